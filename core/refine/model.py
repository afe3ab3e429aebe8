"""The refiner's network and its data: a shallow U-Net over per-slice inputs (thesis §3.7; docs/spec/PIPELINE.md A.9).

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
predicted probabilities are resized back to the sample (bilinear) before thresholding, so every
array a caller sees is at the sample's own ``(H, W)``.

Channel values:

- raw: ``(H, W)`` float in [0, 1], the slice after percentile clipping and scaling (core.preprocess).
- heatmap: the prototype score map ``cos(p) - λ·cos(n)``, normalised per slice by ``HeatmapNorm``
  (default ``percentile``: the slice's 1st..99th percentile mapped to [0, 1], clipped). Score ranges
  differ between stacks and backbones (the reason the thesis thresholds by top-%); a per-slice
  rank-like rescaling carries the shape of the map, not its offset, from one stack to the next.
- mask: the prototype mask as 0/1.

The rest of the package: ``train`` (loss, training, threshold choice), ``loo`` (leave one stack out),
``files`` (the safetensors model file), ``samples`` (samples from stacks through a prototype) and
``apply`` (``refine_stack``: a trained refiner over the slices of a stack).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.devices import select_device
from core.errors import RefineError

INPUT_SETS: dict[str, tuple[str, ...]] = {
    "raw": ("raw",),
    "heatmap": ("heatmap",),
    "raw+heatmap": ("raw", "heatmap"),
    "raw+heatmap+mask": ("raw", "heatmap", "mask"),
}

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
# Network
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


def prepare_target(sample: RefineSample, config: RefineConfig) -> torch.Tensor:
    """Training target of one sample: (1, S, S) float32 0/1 ground truth, nearest-resized."""
    if sample.truth is None:
        raise RefineError(f"sample {sample.stack_id!r} z={sample.z} has no ground truth; training and validation need it")
    return _resize(sample.truth, (config.input_size, config.input_size), nearest=True)[None]


# --------------------------------------------------------------------------------------------------
# Refiner (a trained model)
# --------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device for ``device`` (None / 'auto': CUDA, then MPS, then CPU; core.devices)."""
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
