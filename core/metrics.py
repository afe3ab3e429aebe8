"""Segmentation and feature-space metrics (thesis §2.8, §2.10; docs/spec/PIPELINE.md A.7).

Masks are ``(Y, X)`` bool-like arrays (anything with ``!= 0`` for structure) of the same shape.

Overlap: ``dice = 2|A∩B| / (|A| + |B|)`` and ``iou = |A∩B| / |A∪B|``.

HD95 follows MedPy's ``hd95``: the boundary of a mask is its pixels that have a background
4-neighbour (``mask & ~binary_erosion(mask)``; pixels on the image edge count as boundary, as in
MedPy), the distance of every boundary pixel of one mask to the nearest boundary pixel of the other
is taken in both directions, and HD95 is the 95th percentile (numpy's linear interpolation) of the
two lists pooled. Distances are Euclidean with ``spacing`` = (row, col) pixel size, the values of
``scipy.ndimage.distance_transform_edt(~border, sampling=spacing)`` that MedPy reads (here from a
KD-tree over the boundary pixels, which is several times faster on large slices; the tests check
both agree). Units are those of ``spacing`` (pixels by default).

Empty masks (a slice without structure, or a prediction that selects nothing):

- both empty: dice 1, iou 1, hd95 0 (the prediction is exactly right);
- exactly one empty: dice 0, iou 0, and hd95 = the slice diagonal
  ``sqrt((Y * spacing_y)**2 + (X * spacing_x)**2)``, which no distance inside the slice exceeds.
  HD95 is undefined there; the largest possible value keeps per-slice means finite while
  still penalising the miss as much as any real error can.

Feature space: silhouette score and leave-one-out kNN retrieval accuracy of patch embeddings
labelled structure/background by the ground truth (``patch_labels``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of one predicted mask against its ground truth.

    dice, iou : in [0, 1].
    hd95_px : HD95 in pixels of the slice.
    hd95_um : HD95 in µm, or None when the pixel size is unknown.
    """

    dice: float
    iou: float
    hd95_px: float
    hd95_um: float | None

    def as_dict(self) -> dict:
        """Plain ``{'dice': ..., 'iou': ..., 'hd95_px': ..., 'hd95_um': ...}`` (JSON-ready)."""
        return asdict(self)


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred) != 0
    truth = np.asarray(truth) != 0
    if pred.shape != truth.shape:
        raise ValueError(
            f"prediction shape {pred.shape} differs from ground-truth shape {truth.shape}; "
            "resize the prediction to the slice before scoring"
        )
    return pred, truth


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` of two bool-like masks of one shape.

    Returns a float in [0, 1]; 1.0 when both masks are empty.

    >>> a = np.zeros((4, 4), bool); a[:2] = True
    >>> dice(a, a)
    1.0
    """
    pred, truth = _pair(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union ``|A∩B| / |A∪B|`` of two bool-like masks of one shape.

    Returns a float in [0, 1]; 1.0 when both masks are empty.
    """
    pred, truth = _pair(pred, truth)
    union = int(np.logical_or(pred, truth).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, truth).sum()) / union


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a background 4-neighbour (outside the image counts as background)."""
    footprint = ndi.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndi.binary_erosion(mask, structure=footprint)


def _boundary_distances(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Pooled distances pred-boundary -> truth-boundary and truth -> pred; both masks non-empty."""
    scale = np.asarray(spacing, dtype=np.float64)
    points_p = np.argwhere(_boundary(pred)) * scale
    points_t = np.argwhere(_boundary(truth)) * scale
    # Same values as MedPy's distance_transform_edt(~border, sampling=spacing)[other_border], but a
    # KD-tree over the boundary pixels costs 0.2-0.6 s instead of 1.5-2.5 s on a 3000 x 3000 slice.
    to_truth = cKDTree(points_t).query(points_p)[0]
    to_pred = cKDTree(points_p).query(points_t)[0]
    return np.hstack((to_truth, to_pred))


def _diagonal(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))


def _check_spacing(spacing: Sequence[float], ndim: int, name: str = "spacing") -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(
            f"{name} {spacing} must give one positive pixel size per mask axis ({ndim} values, (y, x) order)"
        )
    return spacing


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """95th percentile of the symmetric boundary distances (MedPy's ``hd95``).

    pred, truth : (Y, X) bool-like masks of one shape.
    spacing : (row, col) size of a pixel; the result is in the same units (pixels by default).
    Returns a float >= 0: 0 when both masks are empty, the slice diagonal when exactly one is
    (see the module docstring).

    >>> a = np.zeros((20, 20), bool); a[5:10, 5:10] = True
    >>> hd95(a, np.roll(a, 3, axis=1))
    3.0
    """
    pred, truth = _pair(pred, truth)
    spacing = _check_spacing(spacing, pred.ndim)
    has_p, has_t = bool(pred.any()), bool(truth.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return _diagonal(pred.shape, spacing)
    return float(np.percentile(_boundary_distances(pred, truth, spacing), 95))


def segmentation_scores(
    pred: np.ndarray, truth: np.ndarray, pixel_size_um: tuple[float, float] | None = None
) -> SegmentationScores:
    """Dice, IoU and HD95 (pixels, and µm when the pixel size is known) of one slice.

    pred, truth : (Y, X) bool-like masks of one shape.
    pixel_size_um : (y, x) µm per pixel, or None (then ``hd95_um`` is None).
    """
    pred, truth = _pair(pred, truth)
    hd_px = hd95(pred, truth)
    hd_um = None
    if pixel_size_um is not None:
        size = _check_spacing(pixel_size_um, pred.ndim, name="pixel_size_um")
        if len(set(size)) == 1:
            # Isotropic pixels scale every distance, hence the percentile, by the same factor.
            hd_um = hd_px * size[0]
        else:
            hd_um = hd95(pred, truth, size)
    return SegmentationScores(dice=dice(pred, truth), iou=iou(pred, truth), hd95_px=hd_px, hd95_um=hd_um)


def _labels_1d(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels).reshape(-1)
    if embeddings.ndim != 2 or embeddings.shape[0] != labels.shape[0]:
        raise ValueError(
            f"embeddings {embeddings.shape} and labels {labels.shape} must be (N, D) and (N,); "
            "flatten a (H, W, D) grid with .reshape(-1, D) and its (H, W) labels with .reshape(-1)"
        )
    # float16 caches: sklearn's distances want float32/float64
    return embeddings.astype(np.float32, copy=False) if embeddings.dtype == np.float16 else embeddings, labels


def silhouette(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    metric: str = "cosine",
    max_samples: int = 4000,
    seed: int = 0,
) -> float:
    """Mean silhouette coefficient of labelled embeddings (``sklearn.metrics.silhouette_score``).

    embeddings : (N, D) float; labels : (N,) bool or int.
    When N > max_samples, a seeded uniform subsample of max_samples rows is scored (the full
    N x N distance matrix of 4900 x 4900 patches would cost ~190 MB). Same seed -> same value.
    Returns a float in [-1, 1], or nan when fewer than two classes are present (in the subsample)
    or every sample is its own class.
    """
    from sklearn.metrics import silhouette_score

    embeddings, labels = _labels_1d(embeddings, labels)
    n = labels.shape[0]
    if max_samples < 2:
        raise ValueError(f"max_samples={max_samples} must be at least 2")
    if n > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))
        embeddings, labels = embeddings[keep], labels[keep]
        n = max_samples
    n_classes = np.unique(labels).size
    if n_classes < 2 or n_classes > n - 1:
        return float("nan")
    return float(silhouette_score(embeddings, labels, metric=metric))


def knn_accuracy(embeddings: np.ndarray, labels: np.ndarray, *, k: int = 10, metric: str = "cosine") -> float:
    """Leave-one-out kNN retrieval accuracy.

    embeddings : (N, D) float; labels : (N,) bool or int.
    For every sample, its k nearest *other* samples (``sklearn.neighbors.NearestNeighbors``; the
    sample itself is excluded by index, so exact duplicates still count as neighbours) vote; the
    sample is a hit when the majority label equals its own. A tie (e.g. 5 against 5 with k = 10)
    goes to the tied label of the nearest neighbour among the tied labels, which does not favour
    any label value. k is lowered to N - 1 when there are fewer samples.
    Returns the fraction of hits in [0, 1] (1.0 when only one class is present), nan when N < 2.
    """
    from sklearn.neighbors import NearestNeighbors

    embeddings, labels = _labels_1d(embeddings, labels)
    n = labels.shape[0]
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if n < 2:
        return float("nan")
    k = min(k, n - 1)
    classes, codes = np.unique(labels, return_inverse=True)
    index = NearestNeighbors(n_neighbors=k, metric=metric).fit(embeddings)
    neighbours = index.kneighbors(return_distance=False)  # X=None: excludes each query point
    votes_labels = codes[neighbours]  # (N, k), nearest first
    flat = (np.arange(n)[:, None] * classes.size + votes_labels).ravel()
    counts = np.bincount(flat, minlength=n * classes.size).reshape(n, classes.size)
    is_top = counts == counts.max(axis=1, keepdims=True)  # (N, C): the tied winners
    # First neighbour (in distance order) whose label is among the winners.
    first = np.argmax(np.take_along_axis(is_top, votes_labels, axis=1), axis=1)
    predicted = votes_labels[np.arange(n), first]
    return float(np.mean(predicted == codes))


def patch_labels(mask: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """Structure/background label per patch: True when more than 50 % of its pixels are structure.

    mask : (Y, X) bool-like, with Y >= h and X >= w.
    grid_shape : (h, w) patch grid (e.g. (70, 70)).
    Returns (h, w) bool. Pixel (row, col) belongs to patch (floor(row * h / Y), floor(col * w / X)),
    so sizes that are not multiples of the grid give patches of slightly different pixel counts
    (area averaging, as when the mask is resized to the grid).

    >>> m = np.zeros((28, 28), bool); m[:14, :8] = True
    >>> patch_labels(m, (2, 2)).tolist()
    [[True, False], [False, False]]
    """
    mask = np.asarray(mask) != 0
    h, w = (int(v) for v in grid_shape)
    if mask.ndim != 2 or h < 1 or w < 1 or mask.shape[0] < h or mask.shape[1] < w:
        raise ValueError(f"mask {mask.shape} must be 2-D and at least as large as the patch grid {(h, w)}")
    rows, cols = mask.shape
    # Index of the first pixel of every patch row / column; every patch gets >= 1 pixel.
    row_starts = np.searchsorted((np.arange(rows) * h) // rows, np.arange(h))
    col_starts = np.searchsorted((np.arange(cols) * w) // cols, np.arange(w))
    sums = np.add.reduceat(np.add.reduceat(mask.astype(np.int32), row_starts, axis=0), col_starts, axis=1)
    counts = np.diff(np.append(row_starts, rows))[:, None] * np.diff(np.append(col_starts, cols))[None, :]
    return 2 * sums > counts


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation (population, ddof 0) of the non-nan values.

    Returns (nan, nan) when every value is nan or there are none.

    >>> summarize([1.0, 3.0, float("nan")])
    (2.0, 1.0)
    """
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf values give nan std; that is the answer
        return float(arr.mean()), float(arr.std())
