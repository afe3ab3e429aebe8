"""The Feature space page's data: a slice's patch embeddings, their labels, 2-D projections and scores."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import streamlit as st

from core.grid import points_to_patches
from core.metrics import knn_accuracy, patch_labels, silhouette
from core.projection import Projection, pca_2d, umap_2d, warm_up_umap
from core.prototypes import Prototype
from ui import state
from ui.resources import Context

COLOR_BY = {"mask": "current mask", "truth": "ground truth", "points": "clicked points"}
CLASS_COLORS = {
    "structure": "#e4572e", "background": "#6c8ead",
    "positive point": "#00b000", "negative point": "#e00000", "other patch": "#b8c4d0",
}
PROTOTYPE_COLORS = {"positive": "#006400", "negative": "#8b0000"}
#: What the UMAP job is doing, for its progress note (core.projection.umap_2d's phases).
UMAP_PHASES = {
    "queued": "starting",
    "load": "loading UMAP (the first use in a server compiles it: about a minute)",
    "fit": "fitting the map",
    "place": "placing the remaining patches and the prototypes",
    "done": "done",
}
#: UMAP fits on at most this many patches (the rest are placed with .transform): keeps a 70 x 70 grid ~ seconds.
UMAP_MAX_SAMPLES = 2500


@dataclass(frozen=True)
class Labelled:
    """Per-patch class names (N,) and whether they come from a ground truth (for the scores)."""

    names: np.ndarray
    classes: tuple[str, ...]


def embeddings(ctx: Context, z: int) -> np.ndarray:
    """(h, w, D) float32 patch embeddings of slice z (cached on disk)."""
    return ctx.embedder.embed(z)


@dataclass(frozen=True)
class SlicePatches:
    """A slice's patches as the page uses them: (N, D) embeddings row by row, the (h, w) grid, the data key."""

    flat: np.ndarray
    grid_shape: tuple[int, int]
    key: str


def slice_patches(ctx: Context, z: int) -> SlicePatches:
    grid = embeddings(ctx, z)
    return SlicePatches(grid.reshape(-1, grid.shape[-1]), (int(grid.shape[0]), int(grid.shape[1])), data_key(ctx, z))


def color_options(has_truth: bool, has_mask: bool) -> list[str]:
    """Keys of COLOR_BY available: the mask only once there is one, the ground truth only when chosen."""
    return [k for k in COLOR_BY if (k != "truth" or has_truth) and (k != "mask" or has_mask)]


def labels_for(color_by: str, ctx: Context, z: int, grid_shape: tuple[int, int], mask: np.ndarray | None,
               truth: np.ndarray | None) -> Labelled:
    """The patch labels to colour by: the (Y, X) mask, the (Y, X) ground truth or the clicked points."""
    if color_by == "mask":
        return mask_labels(mask, grid_shape)
    if color_by == "truth":
        return mask_labels(truth, grid_shape)
    return point_labels(ctx, z, grid_shape)


def data_key(ctx: Context, z: int) -> str:
    return f"{ctx.embedder.cache_key.digest()}:{z}"


def mask_labels(mask: np.ndarray, grid_shape: tuple[int, int]) -> Labelled:
    """'structure' where more than half a patch is in the (Y, X) mask, else 'background'."""
    inside = patch_labels(mask, grid_shape).ravel()
    return Labelled(np.where(inside, "structure", "background"), ("structure", "background"))


def point_labels(ctx: Context, z: int, grid_shape: tuple[int, int]) -> Labelled:
    """Patches under this slice's clicked points: 'positive point' / 'negative point', the rest 'other patch'."""
    names = np.full(grid_shape[0] * grid_shape[1], "other patch", dtype=object)
    for point in state.slice_points(ctx.sid, z):
        row, col = points_to_patches(np.array([[point[0], point[1]]]), ctx.slice_shape, grid_shape)[0]
        names[row * grid_shape[1] + col] = "positive point" if point[2] > 0 else "negative point"
    return Labelled(names.astype(str), ("positive point", "negative point", "other patch"))


@st.cache_data(max_entries=16, show_spinner=False)
def _projection(key: str, method: str, _flat: np.ndarray, _extra: np.ndarray | None, extra_key: str) -> Projection:
    if method == "umap":
        return umap_2d(_flat, _extra, seed=0, max_samples=UMAP_MAX_SAMPLES)
    return pca_2d(_flat, _extra)


def projection(key: str, method: str, flat: np.ndarray, extra: np.ndarray | None) -> Projection:
    """PCA (interactive) or UMAP (seconds; cached) of (N, D) embeddings, extra points mapped alike."""
    extra_key = "" if extra is None else str(hash(extra.tobytes()))
    return _projection(key, method, flat, extra, extra_key)


@st.cache_data(max_entries=16, show_spinner=False)
def _scores(key: str, labels_key: str, _flat: np.ndarray, _labels: np.ndarray) -> tuple[float, float]:
    return silhouette(_flat, _labels), knn_accuracy(_flat, _labels, k=10)


