"""2-D projections of patch embeddings for the feature-space view (thesis §2.10; docs/spec/PIPELINE.md A.7).

``pca_2d`` is interactive (randomized PCA, a fraction of a second for 4900 x 1536); ``umap_2d`` takes
seconds and pays ~30 s of numba compilation on the first ``import umap`` and 40-80 s on the first
fit in a process, so ``umap`` is imported inside the function and ``warm_up_umap`` lets the app
compile it in a background thread. Extra points (e.g. the prototypes) are projected with the same
fitted map, so they can be drawn on top of the patches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Projection:
    """Embeddings and extra points in a common 2-D map.

    method : 'pca' or 'umap'.
    coords : (N, 2) float32, one row per input embedding, same order.
    extra_coords : (M, 2) float32 for the extra points ((0, 2) when there were none).
    explained_variance : PCA only, fraction of the total variance on each axis; None for UMAP.
    """

    method: str
    coords: np.ndarray
    extra_coords: np.ndarray
    explained_variance: tuple[float, float] | None


def _as_matrix(embeddings: np.ndarray, extra: np.ndarray | None, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) and (M, D) float32 (float16 caches are widened); extra None -> (0, D)."""
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(
            f"embeddings {x.shape} must be (N, D) with N >= {min_rows}; "
            "flatten a (H, W, D) grid with .reshape(-1, D)"
        )
    x = x.astype(np.float32, copy=False)
    if extra is None:
        e = np.zeros((0, x.shape[1]), np.float32)
    else:
        e = np.asarray(extra, dtype=np.float32)
        if e.ndim == 1:
            e = e[None, :]
        if e.ndim != 2 or e.shape[1] != x.shape[1]:
            raise ValueError(f"extra points {e.shape} must be (M, {x.shape[1]}) like the embeddings")
    return x, e


def pca_2d(embeddings: np.ndarray, extra: np.ndarray | None = None) -> Projection:
    """First two principal components of the embeddings; extra points through the same map.

    embeddings : (N, D) float (any float dtype), N >= 2.
    extra : (M, D) or (D,) points to project with the fitted components (not used in the fit).
    Returns a ``Projection`` with coords centred on the embeddings' mean (the mean maps to (0, 0)),
    signs fixed deterministically (sklearn's ``svd_flip``), and ``explained_variance`` the
    fraction of the total variance on each axis (sums to <= 1). With D == 1 the second axis is 0.

    Uses sklearn's randomized SVD (seeded) for large inputs: 4900 x 1536 in well under a second.
    """
    from sklearn.decomposition import PCA

    x, e = _as_matrix(embeddings, extra, min_rows=2)
    n_components = min(2, x.shape[0], x.shape[1])
    # Randomized SVD is exact enough for the top two axes and ~50x faster than a full SVD at
    # 4900 x 1536; tiny matrices take the exact path.
    solver = "randomized" if min(x.shape) > 10 else "full"
    with np.errstate(invalid="ignore", divide="ignore"):  # all rows equal: 0 / 0 variance ratios
        pca = PCA(n_components=n_components, svd_solver=solver, random_state=0).fit(x)
    coords = np.zeros((x.shape[0], 2), np.float32)
    extra_coords = np.zeros((e.shape[0], 2), np.float32)
    coords[:, :n_components] = pca.transform(x)
    if e.shape[0]:
        extra_coords[:, :n_components] = pca.transform(e)
    ratios = np.zeros(2)
    ratios[:n_components] = np.nan_to_num(pca.explained_variance_ratio_)  # nan when all rows are equal
    return Projection("pca", coords, extra_coords, (float(ratios[0]), float(ratios[1])))


def umap_2d(
    embeddings: np.ndarray,
    extra: np.ndarray | None = None,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
    seed: int | None = 0,
    max_samples: int | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> Projection:
    """UMAP map of the embeddings to 2-D (umap-learn); extra points placed with ``.transform``.

    embeddings : (N, D) float, N >= 10.
    extra : (M, D) or (D,) points placed into the fitted map (not used in the fit).
    n_neighbors, min_dist, metric : UMAP's parameters (n_neighbors is capped at N - 1).
    seed : int for a reproducible map (UMAP then runs single-threaded); None lets it use all cores.
    max_samples : when N exceeds it, the map is fitted on a seeded subsample and the other rows
        are placed with ``.transform`` (faster for large N; coords still cover all N rows).
    on_phase : called with each step as it starts, for a progress display: 'load' (importing umap-learn;
        it compiles on first use), 'fit' (fitting on F rows), 'place' (placing the other rows and extra
        points into the map).
    Returns a ``Projection`` with ``explained_variance`` None.

    The approximate nearest-neighbour search (``force_approximation_algorithm=True``) is always
    used: below 4096 samples umap-learn would otherwise compute exact pairwise distances through
    a slow Python callable (~20 s for 3000 points instead of ~6 s).
    """
    x, e = _as_matrix(embeddings, extra, min_rows=10)
    n = x.shape[0]
    if max_samples is not None and max_samples < 10:
        raise ValueError(f"max_samples={max_samples} must be at least 10 (or None for all rows)")
    fit_rows = np.arange(n)
    if max_samples is not None and n > max_samples:
        fit_rows = np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))
    report = on_phase or (lambda phase: None)
    report("load")
    reducer = _make_umap(
        n_neighbors=min(n_neighbors, fit_rows.size - 1), min_dist=min_dist, metric=metric, seed=seed
    )
    with warnings.catch_warnings():
        # umap-learn warns about its own choices (approximate search, spectral init); not actionable.
        warnings.simplefilter("ignore", UserWarning)
        report("fit")
        fitted = reducer.fit_transform(x[fit_rows])
        coords = np.empty((n, 2), np.float32)
        coords[fit_rows] = fitted
        rest = np.setdiff1d(np.arange(n), fit_rows, assume_unique=True)
        if rest.size or e.shape[0]:
            report("place")
        if rest.size:
            coords[rest] = reducer.transform(x[rest])
        extra_coords = reducer.transform(e).astype(np.float32) if e.shape[0] else np.zeros((0, 2), np.float32)
    return Projection("umap", coords, extra_coords, None)


def _make_umap(*, n_neighbors: int, min_dist: float, metric: str, seed: int | None):
    import umap  # first import compiles numba code (~30 s); keep it out of module import

    return umap.UMAP(
        n_components=2,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric=metric,
        random_state=seed,
        # A seeded UMAP is single-threaded anyway; saying so avoids its warning.
        n_jobs=1 if seed is not None else -1,
        force_approximation_algorithm=True,
    )


def warm_up_umap() -> None:
    """Fit and transform a tiny random set so numba compiles UMAP's code paths (cosine metric).

    Takes ~1-2 min on a cold 2-core machine, a few seconds once numba's on-disk cache is warm.
    Meant for a background thread at app start-up; the result is discarded.
    """
    rng = np.random.default_rng(0)
    data = rng.standard_normal((200, 16)).astype(np.float32)
    umap_2d(data, data[:3], n_neighbors=15, seed=0)
