"""The prototype pipeline on hand-made embeddings and small synthetic stacks."""

from dataclasses import dataclass

import numpy as np
import pytest
import tifffile

from core.batch import MaskVolume, apply_prototype
from core.window import z_smoothed
from core.config import PipelineConfig
from core.features.embedding import SliceEmbedder
from core.features.embedding_cache import EmbeddingCache
from core.errors import PrototypeError
from core.io import VoxelSize, open_stack
from core.pipeline import Scorer, build_prototype, build_scorer, calibrate_on_points
from core.prototypes import PointSet, load_prototype, save_prototype
from core.thresholds import ThresholdSpec


@dataclass(frozen=True)
class _Spec:
    name: str = "handmade"
    family: str = "test"
    patch_size: int = 14


class HandmadeBackbone:
    """Embeds a (S, S) image as a (S/14, S/14, 2) grid: (patch mean, 1 - patch mean). Plumbing only."""

    spec = _Spec()
    weights_id = "none"
    is_random = False
    patch_size = 14
    embed_dim = 2

    def __init__(self):
        self.calls = 0

    def label(self):
        return "hand-made test features"

    def signature(self):
        return "handmade-v1"

    def embed(self, image01):
        self.calls += 1
        h, w = image01.shape[0] // 14, image01.shape[1] // 14
        means = image01[: h * 14, : w * 14].reshape(h, 14, w, 14).mean(axis=(1, 3))
        return np.stack([means, 1.0 - means], axis=-1).astype(np.float32)


def _write_stack(path, volume, voxel=(2.0, 0.5, 0.5)):
    tifffile.imwrite(path, volume, imagej=True, resolution=(1 / voxel[2], 1 / voxel[1]),
                     metadata={"axes": "ZYX", "spacing": voxel[0], "unit": "um"})
    return path


@pytest.fixture
def square_stack(tmp_path):
    """4 slices of 140 x 140 px: a bright 70 x 70 square (top-left quarter) on a dark background."""
    volume = np.full((4, 140, 140), 100, np.uint16)
    volume[:, :70, :70] = 1000
    return _write_stack(tmp_path / "squares.tif", volume)


def _embedder(path, config, backbone=None, cache=None):
    stack = open_stack(path)
    return SliceEmbedder(stack, 0, backbone or HandmadeBackbone(), config.preprocess, cache=cache)


def test_thesis_mode_keeps_top_ten_percent_of_patches(square_stack):
    config = PipelineConfig.thesis().with_options(image_size=140)  # a 10 x 10 patch grid
    embedder = _embedder(square_stack, config)
    points = PointSet(np.array([[10, 10, 0]]), np.array([[120, 120, 0]]))
    prototype = build_prototype(embedder, points, config)
    result = Scorer(prototype).segment(embedder, 1)
    # The square holds 25 of 100 patches, all with the same top score; top:10 keeps exactly 10 of them,
    # each a 14 x 14 block of the 140 x 140 slice.
    assert result.score_map.shape == (10, 10)
    assert result.mask.sum() == 10 * 14 * 14
    assert result.mask[:70, :70].sum() == result.mask.sum()


def test_score_threshold_recovers_the_square_exactly(square_stack):
    config = PipelineConfig.thesis().with_options(image_size=140, threshold="score:0")
    embedder = _embedder(square_stack, config)
    prototype = build_prototype(embedder, PointSet(np.array([[10, 10, 0]]), np.array([[120, 120, 0]])), config)
    mask = Scorer(prototype).segment(embedder, 2).mask
    expected = np.zeros((140, 140), bool)
    expected[:70, :70] = True
    assert np.array_equal(mask, expected)


def test_calibrated_threshold_keeps_area_constant_when_the_share_changes(tmp_path):
    # Slice 0: a 40 x 40 square on 140 x 140 (8 %); slice 1: an 80 x 80 square (33 %). A top-% rule would give
    # both the same area; the calibrated absolute threshold follows the structure.
    volume = np.full((2, 140, 140), 100, np.uint16)
    volume[0, 28:68, 28:68] = 1000
    volume[1, 28:108, 28:108] = 1000
    path = _write_stack(tmp_path / "share.tif", volume)
    config = PipelineConfig.best().with_options(pixel_classifier="none", image_size=140, normalization="stack")
    embedder = _embedder(path, config)
    prototype = build_prototype(embedder, PointSet(np.array([[45, 45, 0]]), np.array([[120, 120, 0]])), config)
    scorer = Scorer(prototype)
    areas = [scorer.segment(embedder, z).mask.sum() for z in (0, 1)]
    assert abs(areas[0] - 40 * 40) < 0.15 * 40 * 40
    assert abs(areas[1] - 80 * 80) < 0.1 * 80 * 80
    top = [Scorer(prototype, prototype.config.with_options(threshold="top:10")).segment(embedder, z).mask.sum() for z in (0, 1)]
    assert top[0] == top[1]


