"""bench/bench_live.py's pure helpers: the last line other tools parse, the summary that feeds it, and the
chunked .ims generator with its Imaris pyramid (tiny sizes; no timing)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from core.io import open_stack

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_live.py"
LAST_LINE = re.compile(r"^live: best click 1024 (\d+(\.\d)?|n/a) ms, 3050x2933 (\d+(\.\d)?|n/a) ms; first mask new stack "
                       r"(\d+(\.\d)?|n/a) s; DINOSim ratio ttfh (\d+\.\d\d|n/a), click (\d+\.\d\d|n/a)$")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_live", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_last_line_has_the_exact_form(bench):
    line = bench.last_line(123.4, 250.0, 2.34, bench.ratio_text(4.0, 10.0), bench.ratio_text(1.0, 3.0))
    assert line == "live: best click 1024 123 ms, 3050x2933 250 ms; first mask new stack 2.3 s; DINOSim ratio ttfh 0.40, click 0.33"
    assert LAST_LINE.match(line)
    skipped = bench.last_line(None, float("nan"), 12.6, bench.ratio_text(1.0, None), bench.ratio_text(1.0, 0.0))
    assert skipped == "live: best click 1024 n/a ms, 3050x2933 n/a ms; first mask new stack 13 s; DINOSim ratio ttfh n/a, click n/a"
    assert LAST_LINE.match(skipped)


def test_numbers_are_integers_or_one_decimal_below_ten(bench):
    assert [bench.natural_number(v) for v in (1234.4, 10.0, 9.96, 7.26, 0.04)] == ["1234", "10", "10", "7.3", "0.0"]


def _best(size, live_s, ttfh_s, round_=1, pair=None):
    clicks = [{"live_s": s, "forest_s": 2 * s, "preview_s": 0.01, "live_dice_vs_forest": 0.9} for s in live_s]
    return {"system": "protoscope", "mode": "best", "size": list(size), "clicks": clicks, "ttfh_s": ttfh_s,
            "embed_s": ttfh_s - 1, "first_live_s": 1.0, "stack_range_s": 0.5, "pixel_stats_s": 3.0, "round": round_, "pair": pair}


def test_summary_feeds_the_last_line_from_the_documented_medians(bench):
    run = {
        "best": [_best((1024, 1024), [0.10, 0.30], 6.0, pair=1), _best((1024, 1024), [0.20], 8.0, 2),
                 _best((2048, 2048), [0.5], 9.0), _best((3050, 2933), [0.25, 0.35], 10.0)],
        "thesis": [{"size": [1024, 1024], "embed_s": 5.0, "first_click_s": 0.2, "clicks": [{"click_s": 0.1}]}],
        "dinosim": [{"size": [1024, 1024], "embed_s": 10.0, "first": {"mask_s": 4.0}, "pair": 1,
                     "clicks": [{"mask_s": 0.8}, {"mask_s": 0.8}]}],
        "new_stack": [{"open_to_ready_s": 1.0, "embed_s": 6.0, "first_mask_after_embed_s": 2.5,
                       "open_to_first_mask_s": 9.5},
                      {"open_to_ready_s": 1.0, "embed_s": 6.0, "first_mask_after_embed_s": 3.5,
                       "open_to_first_mask_s": 10.5}],
        "slice_change": [], "vit": [],
    }
    summary = bench.summarize(run)
    at_1024 = summary["sizes"]["1024²"]
    assert at_1024["best_live_ms"] == pytest.approx(200.0)  # median of 100, 300, 200 ms over rounds x clicks
    assert at_1024["ttfh_s"] == pytest.approx(7.0)
    assert at_1024["ttfh_ratio"] == "0.50"  # 7 s / (10 + 4) s
    assert at_1024["click_ratio"] == "0.25"  # 200 ms / 800 ms
    assert summary["sizes"]["2048²"]["click_ratio"] == "n/a"  # no DINOSim sample at 2048²
    assert summary["sizes"]["1024²"]["paired_ttfh_ratios"] == [pytest.approx(6.0 / 14.0)]  # round 1's pair only
    assert summary["last_line"] == ("live: best click 1024 200 ms, 3050x2933 300 ms; first mask new stack 3.0 s; "
                                    "DINOSim ratio ttfh 0.50, click 0.25")


def test_tiling_repeats_from_the_top_left_and_crops(bench):
    plane = np.array([[1, 2, 3], [4, 5, 6]])
    assert bench.tiled(plane, (3, 4)).tolist() == [[1, 2, 3, 1], [4, 5, 6, 4], [1, 2, 3, 1]]
    assert bench.tiled(np.stack([plane, plane + 10]), (2, 5))[1].tolist() == [[11, 12, 13, 11, 12], [14, 15, 16, 14, 15]]


def test_pyramid_follows_the_imaris_rule(bench):
    # docs/spec/FORMAT.md §4.3: ImarisWriter's uint16 300 x 260 x 40 sample has 2 levels, the second 150 x 130 x 20
    assert bench.imaris_level_shapes((40, 260, 300), 2) == [(40, 260, 300), (20, 130, 150)]
    # the benchmark's file: Z is small next to Y and X, so it is halved only from level 4 on
    assert bench.imaris_level_shapes((64, 3050, 2933), 2) == [
        (64, 3050, 2933), (64, 1525, 1466), (64, 762, 733), (64, 381, 366), (32, 190, 183), (16, 95, 91)]


def test_binning_is_the_truncated_mean(bench):
    block = np.array([[[1, 2, 9], [3, 5, 9]], [[4, 4, 9], [4, 4, 9]]], np.uint16)  # (2, 2, 3): last column dropped
    assert bench.bin_block(block, (2, 2, 2)).tolist() == [[[3]]]  # (1+2+3+5+4+4+4+4) / 8 = 3.375 -> 3
    assert bench.bin_block(block, (1, 2, 2)).tolist() == [[[2]], [[4]]]  # 11 / 4 = 2.75 -> 2


def test_generated_ims_reads_back_with_its_pyramid(bench, tmp_path):
    shape = (8, 64, 48)
    path = tmp_path / "tiny.ims"
    levels = bench.write_chunked_ims(path, shape, chunks=(4, 16, 16), stop_voxels=4096)
    assert levels == [(8, 64, 48), (4, 32, 24)]
    with open_stack(path) as stack:
        assert stack.shape == (8, 1, 64, 48) and stack.dtype == np.uint16
        assert stack.n_levels == 2 and stack.level_shape(1) == (4, 32, 24)
        assert stack.voxel_size.x == pytest.approx(0.5) and stack.voxel_size.z == pytest.approx(2.0)
        planes = [bench.synthetic_plane(z, shape[1:]) for z in (6, 7)]
        np.testing.assert_array_equal(stack.read_slice(7), planes[1])
        expected = bench.bin_block(np.stack(planes), (2, 2, 2))[0]
        np.testing.assert_array_equal(stack.read_slice(3, level=1), expected)
        assert stack.layout.n_channels == 1


def test_dinosim_is_skipped_with_a_reason_when_its_python_is_missing_or_broken(bench, tmp_path):
    worker, why = bench.start_dinosim(str(tmp_path / "no-venv" / "python"), tmp_path)
    assert worker is None and "does not exist" in why and "no-venv" in why
    worker, why = bench.start_dinosim("/bin/false", tmp_path)  # starts, but answers nothing
    assert worker is None and "did not start" in why
