"""Best mode's per-stack statistics: exact for small stacks, a window subsample for large ones, on disk.

Two statistics: the pixel-feature mean and std (`SliceEmbedder.pixel_statistics`) and the stack-wide
intensity range (`stack_intensity_range`). Their rules (`statistics_method`, `range_method`) keep the exact
values for the stacks of docs/RESULTS.md, so those results cannot move; the subsamples are checked against
the exact values on synthetic stacks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

import core.features.embedding as embedding
from core.errors import StackError
from core.features.backbones import load_backbone
from core.features.embedding import (
    EXACT_RANGE_PIXELS,
    EXACT_STATS_PIXELS,
    SliceEmbedder,
    range_cells,
    range_method,
    stack_intensity_range,
    statistics_method,
    window_features,
    window_origins,
)
from core.features.embedding_cache import EmbeddingCache, RangeKey, StatisticsKey
from core.io import open_stack
from core.io.chunks import ZChunkCache
from core.io.ims import ImsStack
from core.pixels import feature_statistics, filter_features
from core.preprocess import PreprocessConfig, normalized_slice, pooled_intensity_range
from helpers_io import write_ims

STACK_NORM = PreprocessConfig(normalization="stack")


def _stack_file(tmp_path, n_z=8, n_y=96, n_x=80, seed=0):
    """(Z, Y, X) uint16: bright stripes and blobs on noise, a little different in every slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n_y, :n_x]
    planes = []
    for z in range(n_z):
        base = 400 + 600 * (np.sin((xx + 3 * z) / 5.0) > 0.7) + 300 * np.exp(-((yy - 40) ** 2 + (xx - 30 - z) ** 2) / 200)
        planes.append(np.clip(base + rng.normal(0, 40, (n_y, n_x)), 0, 65535).astype(np.uint16))
    path = tmp_path / f"stack_{n_z}x{n_y}x{n_x}.tif"
    tifffile.imwrite(path, np.stack(planes), photometric="minisblack")
    return path


def _embedder(path, **kwargs):
    return SliceEmbedder(open_stack(path), 0, load_backbone("filterbank"), STACK_NORM, **kwargs)


def test_the_rule_keeps_the_results_stacks_exact_and_subsamples_large_ones():
    # docs/RESULTS.md: vesselNN 15..25 x 512 x 512, ISBI 30 x 512 x 512, DSB single images up to 1040 x 1388
    for n_slices, shape in [(15, (512, 512)), (25, (512, 512)), (30, (512, 512)), (1, (1040, 1388))]:
        assert statistics_method(n_slices, shape) == f"exact-v1:n{min(8, n_slices)}"
    assert statistics_method(64, (3050, 2933)) == "windows-v1:n8:k4:w160:m16"
    assert statistics_method(8, (1024, 1024)).startswith("windows")  # 8.4 Mpx > 4 Mpx
    assert statistics_method(3, (1024, 1024)).startswith("exact")  # 3 slices of 1 Mpx
    assert statistics_method(8, (32, 32), exact_pixels=8 * 32 * 32).startswith("exact")
    assert statistics_method(8, (32, 32), exact_pixels=8 * 32 * 32 - 1).startswith("windows")
    assert EXACT_STATS_PIXELS == 4 * 2**20


def test_exact_statistics_are_the_pooled_features_of_eight_whole_slices(tmp_path):
    path = _stack_file(tmp_path, n_z=12)
    embedder = _embedder(path)
    mean, std = embedder.pixel_statistics(64)
    z_values = [0, 2, 3, 5, 6, 8, 9, 11]  # linspace(0, 11, 8) rounded
    expected = feature_statistics([filter_features(embedder.normalized(z), 64) for z in z_values])
    np.testing.assert_array_equal(mean, expected[0])
    np.testing.assert_array_equal(std, expected[1])
    assert mean.dtype == np.float32 and mean.shape == (49,)