def test_bilinear_upsampling_makes_a_diagonal_edge_sub_patch(tmp_path):
    yy, xx = np.mgrid[:140, :140]
    volume = np.where(xx + yy < 140, 1000, 100).astype(np.uint16)[None].repeat(2, axis=0)
    path = _write_stack(tmp_path / "diagonal.tif", volume)
    truth = (xx + yy < 140)
    points = PointSet(np.array([[10, 10, 0]]), np.array([[130, 130, 0]]))
    masks = {}
    for upsampling in ("nearest", "bilinear"):
        config = PipelineConfig.thesis().with_options(image_size=140, upsampling=upsampling, threshold="calibrated")
        embedder = _embedder(path, config)
        prototype = build_prototype(embedder, points, config)
        masks[upsampling] = Scorer(prototype).segment(embedder, 1).mask
    errors = {k: int((m != truth).sum()) for k, m in masks.items()}
    # Nearest: 14 px staircase along the diagonal; bilinear: the edge is placed within a few pixels.
    assert errors["bilinear"] < errors["nearest"] / 2
    staircase_rows = {tuple(np.flatnonzero(row)) for row in masks["nearest"][::1]}
    assert len(staircase_rows) <= 11  # at most one distinct row pattern per patch row (+ empty)
    assert len({int(row.sum()) for row in masks["bilinear"]}) > 40  # the boundary moves pixel by pixel


def test_pixel_classifier_follows_thin_structures(tmp_path):
    # Thin bright lines (3 px) every 20 px: far below the 14 px patch size.
    volume = np.full((2, 140, 140), 100, np.uint16)
    volume[:, :, 10::20] = 1000
    volume[:, :, 11::20] = 1000
    volume[:, :, 12::20] = 1000
    path = _write_stack(tmp_path / "lines.tif", volume)
    truth = volume[1] > 500
    pos = [[11, y, 0] for y in (10, 50, 90)] + [[31, 70, 0]]
    neg = [[20, y, 0] for y in (10, 50, 90)] + [[45, 70, 0]]
    points = PointSet(np.array(pos), np.array(neg))
    best = PipelineConfig.best().with_options(image_size=140, augment_radius=0)
    embedder = _embedder(path, best)
    mask = Scorer(build_prototype(embedder, points, best)).segment(embedder, 1).mask
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9


def test_prototype_file_round_trip_gives_identical_masks(square_stack, tmp_path):
    config = PipelineConfig.best().with_options(image_size=140)
    embedder = _embedder(square_stack, config)
    prototype = build_prototype(embedder, PointSet(np.array([[10, 10, 0], [40, 60, 1]]), np.array([[120, 120, 0]])), config)
    path = save_prototype(prototype, tmp_path / "p.npz")
    loaded = load_prototype(path, backbone="handmade", embed_dim=2)
    assert loaded.pixel_positive_examples.shape == prototype.pixel_positive_examples.shape
    original = Scorer(prototype).segment(embedder, 3).mask
    again = Scorer(loaded).segment(embedder, 3).mask
    assert np.array_equal(original, again)


def test_best_mode_needs_negative_points(square_stack):
    config = PipelineConfig.best().with_options(image_size=140)
    with pytest.raises(PrototypeError, match="needs negative points"):
        build_prototype(_embedder(square_stack, config), PointSet(np.array([[10, 10, 0]])), config)


def test_points_on_missing_slices_are_rejected(square_stack):
    config = PipelineConfig.thesis().with_options(image_size=140)
    with pytest.raises(PrototypeError, match="slices 0-3"):
        build_prototype(_embedder(square_stack, config), PointSet(np.array([[10, 10, 7]])), config)


