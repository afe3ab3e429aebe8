"""Training the refiner: combo loss, threshold choice, early stopping, epoch reports (thesis §3.7, Table 3.5).

``train_unet(train, val, config)`` trains a ``ShallowUNet`` (core.refine.model) on RefineSamples with
Adam (batch 1), keeps the weights of the epoch with the lowest validation loss and the threshold whose
mean validation Dice is best; progress is reported per epoch (``EpochReport``) and ``should_stop``
cancels between samples, keeping the best model so far.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core import __version__
from core.errors import RefineError
from core.metrics import dice
from core.refine.model import (
    RefineConfig,
    Refiner,
    RefineSample,
    ShallowUNet,
    prepare_inputs,
    prepare_target,
    resolve_device,
)

# Output threshold when training is cancelled before any validation pass could choose one.
DEFAULT_THRESHOLD = 0.5
# Soft Dice smoothing (in pixels): keeps the loss finite and forgiving on slices without structure.
_DICE_SMOOTH = 1.0


def combo_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Combo loss ``alpha·BCE + (1 - alpha)·(1 - soft Dice)`` (thesis Eq. 3.2, alpha = 0.5).

    logits, target : (N, 1, H, W); target 0/1 float. BCE is the pixel mean (with logits); the soft
    Dice ``(2·Σpt + 1) / (Σp + Σt + 1)`` (p = sigmoid(logits)) is computed per item, then averaged.
    Returns a scalar tensor.

    >>> round(float(combo_loss(torch.zeros(1, 1, 2, 2), torch.tensor([[[[1., 1.], [0., 0.]]]]))), 4)
    0.5466
    """
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    flat = target.flatten(1)
    soft_dice = (2.0 * (prob * flat).sum(1) + _DICE_SMOOTH) / (prob.sum(1) + flat.sum(1) + _DICE_SMOOTH)
    return alpha * bce + (1.0 - alpha) * (1.0 - soft_dice).mean()


def _require_truth(samples: Sequence[RefineSample], role: str) -> None:
    for s in samples:
        if s.truth is None:
            raise RefineError(f"{role} sample {s.stack_id!r} z={s.z} has no ground truth; training and validation need it")



def select_threshold(
    probabilities: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    candidates: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
) -> tuple[float, dict[float, float]]:
    """The candidate with the highest mean Dice of ``prob >= t`` against the truths.

    probabilities : (H, W) float arrays; truths : matching (H, W) bool arrays.
    Returns (threshold, {candidate: mean Dice}); ties go to the earlier candidate.
    """
    if len(probabilities) != len(truths) or not probabilities:
        raise RefineError("threshold selection needs one ground truth per probability map, and at least one")
    means = {float(t): float(np.mean([dice(p >= t, g) for p, g in zip(probabilities, truths)])) for t in candidates}
    best = max(means, key=lambda t: (means[t], -list(means).index(t)))
    return best, means




@dataclass(frozen=True)
class EpochReport:
    """Progress after one epoch.

    epoch : 0-based index; max_epochs : the configured limit.
    train_loss, val_loss : mean combo loss (val at input_size, eval mode).
    val_dice : mean validation Dice at the slice size with ``val_threshold``, the best candidate.
    best_epoch : epoch whose weights are kept so far (lowest val_loss).
    elapsed_s : seconds since training started; eta_s : seconds left if all max_epochs run
        (an upper bound: early stopping may end sooner).
    """

    epoch: int
    max_epochs: int
    train_loss: float
    val_loss: float
    val_dice: float
    val_threshold: float
    best_epoch: int
    elapsed_s: float
    eta_s: float


@dataclass(frozen=True)
class TrainResult:
    """refiner : best weights; history : one EpochReport per finished epoch; cancelled : should_stop fired."""

    refiner: Refiner
    history: tuple[EpochReport, ...]
    cancelled: bool
    stopped_early: bool


class _Cancelled(Exception):
    pass


