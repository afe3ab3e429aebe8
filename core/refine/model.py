"""Supervised refinement of prototype masks with a shallow U-Net (thesis §3.7, §3.8.3; PIPELINE.md A.9).

The network sees, per slice, a fixed stack of channels chosen by an *input set*:

==================== ==================================
input set            channels (in this order)
==================== ==================================
``raw``              raw
``heatmap``          heatmap
``raw+heatmap``      raw, heatmap         (thesis best: Dice 0.772)
``raw+heatmap+mask`` raw, heatmap, mask
==================== ==================================

Every channel and the ground truth are resized to ``input_size x input_size`` (bilinear with
antialiasing for raw and heatmap, nearest for masks; ``torch.nn.functional.interpolate``); the
predicted probabilities are resized back to the slice (bilinear) before thresholding, so every
array a caller sees is at the slice's own ``(H, W)``.

Channel values:

- raw: ``(H, W)`` float in [0, 1], the slice after percentile clipping and scaling (core.preprocess).
- heatmap: the prototype score map ``cos(p) - λ·cos(n)``, normalised per slice by ``HeatmapNorm``
  (default ``percentile``: the slice's 1st..99th percentile mapped to [0, 1], clipped). Score ranges
  differ between stacks and backbones (the reason the thesis thresholds by top-%); a per-slice
  rank-like rescaling carries the shape of the map, not its offset, from one stack to the next.
- mask: the prototype mask as 0/1.

No pickle anywhere: the weights are a safetensors file whose header metadata holds one JSON document
under the key ``protoscope.refiner`` (see ``save_refiner``), readable without torch.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from core.devices import select_device
from core.errors import ModelFileError, ProtoscopeError, RefineError
from core.metrics import dice, hd95

FORMAT_VERSION = 1
METADATA_KEY = "protoscope.refiner"

INPUT_SETS: dict[str, tuple[str, ...]] = {
    "raw": ("raw",),
    "heatmap": ("heatmap",),
    "raw+heatmap": ("raw", "heatmap"),
    "raw+heatmap+mask": ("raw", "heatmap", "mask"),
}

# Output threshold when training is cancelled before any validation pass could choose one.
_DEFAULT_THRESHOLD = 0.5
# Soft Dice smoothing (in pixels): keeps the loss finite and forgiving on slices without structure.
_DICE_SMOOTH = 1.0
_RAW_TOLERANCE = 1e-3



class HeatmapNorm(str, enum.Enum):
    """How a heatmap is mapped to [0, 1] before it enters the network (per slice)."""

    PERCENTILE = "percentile"  # 1st..99th percentile of this slice -> [0, 1], clipped
    FIXED = "fixed"  # clip to [-1, 1], then (h + 1) / 2: keeps absolute scores comparable


# --------------------------------------------------------------------------------------------------
# Data and configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefineSample:
    """One slice for the refiner.

    raw : (H, W) float32 in [0, 1], the preprocessed slice (percentile-clipped and scaled).
    heatmap : (h, w) float, prototype score map over the same field of view as ``raw``; any
        resolution (the 70x70 patch grid or the slice size), any range (see HeatmapNorm).
        May be None for the 'raw' input set.
    mask : (H, W) bool, the prototype mask; None allowed unless the input set uses it.
    truth : (H, W) bool ground truth, needed for training and evaluation only.
    stack_id : which stack the slice comes from (leave-one-out groups by it).
    z : slice index in that stack.
    """

    raw: np.ndarray
    heatmap: np.ndarray | None
    mask: np.ndarray | None
    truth: np.ndarray | None = None
    stack_id: str = ""
    z: int = 0

    def __post_init__(self) -> None:
        where = f"sample {self.stack_id!r} z={self.z}"
        raw = np.asarray(self.raw, dtype=np.float32)
        if raw.ndim != 2 or min(raw.shape) < 1:
            raise RefineError(f"{where}: raw must be a 2-D (H, W) array, got shape {raw.shape}")
        if not np.all(np.isfinite(raw)):
            raise RefineError(f"{where}: raw contains NaN or infinite values")
        lo, hi = float(raw.min()), float(raw.max())
        if lo < -_RAW_TOLERANCE or hi > 1.0 + _RAW_TOLERANCE:
            raise RefineError(
                f"{where}: raw values span [{lo:g}, {hi:g}] but must lie in [0, 1]; "
                "pass the slice after percentile clipping and scaling (core.preprocess)"
            )
        object.__setattr__(self, "raw", raw)
        if self.heatmap is not None:
            heatmap = np.asarray(self.heatmap, dtype=np.float32)
            if heatmap.ndim != 2 or min(heatmap.shape) < 1:
                raise RefineError(f"{where}: heatmap must be a 2-D array, got shape {heatmap.shape}")
            if not np.all(np.isfinite(heatmap)):
                raise RefineError(f"{where}: heatmap contains NaN or infinite values")
            object.__setattr__(self, "heatmap", heatmap)
        for name in ("mask", "truth"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _as_bool_mask(value, raw.shape, f"{where}: {name}"))

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the slice, in pixels."""
        return self.raw.shape  # type: ignore[return-value]