def separation_scores(key: str, flat: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(silhouette, leave-one-out 10-NN accuracy) of the patches labelled by the ground truth (cosine)."""
    return _scores(key, str(hash(truth.tobytes())), flat, truth)


def prototype_points(prototype: Prototype | None) -> tuple[np.ndarray | None, list[str]]:
    """(M, D) references to mark on the map, with their names."""
    if prototype is None:
        return None, []
    refs = [prototype.positive_references, prototype.negative_references]
    names = [f"positive prototype {i + 1}" for i in range(len(refs[0]))]
    names += [f"negative prototype {i + 1}" for i in range(len(refs[1]))]
    stacked = np.concatenate([r for r in refs if len(r)]) if any(len(r) for r in refs) else None
    return stacked, names


def selected_indices(event) -> np.ndarray:
    """Patch indices of the points selected in the chart (their customdata), duplicates removed."""
    if event is None:
        return np.zeros(0, np.int64)
    selection = event.get("selection") if isinstance(event, dict) else getattr(event, "selection", None)
    points = (selection or {}).get("points", []) if selection is not None else []
    found = []
    for point in points:
        data = point.get("customdata")
        if isinstance(data, (list, tuple)):
            data = data[0] if data else None
        if data is not None:
            found.append(int(data))
    return np.unique(np.asarray(found, np.int64))


def selection_grid(indices: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """(h, w) bool of the selected patches."""
    grid = np.zeros(grid_shape[0] * grid_shape[1], bool)
    grid[indices[(indices >= 0) & (indices < grid.size)]] = True
    return grid.reshape(grid_shape)


def figure(proj: Projection, labelled: Labelled, proto_names: list[str]):
    """Plotly scatter: one WebGL trace per class (customdata = patch index), prototypes as stars."""
    import plotly.graph_objects as go

    fig = go.Figure()
    index = np.arange(len(labelled.names))
    for name in labelled.classes:
        chosen = labelled.names == name
        if not chosen.any():
            continue
        fig.add_trace(go.Scattergl(
            x=proj.coords[chosen, 0], y=proj.coords[chosen, 1], mode="markers", name=f"{name} ({int(chosen.sum())})",
            customdata=index[chosen], marker=dict(size=4 if name != "other patch" else 3,
                                                  color=CLASS_COLORS.get(name, "#888"), opacity=0.75),
            hovertemplate="patch %{customdata}<extra>" + name + "</extra>",
        ))
    names = np.asarray(proto_names[:len(proj.extra_coords)], dtype=object)
    for sign in ("positive", "negative"):  # one legend entry per kind, in the colour its stars are drawn in
        chosen = np.array([str(n).startswith(sign) for n in names], bool)
        if not chosen.any():
            continue
        count = int(chosen.sum())
        fig.add_trace(go.Scatter(
            x=proj.extra_coords[chosen, 0], y=proj.extra_coords[chosen, 1], mode="markers",
            name=f"{sign} prototype" + (f"s ({count})" if count > 1 else ""),
            text=list(names[chosen]), hovertemplate="%{text}<extra></extra>",
            marker=dict(symbol="star", size=16, color=PROTOTYPE_COLORS[sign], line=dict(width=1, color="white")),
        ))
    axis = "PC" if proj.method == "pca" else "UMAP "
    titles = [f"{axis}1", f"{axis}2"]
    if proj.explained_variance is not None:
        titles = [f"PC{i + 1} ({v * 100:.1f} % of variance)" for i, v in enumerate(proj.explained_variance)]
    fig.update_layout(height=520, margin=dict(l=10, r=10, t=30, b=10), dragmode="lasso",
                      xaxis_title=titles[0], yaxis_title=titles[1], legend=dict(orientation="h", y=1.08))
    return fig


@st.cache_resource(show_spinner=False)
def _umap_warm_up() -> threading.Thread:
    thread = threading.Thread(target=warm_up_umap, name="umap-warm-up", daemon=True)
    thread.start()
    return thread


def start_umap_warm_up() -> bool:
    """Compile UMAP's numba code in a background thread, once per process ($PROTOSCOPE_UMAP_WARMUP=0 skips)."""
    if os.environ.get("PROTOSCOPE_UMAP_WARMUP", "1").strip() == "0":
        return False
    return _umap_warm_up().is_alive()


@dataclass
class UmapJob:
    """A UMAP map computed in a background thread while the page shows the PCA map.

    phase : a key of UMAP_PHASES; result / error once the thread has finished.
    """

    key: str
    started: float = field(default_factory=time.monotonic)
    phase: str = "queued"
    result: Projection | None = None
    error: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.result is None and self.error is None

    def progress_text(self) -> str:
        return f"UMAP: {UMAP_PHASES.get(self.phase, self.phase)}… {time.monotonic() - self.started:.0f} s"

    def _run(self, flat: np.ndarray, extra: np.ndarray | None) -> None:
        try:
            result = umap_2d(flat, extra, seed=0, max_samples=UMAP_MAX_SAMPLES, on_phase=self._set_phase)
        except Exception as error:  # noqa: BLE001 - reported on the page, never lost in the thread
            self.error = f"{type(error).__name__}: {error}"
        else:
            self.phase, self.result = "done", result

    def _set_phase(self, phase: str) -> None:
        self.phase = phase


#: UMAP jobs kept per session (finished ones are the cache of their maps).
UMAP_JOBS_KEPT = 6


def umap_job(key: str, flat: np.ndarray, extra: np.ndarray | None) -> UmapJob:
    """The UMAP job of these patches and extra points: the finished or running one, else a new one started in a
    background thread (``features.umap_jobs`` in the session, the last UMAP_JOBS_KEPT kept)."""
    job_key = f"{key}|{'' if extra is None else hash(np.ascontiguousarray(extra).tobytes())}"
    jobs: OrderedDict = state.get("features.umap_jobs") or OrderedDict()
    job = jobs.get(job_key)
    if job is None:
        job = UmapJob(job_key)
        job.thread = threading.Thread(target=job._run, args=(flat, extra), name="protoscope-umap", daemon=True)
        job.thread.start()
        jobs[job_key] = job
    jobs.move_to_end(job_key)
    while len(jobs) > UMAP_JOBS_KEPT:
        jobs.popitem(last=False)
    state.put("features.umap_jobs", jobs)
    return job


def forget_umap_job(job_key: str) -> None:
    """Drop a job (an on_click callback: 'Try again' after a failed UMAP)."""
    (state.get("features.umap_jobs") or OrderedDict()).pop(job_key, None)
