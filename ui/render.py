"""Display images for the app: slice + similarity heatmap + mask outline as PNG bytes (numpy + Pillow only).

Everything is drawn at display size (a few hundred pixels), never at the slice's full size, so a 3000 x 3000
slice costs the same as the 256 x 256 demo. Colours come from a small LUT (matplotlib is not installed).
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

#: Anchor colours of matplotlib's 'inferno' (at 0, 1/8, ..., 1), interpolated into a 256-entry LUT.
_INFERNO_ANCHORS = np.array([
    [0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
    [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164],
], dtype=np.float64)
HEAT_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_INFERNO_ANCHORS)), _INFERNO_ANCHORS[:, c]) for c in range(3)],
    axis=1,
).round().astype(np.uint8)  # (256, 3)

OUTLINE_RGB = (0, 255, 255)  # cyan: visible on grey and on every LUT colour
POSITIVE_RGB = (0, 220, 0)
NEGATIVE_RGB = (255, 40, 40)
SELECTION_RGB = (0, 170, 255)


def display_size(slice_shape: tuple[int, int], max_width: int = 512, max_height: int = 640) -> tuple[int, int]:
    """(width, height) in display pixels for a (Y, X) slice: the largest size within the bounds, same aspect."""
    height, width = slice_shape
    scale = min(max_width / width, max_height / height)
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def resize_float(values: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """(h, w) float map -> (height, width) float32 at ``size`` = (width, height)."""
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(image.resize(size, method), dtype=np.float32)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(Y, X) bool -> (height, width) bool at ``size`` = (width, height), nearest."""
    image = Image.fromarray(np.asarray(mask, dtype=bool).view(np.uint8) * np.uint8(255), mode="L")
    return np.asarray(image.resize(size, Image.Resampling.NEAREST)) > 127


def grey_rgb(image01: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(Y, X) float in [0, 1] -> (height, width, 3) uint8 grey at ``size`` (bilinear, antialiased)."""
    grey = (np.clip(np.asarray(image01, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    resized = Image.fromarray(grey, mode="L").resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.repeat(np.asarray(resized)[..., None], 3, axis=2)


def heat_rgb(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """(h, w) float -> (h, w, 3) uint8 through the LUT; ``low``..``high`` spans the LUT."""
    span = max(high - low, 1e-12)
    index = np.clip((np.asarray(values, dtype=np.float32) - low) / span * 255.0, 0, 255).astype(np.uint8)
    return HEAT_LUT[index]


def color_range(values: np.ndarray) -> tuple[float, float]:
    """Robust colour range of a score map: its 1st and 99th percentiles (min/max when they coincide)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [1.0, 99.0])
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a (h, w) bool mask: mask pixels with a background 4-neighbour (or on the image edge)."""
    mask = np.asarray(mask, dtype=bool)
    inner = np.zeros_like(mask)
    # a pixel is inner when it and its four neighbours are all in the mask (the 4-connected erosion)
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


def to_png(rgb: np.ndarray) -> bytes:
    """(h, w, 3) uint8 -> PNG bytes (fast zlib level: these images live for one interaction)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def to_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    """(h, w, 3) uint8 -> JPEG bytes, 4:4:4 so thin coloured outlines stay sharp.

    ~2 ms and ~60 KB for 512 x 512, against ~25 ms and ~230 KB as PNG: the canvas background is re-sent
    on every click, so this is what keeps a click's server time low.
    """
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(buffer, format="JPEG", quality=quality,
                                                                               subsampling=0)
    return buffer.getvalue()


def compose(
    image01: np.ndarray,
    size: tuple[int, int],
    *,
    scores: np.ndarray | None = None,
    nearest: bool = True,
    opacity: float = 0.5,
    mask: np.ndarray | None = None,
    score_range: tuple[float, float] | None = None,
    tint: np.ndarray | None = None,
    tint_rgb: tuple[int, int, int] = SELECTION_RGB,
) -> np.ndarray:
    """The slice at display ``size`` with a heatmap, a mask outline and a tint blended in: (height, width, 3) uint8.

    image01 : (Y, X) float in [0, 1]. scores : (h, w) map at any resolution (patch grid or pixels), drawn
        with ``nearest`` (patch blocks) or bilinear resizing and blended with ``opacity`` in [0, 1].
    mask : (Y', X') bool at any resolution; its outline is drawn in cyan.
    tint : (h, w) bool at any resolution (e.g. selected patches), blended half-transparent in ``tint_rgb``.
    """
    base = grey_rgb(image01, size)
    out = base
    if scores is not None and opacity > 0:
        low, high = score_range or color_range(scores)
        if nearest:  # colour the small grid, then enlarge the colours: same picture, far fewer pixels to map
            small = Image.fromarray(heat_rgb(scores, low, high), mode="RGB")
            heat = np.asarray(small.resize(size, Image.Resampling.NEAREST))
        else:
            heat = heat_rgb(resize_float(scores, size), low, high)
        alpha = min(max(float(opacity), 0.0), 1.0)
        out = np.asarray(Image.blend(Image.fromarray(base, mode="RGB"), Image.fromarray(heat, mode="RGB"), alpha)).copy()
    if tint is not None:
        selected = resize_mask(tint, size)
        out = out.copy() if out is base else out
        out[selected] = (0.45 * out[selected] + 0.55 * np.asarray(tint_rgb, np.float32)).astype(np.uint8)
    if mask is not None:
        out = out.copy() if out is base else out
        out[outline(resize_mask(mask, size))] = OUTLINE_RGB
    return out


def montage(
    images01: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    labels: Sequence[str],
    *,
    columns: int = 4,
    tile: int = 180,
) -> np.ndarray:
    """Thumbnails of slices with their mask outline and a label, in a grid: (H, W, 3) uint8."""
    count = len(images01)
    if count == 0:
        return np.full((tile, tile, 3), 255, np.uint8)
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    first = np.asarray(images01[0])
    size = display_size(first.shape, tile, tile)
    gap = 4
    sheet = np.full((rows * (size[1] + gap) + gap, columns * (size[0] + gap) + gap, 3), 255, np.uint8)
    for index, (image, mask, label) in enumerate(zip(images01, masks, labels)):
        row, col = divmod(index, columns)
        y0, x0 = gap + row * (size[1] + gap), gap + col * (size[0] + gap)
        sheet[y0:y0 + size[1], x0:x0 + size[0]] = compose(image, size, mask=mask)
    canvas = Image.fromarray(sheet)
    draw = ImageDraw.Draw(canvas)
    for index, label in enumerate(labels):
        row, col = divmod(index, columns)
        x0, y0 = gap + col * (size[0] + gap), gap + row * (size[1] + gap)
        draw.rectangle([x0, y0, x0 + 7 * len(label) + 6, y0 + 14], fill=(0, 0, 0))
        draw.text((x0 + 3, y0 + 1), label, fill=(255, 255, 255))
    return np.asarray(canvas)
