"""`python -m core info` and `python -m core export` (handlers called in-process, one real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.cli.main import main
from core.io import open_stack
from helpers_io import ramp_tczyx, write_ims

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ims(tmp_path):
    data = ramp_tczyx(1, 3, 12, 20, 30)
    return write_ims(tmp_path / "cli.ims", data, n_levels=2, channel_names=["DAPI", "Image", "Expert"],
                     colors=["0 0 1", "0 1 0", "1 1 1"]), data


def test_info_table(ims, capsys):
    path, _ = ims
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format:       ims" in out
    assert "shape:        Z=12 C=3 Y=20 X=30  (Z, C, Y, X)" in out
    assert "dtype:        uint16" in out
    assert "voxel size:   x=0.5 µm, y=0.25 µm, z=2 µm" in out
    assert "levels:       2  (0: 12x20x30, 1: 6x10x15; Z x Y x X)" in out
    assert "time points:  1" in out
    assert "      1        -2  Image   0.000 1.000 0.000" in out


def test_info_json(ims, capsys):
    path, _ = ims
    assert main(["info", str(path), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["format"] == "ims" and desc["shape"] == [12, 3, 20, 30] and desc["dtype"] == "uint16"
    assert [c["name"] for c in desc["channels"]] == ["DAPI", "Image", "Expert"]
    assert desc["voxel_size"] == {"x": 0.5, "y": 0.25, "z": 2.0}
    assert desc["n_timepoints"] == 1 and desc["n_levels"] == 2 and desc["level_shapes"][1] == [6, 10, 15]


def test_export_range_keeps_dtype_and_voxel_size(ims, tmp_path, capsys):
    path, data = ims
    out = tmp_path / "out.tif"
    assert main(["export", str(path), "--channel", "-2", "--z", "0:12:3", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "[export] 4/4" not in captured.err  # 4 slices: no progress lines
    with tifffile.TiffFile(out) as tif:
        stack = tif.asarray()
        assert tif.imagej_metadata["spacing"] == pytest.approx(6.0)  # z step 3 x 2 µm
    assert stack.dtype == np.uint16
    np.testing.assert_array_equal(stack, data[0, 1, 0:12:3])
    with open_stack(out) as back:
        assert back.channel_names == ["Image"]
        assert back.voxel_size.x == pytest.approx(0.5)


def test_export_list_all_level_and_progress(ims, tmp_path, capsys):
    path, data = ims
    assert main(["export", str(path), "-c", "0", "--z", "7,2,9", "-o", str(tmp_path / "a.tif")]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), data[0, 0, [7, 2, 9]])
    assert main(["export", str(path), "--z", "all", "--out", str(tmp_path / "b.ome.tif")]) == 0
    assert "[export] 12/12 slices" in capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b.ome.tif"), data[0, 0])
    assert main(["export", str(path), "--z=-1", "--level", "1", "--out", str(tmp_path / "c.tif")]) == 0
    with open_stack(path) as stack:
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "c.tif"), stack.read_slice(5, 0, level=1))


@pytest.mark.parametrize("argv, message", [
    (["--z", "0:40"], "z range '0:40' ends outside the stack"),
    (["--z", "12"], "valid z: 0..11"),
    (["--channel", "3", "--z", "0"], "channel 3 requested but 'cli.ims' has channels 0..2"),
    (["--z", "0", "--timepoint", "1"], "time point 1 requested but 'cli.ims' has time points 0..0"),
    (["--z", "0", "--level", "2"], "resolution level 2 requested but 'cli.ims' has levels 0..1"),
])
def test_export_errors_are_one_line_exit_2(ims, tmp_path, capsys, argv, message):
    path, _ = ims
    out = tmp_path / "x.tif"
    assert main(["export", str(path), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["cli.ims"]


def test_export_refuses_existing_output_and_non_tiff(ims, tmp_path, capsys):
    path, _ = ims
    (tmp_path / "x.tif").write_bytes(b"keep")
    assert main(["export", str(path), "--z", "0", "--out", str(tmp_path / "x.tif")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "x.tif").read_bytes() == b"keep"
    assert main(["export", str(path), "--z", "0", "--out", str(tmp_path / "x.tif"), "--overwrite"]) == 0
    assert main(["export", str(path), "--z", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "must end with .tif" in capsys.readouterr().err


def test_info_on_missing_file_via_real_subprocess(tmp_path):
    result = subprocess.run([sys.executable, "-m", "core", "info", str(tmp_path / "none.ims")],
                            capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: '{tmp_path / 'none.ims'}' does not exist (check the path)"