def _augment(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Same random flip/rot90 of (C, S, S) inputs and (1, S, S) target (square, so shapes hold)."""
    if rng.random() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if rng.random() < 0.5:
        x, y = x.flip(-2), y.flip(-2)
    k = int(rng.integers(4))
    if k:
        x, y = torch.rot90(x, k, dims=(-2, -1)), torch.rot90(y, k, dims=(-2, -1))
    return x, y


def _validate(
    model: ShallowUNet,
    val: Sequence[RefineSample],
    val_tensors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    config: RefineConfig,
    should_stop: Callable[[], bool] | None,
) -> tuple[float, float, dict[float, float]]:
    """(val loss, best threshold, {threshold: mean Dice}) with the model in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    losses, probs = [], []
    with torch.no_grad():
        for sample, (x, y) in zip(val, val_tensors):
            if should_stop is not None and should_stop():
                raise _Cancelled
            logits = model(x[None].to(device))
            losses.append(float(combo_loss(logits, y[None].to(device))))
            prob = F.interpolate(torch.sigmoid(logits).float().cpu(), size=sample.shape, mode="bilinear", align_corners=False)
            probs.append(prob[0, 0].numpy())
    threshold, dices = select_threshold(probs, [s.truth for s in val], config.thresholds)
    return float(np.mean(losses)), threshold, dices


def _check_sets(train: Sequence[RefineSample], val: Sequence[RefineSample], config: RefineConfig) -> None:
    if not train:
        raise RefineError("no training samples; pick slices with ground truth to train the refiner on")
    if not val:
        raise RefineError("no validation samples; early stopping and the output threshold need at least one")
    _require_truth(train, "training")
    _require_truth(val, "validation")


def train_unet(
    train: Sequence[RefineSample],
    val: Sequence[RefineSample],
    config: RefineConfig = RefineConfig(),
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    metadata: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train a ShallowUNet on ``train``, early-stop and pick the threshold on ``val``.

    Adam, batch 1, shuffled order each epoch, combo loss; after each epoch the validation loss
    decides the kept weights (patience ``config.patience``) and the validation Dice of each
    candidate threshold decides the output threshold of that epoch.

    metadata : provenance stored with the model, JSON-serialisable. Recognised keys:
        'backbone' (e.g. 'dinov2_vits14'), 'weights' (weights id), 'heatmap_mode' (how the
        heatmaps were made); any others are kept as they are.
    on_epoch : called with an EpochReport after every epoch.
    should_stop : polled before every sample; when it returns True training ends and the best
        weights so far are returned with ``cancelled=True`` (if no epoch finished: the current
        weights and threshold 0.5, recorded as ``threshold_source='default'``).
    device : torch device; default core.devices.select_device() (CPU unless CUDA/MPS).
    """
    _check_sets(train, val, config)
    device = resolve_device(device)
    rng = np.random.default_rng(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = ShallowUNet(len(config.channels), config.base_channels)
    model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)

    # Resized once: at input_size <= slice size this is smaller than the samples themselves.
    train_tensors = [(prepare_inputs(s, config), prepare_target(s, config)) for s in train]
    val_tensors = [(prepare_inputs(s, config), prepare_target(s, config)) for s in val]

    history: list[EpochReport] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_loss, best_epoch, best_threshold, best_dices = math.inf, -1, DEFAULT_THRESHOLD, None
    cancelled = stopped_early = False
    start = time.perf_counter()
    try:
        for epoch in range(config.max_epochs):
            model.train()
            losses = []
            for index in rng.permutation(len(train_tensors)):
                if should_stop is not None and should_stop():
                    raise _Cancelled
                x, y = train_tensors[index]
                if config.augment:
                    x, y = _augment(x, y, rng)
                optimiser.zero_grad(set_to_none=True)
                loss = combo_loss(model(x[None].to(device)), y[None].to(device))
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
            val_loss, threshold, dices = _validate(model, val, val_tensors, config, should_stop)
            if val_loss < best_loss:
                best_loss, best_epoch, best_threshold, best_dices = val_loss, epoch, threshold, dices
                best_state = copy.deepcopy(model.state_dict())
            elapsed = time.perf_counter() - start
            report = EpochReport(
                epoch=epoch,
                max_epochs=config.max_epochs,
                train_loss=float(np.mean(losses)),
                val_loss=val_loss,
                val_dice=dices[threshold],
                val_threshold=threshold,
                best_epoch=best_epoch,
                elapsed_s=elapsed,
                eta_s=elapsed / (epoch + 1) * (config.max_epochs - epoch - 1),
            )
            history.append(report)
            if on_epoch is not None:
                on_epoch(report)
            if epoch - best_epoch >= config.patience:
                stopped_early = True
                break
    except _Cancelled:
        cancelled = True
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()

    meta = _training_metadata(config, train, val, metadata, history, best_epoch, best_loss, best_dices,
                              cancelled, stopped_early)
    refiner = Refiner(model=model, config=config, threshold=best_threshold, metadata=meta)
    return TrainResult(refiner=refiner, history=tuple(history), cancelled=cancelled, stopped_early=stopped_early)


def _training_metadata(
    config: RefineConfig,
    train: Sequence[RefineSample],
    val: Sequence[RefineSample],
    source: Mapping[str, Any] | None,
    history: Sequence[EpochReport],
    best_epoch: int,
    best_loss: float,
    best_dices: Mapping[float, float] | None,
    cancelled: bool,
    stopped_early: bool,
) -> dict[str, Any]:
    source = dict(source or {})
    try:
        json.dumps(source)
    except TypeError as err:
        raise RefineError(f"refiner metadata must be JSON-serialisable: {err}") from None
    return {
        "source": {"backbone": source.pop("backbone", None), "weights": source.pop("weights", None),
                   "heatmap_mode": source.pop("heatmap_mode", None), **source},
        "train_slices": [{"stack_id": s.stack_id, "z": int(s.z)} for s in train],
        "val_slices": [{"stack_id": s.stack_id, "z": int(s.z)} for s in val],
        "seed": config.seed,
        "epochs_run": len(history),
        "best_epoch": best_epoch if best_epoch >= 0 else None,
        "cancelled": cancelled,
        "stopped_early": stopped_early,
        "threshold_source": "validation" if best_dices is not None else "default",
        "val_loss": best_loss if math.isfinite(best_loss) else None,
        "val_dice_by_threshold": {str(t): d for t, d in best_dices.items()} if best_dices else None,
        "history": [dataclasses.asdict(h) for h in history],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "protoscope_version": __version__,
        "torch_version": torch.__version__,
    }
