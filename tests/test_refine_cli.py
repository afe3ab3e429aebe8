"""``python -m core refine train/apply`` end to end on tiny synthetic stacks with the filter bank, and
core.refine.samples's sample building and validation splits."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.features.backbones import load_backbone
from core.cli.main import main
from core.config import PipelineConfig
from core.demo import make_demo
from core.features.embedding import SliceEmbedder
from core.io import open_stack
from core.pipeline import build_prototype
from core.preprocess import resize
from core.protocol import EvalStack
from core.prototypes import PointSet, load_prototype, save_prototype
from core.refine.files import load_refiner, read_refiner_metadata
from core.refine.model import RefineSample
from core.refine.samples import raw01, split_by_fraction, split_by_stack, stack_label, stack_samples

PROJECT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--input-size", "32", "--base-channels", "4", "--threads", "1", "--no-augment"]


def run_cli(*args, **popen):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=PROJECT, capture_output=True, text=True,
                          env=env, timeout=300, **popen)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder with two 6-slice 64 x 64 stacks (channel 0 image, channel 1 truth; 'b' is 'a' reversed in z)
    and proto.npz, a thesis-mode filter-bank prototype from 4 + 4 points on a.tif z=2."""
    folder = tmp_path_factory.mktemp("refine")
    image, mask = make_demo(shape=(6, 64, 64), seed=3)
    for name, order in (("a", slice(None)), ("b", slice(None, None, -1))):
        tifffile.imwrite(folder / f"{name}.tif", np.stack([image[order], mask[order].astype(np.uint16)], axis=1),
                         imagej=True, metadata={"axes": "ZCYX"})
    rows, cols = np.nonzero(mask[2])
    back_rows, back_cols = np.nonzero(mask[2] == 0)
    pick, pick_back = np.linspace(0, len(rows) - 1, 4).astype(int), np.linspace(0, len(back_rows) - 1, 4).astype(int)
    points = PointSet(np.array([[cols[i], rows[i], 2] for i in pick]), np.array([[back_cols[i], back_rows[i], 2] for i in pick_back]))
    config = PipelineConfig.thesis().with_options(image_size=112)
    with open_stack(folder / "a.tif") as stack:
        embedder = SliceEmbedder(stack, 0, load_backbone("filterbank"), config.preprocess)
        save_prototype(build_prototype(embedder, points, config), folder / "proto.npz")
    return folder


@pytest.fixture(scope="module")
def setup(data):
    """(folder, model, completed process): a raw+heatmap+mask refiner trained on both stacks by the CLI, on
    samples shrunk to 48 x 48 (--max-side 48)."""
    folder = data
    model = folder / "model.safetensors"
    trained = run_cli("refine", "train", folder / "a.tif", folder / "b.tif", "--image-channel", "0", "--mask-channel", "1",
                      "--inputs", "raw+heatmap+mask", "--prototype", folder / "proto.npz", "--out", model,
                      "--epochs", "2", "--max-side", "48", "--cache", folder / "cache", *TINY_TRAIN)
    assert trained.returncode == 0, trained.stderr
    return folder, model, trained


def test_train_writes_model_with_provenance(setup):
    folder, model, trained = setup
    assert "epoch  1/2" in trained.stderr and "epoch  2/2" in trained.stderr and "val Dice" in trained.stderr
    assert f"wrote {model}" in trained.stdout
    meta = read_refiner_metadata(model)
    assert meta["input_set"] == "raw+heatmap+mask" and meta["channels"] == ["raw", "heatmap", "mask"]
    assert meta["input_size"] == 32 and meta["base_channels"] == 4 and meta["epochs_run"] == 2
    source = meta["source"]
    assert source["backbone"] == "filterbank" and source["weights"] == "none" and source["heatmap_mode"] == "thesis"
    assert source["prototype_file"] == str((folder / "proto.npz").resolve())
    assert [s["stack_id"] for s in source["stacks"]] == ["a", "b"] and source["stacks"][0]["truth"] == "channel 1"
    assert source["validation"] == {"kind": "fraction", "fraction": 0.2} and source["max_side"] == 48
    # 6 slices per stack (the 40-slice skip shrinks to 0); round(0.2 * 6) = 1 validation slice per stack, in the
    # middle of one bin of 6: z = floor(0.5 * 6) = 3.
    assert meta["val_slices"] == [{"stack_id": "a", "z": 3}, {"stack_id": "b", "z": 3}]
    assert len(meta["train_slices"]) == 10 and {"stack_id": "a", "z": 3} not in meta["train_slices"]


def test_apply_writes_the_refined_masks(setup, tmp_path):
    folder, model, _ = setup
    out = tmp_path / "refined.tif"
    applied = run_cli("refine", "apply", folder / "a.tif", "--model", model, "--prototype", folder / "proto.npz",
                      "--out", out, "--channel", "0", "--z", "4,0,2", "--cache", folder / "cache", "--threads", "1")
    assert applied.returncode == 0, applied.stderr
    pages = tifffile.imread(out)
    assert pages.shape == (3, 64, 64) and pages.dtype == np.uint8 and set(np.unique(pages)) <= {0, 255}
    # The pages are the model's masks of slices 4, 0, 2 from the same prototype maps on 48 x 48 samples, with the
    # probabilities brought back to 64 x 64 (bilinear) before the threshold.
    prototype = load_prototype(folder / "proto.npz")
    samples = stack_samples(EvalStack(folder / "a.tif", 0, mask_channel=1), [4, 0, 2], prototype=prototype,
                            backbone=load_backbone("filterbank"), with_truth=False, max_side=48)
    assert samples[0].shape == (48, 48)
    refiner = load_refiner(model, expected_backbone="filterbank")
    expected = np.stack([np.where(resize(refiner.predict_proba(s), (64, 64)) >= refiner.threshold, 255, 0)
                         for s in samples])
    np.testing.assert_array_equal(pages, expected)