def test_window_origins_are_spread_inside_the_slice():
    origins = window_origins(32, (1024, 985), 160)
    assert len(set(origins)) == 32
    rows, cols = np.array(origins).T
    assert rows.min() >= 0 and rows.max() <= 1024 - 160 and cols.min() >= 0 and cols.max() <= 985 - 160
    # every quarter of the slice holds some windows
    quarters = {(r >= 432, c >= 412) for r, c in origins}
    assert quarters == {(False, False), (False, True), (True, False), (True, True)}
    assert window_origins(3, (100, 50), 160) == [(0, 0)] * 3  # the window is the whole slice
    # R2 sequence: (0.5 + 0.75488) % 1 = 0.25488 and (0.5 + 0.56984) % 1 = 0.06984 of the free 80 px
    assert window_origins(1, (100, 100), 20) == [(20, 6)]


def test_window_features_inside_a_slice_match_the_whole_slice(tmp_path):
    path = _stack_file(tmp_path, n_z=1, n_y=120, n_x=140)
    with open_stack(path) as stack:
        whole = filter_features(normalized_slice(stack.read_slice(0), STACK_NORM, (300.0, 1300.0)), 512)
        part = window_features(stack, 0, 0, (30, 50), 512, preprocess=STACK_NORM, stack_range=(300.0, 1300.0),
                               window=80, margin=16)
        # a window at the slice's corner keeps its outer sides (the whole slice is cut there too)
        corner = window_features(stack, 0, 0, (0, 0), 512, preprocess=STACK_NORM, stack_range=(300.0, 1300.0),
                                 window=80, margin=16)
    assert part.shape == (48, 48, 49)  # 80 - 2 x 16 on both axes: every side cuts through the slice
    fine = list(range(1 + 8 * 2))  # intensity and the sigma 0.7 and 1.0 features: footprints within the margin
    np.testing.assert_allclose(part[..., fine], whole[46:94, 66:114][..., fine], atol=1e-5)
    assert corner.shape == (64, 64, 49)
    np.testing.assert_allclose(corner[..., fine], whole[:64, :64][..., fine], atol=1e-5)


