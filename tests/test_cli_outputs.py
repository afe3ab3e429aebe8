"""Outputs never replace inputs, and every option is range-checked before any work (issue #12)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.cli.main import main
from test_errors import write_prototype


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def inputs(tmp_path):
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.arange(3 * 28 * 28, dtype=np.uint16).reshape(3, 28, 28), imagej=True,
                     metadata={"axes": "ZYX"})
    return stack, write_prototype(tmp_path / "proto.npz")


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


@pytest.mark.parametrize("case", ["out_is_stack", "areas_is_stack", "areas_is_prototype", "out_equals_areas"])
def test_apply_never_writes_over_its_inputs(inputs, tmp_path, capsys, case):
    stack, proto = inputs
    before = {p: digest(p) for p in (stack, proto)}
    out, areas = {
        "out_is_stack": (stack, None),
        "areas_is_stack": (tmp_path / "m.tif", stack),
        "areas_is_prototype": (tmp_path / "m.tif", proto),
        "out_equals_areas": (tmp_path / "m.tif", tmp_path / "m.tif"),
    }[case]
    argv = ["apply", str(stack), "--prototype", str(proto), "--out", str(out), "--overwrite"]
    if areas is not None:
        argv += ["--areas", str(areas)]
    assert main(argv) == 2
    line = one_error(capsys)
    assert str(stack.name) in line or str(proto.name) in line or "two outputs" in line
    assert {p: digest(p) for p in (stack, proto)} == before
    assert not (tmp_path / "m.tif").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proto.npz", "stack.tif"]  # no temp left behind


def test_apply_refuses_a_backbone_other_than_the_prototypes(inputs, capsys):
    stack, proto = inputs
    assert main(["apply", str(stack), "--prototype", str(proto), "--out", str(stack.parent / "m.tif"),
                 "--backbone", "dinov2_vits14"]) == 2
    assert "filterbank" in one_error(capsys)


@pytest.mark.parametrize("option,value", [("--points", "-3"), ("--points", "0"), ("--seeds", "0"), ("--slices", "0"),
                                          ("--skip-ends", "-1"), ("--margin", "-2")])
def test_evaluate_checks_its_counts_before_any_work(inputs, capsys, option, value):
    stack, _ = inputs
    assert main(["evaluate", str(stack), "--image-channel", "0", "--mask-channel", "0", "--backbone", "filterbank",
                 option, value]) == 2
    assert option in one_error(capsys)


def test_evaluate_report_may_not_be_an_input(inputs, capsys):
    stack, _ = inputs
    before = digest(stack)
    assert main(["evaluate", str(stack), "--image-channel", "0", "--mask-channel", "0", "--backbone", "filterbank",
                 "--csv", str(stack)]) == 2
    one_error(capsys)
    assert digest(stack) == before


def test_apply_warns_before_the_run_when_the_channel_is_far_off(tmp_path):
    """A prototype made on 'Vessels' applied to a channel named 'Ground truth' (0/1 values): two warnings on
    stderr before any progress, and the run still completes (a warning, not a refusal)."""
    import json
    import subprocess
    import sys

    from core.demo import make_demo

    image, mask = make_demo(shape=(2, 64, 64), seed=1)
    stack = tmp_path / "named.ome.tif"
    tifffile.imwrite(stack, np.stack([image, mask.astype(np.uint16)], axis=1), metadata={
        "axes": "ZCYX", "Channel": {"Name": ["Vessels", "Ground truth"]}})
    rows, cols = np.nonzero(mask[0])
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"positive": [[int(cols[0]), int(rows[0]), 0]], "negative": [[1, 1, 0]]}))
    project = Path(__file__).resolve().parents[1]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=project, capture_output=True,
                              text=True, timeout=300)

    made = cli("prototype", stack, "--points", points, "--out", tmp_path / "p.npz", "--channel", "0",
               "--backbone", "filterbank", "--mode", "thesis", "--option", "image_size=126")
    assert made.returncode == 0, made.stderr
    same = cli("apply", stack, "--prototype", tmp_path / "p.npz", "--out", tmp_path / "a.tif", "--channel", "0")
    assert same.returncode == 0 and "WARNING" not in same.stderr
    other = cli("apply", stack, "--prototype", tmp_path / "p.npz", "--out", tmp_path / "b.tif", "--channel", "1")
    assert other.returncode == 0, other.stderr
    warnings = [line for line in other.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2
    assert "made on channel 'Vessels', this channel is 'Ground truth'" in warnings[0]
    assert "far from those the prototype was made on" in warnings[1]
