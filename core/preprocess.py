"""Slice preprocessing before feature extraction (thesis §3.3, docs/spec/PIPELINE.md A.1).

Thesis mode: clip each slice to its own 5th-95th intensity percentiles, rescale to [0, 1] and resize to
980 x 980 pixels (bilinear, antialiased) so that a 14-px ViT sees a 70 x 70 patch grid. The grey-to-RGB
replication and the ImageNet mean/std normalisation belong to the DINOv2 backbone (``core.features.backbones``),
because they are a property of that model, not of the data.

Best mode can replace the per-slice percentiles by percentiles pooled over the whole stack
(``normalization="stack"``), so that every slice — and a transferred prototype — sees one intensity scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import OptionError, StackError

#: Largest number of pixels per slice used to estimate percentiles (a strided subsample beyond this;
#: the percentiles of a 9-Mpixel slice move by far less than one grey level).
_PERCENTILE_SAMPLE_PIXELS = 2_000_000

#: Largest model input side: 300 patches of 14 px (a 4200 x 4200 float image is 70 MB, and DINOv2 attends over
#: 90,000 patches); beyond, a run would only exhaust memory (a typo like image_size=98000 must not try).
MAX_IMAGE_SIZE = 4200


@dataclass(frozen=True)
class PreprocessConfig:
    """How a raw slice becomes the model's input image.

    clip_percentiles : (low, high) percentiles in %, clipped and mapped to 0 and 1.
    image_size : side in pixels of the square model input (980 = 70 patches of 14 px).
    normalization : 'slice' (percentiles of each slice, thesis) or 'stack' (percentiles pooled over the stack).
    """

    clip_percentiles: tuple[float, float] = (5.0, 95.0)
    image_size: int = 980
    normalization: str = "slice"

    def __post_init__(self) -> None:
        low, high = self.clip_percentiles
        if not 0.0 <= low < high <= 100.0:
            raise OptionError(f"clip percentiles (options clip_low, clip_high) must satisfy 0 <= clip_low < clip_high "
                              f"<= 100 %, got clip_low={low:g}, clip_high={high:g}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, (int, np.integer)) \
                or not 14 <= self.image_size <= MAX_IMAGE_SIZE:
            raise OptionError(f"option image_size must be a whole number of pixels >= 14 (one 14-px patch; "
                              f"980 = 70 patches) and <= {MAX_IMAGE_SIZE}, got {self.image_size!r}")
        if self.normalization not in ("slice", "stack"):
            raise OptionError(f"option normalization must be 'slice' or 'stack', got {self.normalization!r}")

    def signature(self, intensity_range: tuple[float, float] | None = None) -> str:
        """Stable text for cache keys; includes the stack-wide range when one is used."""
        low, high = self.clip_percentiles
        text = f"pre-v1:clip{low:g}-{high:g}:size{self.image_size}:norm-{self.normalization}:resize-bilinear-aa"
        if self.normalization == "stack" and intensity_range is not None:
            text += f":range{intensity_range[0]:.6g},{intensity_range[1]:.6g}"
        return text

    def as_dict(self) -> dict:
        return {
            "clip_percentiles": list(self.clip_percentiles),
            "image_size": self.image_size,
            "normalization": self.normalization,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        """The inverse of `as_dict`; OptionError names a missing or ill-typed setting."""
        if not isinstance(data, dict):
            raise OptionError(f"preprocessing settings must be a JSON object, got {type(data).__name__}")
        for key in ("clip_percentiles", "image_size"):
            if key not in data:
                raise OptionError(f"preprocessing settings lack {key!r}")
        clip, size = data["clip_percentiles"], data["image_size"]
        if (not isinstance(clip, (list, tuple)) or len(clip) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in clip)):
            raise OptionError(f"preprocessing setting clip_percentiles must be two numbers [low, high], got {clip!r}")
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not float(size).is_integer():
            raise OptionError(f"preprocessing setting image_size must be a whole number of pixels, got {size!r}")
        normalization = data.get("normalization", "slice")
        if not isinstance(normalization, str):
            raise OptionError(f"preprocessing setting normalization must be 'slice' or 'stack', got {normalization!r}")
        return cls(clip_percentiles=(float(clip[0]), float(clip[1])), image_size=int(size), normalization=normalization)


def _subsample(image: np.ndarray, max_pixels: int = _PERCENTILE_SAMPLE_PIXELS) -> np.ndarray:
    step = int(np.ceil(np.sqrt(image.size / max_pixels))) if image.size > max_pixels else 1
    return image[::step, ::step]


def intensity_range(image: np.ndarray, percentiles: tuple[float, float] = (5.0, 95.0)) -> tuple[float, float]:
    """Intensity values at the given percentiles of one slice.

    image : (Y, X) any real dtype. Returns (low, high) in the image's units.
    """
    return _finite_percentiles(_subsample(np.asarray(image)), percentiles)


def pooled_intensity_range(slices: list[np.ndarray], percentiles: tuple[float, float] = (5.0, 95.0)) -> tuple[float, float]:
    """Percentiles pooled over several slices (stack-wide normalisation).

    slices : list of (Y, X) arrays, e.g. evenly spaced slices of a stack. Returns (low, high).
    """
    if not slices:
        raise ValueError("need at least one slice to estimate a stack-wide intensity range")
    per_slice = max(_PERCENTILE_SAMPLE_PIXELS // len(slices), 10_000)
    pooled = np.concatenate([_subsample(np.asarray(s), per_slice).ravel() for s in slices])
    return _finite_percentiles(pooled, percentiles)


def sample_intensity_range(values: np.ndarray, percentiles: tuple[float, float] = (5.0, 95.0)) -> tuple[float, float]:
    """Percentiles of every value of a pixel sample, e.g. windows of a stack's slices pooled (no subsampling).

    values : any shape, any real dtype (NaN and inf are ignored). Returns (low, high); StackError when no value
    is finite.
    """
    return _finite_percentiles(np.asarray(values).ravel(), percentiles)


def _finite_percentiles(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """(low, high) percentiles of the finite values (float images may hold NaN or inf where nothing was
    measured); StackError when there is no finite value at all."""
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise StackError("the image has no finite pixel values (all NaN or infinite); choose another channel "
                             "or slice, or fix the file")
    low, high = np.percentile(values, percentiles)
    return float(low), float(high)


def rescale(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and map linearly to [0, 1].

    image : (Y, X) any real dtype. Returns (Y, X) float32 in [0, 1]; a flat range gives all zeros.
    """
    float_input = np.asarray(image).dtype.kind == "f"
    data = np.asarray(image, dtype=np.float32)
    if not high > low:
        return np.zeros(data.shape, dtype=np.float32)
    out = (data - np.float32(low)) / np.float32(high - low)
    out = np.clip(out, 0.0, 1.0, out=out)
    if float_input and not np.isfinite(out).all():
        out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)  # unmeasured pixels count as background
    return out