@dataclass(frozen=True)
class RefineConfig:
    """Refiner settings; defaults follow the thesis (Table 3.5) except ``input_size`` (CPU-sized).

    input_set : key of INPUT_SETS.
    input_size : side of the square network input in pixels, multiple of 4 (thesis: 980).
    base_channels : width of the first encoder block; the thesis does not state it. 16 keeps a
        980x980 step at a few seconds on a 2-core CPU; 32 is the common U-Net choice on a GPU.
    max_epochs, patience : early stopping on validation loss; the best epoch's weights are kept.
    lr : Adam learning rate. Batch size is 1 (thesis).
    seed : seeds weight initialisation (torch), shuffling and augmentation (numpy).
    augment : random horizontal/vertical flips and 90° rotations of the training samples.
    thresholds : candidate probability thresholds, the best mean validation Dice wins.
    heatmap_norm : per-slice heatmap normalisation (HeatmapNorm).
    """

    input_set: str = "raw+heatmap"
    input_size: int = 256
    base_channels: int = 16
    max_epochs: int = 15
    patience: int = 5
    lr: float = 1e-3
    seed: int = 0
    augment: bool = True
    thresholds: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    heatmap_norm: HeatmapNorm = HeatmapNorm.PERCENTILE

    def __post_init__(self) -> None:
        if self.input_set not in INPUT_SETS:
            raise RefineError(f"unknown input set {self.input_set!r}; use one of {', '.join(INPUT_SETS)}")
        if self.input_size < 4 or self.input_size % 4:
            raise RefineError(f"input_size must be a positive multiple of 4 (two 2x poolings), got {self.input_size}")
        if self.base_channels < 1:
            raise RefineError(f"base_channels must be >= 1, got {self.base_channels}")
        if self.max_epochs < 1 or self.patience < 1:
            raise RefineError(f"max_epochs and patience must be >= 1, got {self.max_epochs} and {self.patience}")
        if not self.lr > 0:
            raise RefineError(f"lr must be > 0, got {self.lr}")
        thresholds = tuple(float(t) for t in self.thresholds)
        if not thresholds or not all(0.0 < t < 1.0 for t in thresholds):
            raise RefineError(f"thresholds must be probabilities strictly between 0 and 1, got {self.thresholds}")
        object.__setattr__(self, "thresholds", thresholds)
        try:
            object.__setattr__(self, "heatmap_norm", HeatmapNorm(self.heatmap_norm))
        except ValueError:
            raise RefineError(
                f"unknown heatmap_norm {self.heatmap_norm!r}; use {', '.join(m.value for m in HeatmapNorm)}"
            ) from None

    @property
    def channels(self) -> tuple[str, ...]:
        """The input channels in network order."""
        return INPUT_SETS[self.input_set]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict (enums as their values, tuples as lists)."""
        out = dataclasses.asdict(self)
        out["heatmap_norm"] = self.heatmap_norm.value
        out["thresholds"] = list(self.thresholds)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RefineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "thresholds" in values:
            values["thresholds"] = tuple(values["thresholds"])
        return cls(**values)


# --------------------------------------------------------------------------------------------------
# Network and loss
# --------------------------------------------------------------------------------------------------


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ShallowUNet(nn.Module):
    """Two-level U-Net of thesis Table 3.4.

    Widths: encoder b, 2b; bottleneck 4b; decoder 2b, b; 1x1 head to one logit (b = base_channels).
    forward : (N, in_channels, H, W) float -> (N, 1, H, W) logits; H and W must be multiples of 4.
    """

    def __init__(self, in_channels: int, base_channels: int = 16) -> None:
        super().__init__()
        b = base_channels
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.enc1 = _double_conv(in_channels, b)
        self.enc2 = _double_conv(b, 2 * b)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _double_conv(2 * b, 4 * b)
        self.up2 = nn.ConvTranspose2d(4 * b, 2 * b, kernel_size=2, stride=2)
        self.dec2 = _double_conv(4 * b, 2 * b)
        self.up1 = nn.ConvTranspose2d(2 * b, b, kernel_size=2, stride=2)
        self.dec1 = _double_conv(2 * b, b)
        self.head = nn.Conv2d(b, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"H and W must be multiples of 4 (two 2x poolings), got {tuple(x.shape[-2:])}")
        skip1 = self.enc1(x)
        skip2 = self.enc2(self.pool(skip1))
        deep = self.bottleneck(self.pool(skip2))
        up2 = self.dec2(torch.cat([self.up2(deep), skip2], dim=1))
        up1 = self.dec1(torch.cat([self.up1(up2), skip1], dim=1))
        return self.head(up1)


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


# --------------------------------------------------------------------------------------------------
# Sample -> tensors
# --------------------------------------------------------------------------------------------------


def _as_bool_mask(value: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != shape:
        raise RefineError(f"{where} has shape {arr.shape} but the slice is {shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise RefineError(f"{where} must be boolean (or 0/1), got values outside {{0, 1}}")
        arr = arr.astype(bool)
    return arr


def normalise_heatmap(heatmap: np.ndarray, mode: HeatmapNorm = HeatmapNorm.PERCENTILE) -> np.ndarray:
    """(h, w) float score map -> (h, w) float32 in [0, 1] (see HeatmapNorm).

    A constant map gives all zeros under 'percentile'.
    """
    h = np.asarray(heatmap, dtype=np.float32)
    if HeatmapNorm(mode) is HeatmapNorm.FIXED:
        return (np.clip(h, -1.0, 1.0) + 1.0) / 2.0
    lo, hi = np.percentile(h, (1.0, 99.0))
    if hi - lo <= 1e-12:
        return np.zeros_like(h)
    return np.clip((h - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _resize(image: np.ndarray, size: tuple[int, int], *, nearest: bool) -> torch.Tensor:
    """(h, w) array -> (size) float32 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if nearest:
        out = F.interpolate(t, size=size, mode="nearest")
    else:
        # antialias only matters (and only applies) when shrinking; it avoids aliasing a 3000-px slice.
        shrink = size[0] < t.shape[-2] or size[1] < t.shape[-1]
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out[0, 0]