def test_apply_with_a_prototype_of_another_backbone_fails_cleanly(setup, tmp_path, capsys):
    folder, model, _ = setup
    other = dataclasses.replace(load_prototype(folder / "proto.npz"), backbone="dinov2_vits14", weights_id="random:seed0")
    save_prototype(other, tmp_path / "other.npz")
    status = main(["refine", "apply", str(folder / "a.tif"), "--model", str(model), "--prototype", str(tmp_path / "other.npz"),
                   "--out", str(tmp_path / "x.tif"), "--channel", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith("error: ") and "'filterbank'" in err[0] and "'dinov2_vits14'" in err[0]
    assert not (tmp_path / "x.tif").exists()


@pytest.mark.parametrize("inputs", ["raw+mask", "Heatmap", ""])
def test_bad_inputs_fail_cleanly(data, tmp_path, capsys, inputs):
    folder = data
    status = main(["refine", "train", str(folder / "a.tif"), "--mask-channel", "1", "--inputs", inputs,
                   "--prototype", str(folder / "proto.npz"), "--out", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith("error: --inputs") and "raw, heatmap, raw+heatmap, raw+heatmap+mask" in err[0]


def test_heatmap_inputs_need_a_prototype(data, tmp_path, capsys):
    folder = data
    status = main(["refine", "train", str(folder / "a.tif"), "--mask-channel", "1", "--inputs", "heatmap",
                   "--out", str(tmp_path / "m.safetensors")])
    assert status == 2 and "give --prototype" in capsys.readouterr().err


def test_ctrl_c_saves_the_best_model_so_far(data, tmp_path):
    folder = data
    model = tmp_path / "interrupted.safetensors"
    args = [sys.executable, "-m", "core", "refine", "train", str(folder / "a.tif"), str(folder / "b.tif"),
            "--image-channel", "0", "--mask-channel", "1", "--inputs", "raw", "--out", str(model), "--val-stack", "1",
            "--epochs", "5000", "--patience", "5000", *TINY_TRAIN]
    process = subprocess.Popen(args, cwd=PROJECT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        for line in process.stderr:
            if line.startswith("epoch  1/5000"):
                break
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "best model so far" in stdout
    meta = read_refiner_metadata(model)
    assert meta["cancelled"] is True and 1 <= meta["epochs_run"] < 5000 and meta["threshold_source"] == "validation"
    assert meta["source"]["validation"] == {"kind": "stack", "stack_id": "b"}
    assert {s["stack_id"] for s in meta["train_slices"]} == {"a"} and len(meta["val_slices"]) == 6


# ---- core.refine.samples ---------------------------------------------------------------------------------


def test_raw01_clips_to_the_slice_percentiles():
    image = np.arange(101, dtype=np.uint16).reshape(1, 101) * 10  # percentiles 5 and 95 are 50 and 950
    out = raw01(image)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, [0, 5, 50, 95, 100]], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def _samples(stack_id: str, zs) -> list[RefineSample]:
    return [RefineSample(np.zeros((4, 4)), None, None, stack_id=stack_id, z=z) for z in zs]


def test_split_by_fraction_takes_evenly_spaced_slices_per_stack():
    train, val = split_by_fraction(_samples("a", range(10)) + _samples("b", [7, 3, 5]) + _samples("c", [1]), 0.2)
    # a: 2 of 10 -> bins of 5, centres 2.5 and 7.5 -> z 2, 7; b: round(0.6) = 1 -> middle of [3, 5, 7] -> 5; c: too few.
    assert [(s.stack_id, s.z) for s in val] == [("a", 2), ("a", 7), ("b", 5)]
    assert len(train) == 8 + 2 + 1


def test_split_by_stack_and_its_errors():
    train, val = split_by_stack(_samples("a", [0, 1]) + _samples("b", [0]), "b")
    assert [s.stack_id for s in train] == ["a", "a"] and [s.stack_id for s in val] == ["b"]
    with pytest.raises(Exception, match="leaves 2 training and 0 validation"):
        split_by_stack(_samples("a", [0, 1]), "c")


def test_stack_label_drops_ome_tiff_suffixes():
    assert stack_label("/x/sample_A.ome.tif") == "sample_A" and stack_label("b.ims") == "b"


def test_large_slices_are_shrunk_to_max_side(data):
    folder = data
    prototype = load_prototype(folder / "proto.npz")
    spec = EvalStack(folder / "a.tif", 0, mask_channel=1)
    full, half = (stack_samples(spec, [2], prototype=prototype, backbone=load_backbone("filterbank"), max_side=side)[0]
                  for side in (None, 32))
    assert full.shape == (64, 64) and half.shape == (32, 32)
    # nearest (exact) from 64 to 32 px keeps the pixel centres 1, 3, 5, ...
    np.testing.assert_array_equal(half.truth, full.truth[1::2, 1::2])
    np.testing.assert_array_equal(half.mask, full.mask[1::2, 1::2])
    # antialiased bilinear 2x down: a triangle filter twice as wide, taps 2i-1..2i+2 weighted 1, 3, 3, 1 (/ 8)
    # along each axis (checked away from the edges, where the taps are renormalised)
    taps = np.array([1, 3, 3, 1]) / 8
    rows = np.stack([np.tensordot(full.raw[2 * i - 1:2 * i + 3], taps, axes=(0, 0)) for i in range(1, 31)])
    expected = np.stack([rows[:, 2 * j - 1:2 * j + 3] @ taps for j in range(1, 31)], axis=1)
    np.testing.assert_allclose(half.raw[1:31, 1:31], expected, atol=1e-5)
