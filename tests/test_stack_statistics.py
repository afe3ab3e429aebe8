"""Best mode's per-stack pixel statistics: exact for small stacks, a window subsample for large ones, on disk.

The rule (`statistics_method`) keeps the exact statistics for the stacks of docs/RESULTS.md, so those
results cannot move; the subsample is checked against the exact statistics on synthetic stacks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

import core.features.embedding as embedding
from core.features.backbones import load_backbone
from core.features.embedding import (
    EXACT_STATS_PIXELS,
    SliceEmbedder,
    statistics_method,
    window_features,
    window_origins,
)
from core.features.embedding_cache import EmbeddingCache, StatisticsKey
from core.io import open_stack
from core.pixels import feature_statistics, filter_features
from core.preprocess import PreprocessConfig, normalized_slice

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