def prepare_inputs(sample: RefineSample, config: RefineConfig) -> torch.Tensor:
    """Network input of one sample: (C, S, S) float32, channels in ``config.channels`` order, S = input_size."""
    size = (config.input_size, config.input_size)
    planes = []
    for channel in config.channels:
        if channel == "raw":
            planes.append(_resize(sample.raw, size, nearest=False))
        elif channel == "heatmap":
            if sample.heatmap is None:
                raise RefineError(f"input set {config.input_set!r} needs a heatmap; sample {sample.stack_id!r} z={sample.z} has none")
            planes.append(_resize(normalise_heatmap(sample.heatmap, config.heatmap_norm), size, nearest=False))
        else:
            if sample.mask is None:
                raise RefineError(f"input set {config.input_set!r} needs the prototype mask; sample {sample.stack_id!r} z={sample.z} has none")
            planes.append(_resize(sample.mask, size, nearest=True))
    return torch.stack(planes)


def _prepare_target(sample: RefineSample, config: RefineConfig) -> torch.Tensor:
    """(1, S, S) float32 0/1 ground truth, nearest-resized."""
    return _resize(sample.truth, (config.input_size, config.input_size), nearest=True)[None]


def _require_truth(samples: Sequence[RefineSample], role: str) -> None:
    for s in samples:
        if s.truth is None:
            raise RefineError(f"{role} sample {s.stack_id!r} z={s.z} has no ground truth; training and validation need it")


