"""The pixel branch of best mode: a small classifier on per-pixel features, trained on the user's clicks.

Patch prototypes on a 14-px grid cannot follow thin structures, and cosine similarity over many
standardised filters dilutes the intensity signal (docs/spec/PIPELINE.md part B). ilastik and convpaint instead
train a classifier on the clicked pixels' filter responses; a pixel-classification benchmark found
DINO + filter features best. This module does that, as an option of the prototype pipeline:

features   filter-bank responses (``core.features.filterbank``) of the normalised slice at a working resolution
           (the slice itself, or shrunk so its longer side is at most ``max_side`` px), standardised with
           statistics pooled over the stack (each stack with its own, so that transfer sees comparable
           scales), optionally followed by the first ``patch_components`` principal components of the
           backbone's patch embeddings, bilinearly upsampled (the "DINO + filters" combination).
examples   the feature vectors at every click and at the pixels within ``augment_radius`` of it.
classifier ``forest`` (a random forest, 50 trees, as ilastik) or ``linear`` (logistic regression), fitted
           on the examples. Prototype files store the examples, not the fitted model (no pickles): the
           model is re-fitted deterministically (fixed seed) when the prototype is loaded.
score      2·p(structure) - 1, in [-1, 1], at the working resolution, upsampled bilinearly to the slice.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from core.features import filterbank
from core.grid import upsample_bilinear
from core.preprocess import resize

CLASSIFIERS = ("none", "forest", "linear")


@dataclass(frozen=True)
class PixelFeatureSpace:
    """How pixel features are made, and the stack statistics that standardise them.

    mean, std : (F,) float32 statistics of this stack's filter-bank features (working resolution).
    projection : (D, k) float32 PCA basis of patch embeddings (k = patch_components) or None.
    projection_mean : (D,) float32 mean removed before projecting, or None.
    """

    mean: np.ndarray
    std: np.ndarray
    projection: np.ndarray | None = None
    projection_mean: np.ndarray | None = None


def working_shape(slice_shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(rows, cols) of the working resolution: the slice, shrunk to a longer side of ``max_side`` px."""
    height, width = slice_shape
    scale = min(1.0, max_side / max(height, width))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def filter_features(normalized: np.ndarray, max_side: int) -> np.ndarray:
    """(Y, X) float32 slice in [0, 1] -> (h, w, F) float32 filter-bank features at the working resolution."""
    shape = working_shape(normalized.shape, max_side)
    image = resize(normalized, shape) if shape != normalized.shape else normalized.astype(np.float32)
    return filterbank.pixel_features(image)


def feature_statistics(feature_maps: list[np.ndarray], max_samples: int = 400_000) -> tuple[np.ndarray, np.ndarray]:
    """Pooled per-feature mean and std over several (h, w, F) maps (subsampled to ``max_samples`` rows)."""
    rows = sum(m.shape[0] * m.shape[1] for m in feature_maps)
    step = max(1, rows // max_samples)
    pooled = np.concatenate([m.reshape(-1, m.shape[-1])[::step] for m in feature_maps])
    return filterbank.feature_statistics(pooled)


def fit_projection(patch_embeddings: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA basis of (..., D) patch embeddings: ((D, k) basis, (D,) mean), k = min(components, D)."""
    from sklearn.decomposition import PCA

    flat = patch_embeddings.reshape(-1, patch_embeddings.shape[-1]).astype(np.float32)
    k = min(components, flat.shape[0], flat.shape[1])
    pca = PCA(n_components=k, svd_solver="randomized", random_state=0).fit(flat)
    # Scale so that every component has unit variance, comparable with the standardised filters.
    basis = pca.components_.T / np.sqrt(np.maximum(pca.explained_variance_, 1e-12))
    return basis.astype(np.float32), pca.mean_.astype(np.float32)


def combined_features(
    filters: np.ndarray,
    space: PixelFeatureSpace,
    patch_embeddings: np.ndarray | None = None,
) -> np.ndarray:
    """Standardised filters, plus projected and upsampled patch embeddings when the space has a projection.

    filters : (h, w, F) raw filter features. patch_embeddings : (gh, gw, D). Returns (h, w, F [+ k]) float32.
    """
    standardized = filterbank.standardize(filters, space.mean, space.std)
    if space.projection is None or patch_embeddings is None:
        return standardized

    projected = (patch_embeddings.reshape(-1, patch_embeddings.shape[-1]) - space.projection_mean) @ space.projection
    grid = projected.reshape(*patch_embeddings.shape[:2], -1)
    return np.concatenate([standardized, upsample_channels(grid, filters.shape[:2])], axis=-1)


def upsample_channels(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(gh, gw, k) map -> (rows, cols, k) float32, each channel as ``core.grid.upsample_bilinear`` gives it.

    One interpolation of all k channels at once: ~4x faster than k calls, and the same numbers (each output
    pixel is the same weighted sum of the same four samples).
    """
    import torch  # lazily, as core.grid: reading stacks and prototype files must not load torch
    import torch.nn.functional as F

    if grid.shape[-1] == 1:
        return upsample_bilinear(grid[..., 0], shape)[..., None]
    channels = torch.from_numpy(np.ascontiguousarray(np.moveaxis(grid, -1, 0), dtype=np.float32))[None]
    out = F.interpolate(channels, size=tuple(shape), mode="bilinear", align_corners=False)[0]
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())


def example_pixels(xy: np.ndarray, slice_shape: tuple[int, int], work_shape: tuple[int, int], radius: int) -> np.ndarray:
    """Working-resolution (row, col) of the clicks and of every pixel within ``radius`` of each click.

    xy : (N, 2) x = column, y = row in original pixels. Returns (M, 2) int64, clipped to the image.
    """
    if len(xy) == 0:
        return np.zeros((0, 2), np.int64)
    scale_y = work_shape[0] / slice_shape[0]
    scale_x = work_shape[1] / slice_shape[1]
    rows = np.floor((xy[:, 1] + 0.5) * scale_y).astype(np.int64)
    cols = np.floor((xy[:, 0] + 0.5) * scale_x).astype(np.int64)
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) if dy * dy + dx * dx <= radius * radius]
    out_rows = np.concatenate([rows + dy for dy, _ in offsets])
    out_cols = np.concatenate([cols + dx for _, dx in offsets])
    return np.stack([np.clip(out_rows, 0, work_shape[0] - 1), np.clip(out_cols, 0, work_shape[1] - 1)], axis=1)


