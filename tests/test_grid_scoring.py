import numpy as np
import pytest

from core.config import Scoring
from core.grid import grid_to_pixels_nearest, pixels_to_grid_mean, points_to_patches, upsample_bilinear
from core.scoring import class_similarity, kmeans_prototypes, l2_normalize, mean_prototype, score_embeddings


def test_points_map_to_the_patch_that_contains_them():
    # A 140 x 280 slice on a 10 x 20 grid: 14-px patches. (x=13, y=0) is in patch (0, 0); (x=14, y=27) in (1, 1).
    cells = points_to_patches(np.array([[13, 0], [14, 27], [279, 139]]), (140, 280), (10, 20))
    assert cells.tolist() == [[0, 0], [1, 1], [9, 19]]


def test_points_map_through_a_resize():
    # A 1000-px wide slice resized to 980 px and cut into 70 patches: x=500 -> patch floor(500.5*70/1000)=35.
    assert points_to_patches(np.array([[500, 0]]), (1000, 1000), (70, 70))[0].tolist() == [0, 35]


def test_nearest_resize_agrees_with_point_mapping():
    rng = np.random.default_rng(1)
    grid = rng.normal(size=(7, 5))
    full = grid_to_pixels_nearest(grid, (30, 23))
    ys, xs = np.mgrid[0:30, 0:23]
    cells = points_to_patches(np.stack([xs.ravel(), ys.ravel()], 1), (30, 23), (7, 5))
    assert np.array_equal(full.ravel(), grid[cells[:, 0], cells[:, 1]])


def test_bilinear_upsampling_of_constant_and_ramp():
    assert np.allclose(upsample_bilinear(np.full((4, 4), 0.3), (40, 40)), 0.3)
    ramp = np.tile(np.arange(4, dtype=np.float32), (4, 1))  # columns 0..3 at patch centres 5, 15, 25, 35
    up = upsample_bilinear(ramp, (40, 40))
    assert up[0, 10] == pytest.approx(0.55)  # pixel 10 lies 0.55 of the way from centre 4.5 to 14.5
    assert up[0, 0] == pytest.approx(0.0) and up[0, 39] == pytest.approx(3.0)


def test_grid_mean_of_blocks():
    image = np.zeros((28, 28))
    image[:14, :14] = 1.0
    assert pixels_to_grid_mean(image, (2, 2)).tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_mean_prototype_is_unit_mean_of_unit_vectors():
    embeddings = np.array([[2.0, 0.0], [0.0, 5.0]])
    proto = mean_prototype(embeddings)
    assert np.allclose(proto, [[np.sqrt(0.5), np.sqrt(0.5)]])


def test_score_is_cos_positive_minus_lambda_cos_negative():
    # Patch along x; positive prototype at 60 degrees, negative along y: S = cos60 - 0.8*cos90 = 0.5.
    embeddings = np.array([[[3.0, 0.0], [0.0, 1.0]]])
    positive = np.array([[0.5, np.sqrt(3) / 2]])
    negative = np.array([[0.0, 1.0]])
    scores = score_embeddings(embeddings, positive, negative, negative_weight=0.8)
    assert scores.shape == (1, 2)
    assert scores[0, 0] == pytest.approx(0.5)
    assert scores[0, 1] == pytest.approx(np.sqrt(3) / 2 - 0.8)


def test_positive_only_scoring():
    embeddings = np.array([[[1.0, 0.0]]])
    scores = score_embeddings(embeddings, np.array([[1.0, 0.0]]), None)
    assert scores[0, 0] == pytest.approx(1.0)


def test_knn_scoring_averages_the_k_nearest_examples():
    examples = l2_normalize(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    value = class_similarity(np.array([[1.0, 0.0]]), examples, Scoring.KNN, knn_k=2)
    assert value[0] == pytest.approx((1.0 + 0.0) / 2)


def test_multi_prototypes_find_two_clusters():
    rng = np.random.default_rng(0)
    cluster_a = np.array([1.0, 0.0, 0.0]) + rng.normal(scale=0.05, size=(20, 3))
    cluster_b = np.array([0.0, 1.0, 0.0]) + rng.normal(scale=0.05, size=(20, 3))
    centres = kmeans_prototypes(np.concatenate([cluster_a, cluster_b]), 2, seed=0)
    assert centres.shape == (2, 3)
    best = np.sort(np.argmax(np.abs(centres), axis=1))
    assert best.tolist() == [0, 1]
    # A patch identical to cluster b scores ~1 with 'multi' but only ~0.7 with the single mean prototype.
    probe = np.array([[0.0, 1.0, 0.0]])
    assert class_similarity(probe, centres, Scoring.MULTI)[0] > 0.98
    assert class_similarity(probe, mean_prototype(np.concatenate([cluster_a, cluster_b])), Scoring.MEAN)[0] < 0.8
