"""Seeded positive/negative points from a ground-truth mask (thesis §3.5.1; docs/spec/PIPELINE.md A.3).

Positives are drawn uniformly, without replacement, from the structure eroded by a disk of radius
``margin_px``; negatives from the background outside the structure dilated by the same disk, so no
point sits within ``margin_px`` pixels of the structure's boundary. The image edge is not a
boundary: structure touching the edge keeps its pixels there (erosion with ``border_value=1``), so
a pixel is a positive candidate exactly when ``distance_transform_edt(truth) > margin_px`` and a
negative candidate exactly when ``distance_transform_edt(~truth) > margin_px``.

When a class has fewer candidates at that margin than it needs (thin structures, a slice almost
filled), the margin is halved with integer division (5 -> 2 -> 1 -> 0) until both classes have
enough, or it is 0. One margin is used for both classes (as in the thesis) and recorded in the
result. A class needs the requested count, or all its pixels when it has fewer: a 9-pixel
structure asked for 25 points ends at margin 0 and gives its 9 pixels, and a class with no pixel
at all (a slice without structure) gets zero points without shrinking the other class's margin;
the caller decides what to do with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import isqrt

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class SampledPoints:
    """Points sampled from one ground-truth mask.

    positive_xy : (N, 2) int64, (x = column, y = row) in pixels of the mask, on the structure.
    negative_xy : (M, 2) int64, same convention, on the background.
    margin_px : margin actually used, pixels (<= the requested margin; see the module docstring).
    """

    positive_xy: np.ndarray
    negative_xy: np.ndarray
    margin_px: int


def _dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """``ndi.binary_dilation(mask, disk(radius))`` (outside the image = False), ~6x faster.

    The disk is the union over row offsets dy of horizontal segments of half-width
    isqrt(r² - dy²), so the dilation is an OR of vertically shifted 1-D maximum filters
    (scipy's is O(N) whatever the width): 0.15 s instead of 0.9 s at 3000 x 3000, radius 5.
    """
    rows = mask.shape[0]
    out = mask.copy()
    segments: dict[int, np.ndarray] = {0: mask}
    for dy in range(-radius, radius + 1):
        half = isqrt(radius * radius - dy * dy)
        if half not in segments:
            segments[half] = ndi.maximum_filter1d(mask, 2 * half + 1, axis=1, mode="constant", cval=0)
        seg = segments[half]
        if dy > 0:
            out[dy:] |= seg[: rows - dy]
        elif dy < 0:
            out[:dy] |= seg[-dy:]
        else:
            out |= seg
    return out


def _shrink(mask: np.ndarray, margin: int) -> np.ndarray:
    """Pixels of ``mask`` farther than ``margin`` px (Euclidean) from every pixel outside it.

    Equals ``ndi.binary_erosion(mask, disk(margin), border_value=1)``: the image edge is not a
    boundary.
    """
    if margin == 0:
        return mask
    return ~_dilate_disk(~mask, margin)


def _draw(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct (x, y) pixels of a 2-D bool mask, uniformly; all of them if fewer."""
    flat = np.flatnonzero(candidates)
    if count == 0 or flat.size == 0:
        return np.zeros((0, 2), np.int64)
    picked = flat[rng.choice(flat.size, size=min(count, flat.size), replace=False)]
    rows, cols = np.divmod(picked, candidates.shape[1])
    return np.stack([cols, rows], axis=1).astype(np.int64)


def sample_points(
    truth: np.ndarray,
    n_positive: int = 25,
    n_negative: int = 25,
    *,
    margin_px: int = 5,
    seed: int = 0,
) -> SampledPoints:
    """Sample positive points on the structure and negative points on the background.

    truth : (Y, X) bool-like ground truth (True / non-zero = structure).
    n_positive, n_negative : points wanted per class (>= 0).
    margin_px : minimum distance to the structure boundary, pixels (disk footprint).
    seed : seed of ``np.random.default_rng``; same mask and seed -> same points.
    Returns ``SampledPoints`` with (x, y) int64 pixel coordinates and the margin used.

    >>> m = np.zeros((40, 40), bool); m[10:30, 10:30] = True
    >>> p = sample_points(m, 3, 3, margin_px=2, seed=1)
    >>> bool(m[p.positive_xy[:, 1], p.positive_xy[:, 0]].all()), p.margin_px
    (True, 2)
    """
    truth = np.asarray(truth) != 0
    if truth.ndim != 2:
        raise ValueError(f"ground-truth mask must be 2-D (Y, X), got shape {truth.shape}")
    if n_positive < 0 or n_negative < 0 or margin_px < 0:
        raise ValueError(
            f"point counts ({n_positive}, {n_negative}) and margin_px ({margin_px}) must be >= 0"
        )
    background = ~truth
    n_structure = int(truth.sum())
    # What each class can give at margin 0; a class with nothing there does not shrink the margin.
    need_pos = min(int(n_positive), n_structure)
    need_neg = min(int(n_negative), truth.size - n_structure)
    margin = int(margin_px)
    while True:
        pos = _shrink(truth, margin) if need_pos else truth
        neg = _shrink(background, margin) if need_neg else background
        if margin == 0 or (int(pos.sum()) >= need_pos and int(neg.sum()) >= need_neg):
            break
        margin //= 2
    rng = np.random.default_rng(seed)
    return SampledPoints(
        positive_xy=_draw(pos, need_pos, rng),
        negative_xy=_draw(neg, need_neg, rng),
        margin_px=margin,
    )
