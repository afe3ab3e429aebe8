"""Tests of core.sampling: margins, determinism, margin reduction, empty classes, counts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import disk

from core.sampling import SampledPoints, _dilate_disk, _shrink, sample_points


def blob_mask(shape=(120, 160), seed=0, fraction=0.3) -> np.ndarray:
    smooth = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), 6)
    return smooth > np.quantile(smooth, 1 - fraction)


def check_margins(truth: np.ndarray, points: SampledPoints) -> None:
    """Positives lie farther than the margin from any background pixel, negatives from any structure."""
    to_background = ndi.distance_transform_edt(truth)  # 0 on background
    to_structure = ndi.distance_transform_edt(~truth)  # 0 on structure
    px, py = points.positive_xy[:, 0], points.positive_xy[:, 1]
    nx, ny = points.negative_xy[:, 0], points.negative_xy[:, 1]
    assert (to_background[py, px] > points.margin_px).all()
    assert (to_structure[ny, nx] > points.margin_px).all()


def test_points_respect_the_margin_and_counts():
    truth = blob_mask()
    points = sample_points(truth, 25, 30, margin_px=5, seed=0)
    assert points.margin_px == 5
    assert points.positive_xy.shape == (25, 2) and points.negative_xy.shape == (30, 2)
    assert points.positive_xy.dtype == np.int64 and points.negative_xy.dtype == np.int64
    check_margins(truth, points)
    # x is the column, y the row: all coordinates inside the (Y, X) = (120, 160) mask
    assert points.positive_xy[:, 0].max() < 160 and points.positive_xy[:, 1].max() < 120
    # without replacement: no pixel twice
    assert len({tuple(p) for p in points.positive_xy}) == 25
    assert len({tuple(p) for p in points.negative_xy}) == 30


def test_candidates_equal_scipy_morphology_with_a_disk():
    truth = blob_mask(seed=4)
    truth[:, :3] = True  # structure touching the image edge
    for radius in (1, 2, 3, 5, 8):
        footprint = disk(radius).astype(bool)
        np.testing.assert_array_equal(_dilate_disk(truth, radius), ndi.binary_dilation(truth, footprint))
        np.testing.assert_array_equal(
            _shrink(truth, radius), ndi.binary_erosion(truth, footprint, border_value=1)
        )
        np.testing.assert_array_equal(_shrink(~truth, radius), ~ndi.binary_dilation(truth, footprint))
        # and the distance form used in the module docstring
        np.testing.assert_array_equal(_shrink(truth, radius), ndi.distance_transform_edt(truth) > radius)


def test_same_seed_same_points_other_seed_other_points():
    truth = blob_mask(seed=1)
    a = sample_points(truth, seed=7)
    b = sample_points(truth, seed=7)
    c = sample_points(truth, seed=8)
    np.testing.assert_array_equal(a.positive_xy, b.positive_xy)
    np.testing.assert_array_equal(a.negative_xy, b.negative_xy)
    assert not np.array_equal(a.positive_xy, c.positive_xy)
    assert not np.array_equal(a.negative_xy, c.negative_xy)


def test_points_are_spread_uniformly_over_the_candidates():
    # 20 x 20 square, margin 2 -> 16 x 16 = 256 candidates; 1000 draws of 4 points over many seeds
    # should hit both halves of the eroded square about equally.
    truth = np.zeros((40, 40), bool)
    truth[10:30, 10:30] = True
    left = 0
    for seed in range(250):
        xy = sample_points(truth, 4, 0, margin_px=2, seed=seed).positive_xy
        assert ((xy >= 12) & (xy <= 27)).all()  # inside rows/cols 12..27
        left += int((xy[:, 0] < 20).sum())
    assert 430 < left < 570  # 500 expected, binomial sd ~16


def test_margin_is_halved_on_a_thin_structure():
    # A 5 px wide stripe (columns 20-24): distance to the background is 1 2 3 2 1 across it, so a
    # margin of 5 leaves no candidate, 2 leaves column 22 (60 px >= 10 wanted). Sequence 5 -> 2.
    truth = np.zeros((60, 60), bool)
    truth[:, 20:25] = True
    points = sample_points(truth, 10, 10, margin_px=5, seed=0)
    assert points.margin_px == 2
    assert points.positive_xy.shape == (10, 2)
    assert set(points.positive_xy[:, 0].tolist()) == {22}
    # the one margin also applies to the negatives: they may now be 3 px from the stripe
    check_margins(truth, points)
    # 3 px stripe (1 2 1): 5 -> 2 -> 1, the middle column
    truth = np.zeros((60, 60), bool)
    truth[:, 20:23] = True
    points = sample_points(truth, 10, 10, margin_px=5, seed=0)
    assert points.margin_px == 1 and set(points.positive_xy[:, 0].tolist()) == {21}
    # a 1 px line: only margin 0 leaves candidates
    line = np.zeros((60, 60), bool)
    line[30, 10:50] = True
    points = sample_points(line, 10, 10, margin_px=5, seed=0)
    assert points.margin_px == 0
    assert (points.positive_xy[:, 1] == 30).all()
    check_margins(line, points)


def test_too_few_candidates_reduces_margin_then_returns_all():
    truth = np.zeros((30, 30), bool)
    truth[10:13, 10:13] = True  # 9 pixels; its 1-px-margin core is the single centre pixel
    points = sample_points(truth, 25, 25, margin_px=4, seed=0)
    assert points.margin_px == 0
    assert points.positive_xy.shape == (9, 2)  # all of them
    assert sorted(map(tuple, points.positive_xy)) == [(x, y) for x in range(10, 13) for y in range(10, 13)]
    assert points.negative_xy.shape == (25, 2)
    # asking for exactly one point: the centre pixel satisfies margin 1 (4 -> 2 -> 1)
    one = sample_points(truth, 1, 0, margin_px=4, seed=0)
    assert one.margin_px == 1 and one.positive_xy.tolist() == [[11, 11]]


def test_empty_structure_gives_no_positives_and_keeps_the_margin():
    truth = np.zeros((50, 50), bool)
    points = sample_points(truth, 25, 25, margin_px=5, seed=0)
    assert points.positive_xy.shape == (0, 2) and points.positive_xy.dtype == np.int64
    assert points.negative_xy.shape == (25, 2)
    assert points.margin_px == 5
    full = sample_points(np.ones((50, 50), bool), 5, 5, margin_px=3, seed=0)
    assert full.positive_xy.shape == (5, 2) and full.negative_xy.shape == (0, 2)
    assert full.margin_px == 3  # the image edge is not a boundary


def test_zero_requested_and_bad_arguments():
    truth = blob_mask()
    points = sample_points(truth, 0, 3, margin_px=5, seed=0)
    assert points.positive_xy.shape == (0, 2) and points.negative_xy.shape == (3, 2)
    with pytest.raises(ValueError, match="2-D"):
        sample_points(np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError, match="margin_px"):
        sample_points(truth, margin_px=-1)


def test_large_slice():
    # 3000 x 3000 like the largest thesis slices: the fast path end to end (no timing check).
    truth = np.zeros((3000, 3000), bool)
    truth[500:2500:7, :] = True  # 1 px lines every 7 rows
    truth[1000:1400, 1000:1400] = True  # one thick block: margin-5 positives exist
    points = sample_points(truth, 25, 25, margin_px=5, seed=0)
    assert points.margin_px == 5
    assert points.positive_xy.shape == (25, 2) and points.negative_xy.shape == (25, 2)
    # check each point's disk of radius 5 (cheaper than distance transforms of the whole slice)
    footprint = disk(5).astype(bool)
    for xy, inside in ((points.positive_xy, True), (points.negative_xy, False)):
        for x, y in xy:
            # the disk clipped to the image (the image edge is not a boundary)
            y0, x0 = max(y - 5, 0), max(x - 5, 0)
            window = truth[y0 : y + 6, x0 : x + 6]
            near = footprint[y0 - (y - 5) :, x0 - (x - 5) :][: window.shape[0], : window.shape[1]]
            assert (window[near] == inside).all()
