"""Tests of core.metrics: hand-computed Dice/IoU/HD95, empty-mask conventions, feature-space scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from core.metrics import (
    SegmentationScores,
    dice,
    hd95,
    iou,
    knn_accuracy,
    patch_labels,
    segmentation_scores,
    silhouette,
    summarize,
)


def square(shape=(20, 30), top=3, left=4, size=10) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top : top + size, left : left + size] = True
    return mask


def pooled_hd95_brute_force(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0)) -> float:
    """MedPy's definition written out: EDT distances between 4-connected boundaries, pooled, 95th pct."""

    def border(m):
        return m & ~ndi.binary_erosion(m, structure=ndi.generate_binary_structure(2, 1))

    ba, bb = border(a), border(b)
    d_ab = ndi.distance_transform_edt(~bb, sampling=spacing)[ba]
    d_ba = ndi.distance_transform_edt(~ba, sampling=spacing)[bb]
    return float(np.percentile(np.hstack((d_ab, d_ba)), 95))


def pooled_hd95_all_pairs(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0)) -> float:
    """Same definition by explicit all-pairs distances (no distance transform, no KD-tree)."""

    def border_points(m):
        inner = np.zeros_like(m)
        inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        return np.argwhere(m & ~inner) * np.asarray(spacing)

    pa, pb = border_points(a), border_points(b)
    dist = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.hstack((dist.min(1), dist.min(0))), 95))


# --- Dice / IoU -------------------------------------------------------------------------------


def test_overlapping_squares_offset_by_five():
    a = square(left=4)
    b = square(left=9)  # 10 x 10 squares, 5 columns in common -> 50 px
    assert dice(a, b) == pytest.approx(2 * 50 / 200)
    assert iou(a, b) == pytest.approx(50 / 150)


def test_dice_iou_symmetric_bounded_and_one_for_identical_masks():
    rng = np.random.default_rng(3)
    for _ in range(5):
        a = rng.random((15, 17)) > 0.6
        b = rng.random((15, 17)) > 0.4
        assert dice(a, b) == dice(b, a)
        assert iou(a, b) == iou(b, a)
        assert 0.0 <= iou(a, b) <= dice(a, b) <= 1.0
        d = dice(a, b)
        assert iou(a, b) == pytest.approx(d / (2 - d))  # the two are tied by this identity
        assert dice(a, a) == 1.0 and iou(a, a) == 1.0
    disjoint = square(left=0, size=5), square(left=20, size=5)
    assert dice(*disjoint) == 0.0 and iou(*disjoint) == 0.0


def test_nonzero_values_count_as_structure():
    labels = np.zeros((4, 4), np.uint16)
    labels[:2, :2] = 255
    assert dice(labels, labels > 0) == 1.0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((4, 4)), np.zeros((4, 5)))


# --- HD95 -------------------------------------------------------------------------------------


def test_hd95_square_shifted_by_three_columns_is_3():
    # 10 x 10 square A vs the same shifted 3 px right (B). Boundary of A: 36 px. Distances to B's
    # boundary: top and bottom rows 3, 2, 1 and 7 zeros each (B's top/bottom rows start 3 px right);
    # left column (8 px) 3 each (B's left column); right column (8 px, rows 1..8, inside B)
    # min(3 to B's right column, r to B's top row, 9 - r to its bottom row) = 1 2 3 3 3 3 2 1.
    # B -> A is the mirror image. Pooled 72 values: 28 x 0, 8 x 1, 8 x 2, 28 x 3; the 95th
    # percentile (sorted index 0.95 * 71 = 67.45) lies among the 3s (indices 44-71): 3.0.
    a = square(left=4)
    b = square(left=7)
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(b, a) == pytest.approx(3.0)
    assert pooled_hd95_brute_force(a, b) == pytest.approx(3.0)


def test_hd95_anisotropic_spacing_by_hand():
    a = square(top=3)
    down = square(top=6)  # shifted 3 rows down
    assert hd95(a, down) == pytest.approx(3.0)
    # Rows 2 units long (spacing (2, 1)). A -> B: top row 10 x 6 (3 rows away); bottom row (inside B)
    # 0 at both corners and min(6, c, 9 - c) = 1 2 3 4 4 3 2 1 between; left and right columns:
    # rows 4, 5 are 2 and 1 rows above B (4 and 2 units), rows 6..11 lie on B's columns (0).
    # Per direction 14 x 0, 2 x 1, 4 x 2, 2 x 3, 4 x 4, 10 x 6; pooled, indices 52-71 are 6s: 6.0.
    assert hd95(a, down, spacing=(2.0, 1.0)) == pytest.approx(6.0)
    assert pooled_hd95_brute_force(a, down, spacing=(2.0, 1.0)) == pytest.approx(6.0)
    # Only the axis of the shift matters: the same spacing on a column shift leaves 3.0,
    # doubling the column spacing instead gives 6.0 again.
    right = square(left=7)
    assert hd95(square(left=4), right, spacing=(2.0, 1.0)) == pytest.approx(3.0)
    assert hd95(square(left=4), right, spacing=(1.0, 2.0)) == pytest.approx(6.0)
    # isotropic spacing scales the result
    assert hd95(a, down, spacing=(0.5, 0.5)) == pytest.approx(1.5)


