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
