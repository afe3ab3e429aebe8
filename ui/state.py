"""Session state of the app: what the user made and chose, in one place, named by page.

Keys (all persist across reruns and page switches; widgets use a shadow key, see ``bind``):

home.sample            Sample | None            the opened stack
home.channel           int                      image channel
home.truth             Truth | None             ground truth: a channel of the stack, or a mask file
home.backbone          BackboneChoice           the active backbone and weights
home.backbone_overrides dict | None             hidden test hook: DINOv2 config overrides for random weights
home.mode              'best' | 'thesis'         best (the recommended mode) unless the user switches
home.options           dict                     advanced pipeline options (core.config OPTION_NAMES)
segment.points         {stack_id: {z: [[x, y, label], ...]}}   label +1 positive, -1 negative
segment.generation     int                      bumped by undo/clear: gives the canvases fresh keys
segment.prototypes     [SavedPrototype, ...]    saved in this session
segment.preview_timings, segment.pixel_timings  ms per step of best mode's patch preview and pixel result
segment.pixel_fresh    bool                     the run shows the pixel result computed right after a preview
segment.preview_kind   'patch preview' | 'live linear preview' | None: which preview preceded the forest's mask (named in the timing caption)
batch.result, evaluate.result                   the last run's results
refine.stacks          [TrainingStack, ...]     training stacks added from the data root (ui.refine)
refine.job             TrainJob | None          the running or last training (a background thread)
refine.models          [TrainedModel, ...]      models trained in this session (safetensors bytes)
refine.result          RefineOutputs | None     the last refined batch
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import streamlit as st

from core.prototypes import PointSet, Prototype


@dataclass(frozen=True)
class Sample:
    """An opened stack: resolved path, how it was opened ('demo' | 'path' | 'upload') and a display name."""

    path: str
    origin: str
    name: str

    @property
    def is_demo(self) -> bool:
        return self.origin == "demo"


@dataclass(frozen=True)
class Truth:
    """Ground truth: ``channel`` of the stack, or the first channel of ``path`` (same Z, Y, X)."""

    channel: int | None = None
    path: str | None = None

    def describe(self, channel_names: list[str] | None = None) -> str:
        if self.path is not None:
            return f"mask file {self.path.rsplit('/', 1)[-1]}"
        name = channel_names[self.channel] if channel_names and self.channel is not None else ""
        return f"channel {self.channel}" + (f" ({name})" if name else "")


@dataclass(frozen=True)
class BackboneChoice:
    """Arguments of core.backbones.load_backbone: name, weights ('hub' | 'random' | a path), seed."""

    name: str
    weights: str = "hub"
    seed: int = 0


@dataclass
class SavedPrototype:
    name: str
    prototype: Prototype = field(repr=False)
    data: bytes = field(repr=False)  # the .npz file content
    stack_id: str = ""


DEFAULTS: dict[str, Callable[[], Any]] = {
    "home.sample": lambda: None,
    "home.channel": lambda: 0,
    "home.truth": lambda: None,
    "home.backbone": lambda: None,  # filled by resources.active_backbone() on first use
    "home.backbone_overrides": lambda: None,
    "home.mode": lambda: "best",
    "home.options": dict,
    "segment.points": dict,
    "segment.generation": lambda: 0,
    "segment.prototypes": list,
    "segment.snapshots": dict,
    "refine.stacks": list,
    "refine.job": lambda: None,
    "refine.models": list,
    "refine.result": lambda: None,
}


def init() -> None:
    """Create the missing keys with their defaults (called at the top of every run)."""
    for key, make in DEFAULTS.items():
        if key not in st.session_state:
            st.session_state[key] = make()


def get(key: str, default: Any = None) -> Any:
    """A stored value; keys of DEFAULTS are created on first use, others give ``default`` when unset."""
    if key not in st.session_state:
        if key not in DEFAULTS:
            return default
        st.session_state[key] = DEFAULTS[key]()
    return st.session_state[key]


def put(key: str, value: Any) -> None:
    st.session_state[key] = value


def bind(key: str, default: Any, widget_key: str | None = None) -> str:
    """Shadow widget key for the persistent setting ``key`` (``_w.<key>`` unless ``widget_key`` is given).

    Streamlit forgets a widget's value when a page without it runs; the value is kept under ``key``, the one
    source of truth, and the widget is re-seeded from it whenever the two differ: when the widget reappears,
    or when another widget of the same setting (the mode radio of the Open sample page and of the sidebar,
    the slice slider of Segment and Feature space; each page has its own widget key) changed it. Pass
    ``on_change=store, args=(key, widget_key)`` so the stored value follows the widget before the script
    runs (``widget`` does).
    """
    widget = widget_key or "_w." + key
    if key not in st.session_state:
        st.session_state[key] = default
    if widget not in st.session_state or not _same(st.session_state[widget], st.session_state[key]):
        st.session_state[widget] = st.session_state[key]
    return widget


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. arrays: compare as different, so the stored value wins
        return False


def store(key: str, widget_key: str | None = None) -> None:
    """Copy a bound widget's value into its persistent key (an ``on_change`` callback)."""
    st.session_state[key] = st.session_state[widget_key or "_w." + key]