def resize(image: np.ndarray, shape: tuple[int, int], *, mode: str = "bilinear") -> np.ndarray:
    """Resize a 2-D float image with torch (bilinear antialiased when shrinking, or nearest).

    image : (Y, X) real. shape : (rows, cols) of the result. Returns float32 of that shape.
    """
    if tuple(image.shape) == tuple(shape):
        return np.asarray(image, dtype=np.float32)
    # imported here, not at module top: the CLI's config and info commands need no torch (2 s to import)
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if mode == "nearest":
        out = F.interpolate(tensor, size=tuple(shape), mode="nearest-exact")
    else:
        shrinking = shape[0] < image.shape[0] or shape[1] < image.shape[1]
        out = F.interpolate(tensor, size=tuple(shape), mode="bilinear", align_corners=False, antialias=shrinking)
    return out[0, 0].numpy()


def prepare_slice(
    image: np.ndarray,
    config: PreprocessConfig = PreprocessConfig(),
    stack_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """The model input for one raw slice.

    image : (Y, X) raw slice in its native dtype.
    stack_range : (low, high) intensities to use when ``config.normalization == 'stack'``.
    Returns (S, S) float32 in [0, 1], S = config.image_size.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {image.shape}")
    if config.normalization == "stack":
        if stack_range is None:
            raise ValueError("stack-wide normalisation needs the stack's intensity range")
        low, high = stack_range
    else:
        low, high = intensity_range(image, config.clip_percentiles)
    scaled = rescale(image, low, high)
    return resize(scaled, (config.image_size, config.image_size))


def normalized_slice(
    image: np.ndarray,
    config: PreprocessConfig = PreprocessConfig(),
    stack_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """The clipped and rescaled slice at its original size: (Y, X) float32 in [0, 1]."""
    if config.normalization == "stack" and stack_range is not None:
        low, high = stack_range
    else:
        low, high = intensity_range(image, config.clip_percentiles)
    return rescale(image, low, high)