def test_hd95_matches_medpy_definition_on_random_masks():
    rng = np.random.default_rng(0)
    for trial in range(6):
        a = ndi.gaussian_filter(rng.random((40, 50)), 2) > 0.5
        b = ndi.gaussian_filter(rng.random((40, 50)), 2) > 0.52
        if not (a.any() and b.any()):
            continue
        spacing = [(1.0, 1.0), (2.0, 1.0), (0.3, 0.7)][trial % 3]
        expected = pooled_hd95_all_pairs(a, b, spacing)
        assert pooled_hd95_brute_force(a, b, spacing) == pytest.approx(expected)
        assert hd95(a, b, spacing) == pytest.approx(expected)


def test_hd95_counts_image_edge_pixels_as_boundary():
    # A mask filling the left half: its right edge AND its pixels on the image border are boundary
    # (MedPy erodes with a background outside the image).
    a = np.zeros((10, 10), bool)
    a[:, :5] = True
    b = a.copy()
    b[:, 5] = True  # one column wider
    assert hd95(a, b) == pytest.approx(pooled_hd95_all_pairs(a, b))
    assert hd95(a, a) == 0.0


def test_hd95_rejects_bad_spacing():
    with pytest.raises(ValueError, match="spacing"):
        hd95(square(), square(), spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(square(), square(), spacing=(1.0,))


# --- empty masks ------------------------------------------------------------------------------


def test_both_empty_is_a_perfect_score():
    empty = np.zeros((6, 8), bool)
    assert dice(empty, empty) == 1.0
    assert iou(empty, empty) == 1.0
    assert hd95(empty, empty) == 0.0
    assert segmentation_scores(empty, empty, (0.5, 0.5)) == SegmentationScores(1.0, 1.0, 0.0, 0.0)


def test_one_empty_gives_zero_overlap_and_the_slice_diagonal():
    empty = np.zeros((6, 8), bool)
    full = square(shape=(6, 8), top=1, left=1, size=3)
    for pred, truth in ((empty, full), (full, empty)):
        assert dice(pred, truth) == 0.0
        assert iou(pred, truth) == 0.0
        assert hd95(pred, truth) == pytest.approx(10.0)  # sqrt(6² + 8²)
        assert hd95(pred, truth, spacing=(2.0, 0.5)) == pytest.approx(math.hypot(12.0, 4.0))
    scores = segmentation_scores(empty, full, pixel_size_um=(0.5, 0.5))
    assert scores.hd95_px == pytest.approx(10.0) and scores.hd95_um == pytest.approx(5.0)


# --- segmentation_scores ----------------------------------------------------------------------


def test_segmentation_scores_bundle_and_micrometres():
    a, b = square(left=4), square(left=7)
    s = segmentation_scores(a, b)
    assert s.dice == pytest.approx(2 * 70 / 200)
    assert s.iou == pytest.approx(70 / 130)
    assert s.hd95_px == pytest.approx(3.0)
    assert s.hd95_um is None
    assert segmentation_scores(a, b, pixel_size_um=(0.5, 0.5)).hd95_um == pytest.approx(1.5)
    # anisotropic pixel: recomputed, not scaled (x 2 µm along the shift -> 6.0, see above)
    aniso = segmentation_scores(a, b, pixel_size_um=(1.0, 2.0))
    assert aniso.hd95_um == pytest.approx(6.0) and aniso.hd95_px == pytest.approx(3.0)
    assert s.as_dict() == {"dice": s.dice, "iou": s.iou, "hd95_px": s.hd95_px, "hd95_um": None}


# --- feature space ----------------------------------------------------------------------------


def two_clusters(n=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centre = np.zeros(d)
    centre[0] = 10.0
    x = np.vstack([rng.normal(size=(n, d)) + centre, rng.normal(size=(n, d)) - centre])
    labels = np.repeat([True, False], n)
    return x.astype(np.float32), labels


def test_silhouette_separated_clusters_high_shuffled_near_zero_single_class_nan():
    x, labels = two_clusters()
    assert silhouette(x, labels) > 0.8
    assert silhouette(x, labels, metric="euclidean") > 0.6  # centres 20 apart, spread ~5.7 within
    shuffled = np.random.default_rng(1).permutation(labels)
    assert abs(silhouette(x, shuffled)) < 0.05
    assert math.isnan(silhouette(x, np.ones(len(x), bool)))


def test_silhouette_subsample_is_seeded():
    x, labels = two_clusters(n=300)
    shuffled = np.random.default_rng(2).permutation(labels)
    a = silhouette(x, shuffled, max_samples=100, seed=5)
    assert a == silhouette(x, shuffled, max_samples=100, seed=5)
    assert a != silhouette(x, shuffled, max_samples=100, seed=6)
    assert abs(silhouette(x.astype(np.float16), labels, max_samples=100) - silhouette(x, labels, max_samples=100)) < 1e-3


def test_knn_accuracy_separable_is_one():
    x, labels = two_clusters(n=50)
    assert knn_accuracy(x, labels) == 1.0
    assert knn_accuracy(x, labels.astype(int), metric="euclidean") == 1.0


def test_knn_accuracy_hand_built_line():
    # Points on a line (euclidean), k = 2. Labels:       0    0    0    1    1    0
    x = np.array([[0.0], [1.0], [2.0], [3.1], [4.3], [5.6]])
    labels = np.array([0, 0, 0, 1, 1, 0])
    # nearest others: p0 -> p1,p2 (0,0) hit;  p1 -> p0,p2 (0,0) hit;  p2 -> p1,p3 (0,1) tie -> nearest
    # p1 (d 1.0 < 1.1) says 0: hit;  p3 -> p2,p4 (0,1) tie -> nearest p2 (1.1 < 1.2) says 0: miss;
    # p4 -> p3,p5 (1,0) tie -> nearest p3 (1.2 < 1.3) says 1: hit;  p5 -> p4,p3 (1,1): miss. 4 / 6.
    assert knn_accuracy(x, labels, k=2, metric="euclidean") == pytest.approx(4 / 6)
    # (breaking ties towards the smallest label instead would give 3 / 6: p4 would miss.)
    # k = 1 is plain leave-one-out 1-NN: p3's nearest p2 (miss), p5's nearest p4 (miss) -> 4 / 6.
    assert knn_accuracy(x, labels, k=1, metric="euclidean") == pytest.approx(4 / 6)


def test_knn_accuracy_excludes_the_sample_itself_even_with_duplicates():
    # Two identical points with different labels: each one's only other neighbour disagrees.
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.1]])
    labels = np.array([1, 0, 0, 0])
    # k = 1: p0 -> p1 (0) miss; p1 -> p0 (1) miss; p2 -> p3 hit; p3 -> p2 hit.
    assert knn_accuracy(x, labels, k=1, metric="euclidean") == pytest.approx(0.5)