def widget(key: str, default: Any, *, on_change: Callable[..., None] | None = None,
           args: tuple = (), widget_key: str | None = None) -> dict[str, Any]:
    """A widget's session-state arguments for the persistent setting ``key``: ``st.radio(..., **widget(k, d))``.

    Returns dict(key=bind(key, default, widget_key), on_change=store, args=(key, widget_key),
    persist_state='session'). A callback of its own (``on_change``, called with ``args``) replaces ``store``
    and must store the value itself. ``widget_key`` names the widget when the setting has a widget on more
    than one page (one widget key per page: Streamlit keeps one value per key, and a key shared by two
    pages' widgets lost its value on the page switch with ``persist_state``).

    ``persist_state='session'`` keeps the widget's value while it is not drawn and makes Streamlit send it
    to the browser again on every run until the browser reports it back. Without it, entering a page ran
    it twice at once (the canvas reports its first value): the first run sent the re-seeded value, the
    second drew the widget without it, and a browser that mounted only the second showed the widget's
    default (a toggle off, a slider at its minimum) and sent that back with the next click (issue 11,
    point 3: the heatmap switched itself off).

    >>> widget("home.mode", "best")   # doctest: +SKIP
    {'key': '_w.home.mode', 'on_change': <function store>, 'args': ('home.mode', None), 'persist_state': 'session'}
    """
    if on_change is None:
        on_change, args = store, (key, widget_key)
    return {"key": bind(key, default, widget_key), "on_change": on_change, "args": args, "persist_state": "session"}


def set_bound(key: str, value: Any) -> None:
    """Change a bound setting from a callback (before its widget is drawn in this run)."""
    st.session_state[key] = value
    st.session_state["_w." + key] = value


# ---- points ---------------------------------------------------------------------------------------------


def stack_id(path: str, channel: int) -> str:
    """Short stable id of (stack file, channel) for keys."""
    return hashlib.sha1(f"{path}|{channel}".encode()).hexdigest()[:10]


def slice_points(sid: str, z: int) -> list[list[int]]:
    """[[x, y, label], ...] of one slice (a copy)."""
    return [list(p) for p in get("segment.points").get(sid, {}).get(int(z), [])]


def set_slice_points(sid: str, z: int, points: list[list[int]]) -> None:
    all_points = get("segment.points")
    per_stack = dict(all_points.get(sid, {}))
    if points:
        per_stack[int(z)] = [[int(v) for v in p] for p in points]
    else:
        per_stack.pop(int(z), None)
    all_points[sid] = per_stack


def point_set(sid: str) -> PointSet:
    """All points of a stack as a core PointSet ((N, 3) x, y, z per class)."""
    per_stack = get("segment.points").get(sid, {})
    positive = [[p[0], p[1], z] for z, pts in sorted(per_stack.items()) for p in pts if p[2] > 0]
    negative = [[p[0], p[1], z] for z, pts in sorted(per_stack.items()) for p in pts if p[2] < 0]
    return PointSet(np.asarray(positive, np.int64).reshape(-1, 3), np.asarray(negative, np.int64).reshape(-1, 3))


def point_summary(sid: str) -> list[dict]:
    """Per-slice counts [{'z', 'positive', 'negative'}] in z order."""
    per_stack = get("segment.points").get(sid, {})
    return [
        {"z": z, "positive": sum(p[2] > 0 for p in pts), "negative": sum(p[2] < 0 for p in pts)}
        for z, pts in sorted(per_stack.items())
    ]


def bump_generation() -> None:
    st.session_state["segment.generation"] = get("segment.generation") + 1


def undo_point(sid: str, z: int) -> None:
    """Remove the last point of slice z (an on_click callback)."""
    points = slice_points(sid, z)
    if points:
        set_slice_points(sid, z, points[:-1])
        bump_generation()


def clear_points(sid: str, z: int | None = None) -> None:
    """Remove the points of slice z, or of every slice when z is None (an on_click callback)."""
    if z is None:
        get("segment.points")[sid] = {}
    else:
        set_slice_points(sid, z, [])
    bump_generation()
