"""U-Net refinement (core.refine): network shapes, loss, threshold choice, training, save/load, LOO."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.ndimage import gaussian_filter

import core.refine.train as refine
from core.errors import RefineError
from core.metrics import dice
from core.refine.files import load_refiner, read_refiner_metadata, save_refiner
from core.refine.loo import leave_one_out
from core.refine.model import (
    INPUT_SETS,
    HeatmapNorm,
    RefineConfig,
    RefineSample,
    ShallowUNet,
    normalise_heatmap,
    prepare_inputs,
)
from core.refine.train import EpochReport, combo_loss, select_threshold, train_unet

TINY = dict(input_size=32, base_channels=4, augment=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def disk(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def disk_sample(rng: np.random.Generator, stack_id: str = "A", z: int = 0, size: int = 32) -> RefineSample:
    """Truth: a disk of radius 6. Heatmap: a blurred disk 3 px too large plus noise (a sloppy prototype map)."""
    cy, cx = rng.uniform(11, size - 11, 2)
    truth = disk(size, cy, cx, 6)
    heatmap = gaussian_filter(disk(size, cy, cx, 9).astype(float), 1.5) + rng.normal(0, 0.25, (size, size))
    raw = np.clip(0.2 + 0.5 * truth + rng.normal(0, 0.1, (size, size)), 0, 1)
    return RefineSample(raw=raw, heatmap=heatmap, mask=heatmap > 0.5, truth=truth, stack_id=stack_id, z=z)


# ---------------------------------------------------------------- network and loss


@pytest.mark.parametrize("input_set", list(INPUT_SETS))
def test_unet_maps_each_input_set_to_one_logit_per_pixel(input_set):
    channels = len(INPUT_SETS[input_set])
    net = ShallowUNet(channels, base_channels=4).eval()
    assert net(torch.zeros(1, channels, 32, 32)).shape == (1, 1, 32, 32)
    assert net(torch.zeros(2, channels, 36, 20)).shape == (2, 1, 36, 20)


def test_unet_rejects_sizes_not_multiple_of_four():
    net = ShallowUNet(2, base_channels=4)
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.zeros(1, 2, 30, 32))
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        net(torch.zeros(1, 3, 32, 32))
    with pytest.raises(RefineError, match="multiple of 4"):
        RefineConfig(input_size=250)


def test_input_sets_fix_the_channel_order():
    assert INPUT_SETS == {
        "raw": ("raw",),
        "heatmap": ("heatmap",),
        "raw+heatmap": ("raw", "heatmap"),
        "raw+heatmap+mask": ("raw", "heatmap", "mask"),
    }


def test_combo_loss_is_near_zero_for_a_perfect_prediction():
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4, :] = 1
    assert float(combo_loss(20 * (2 * target - 1), target)) < 1e-4


def test_combo_loss_hand_value_for_zero_logits_on_half_foreground():
    # p = 0.5 everywhere on a 4x4 target with 8 foreground pixels:
    # BCE = ln 2; soft Dice = (2*4 + 1) / (8 + 8 + 1) = 9/17.
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    logits = torch.zeros(1, 1, 4, 4)
    expected = 0.5 * math.log(2) + 0.5 * (1 - 9 / 17)
    assert float(combo_loss(logits, target)) == pytest.approx(expected, abs=1e-6)
    assert float(combo_loss(logits, target, alpha=1.0)) == pytest.approx(math.log(2), abs=1e-6)


# ---------------------------------------------------------------- inputs


def test_normalise_heatmap_rules():
    fixed = normalise_heatmap(np.array([[-2.0, 0.0, 0.5, 2.0]]), HeatmapNorm.FIXED)
    np.testing.assert_allclose(fixed, [[0.0, 0.5, 0.75, 1.0]])
    # 1st and 99th percentile of -1..1 in 101 steps are -0.98 and 0.98.
    ramp = normalise_heatmap(np.linspace(-1, 1, 101)[None], HeatmapNorm.PERCENTILE)
    assert ramp[0, 50] == pytest.approx(0.5, abs=1e-6)
    assert ramp[0, 0] == 0.0 and ramp[0, -1] == 1.0
    assert ramp[0, 75] == pytest.approx(0.5 / 0.98 / 2 + 0.5, abs=1e-6)
    assert not normalise_heatmap(np.full((3, 3), 7.0)).any()


def test_prepare_inputs_resizes_channels_in_order():
    raw = np.full((40, 24), 0.25, np.float32)
    mask = np.zeros((40, 24), bool)
    mask[:, :12] = True
    heatmap = np.tile(np.linspace(-1, 1, 7), (7, 1))  # patch-grid resolution is allowed
    sample = RefineSample(raw=raw, heatmap=heatmap, mask=mask)
    x = prepare_inputs(sample, RefineConfig(input_set="raw+heatmap+mask", input_size=16))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.tensor(0.25))
    assert x[1, :, 0].max() < 0.1 and x[1, :, -1].min() > 0.9  # heatmap rises left to right
    assert set(x[2].unique().tolist()) == {0.0, 1.0}  # nearest keeps the mask binary
    assert x[2, :, :8].all() and not x[2, :, 8:].any()


def test_sample_validation_messages():
    raw = np.zeros((8, 8), np.float32)
    with pytest.raises(RefineError, match=r"\[0, 1\]"):
        RefineSample(raw=raw + 3, heatmap=None, mask=None)
    with pytest.raises(RefineError, match="shape"):
        RefineSample(raw=raw, heatmap=None, mask=np.zeros((8, 9), bool))
    assert RefineSample(raw=raw, heatmap=None, mask=np.eye(8, dtype=np.uint8)).mask.dtype == bool
    with pytest.raises(RefineError, match="needs a heatmap"):
        prepare_inputs(RefineSample(raw=raw, heatmap=None, mask=None), RefineConfig(input_size=8))


# ---------------------------------------------------------------- threshold choice


def test_select_threshold_picks_the_best_mean_dice():
    # Structure at probability 0.7, background at 0.5: 0.2 and 0.4 take everything, 0.8 nothing,
    # only 0.6 recovers the structure exactly.
    truth = np.zeros((10, 10), bool)
    truth[2:6, 2:6] = True
    prob = np.where(truth, 0.7, 0.5).astype(np.float32)
    threshold, means = select_threshold([prob, prob], [truth, truth], (0.2, 0.4, 0.6, 0.8))
    assert threshold == 0.6
    assert means[0.6] == pytest.approx(1.0)
    assert means[0.2] == pytest.approx(2 * 16 / (100 + 16))
    assert means[0.8] == pytest.approx(0.0)


# ---------------------------------------------------------------- training


def test_tiny_unet_learns_to_sharpen_a_sloppy_heatmap():
    rng = np.random.default_rng(0)
    samples = [disk_sample(rng, z=z) for z in range(4)]
    # lr 1e-2 (not the thesis 1e-3) so that ten epochs suffice on a shared 2-core CPU.
    config = RefineConfig(input_set="heatmap", max_epochs=10, patience=10, lr=1e-2, base_channels=8, input_size=32, augment=False)
    reports: list[EpochReport] = []
    result = train_unet(samples, samples, config, on_epoch=reports.append, metadata={"backbone": "synthetic"})
    refiner = result.refiner
    assert not result.cancelled and len(reports) == len(result.history) == 10
    assert [r.epoch for r in reports] == list(range(10))
    assert reports[-1].train_loss < 0.5 * reports[0].train_loss
    assert reports[-1].eta_s == 0.0
    baseline = np.mean([dice(normalise_heatmap(s.heatmap) >= 0.5, s.truth) for s in samples])
    refined = np.mean([dice(refiner.predict(s), s.truth) for s in samples])
    assert refined > 0.85 and refined > baseline + 0.15, (baseline, refined)
    # The kept threshold is the best candidate of the kept epoch.
    by_t = refiner.metadata["val_dice_by_threshold"]
    assert refiner.threshold == float(max(by_t, key=by_t.get))
    assert refiner.threshold == result.history[refiner.metadata["best_epoch"]].val_threshold
    assert refiner.predict_proba(samples[0]).shape == (32, 32)


def test_early_stopping_keeps_the_best_epoch(monkeypatch):
    losses = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9])
    states = []

    def fake_validate(model, val, val_tensors, config, should_stop):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(losses), 0.4, {0.2: 0.1, 0.4: 0.3, 0.6: 0.2, 0.8: 0.0}

    monkeypatch.setattr(refine, "_validate", fake_validate)
    rng = np.random.default_rng(1)
    samples = [disk_sample(rng, z=z) for z in range(2)]
    result = train_unet(samples, samples, RefineConfig(input_set="raw", patience=2, **TINY))
    assert result.stopped_early and len(result.history) == 4  # epochs 2, 3 do not beat epoch 1
    assert [r.best_epoch for r in result.history] == [0, 1, 1, 1]
    kept = result.refiner.model.state_dict()
    assert all(torch.equal(kept[k], states[1][k]) for k in kept)
    assert not all(torch.equal(kept[k], states[3][k]) for k in kept)


def test_same_seed_same_weights_other_seed_other_weights():
    rng = np.random.default_rng(2)
    samples = [disk_sample(rng, z=z) for z in range(2)]
    config = RefineConfig(input_set="raw+heatmap", max_epochs=2, input_size=32, base_channels=4, augment=True)
    a = train_unet(samples, samples, config).refiner.model.state_dict()
    b = train_unet(samples, samples, config).refiner.model.state_dict()
    c = train_unet(samples, samples, RefineConfig(**{**config.to_json(), "seed": 1})).refiner.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_should_stop_after_the_first_sample_returns_a_usable_model():
    rng = np.random.default_rng(3)
    samples = [disk_sample(rng, z=z) for z in range(4)]
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 1  # polled before each sample: one sample trains, then we stop

    result = train_unet(samples, samples, RefineConfig(**TINY), should_stop=stop, device="cpu")
    assert result.cancelled and result.history == () and calls == 2
    assert result.refiner.threshold == 0.5
    assert result.refiner.metadata["threshold_source"] == "default"
    assert result.refiner.device == torch.device("cpu")
    mask = result.refiner.predict(samples[0])
    assert mask.shape == (32, 32) and mask.dtype == bool


def test_training_needs_truth_and_validation():
    rng = np.random.default_rng(4)
    good = disk_sample(rng)
    unlabelled = RefineSample(raw=good.raw, heatmap=good.heatmap, mask=good.mask)
    with pytest.raises(RefineError, match="no ground truth"):
        train_unet([unlabelled], [good], RefineConfig(**TINY))
    with pytest.raises(RefineError, match="no validation samples"):
        train_unet([good], [], RefineConfig(**TINY))


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip_and_checks(tmp_path: Path):
    rng = np.random.default_rng(5)
    samples = [disk_sample(rng, z=z) for z in range(3)]
    config = RefineConfig(input_set="raw+heatmap+mask", max_epochs=2, **TINY)
    refiner = train_unet(samples, samples[:1], config, metadata={"backbone": "dinov2_vits14", "weights": "w1", "heatmap_mode": "thesis"}).refiner
    path = save_refiner(refiner, tmp_path / "model.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind

    loaded = load_refiner(path, expected_input_set="raw+heatmap+mask", expected_backbone="dinov2_vits14")
    original, restored = refiner.model.state_dict(), loaded.model.state_dict()
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    assert loaded.config == config and loaded.threshold == refiner.threshold
    assert np.array_equal(loaded.predict_proba(samples[2]), refiner.predict_proba(samples[2]))

    meta = read_refiner_metadata(path)
    assert meta["channels"] == ["raw", "heatmap", "mask"] and meta["format_version"] == 1
    assert meta["source"] == {"backbone": "dinov2_vits14", "weights": "w1", "heatmap_mode": "thesis"}
    assert meta["train_slices"] == [{"stack_id": "A", "z": z} for z in range(3)]
    assert meta["epochs_run"] == 2 and meta["seed"] == 0 and meta["created"]

    with pytest.raises(RefineError, match="input set 'raw\\+heatmap\\+mask', not 'heatmap'"):
        load_refiner(path, expected_input_set="heatmap")
    with pytest.raises(RefineError, match="'dinov2_vits14'.*'dinov2_vitg14'"):
        load_refiner(path, expected_backbone="dinov2_vitg14")
    with pytest.raises(RefineError, match="already exists"):
        save_refiner(refiner, path)
    save_refiner(loaded, path, overwrite=True)
    assert load_refiner(path).threshold == refiner.threshold


def test_load_rejects_files_that_are_not_refiners(tmp_path: Path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(RefineError, match="not a Protoscope refiner"):
        load_refiner(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(RefineError, match="not a readable safetensors"):
        load_refiner(garbage)
    with pytest.raises(RefineError, match="does not exist"):
        load_refiner(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- leave one out


def test_leave_one_out_on_three_tiny_stacks():
    rng = np.random.default_rng(6)
    samples = [disk_sample(rng, stack_id=s, z=z) for s in ("A", "B", "C") for z in (5, 1)]
    progress = []
    result = leave_one_out(samples, RefineConfig(input_set="raw+heatmap", max_epochs=1, **TINY), seeds=(0,),
                           on_progress=progress.append)
    assert [(r.held_out, r.seed) for r in result.rows] == [("A", 0), ("B", 0), ("C", 0)]
    assert all(r.z == (1, 5) for r in result.rows)
    assert all(np.isfinite(r.dice) and 0 <= r.dice <= 1 for r in result.rows)
    first = result.rows[0]
    held = [s for s in samples if s.stack_id == "A"][::-1]  # z order 1, 5
    assert first.slice_proto_dice == pytest.approx([dice(s.mask, s.truth) for s in held])
    assert result.summary["n_slices"] == 6 and result.summary["n_runs"] == 3
    assert result.summary["dice_gain"] == pytest.approx(result.summary["dice_mean"] - result.summary["proto_dice_mean"])
    assert len(progress) == 3 and {p.held_out for p in progress} == {"A", "B", "C"}
    with pytest.raises(RefineError, match="at least 2 stacks"):
        leave_one_out(samples[:2], RefineConfig(**TINY), seeds=(0,))