def test_knn_accuracy_caps_k_and_handles_tiny_input():
    x = np.array([[0.0], [1.0], [5.0]])
    assert knn_accuracy(x, np.array([0, 0, 1]), k=10, metric="euclidean") == pytest.approx(
        knn_accuracy(x, np.array([0, 0, 1]), k=2, metric="euclidean")
    )
    assert math.isnan(knn_accuracy(x[:1], np.array([1])))
    with pytest.raises(ValueError, match="labels"):
        knn_accuracy(x, np.array([0, 1]))


def test_patch_labels_28x28_with_14_px_patches():
    mask = np.zeros((28, 28), bool)
    mask[:14, :8] = True  # patch (0, 0): 14 x 8 = 112 of 196 px > 50 % -> structure
    mask[8:14, 14:] = True  # patch (0, 1): 6 x 14 = 84 px < 50 %
    mask[14:, 14:21] = True  # patch (1, 1): 14 x 7 = 98 px, exactly 50 %, not more -> background
    labels = patch_labels(mask, (2, 2))
    assert labels.dtype == bool and labels.shape == (2, 2)
    assert labels.tolist() == [[True, False], [False, False]]
    mask[14, 21] = True  # 99 px -> structure
    assert patch_labels(mask, (2, 2)).tolist() == [[True, False], [False, True]]


def test_patch_labels_size_not_a_multiple_of_the_grid():
    # 10 rows onto 3 patch rows: floor(r * 3 / 10) -> rows 0-3 | 4-6 | 7-9 (4, 3, 3 px);
    # 7 columns onto 2: floor(c * 2 / 7) -> cols 0-3 | 4-6 (4, 3 px).
    mask = np.zeros((10, 7), bool)
    mask[4:7, 4:6] = True  # patch (1, 1) is 3 x 3 = 9 px, 6 of them set -> structure
    mask[0:2, 0:4] = True  # patch (0, 0) is 4 x 4 = 16 px, 8 set = 50 % -> background
    mask[7:10, 0:3] = True  # patch (2, 0) is 3 x 4 = 12 px, 9 set -> structure
    assert patch_labels(mask, (3, 2)).tolist() == [[False, False], [False, True], [True, False]]
    # agrees with the area-averaged resize when the size is a multiple of the grid
    rng = np.random.default_rng(0)
    m = rng.random((70 * 3, 70 * 3)) > 0.5
    expected = m.reshape(70, 3, 70, 3).mean(axis=(1, 3)) > 0.5
    np.testing.assert_array_equal(patch_labels(m, (70, 70)), expected)
    with pytest.raises(ValueError, match="grid"):
        patch_labels(np.zeros((5, 5), bool), (7, 7))


def test_summarize_ignores_nan():
    assert summarize([1.0, 3.0, float("nan")]) == (2.0, 1.0)
    assert summarize([0.5]) == (0.5, 0.0)
    mean, std = summarize([float("nan")])
    assert math.isnan(mean) and math.isnan(std)
    mean, std = summarize([])
    assert math.isnan(mean) and math.isnan(std)