# --------------------------------------------------------------------------------------------------
# Refiner (a trained model) and threshold selection
# --------------------------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device | None) -> torch.device:
    return select_device(device)


@dataclass
class Refiner:
    """A trained refiner: the network, its settings, its output threshold and its provenance."""

    model: ShallowUNet
    config: RefineConfig
    threshold: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def predict_proba(self, sample: RefineSample) -> np.ndarray:
        """(H, W) float32 foreground probability at the sample's own size."""
        return _predict_proba(self.model, sample, self.config)

    def predict(self, sample: RefineSample) -> np.ndarray:
        """(H, W) bool refined mask: probability >= threshold."""
        return self.predict_proba(sample) >= self.threshold


@torch.no_grad()
def _predict_proba(model: ShallowUNet, sample: RefineSample, config: RefineConfig) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    logits = model(prepare_inputs(sample, config)[None].to(device))
    prob = torch.sigmoid(logits).float().cpu()
    prob = F.interpolate(prob, size=sample.shape, mode="bilinear", align_corners=False)
    return prob[0, 0].numpy()


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


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


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
    device = _resolve_device(device)
    rng = np.random.default_rng(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = ShallowUNet(len(config.channels), config.base_channels)
    model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)

    # Resized once: at input_size <= slice size this is smaller than the samples themselves.
    train_tensors = [(prepare_inputs(s, config), _prepare_target(s, config)) for s in train]
    val_tensors = [(prepare_inputs(s, config), _prepare_target(s, config)) for s in val]

    history: list[EpochReport] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_loss, best_epoch, best_threshold, best_dices = math.inf, -1, _DEFAULT_THRESHOLD, None
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
    from core import __version__

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


# --------------------------------------------------------------------------------------------------
# Leave one sample out
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldProgress:
    """LOO progress: fold (0-based) of n_folds holding out ``held_out``, training with ``seed``."""

    fold: int
    n_folds: int
    held_out: str
    seed: int
    epoch: EpochReport


@dataclass(frozen=True)
class LeaveOneOutRow:
    """One (held-out stack, seed) run; per-slice tuples follow ``z`` order.

    dice, hd95 : mean over the held-out slices of the refined masks (core.metrics; hd95 in pixels
        of the slice, the slice diagonal when exactly one of prediction and truth is empty).
    proto_dice, proto_hd95 : the same for the input prototype masks (the baseline).
    """

    held_out: str
    seed: int
    threshold: float
    epochs_run: int
    z: tuple[int, ...]
    slice_dice: tuple[float, ...]
    slice_hd95: tuple[float, ...]
    slice_proto_dice: tuple[float, ...]
    slice_proto_hd95: tuple[float, ...]

    @property
    def dice(self) -> float:
        return _finite_mean(self.slice_dice)

    @property
    def hd95(self) -> float:
        return _finite_mean(self.slice_hd95)

    @property
    def proto_dice(self) -> float:
        return _finite_mean(self.slice_proto_dice)

    @property
    def proto_hd95(self) -> float:
        return _finite_mean(self.slice_proto_hd95)


@dataclass(frozen=True)
class LeaveOneOutResult:
    """rows : one per (fold, seed); summary : per-slice means/stds over all rows (see ``summarise``)."""

    input_set: str
    rows: tuple[LeaveOneOutRow, ...]
    summary: dict[str, float]
    cancelled: bool = False