def test_windows_covering_the_whole_slice_reproduce_the_exact_statistics(tmp_path):
    """At max_side 60 the working slices are 60 x 50: each window (160) is the whole slice, resized as usual."""
    path = _stack_file(tmp_path, n_z=8, n_y=120, n_x=100)
    exact = _embedder(path, stack_range=(300.0, 1300.0))
    exact_stats = exact.pixel_statistics(60)
    sub = _embedder(path, stack_range=(300.0, 1300.0))
    sub.exact_stats_pixels = 0
    sub_stats = sub.pixel_statistics(60)
    np.testing.assert_allclose(sub_stats[0], exact_stats[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sub_stats[1], exact_stats[1], rtol=1e-5, atol=1e-7)


def test_subsampled_statistics_are_close_to_the_exact_ones(tmp_path, monkeypatch):
    path = _stack_file(tmp_path, n_z=8, n_y=400, n_x=360)
    exact = _embedder(path, stack_range=(300.0, 1300.0)).pixel_statistics(512)
    sub_embedder = _embedder(path, stack_range=(300.0, 1300.0))
    sub_embedder.exact_stats_pixels = 0
    calls = []
    real = embedding.window_features

    def counted(stack, z, *args, **kwargs):
        calls.append(z)
        return real(stack, z, *args, **kwargs)

    monkeypatch.setattr(embedding, "window_features", counted)
    sub = sub_embedder.pixel_statistics(512)
    assert sorted(set(calls)) == [0, 1, 2, 3, 4, 5, 6, 7] and len(calls) == 32  # 4 windows in each of 8 slices
    mean_gap = np.abs(sub[0] - exact[0]) / exact[1]
    std_gap = np.abs(sub[1] / exact[1] - 1)
    assert np.median(mean_gap) < 0.1 and np.median(std_gap) < 0.1
    assert not np.array_equal(sub[0], exact[0])  # it is a subsample


def test_statistics_are_stored_next_to_the_embeddings_and_reused(tmp_path, monkeypatch):
    path = _stack_file(tmp_path, n_z=4)
    cache = EmbeddingCache(tmp_path / "cache")
    first = _embedder(path, cache=cache, stack_range=(300.0, 1300.0))
    stats = first.pixel_statistics(64)
    files = list((tmp_path / "cache").glob("*.stats.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["key"]["method"] == "exact-v1:n4" and record["key"]["max_side"] == 64
    assert record["key"]["channel"] == 0 and record["key"]["timepoint"] == 0
    assert record["key"]["filters"].startswith("filterbank-v1:") and "range300,1300" in record["key"]["preprocess"]
    assert len(record["mean"]) == 49

    def no_features(*args, **kwargs):
        raise AssertionError("statistics on disk must not be recomputed")

    second = _embedder(path, cache=cache, stack_range=(300.0, 1300.0))
    monkeypatch.setattr(second, "pixel_filters", no_features)
    again = second.pixel_statistics(64)
    np.testing.assert_array_equal(again[0], stats[0])  # float32 values survive JSON exactly
    np.testing.assert_array_equal(again[1], stats[1])
    with pytest.raises(AssertionError, match="must not be recomputed"):
        second.pixel_statistics(48)  # another working size is another entry


def test_a_damaged_or_foreign_statistics_file_is_a_miss(tmp_path):
    cache = EmbeddingCache(tmp_path)
    key = StatisticsKey("file|1|2|abc", 0, 0, "pre", 1024, "filterbank-v1:x", "exact-v1:n8")
    path = tmp_path / f"{key.digest()}.stats.json"
    for text in ("{not json", json.dumps({"key": {}, "mean": [1], "std": [1]}),
                 json.dumps({"key": json.loads(key.as_json()), "mean": [1, 2], "std": [1]}),
                 json.dumps({"key": json.loads(key.as_json()), "mean": ["a"], "std": [1]})):
        path.write_text(text)
        assert cache.get_statistics(key) is None
    cache.put_statistics(key, np.array([1.5, -2.25], np.float32), np.array([0.1, 3.0], np.float32))
    mean, std = cache.get_statistics(key)
    np.testing.assert_array_equal(mean, np.array([1.5, -2.25], np.float32))
    np.testing.assert_array_equal(std, np.array([0.1, 3.0], np.float32))
    assert cache.clear() == 1 and cache.get_statistics(key) is None


# ---- the stack-wide intensity range ------------------------------------------------------------------


def _todays_range(stack, percentiles=(5.0, 95.0)):
    """The range as stack_intensity_range computed it before windows existed: 16 whole slices, one at a time."""
    n_z = stack.shape[0]
    z_values = np.unique(np.linspace(0, n_z - 1, min(16, n_z)).round().astype(int))
    return pooled_intensity_range([stack.read_slice(int(z), 0) for z in z_values], percentiles)


def _illuminated_planes(n_z, n_y, n_x, seed=0):
    """(Z, Y, X) uint16: blobs under a radial falloff (dim borders) with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n_y, :n_x]
    light = 1 - 0.4 * (((yy - n_y / 2) / n_y) ** 2 + ((xx - n_x / 2) / n_x) ** 2) * 4
    planes = []
    for z in range(n_z):
        blobs = (np.sin(xx / 23.0 + z / 3) * np.sin(yy / 17.0) > 0.6) * 900.0
        planes.append(np.clip(300 + blobs * light + rng.normal(0, 50, (n_y, n_x)), 0, 65535).astype(np.uint16))
    return np.stack(planes)


def test_the_range_rule_keeps_the_results_stacks_exact_and_windows_large_ones():
    # docs/RESULTS.md: vesselNN 14..25 x 512 x 512, ISBI 30 x 512 x 512, DSB single images up to 1040 x 1388
    for n_slices, shape in [(14, (512, 512)), (25, (512, 512)), (30, (512, 512)), (1, (1040, 1388))]:
        assert range_method(n_slices, shape) == f"exact-v1:n{min(16, n_slices)}"
    assert range_method(64, (3050, 2933)) == "windows-v1:n16:k256:w128"
    assert range_method(64, (1024, 1024)) == "exact-v1:n16"  # 16 x 1 Mpx = the budget
    assert range_method(64, (1024, 1025)).startswith("windows")
    assert range_method(4, (2048, 2048)).startswith("exact") and range_method(5, (2048, 2048)).startswith("windows")
    assert EXACT_RANGE_PIXELS == 16 * 2**20


def test_a_small_stack_gets_todays_range_bit_for_bit(tmp_path):
    path = _stack_file(tmp_path, n_z=20, n_y=64, n_x=48)
    with open_stack(path) as stack:
        assert stack_intensity_range(stack, 0) == _todays_range(stack)
        assert stack_intensity_range(stack, 0, (1.0, 99.5)) == _todays_range(stack, (1.0, 99.5))


@pytest.mark.shared_data
def test_the_vesselnn_ranges_are_unchanged(shared_data):
    path = shared_data / "vesselnn" / "images" / "burgess2014_bbbDisruption.tif"  # 15 x 512 x 512
    with open_stack(path) as stack:
        found = stack_intensity_range(stack, 0)
        assert found == _todays_range(stack) == (6.0, 61.0)


def test_range_cells_are_grid_cells_with_every_pixel_equally_likely():
    cells = range_cells(1600, (512, 512), 128)
    counts = np.zeros((4, 4), int)
    for row, col in cells:
        assert row % 128 == 0 and col % 128 == 0
        counts[row // 128, col // 128] += 1
    assert counts.min() >= 85 and counts.max() <= 115  # 100 each, the border cells as often as the middle ones
    # a 300 x 200 slice: 3 x 2 cells, the last row of cells 44 px high
    assert {row for row, _ in range_cells(100, (300, 200), 128)} == {0, 128, 256}
    assert {col for _, col in range_cells(100, (300, 200), 128)} == {0, 128}
    # R2: u = (0.5 + 0.75488) % 1 = 0.25488, v = 0.06984 -> cell (0, 0) of 2 x 2; then u = 0.00976, v = 0.63968
    assert range_cells(2, (256, 256), 128) == [(0, 0), (0, 128)]


def _two_cell_stack(tmp_path, dtype=np.uint16):
    """2 x 256 x 256: the windows (2 in all, monkeypatched) are z=0's cell (0, 0) and z=1's cell (0, 128)."""
    data = np.full((2, 256, 256), 1000, dtype)
    data[0, :128, :128] = 10  # z=0's window
    data[0, 200, 200] = 5  # outside every window
    data[1, :128, 128:] = 20  # z=1's window
    data[1, 0, 130] = 70
    data[1, 255, 0] = 9000  # outside every window
    path = tmp_path / "two_cells.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    return path, data


def test_a_large_stack_pools_its_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(embedding, "RANGE_WINDOWS", 2)
    path, _ = _two_cell_stack(tmp_path)
    with open_stack(path) as stack:
        assert stack_intensity_range(stack, 0, (0.0, 100.0)) == (5.0, 9000.0)  # the whole slices
        assert stack_intensity_range(stack, 0, (0.0, 100.0), exact_pixels=0) == (10.0, 70.0)  # the two windows


def test_windows_without_a_finite_value_fall_back_to_whole_slices(tmp_path, monkeypatch):
    monkeypatch.setattr(embedding, "RANGE_WINDOWS", 2)
    data = np.full((2, 256, 256), np.nan, np.float32)
    data[0, 200, 200], data[1, 130, 0] = 2.5, 7.5  # outside both windows
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    with open_stack(path) as stack:
        assert stack_intensity_range(stack, 0, (0.0, 100.0), exact_pixels=0) == (2.5, 7.5)
    tifffile.imwrite(path, np.full((2, 256, 256), np.nan, np.float32), photometric="minisblack")
    with open_stack(path) as stack, pytest.raises(StackError, match="no finite pixel values"):
        stack_intensity_range(stack, 0, exact_pixels=0)


def test_windows_read_as_regions_of_an_ims_equal_windows_cut_from_whole_planes(tmp_path, monkeypatch):
    volume = _illuminated_planes(20, 300, 280)
    ims_path = write_ims(tmp_path / "lit.ims", volume[None, None], chunks=(8, 64, 64))
    tif_path = tmp_path / "lit.tif"
    tifffile.imwrite(tif_path, volume, photometric="minisblack")
    regions = []
    with ImsStack(ims_path, chunk_cache=ZChunkCache(1 << 30, min_block_bytes=0)) as stack:
        real = stack.read_region
        monkeypatch.setattr(stack, "read_region", lambda *a, **k: regions.append(k["rows"]) or real(*a, **k))
        from_regions = stack_intensity_range(stack, 0, exact_pixels=0)
    assert len(regions) == 256  # 16 per sampled slice, each one grid cell (no z-chunk was decoded)
    with open_stack(tif_path) as stack:
        from_planes = stack_intensity_range(stack, 0, exact_pixels=0)  # TIFF planes are cheap: cut from them
        exact = stack_intensity_range(stack, 0)
    assert from_regions == from_planes
    span = exact[1] - exact[0]
    assert abs(from_planes[0] - exact[0]) < 0.02 * span and abs(from_planes[1] - exact[1]) < 0.02 * span


def test_the_range_is_stored_next_to_the_embeddings_and_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(embedding, "RANGE_WINDOWS", 2)
    path, _ = _two_cell_stack(tmp_path)
    cache = EmbeddingCache(tmp_path / "cache")
    with open_stack(path) as stack:
        first = stack_intensity_range(stack, 0, (0.0, 100.0), exact_pixels=0, cache=cache)
    assert first == (10.0, 70.0)
    files = list((tmp_path / "cache").glob("*.range.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["key"]["method"] == "windows-v1:n2:k2:w128" and record["key"]["percentiles"] == [0.0, 100.0]
    assert record["key"]["channel"] == 0 and record["key"]["timepoint"] == 0 and "two_cells.tif" in record["key"]["file_signature"]
    assert (record["low"], record["high"]) == (10.0, 70.0)

    with open_stack(path) as stack:
        def no_reads(*args, **kwargs):
            raise AssertionError("a cached range must not read pixels")

        monkeypatch.setattr(stack, "read_slice", no_reads)
        monkeypatch.setattr(stack, "read_region", no_reads)
        monkeypatch.setattr(stack, "read_slices", no_reads)
        assert stack_intensity_range(stack, 0, (0.0, 100.0), exact_pixels=0, cache=cache) == first
        with pytest.raises(AssertionError, match="must not read pixels"):  # other percentiles: another entry
            stack_intensity_range(stack, 0, (1.0, 100.0), exact_pixels=0, cache=cache)
        with pytest.raises(AssertionError, match="must not read pixels"):  # the other rule: another entry
            stack_intensity_range(stack, 0, (0.0, 100.0), cache=cache)


def test_a_best_mode_embedder_gets_its_range_from_the_disk_cache(tmp_path, monkeypatch):
    path = _stack_file(tmp_path, n_z=6)
    cache = EmbeddingCache(tmp_path / "cache")
    first = _embedder(path, cache=cache)
    with open_stack(path) as stack:
        assert first.stack_range == _todays_range(stack)  # computed in the constructor, as before
    assert len(list((tmp_path / "cache").glob("*.range.json"))) == 1
    stack = open_stack(path)
    monkeypatch.setattr(stack, "read_slices", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    second = SliceEmbedder(stack, 0, load_backbone("filterbank"), STACK_NORM, cache=cache)
    assert second.stack_range == first.stack_range and second.cache_key == first.cache_key
    stack.close()


def test_a_damaged_or_foreign_range_file_is_a_miss(tmp_path):
    cache = EmbeddingCache(tmp_path)
    key = RangeKey("file|1|2|abc", 0, 0, (5.0, 95.0), "exact-v1:n16")
    path = tmp_path / f"{key.digest()}.range.json"
    for text in ("{not json", json.dumps({"key": {}, "low": 1, "high": 2}),
                 json.dumps({"key": json.loads(key.as_json()), "low": "a", "high": 2}),
                 json.dumps({"key": json.loads(key.as_json()), "low": 1}),
                 json.dumps({"key": json.loads(key.as_json()), "low": True, "high": 2})):
        path.write_text(text)
        assert cache.get_range(key) is None
    cache.put_range(key, 207.0, 998.125)
    assert cache.get_range(key) == (207.0, 998.125)
    assert cache.get_range(RangeKey("file|1|2|abc", 1, 0, (5.0, 95.0), "exact-v1:n16")) is None  # another channel
    assert cache.clear() == 1 and cache.get_range(key) is None