#: Below these numbers of rows a forest fits / predicts on one thread: joblib's pool costs 10-30 ms per call,
#: more than the trees' work on a few hundred examples or a few clicked pixels. The trees and the
#: probabilities do not depend on the number of threads.
SMALL_FIT_ROWS = 2_000
SMALL_PREDICT_ROWS = 50_000


def _threads_for(rows: int, small: int) -> int:
    """Threads for a forest job of ``rows`` rows: one below ``small``, else up to two (the cores we plan for)."""
    return 1 if rows < small else min(2, os.cpu_count() or 1)


@contextlib.contextmanager
def _quiet_joblib() -> Iterator[None]:
    """Silence scikit-learn's 'delayed should be used with Parallel' warning, raised when its thread pool is
    entered from a thread it did not configure (e.g. Streamlit's script thread); harmless here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*sklearn.utils.parallel.delayed.*")
        yield


class PixelClassifier:
    """A classifier fitted on standardised example features; ``score`` gives 2·p - 1 per pixel."""

    def __init__(self, kind: str, positive: np.ndarray, negative: np.ndarray, *, n_trees: int = 50, seed: int = 0) -> None:
        if kind not in ("forest", "linear"):
            raise ValueError(f"unknown pixel classifier {kind!r}; use forest or linear")
        if len(positive) == 0 or len(negative) == 0:
            raise ValueError("the pixel classifier needs positive and negative clicks")
        features = np.concatenate([positive, negative]).astype(np.float32)
        labels = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))]).astype(np.int64)
        # Balanced classes: clicks are few and their numbers per class are arbitrary.
        if kind == "forest":
            self.model = RandomForestClassifier(
                n_estimators=n_trees, min_samples_leaf=2, class_weight="balanced", random_state=seed,
                n_jobs=_threads_for(len(features), SMALL_FIT_ROWS),  # same trees for any n_jobs (fixed random_state)
            )
        else:
            self.model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000)
        with _quiet_joblib():
            self.model.fit(features, labels)
        self.kind = kind

    def score(self, features: np.ndarray, chunk_rows: int = 262_144) -> np.ndarray:
        """(h, w, F) standardised features -> (h, w) float32 in [-1, 1]."""
        flat = features.reshape(-1, features.shape[-1])
        out = np.empty(flat.shape[0], np.float32)
        if self.kind == "forest":
            # Calibration scores a few clicked pixels: joblib's thread pool would cost more than the trees.
            self.model.n_jobs = _threads_for(flat.shape[0], SMALL_PREDICT_ROWS)
        with _quiet_joblib():
            for start in range(0, flat.shape[0], chunk_rows):
                out[start : start + chunk_rows] = self.model.predict_proba(flat[start : start + chunk_rows])[:, 1]
        return (2.0 * out - 1.0).reshape(features.shape[:2])