def test_batch_uses_the_cache_and_reports_areas(square_stack, tmp_path):
    config = PipelineConfig.thesis().with_options(image_size=140, threshold="score:0")
    backbone = HandmadeBackbone()
    cache = EmbeddingCache(tmp_path / "cache")
    embedder = _embedder(square_stack, config, backbone, cache)
    prototype = build_prototype(embedder, PointSet(np.array([[10, 10, 0]]), np.array([[120, 120, 0]])), config)
    volume = MaskVolume([3, 1, 2], (140, 140), directory=tmp_path)
    events = []
    result = apply_prototype(embedder, prototype, [3, 1, 2], volume, voxel_size=VoxelSize(0.5, 0.5, 2.0),
                             on_progress=lambda phase, done, total, eta: events.append((phase, done, total)))
    assert result.area_px == [4900, 4900, 4900]
    assert result.area_um2 == [4900 * 0.25] * 3
    assert result.volume_um3 == pytest.approx(3 * 4900 * 0.25 * 2.0)
    assert volume.array.shape == (3, 140, 140) and set(np.unique(volume.array)) == {0, 255}
    assert ("mask", 3, 3) in events
    assert backbone.calls == 4  # slice 0 for the prototype, then 3, 1 and 2
    # A second run, with a new embedder, embeds nothing: every slice comes from the on-disk cache.
    apply_prototype(_embedder(square_stack, config, backbone, cache), prototype, [0, 1, 2, 3], lambda z, m: None)
    assert backbone.calls == 4
    assert "z,area_px,area_um2,threshold" in result.to_csv()
    volume.close()


def test_batch_cancel_stops_between_slices(square_stack):
    config = PipelineConfig.thesis().with_options(image_size=140)
    embedder = _embedder(square_stack, config)
    prototype = build_prototype(embedder, PointSet(np.array([[10, 10, 0]]), np.array([[120, 120, 0]])), config)
    seen = []
    result = apply_prototype(embedder, prototype, [0, 1, 2, 3], lambda z, m: seen.append(z),
                             should_stop=lambda: len(seen) >= 2)
    assert result.cancelled and seen == [0, 1]


def test_z_smoothing_is_a_gaussian_weighted_mean():
    maps = {0: np.zeros((2, 2)), 1: np.ones((2, 2)), 2: np.full((2, 2), 2.0)}
    smoothed = z_smoothed(maps, 1, 1.0, 3)
    weights = np.exp(-0.5 * np.array([1.0, 0.0, 1.0]))
    assert smoothed[0, 0] == pytest.approx((weights @ np.array([0.0, 1.0, 2.0])) / weights.sum())
    assert np.array_equal(z_smoothed(maps, 1, 0.0, 3), maps[1])


def test_threshold_override_in_apply(square_stack):
    config = PipelineConfig.thesis().with_options(image_size=140)
    embedder = _embedder(square_stack, config)
    prototype = build_prototype(embedder, PointSet(np.array([[10, 10, 0]]), np.array([[120, 120, 0]])), config)
    result = apply_prototype(embedder, prototype, [0], lambda z, m: None, threshold=ThresholdSpec("top", 25))
    assert result.area_px == [4900]


def test_cleanup_removes_specks_and_small_holes_but_keeps_large_enclosed_regions():
    from core.config import Cleanup
    from core.pipeline import clean_mask

    mask = np.zeros((60, 60), bool)
    mask[5:45, 5:45] = True  # a ring-shaped "vessel loop" enclosing tissue
    mask[12:38, 12:38] = False
    mask[8, 8] = False  # a one-pixel hole in the vessel wall
    mask[55, 55] = True  # an isolated speck
    cleaned = clean_mask(mask, Cleanup(hole_size_px=20, min_size_px=20))
    assert cleaned[8, 8] and not cleaned[55, 55]
    assert not cleaned[25, 25]  # the enclosed 26 x 26 region is not a "small hole"
    assert cleaned.sum() == mask.sum() + 1 - 1


def test_stack_normalisation_keeps_an_empty_slice_empty(tmp_path):
    # Slice 0: a bright square; slice 1: background noise only. Per-slice percentiles stretch slice 1's noise
    # to the full range, so it "contains" structure; stack-wide percentiles keep it dark.
    rng = np.random.default_rng(0)
    volume = (100 + rng.normal(0, 5, (2, 140, 140))).astype(np.uint16)
    volume[0, 28:84, 28:84] = 1000
    path = _write_stack(tmp_path / "empty.tif", volume)
    points = PointSet(np.array([[50, 50, 0]]), np.array([[120, 120, 0]]))
    areas = {}
    for normalization in ("slice", "stack"):
        config = PipelineConfig.thesis().with_options(image_size=140, normalization=normalization, threshold="calibrated",
                                                       upsampling="bilinear")
        embedder = _embedder(path, config)
        areas[normalization] = int(Scorer(build_prototype(embedder, points, config)).segment(embedder, 1).mask.sum())
    assert areas["stack"] == 0
    assert areas["slice"] > 1000


