"""End to end through the command line: prototype -> apply -> evaluate, with the filter bank and with a tiny
random-initialised DINOv2 (plumbing only: random weights mean nothing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.demo import make_demo

PROJECT = Path(__file__).resolve().parents[1]
TINY = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


def run_cli(*args, cwd=PROJECT, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory):
    """A 6-slice 96 x 96 synthetic vessel stack: channel 0 image, channel 1 ground truth (ZCYX TIFF)."""
    folder = tmp_path_factory.mktemp("cli")
    image, mask = make_demo(shape=(6, 96, 96), seed=3)
    path = folder / "small.tif"
    tifffile.imwrite(path, np.stack([image, mask.astype(np.uint16)], axis=1), imagej=True,
                     resolution=(1 / 0.8, 1 / 0.8), metadata={"axes": "ZCYX", "spacing": 2.0, "unit": "um"})
    rows, cols = np.nonzero(mask[2])
    background_rows, background_cols = np.nonzero(mask[2] == 0)
    pick = np.linspace(0, len(rows) - 1, 4).astype(int)
    pick_background = np.linspace(0, len(background_rows) - 1, 4).astype(int)
    points = {"positive": [[int(cols[i]), int(rows[i]), 2] for i in pick],
              "negative": [[int(background_cols[i]), int(background_rows[i]), 2] for i in pick_background]}
    (folder / "points.json").write_text(json.dumps(points))
    return path


@pytest.mark.parametrize("mode", ["thesis", "best"])
def test_filterbank_prototype_apply(small_stack, tmp_path, mode):
    folder = small_stack.parent
    proto = tmp_path / "proto.npz"
    made = run_cli("prototype", small_stack, "--points", folder / "points.json", "--out", proto, "--channel", "0",
                   "--backbone", "filterbank", "--mode", mode, "--cache", tmp_path / "cache", "--option", "image_size=196")
    assert made.returncode == 0, made.stderr
    assert "Filter bank" in made.stderr
    masks = tmp_path / "masks.tif"
    applied = run_cli("apply", small_stack, "--prototype", proto, "--out", masks, "--channel", "0", "--z", "4,0,2",
                      "--cache", tmp_path / "cache", "--areas", tmp_path / "areas.csv")
    assert applied.returncode == 0, applied.stderr
    with tifffile.TiffFile(masks) as tif:
        pages = tif.series[0].asarray()
    assert pages.shape == (3, 96, 96) and pages.dtype == np.uint8
    assert set(np.unique(pages)) <= {0, 255} and pages.any()
    lines = (tmp_path / "areas.csv").read_text().splitlines()
    assert lines[0] == "z,area_px,area_um2,threshold" and [int(l.split(",")[0]) for l in lines[1:]] == [4, 0, 2]
    # area in µm² = px x 0.8 µm x 0.8 µm
    z4 = lines[1].split(",")
    assert float(z4[2]) == pytest.approx(int(z4[1]) * 0.64, rel=1e-4)
    # Refuses to overwrite without --overwrite.
    again = run_cli("apply", small_stack, "--prototype", proto, "--out", masks, "--channel", "0", "--cache", tmp_path / "cache")
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_tiny_random_dinov2_end_to_end(small_stack, tmp_path):
    folder = small_stack.parent
    proto = tmp_path / "tiny.npz"
    common = ["--cache", tmp_path / "cache"]
    made = run_cli("prototype", small_stack, "--points", folder / "points.json", "--out", proto, "--channel", "0",
                   "--backbone", "dinov2_vits14", "--weights", "random", "--backbone-config", json.dumps(TINY),
                   "--mode", "thesis", "--option", "image_size=112", *common)
    assert made.returncode == 0, made.stderr
    assert "RANDOM WEIGHTS" in made.stderr
    with np.load(proto, allow_pickle=False) as archive:
        metadata = json.loads(str(archive["metadata_json"]))
        assert archive["positive_examples"].shape == (4, 32)
    assert metadata["backbone"] == "dinov2_vits14" and metadata["weights_id"].startswith("random:seed0")
    masks = tmp_path / "tiny.tif"
    # apply re-creates the same tiny random model from the prototype's weights id.
    applied = run_cli("apply", small_stack, "--prototype", proto, "--out", masks, "--channel", "0", "--z", "0:6", *common)
    assert applied.returncode == 0, applied.stderr
    with tifffile.TiffFile(masks) as tif:
        pages = tif.series[0].asarray()
    assert pages.shape == (6, 96, 96)
    # thesis mode: top 10 % of an 8 x 8 patch grid = 6 patches of 12 x 12 px each on every slice
    assert all(int((page > 0).sum()) == 6 * 12 * 12 for page in pages)


def test_evaluate_json_and_csv(small_stack, tmp_path):
    out = tmp_path / "eval.json"
    done = run_cli("evaluate", small_stack, "--image-channel", "0", "--mask-channel", "-1", "--backbone", "filterbank",
                   "--mode", "thesis", "--baseline", "otsu", "intensity", "--points", "5", "--seeds", "1", "--slices", "3",
                   "--skip-ends", "1", "--option", "image_size=196", "--cache", tmp_path / "cache", "--json", out)
    assert done.returncode == 0, done.stderr
    payload = json.loads(out.read_text())
    settings = {(e["method"], e["setting"]) for e in payload["summary"]}
    assert ("thesis", "same-slice") in settings and ("thesis", "same-file") in settings
    assert ("otsu", "same-slice") in settings and ("intensity", "same-file") in settings
    assert payload["slices"]["small"] == [1, 2, 4] or len(payload["slices"]["small"]) == 3
    for entry in payload["summary"]:
        assert 0.0 <= entry["dice"] <= 1.0
    rows = (tmp_path / "eval.csv").read_text().splitlines()
    assert rows[0].startswith("method,backbone,setting,ref_stack,ref_z,stack,z,seed,dice,iou,hd95_px,hd95_um")
    assert "Dice" in done.stdout


def test_cli_errors_are_one_line(small_stack, tmp_path):
    missing = run_cli("prototype", small_stack, "--points", tmp_path / "nope.json", "--out", tmp_path / "p.npz")
    assert missing.returncode == 2 and "points file not found" in missing.stderr and "Traceback" not in missing.stderr
    bad_backbone = run_cli("evaluate", small_stack, "--image-channel", "0", "--mask-channel", "1", "--backbone", "vit_huge")
    assert bad_backbone.returncode == 2 and "vit_huge" in bad_backbone.stderr
    no_weights = run_cli("prototype", small_stack, "--points", small_stack.parent / "points.json", "--out", tmp_path / "p.npz",
                         "--backbone", "dinov2_vits14", env_extra={"HF_HOME": str(tmp_path / "hf")})
    assert no_weights.returncode == 2
    assert "random" in no_weights.stderr and "Traceback" not in no_weights.stderr


def test_evaluate_rejects_a_variant_named_like_a_baseline(small_stack):
    # Results are reported by method name: a variant called 'otsu' would be confused with the Otsu baseline.
    clash = run_cli("evaluate", small_stack, "--image-channel", "0", "--mask-channel", "1", "--backbone", "filterbank",
                    "--variant", "otsu=best:threshold=otsu", "--baseline", "otsu")
    assert clash.returncode == 2 and "Traceback" not in clash.stderr
    assert "the name 'otsu' is already taken" in clash.stderr