def _finite_mean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _finite_std(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.std()) if arr.size else float("nan")


def summarise(rows: Sequence[LeaveOneOutRow]) -> dict[str, float]:
    """Means and stds over every evaluated slice of every row (the thesis reports per-slice means).

    Keys: dice_mean, dice_std, hd95_mean, hd95_std, proto_dice_mean, proto_dice_std,
    proto_hd95_mean, proto_hd95_std, dice_gain (dice_mean - proto_dice_mean), n_slices, n_runs.
    """
    cols = {
        "dice": [v for r in rows for v in r.slice_dice],
        "hd95": [v for r in rows for v in r.slice_hd95],
        "proto_dice": [v for r in rows for v in r.slice_proto_dice],
        "proto_hd95": [v for r in rows for v in r.slice_proto_hd95],
    }
    out: dict[str, float] = {}
    for name, values in cols.items():
        out[f"{name}_mean"] = _finite_mean(values)
        out[f"{name}_std"] = _finite_std(values)
    out["dice_gain"] = out["dice_mean"] - out["proto_dice_mean"]
    out["n_slices"] = float(len(cols["dice"]))
    out["n_runs"] = float(len(rows))
    return out


def leave_one_out(
    samples: Sequence[RefineSample],
    config: RefineConfig = RefineConfig(),
    seeds: Sequence[int] = (0, 1, 2),
    *,
    on_progress: Callable[[FoldProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str | torch.device | None = None,
) -> LeaveOneOutResult:
    """Leave-one-stack-out evaluation as in the thesis (§3.8.1, Table 3.5).

    For every stack (in order of first appearance) and seed: train on the other stacks' samples,
    validate (early stopping, threshold) on the held-out stack's samples, and score the refined
    masks on those same samples against their truth, next to the prototype masks (``sample.mask``).
    Note this follows the thesis: the reported fold is also the validation fold, which makes the
    scores slightly optimistic.

    samples : RefineSamples with truth and prototype mask, from >= 2 distinct stack_id values.
    Returns LeaveOneOutResult; if should_stop fires, the finished runs only with cancelled=True.
    """
    order = list(dict.fromkeys(s.stack_id for s in samples))
    if len(order) < 2:
        raise RefineError(f"leave-one-out needs samples from at least 2 stacks, got {len(order)} ({order})")
    if not seeds:
        raise RefineError("leave-one-out needs at least one seed")
    missing = [f"{s.stack_id} z={s.z}" for s in samples if s.mask is None or s.truth is None]
    if missing:
        raise RefineError(f"leave-one-out needs the prototype mask and the truth of every sample; missing for {missing[:5]}")

    rows: list[LeaveOneOutRow] = []
    for fold, held_out in enumerate(order):
        test = sorted((s for s in samples if s.stack_id == held_out), key=lambda s: s.z)
        train = [s for s in samples if s.stack_id != held_out]
        proto_dice = tuple(float(dice(s.mask, s.truth)) for s in test)
        proto_hd95 = tuple(float(hd95(s.mask, s.truth)) for s in test)
        for seed in seeds:
            def report(epoch: EpochReport, fold=fold, held_out=held_out, seed=seed) -> None:
                if on_progress is not None:
                    on_progress(FoldProgress(fold, len(order), held_out, seed, epoch))

            result = train_unet(train, test, dataclasses.replace(config, seed=int(seed)), on_epoch=report,
                                should_stop=should_stop, device=device)
            if result.cancelled:
                return LeaveOneOutResult(config.input_set, tuple(rows), summarise(rows), cancelled=True)
            refiner = result.refiner
            preds = [refiner.predict(s) for s in test]
            rows.append(LeaveOneOutRow(
                held_out=held_out,
                seed=int(seed),
                threshold=refiner.threshold,
                epochs_run=len(result.history),
                z=tuple(int(s.z) for s in test),
                slice_dice=tuple(float(dice(p, s.truth)) for p, s in zip(preds, test)),
                slice_hd95=tuple(float(hd95(p, s.truth)) for p, s in zip(preds, test)),
                slice_proto_dice=proto_dice,
                slice_proto_hd95=proto_hd95,
            ))
    return LeaveOneOutResult(config.input_set, tuple(rows), summarise(rows))


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------


def save_refiner(refiner: Refiner, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the weights and a JSON metadata document into one safetensors file, atomically.

    The header metadata key ``protoscope.refiner`` holds JSON with: format_version, input_set,
    channels, base_channels, input_size, threshold, config, source (backbone, weights,
    heatmap_mode), train/val slices, seed, epochs_run, validation scores, created (UTC).
    Raises RefineError if ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise RefineError(f"refiner file {path} already exists; choose another name or pass overwrite=True")
    if not path.parent.is_dir():
        raise RefineError(f"cannot save refiner to {path}: folder {path.parent} does not exist")
    config = refiner.config
    document = {
        **refiner.metadata,
        "format_version": FORMAT_VERSION,
        "kind": "protoscope.refiner",
        "input_set": config.input_set,
        "channels": list(config.channels),
        "base_channels": config.base_channels,
        "input_size": config.input_size,
        "heatmap_norm": config.heatmap_norm.value,
        "threshold": float(refiner.threshold),
        "config": config.to_json(),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in refiner.model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={METADATA_KEY: json.dumps(document)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_refiner_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata document of a refiner file, without loading the weights."""
    path = Path(path)
    if not path.is_file():
        raise RefineError(f"refiner file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise RefineError(f"{path} is not a readable safetensors file ({err})") from None
    if METADATA_KEY not in header:
        raise RefineError(f"{path} is a safetensors file but not a Protoscope refiner (no {METADATA_KEY!r} metadata)")
    try:
        return json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise RefineError(f"{path}: refiner metadata is not valid JSON ({err})") from None


def load_refiner(
    path: str | os.PathLike,
    *,
    expected_input_set: str | None = None,
    expected_backbone: str | None = None,
    device: str | torch.device | None = None,
) -> Refiner:
    """Load a refiner written by save_refiner, checking it fits the caller's inputs.

    expected_input_set : raise RefineError unless the model was trained on this input set.
    expected_backbone : raise RefineError unless the heatmaps it was trained on came from this
        backbone (checked only for input sets that use the heatmap or mask).
    """
    path = Path(path)
    meta = read_refiner_metadata(path)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise RefineError(f"{path}: refiner format version {version} is not supported (this Protoscope reads {FORMAT_VERSION})")
    try:
        config = RefineConfig.from_json(meta["config"])
    except (KeyError, TypeError) as err:
        raise RefineError(f"{path}: refiner metadata lacks a usable 'config' ({err})") from None
    if list(config.channels) != list(meta.get("channels", [])):
        raise RefineError(f"{path}: channel order {meta.get('channels')} does not match input set {config.input_set!r}")
    if expected_input_set is not None and expected_input_set != config.input_set:
        raise RefineError(
            f"{path} was trained on input set {config.input_set!r}, not {expected_input_set!r}; "
            "train a refiner for this input set or pick the matching one"
        )
    if expected_backbone is not None and config.channels != ("raw",):
        trained = (meta.get("source") or {}).get("backbone")
        if trained != expected_backbone:
            raise RefineError(
                f"{path} was trained on heatmaps from backbone {trained!r}, but the current heatmaps come from "
                f"{expected_backbone!r}; its inputs would not match, so train a refiner on this backbone's heatmaps"
            )
    model = ShallowUNet(len(config.channels), config.base_channels)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as err:
        raise RefineError(f"{path}: weights do not fit the recorded architecture ({err})") from None
    model.to(_resolve_device(device)).eval()
    metadata = {k: v for k, v in meta.items() if k not in ("config",)}
    return Refiner(model=model, config=config, threshold=float(meta["threshold"]), metadata=metadata)