def test_guided_upsampling_follows_image_edges_better_than_bilinear(tmp_path):
    yy, xx = np.mgrid[:140, :140]
    truth = (xx - 0.6 * yy) < 50  # an oblique edge
    volume = np.where(truth, 1000, 100).astype(np.uint16)[None].repeat(2, axis=0)
    path = _write_stack(tmp_path / "oblique.tif", volume)
    points = PointSet(np.array([[5, 10, 0]]), np.array([[130, 10, 0]]))
    errors = {}
    for upsampling in ("bilinear", "guided"):
        config = PipelineConfig.thesis().with_options(image_size=140, upsampling=upsampling, threshold="calibrated")
        embedder = _embedder(path, config)
        mask = Scorer(build_prototype(embedder, points, config)).segment(embedder, 1).mask
        errors[upsampling] = int((mask != truth).sum())
    assert errors["guided"] < errors["bilinear"] / 2  # measured: 10 vs 156 pixels wrong


def test_batch_reads_ims_planes_chunk_wise_and_gives_the_same_masks(tmp_path):
    from helpers_io import write_ims

    # 8 slices of thin lines in an .ims with 4-slice z-chunks: single-plane reads would decompress each
    # chunk once per plane; the batch must read planes through read_slices instead.
    volume = np.full((8, 140, 140), 100, np.uint16)
    volume[:, :, 10::20] = 1000
    volume[:, :, 11::20] = 1000
    volume[3:, 60:80, :] = 1000
    path = write_ims(tmp_path / "lines.ims", volume[None, None], chunks=(4, 32, 32))
    points = PointSet(np.array([[11, 10, 0], [11, 90, 0]]), np.array([[20, 10, 0], [45, 120, 0]]))
    best = PipelineConfig.best().with_options(image_size=140, augment_radius=0)

    def run(memo_slices, config=best):
        embedder = _embedder(path, config)
        embedder.raw_memo_slices = memo_slices
        prototype = build_prototype(embedder, points, config)
        single_reads, group_reads = [], []
        read_slice, read_slices = embedder.stack.read_slice, embedder.stack.read_slices
        embedder.stack.read_slice = lambda z, *a, **k: single_reads.append(z) or read_slice(z, *a, **k)
        embedder.stack.read_slices = lambda zs, *a, **k: group_reads.extend(zs) or read_slices(zs, *a, **k)
        masks = {}
        apply_prototype(embedder, prototype, list(range(8)), masks.__setitem__)
        # The memo holds its own planes, not views that would keep a whole read block alive.
        assert all(plane.base is None or plane.base.nbytes == plane.nbytes for plane in embedder._raw_memo.values())
        return masks, single_reads, group_reads

    masks, single_reads, group_reads = run(memo_slices=4)
    assert single_reads == []
    assert sorted(group_reads) == sorted(list(range(8)) * 2)  # embed phase, then mask phase (no cache here)
    # Without the memo every later use of a plane reads it again, one plane at a time; same masks.
    masks_without_memo, single_reads_without_memo, _ = run(memo_slices=0)
    assert len(single_reads_without_memo) >= 8
    assert masks.keys() == masks_without_memo.keys()
    for z in masks:
        np.testing.assert_array_equal(masks[z], masks_without_memo[z])
    assert masks[5][70].mean() > 0.9 and masks[1][70].mean() < 0.5
    # With z smoothing the score maps of the z neighbours are made first; they are read chunk-wise too.
    smoothed = best.with_options(z_sigma=1)
    masks, single_reads, group_reads = run(memo_slices=4, config=smoothed)
    assert single_reads == [] and sorted(group_reads) == sorted(list(range(8)) * 2)


def test_build_scorer_calibrates_on_the_features_it_already_computed(tmp_path):
    # build_scorer hands the features at the clicked pixels to the calibration; computing them afresh
    # from the slice must give the same threshold.
    volume = np.full((2, 140, 140), 100, np.uint16)
    volume[:, :, 10::20] = 1000
    volume[:, :, 11::20] = 1000
    path = _write_stack(tmp_path / "lines.tif", volume)
    points = PointSet(np.array([[11, 10, 1], [10, 90, 1], [31, 50, 0]]), np.array([[20, 10, 1], [45, 70, 1], [5, 5, 0]]))
    best = PipelineConfig.best().with_options(image_size=140)
    embedder = _embedder(path, best)
    scorer = build_scorer(embedder, points, best)
    fresh = calibrate_on_points(_embedder(path, best), scorer.prototype, Scorer(scorer.prototype))
    assert scorer.prototype.calibrated_threshold == pytest.approx(fresh, abs=1e-6)
    assert np.isfinite(fresh)
