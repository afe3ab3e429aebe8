"""The Segment page's work: points -> prototype -> score map -> mask -> overlay PNG, memoised per step.

A click changes the points, so the prototype and the slice's score map are rebuilt (embeddings come from the
on-disk cache); a threshold move reuses both and recomputes only the mask; an opacity change only redraws.
Each step's server time is recorded (``View.timings``, ms) and the last 50 views in
``st.session_state['segment.timings']``.

Best mode's forest takes ~1-3 s per click (fitting it and scoring every pixel), so a click first gets a
*preview*, drawn at once: with positive and negative points, the live step's mask (``core.live.live_click``: a
linear classifier on the same pixel features, ~0.1 s at 1024²); with positive points only, the cosine heatmap
of the patch grid (tens of ms, like thesis mode). The page then computes the forest's result (the
refinement) and reruns to show it in place of the preview; the caption says which classifier the shown mask
comes from. While a base is chosen (quick adapt) the preview is the patch heatmap.

Quick adapt: with a *base* chosen ("Start from a saved prototype": a prototype saved in the session or an uploaded
``.npz``), the page shows the base applied to this stack as it is until points are clicked here; then the points
are added to it (``core.pipeline.adapt_scorer``). The canvas shows this stack's points only; the base's examples
are counted per source stack (``core.pipeline.prototype_lineage``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from core.config import Cleanup, PipelineConfig, Upsampling
from core.errors import PrototypeError, ProtoscopeError
from core.io import VoxelSize, stack_label
from core.io.writers import write_masks
from core.live import LiveResult, fits_in_memo, live_click, prepare_slice
from core.pipeline import Scorer, SliceSegmentation, adapt_scorer, build_scorer, check_adaptable, prototype_lineage
from core.prototypes import PointSet, Prototype, load_prototype, prototype_to_bytes
from core.thresholds import ThresholdSpec, otsu_value
from ui import render, state
from ui.resources import Context
from ui.state import SavedPrototype

THRESHOLD_KINDS = {"top": "top %", "score": "absolute score", "otsu": "Otsu (per slice)", "calibrated": "calibrated on the points"}
#: Entries kept per memo; masks hold full-size (Y, X) scores and masks (~45 MB for a 3000 x 3000 slice).
_MEMO_SIZES = {"prototype": 8, "scores": 6, "masks": 3, "grey": 8, "png": 16, "preview": 8, "preview_scores": 8,
               "live": 3}
#: What the caption calls each preview, and the live step's classifier.
PATCH_PREVIEW, LIVE_PREVIEW = "patch preview", "live linear preview"


@dataclass
class View:
    """What the Segment page shows for one slice."""

    z: int
    image_png: bytes  # the overlay as JPEG bytes (see render.to_jpeg)
    display: tuple[int, int]  # (width, height)
    prototype: Prototype | None = None
    segmentation: SliceSegmentation | None = None
    message: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # ms per step
    preview: bool = False  # best mode's preview: the patch heatmap (no mask) or the live step's mask
    pending: bool = False  # the pixel result of these points is still to be computed (after drawing this)
    live_next: bool = False  # ... and first the pixel features the live step needs (its mask is shown next)
    classifier: str | None = None  # where the mask comes from: LIVE_PREVIEW, 'forest', 'linear' (None: no pixel mask)
    base: "Base | None" = None  # the saved prototype this stack's points are added to (quick adapt)

    @property
    def area_px(self) -> int | None:
        return int(self.segmentation.mask.sum()) if self.segmentation is not None else None


def _memo(name: str) -> OrderedDict:
    key = f"segment._memo.{name}"
    if key not in st.session_state:
        st.session_state[key] = OrderedDict()
    return st.session_state[key]


def _remember(name: str, key: Any, value: Any) -> Any:
    memo = _memo(name)
    memo[key] = value
    memo.move_to_end(key)
    while len(memo) > _MEMO_SIZES.get(name, 8):
        memo.popitem(last=False)
    return value


def _recall(name: str, key: Any) -> Any:
    memo = _memo(name)
    if key in memo:
        memo.move_to_end(key)
        return memo[key]
    return None


# ---- quick adapt: the base prototype ----------------------------------------------------------------------

NO_BASE = ""
UPLOAD_BASE = "\x00upload"  # the selectbox entry for an uploaded .npz (no saved name can be this)


@dataclass(frozen=True)
class Base:
    """The prototype this stack's points are added to: its name, the prototype, and a digest of its file content
    (the memo keys' identity of the base)."""

    name: str
    prototype: Prototype = field(repr=False)
    digest: str = ""


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


def base_options() -> list[str]:
    """The "Start from" choices: none, every prototype saved in the session, an uploaded file."""
    return [NO_BASE, *(saved.name for saved in state.get("segment.prototypes")), UPLOAD_BASE]


def base_label(choice: str) -> str:
    return {NO_BASE: "nothing: a new prototype", UPLOAD_BASE: "an uploaded .npz file…"}.get(choice, choice)


def current_base() -> Base | None:
    """The base chosen on the Segment page (``segment.base``), or None."""
    choice = state.get("segment.base", NO_BASE)
    if choice == UPLOAD_BASE:
        return state.get("segment.base_upload")
    for saved in state.get("segment.prototypes"):
        if saved.name == choice:
            return Base(saved.name, saved.prototype, _digest(saved.data))
    return None


def take_upload(key: str) -> None:
    """on_change of the base uploader: read the .npz into ``segment.base_upload`` (a PrototypeFileError's message
    into ``segment.base_error``)."""
    upload = st.session_state.get(key)
    state.put("segment.base_error", None)
    state.put("segment.base_upload", None)
    if upload is None:
        return
    data = upload.getvalue()
    try:
        prototype = load_prototype(data, name=upload.name)
    except ProtoscopeError as error:
        state.put("segment.base_error", str(error))
        return
    state.put("segment.base_upload", Base(upload.name.removesuffix(".npz"), prototype, _digest(data)))


def base_picker() -> None:
    """The "Start from a saved prototype" selectbox (and the uploader when a file is chosen); the choice is
    ``segment.base`` (a saved name, NO_BASE or UPLOAD_BASE), read by the next run's ``current_base``."""
    options = base_options()
    if state.get("segment.base", NO_BASE) not in options:  # renamed or gone (another sample's workspace)
        state.set_bound("segment.base", NO_BASE)
    st.selectbox("Start from a saved prototype", options, format_func=base_label, **state.widget("segment.base", NO_BASE),
                 help="Quick adapt: the points you click on this stack are added to the chosen prototype's examples, "
                      "and its threshold is calibrated on them. Saving keeps both and records where they came from.")
    if state.get("segment.base") == UPLOAD_BASE:
        st.file_uploader("Base prototype (.npz)", type=["npz"], key="segment.base_file", on_change=take_upload,
                         args=("segment.base_file",))
        if state.get("segment.base_error"):
            st.error(state.get("segment.base_error"))


def base_problem(ctx: Context, base: Base | None) -> str | None:
    """Why ``base`` cannot take points on this stack under the session's settings (None when it can)."""
    if base is None:
        return None
    try:
        check_adaptable(base.prototype, ctx.embedder, ctx.config)
    except PrototypeError as error:
        return f"'{base.name}' cannot be adapted here: {error}."
    return None


def _source_name(entry: dict) -> str:
    return stack_label(Path(entry["source_file"])) if entry.get("source_file") else "an earlier stack"


def base_caption(base: Base) -> str:
    """'Based on NAME (3 + 3 examples from a, 2 + 2 from b)': the base's positive + negative examples per stack."""
    parts = [f"{e['positive']} + {e['negative']} examples from {_source_name(e)}" for e in prototype_lineage(base.prototype)]
    return f"Based on '{base.name}' ({', '.join(parts)}); the canvas shows this stack's points only"


def origin_rows(ctx: Context, base: Base | None, points: PointSet) -> list[dict]:
    """Where the prototype's examples come from: this stack's points, then the base's examples per source stack."""
    rows = [{"from": f"this stack ({stack_label(ctx.stack.path)})", "positive": int(len(points.positive)),
             "negative": int(len(points.negative))}]
    if base is not None:
        rows += [{"from": f"inherited: {_source_name(e)}", "positive": int(e["positive"]), "negative": int(e["negative"])}
                 for e in prototype_lineage(base.prototype)]
    return rows


def lineage_text(prototype: Prototype) -> str:
    """'a: 3 + 3, b: 2 + 2' for a prototype with more than one source, else ''."""
    entries = prototype_lineage(prototype)
    if len(entries) < 2:
        return ""
    return ", ".join(f"{_source_name(e)}: {e['positive']} + {e['negative']}" for e in entries)


def scoring_config_key(config: PipelineConfig) -> str:
    """Everything of the config that changes the prototype or the score map (not the threshold)."""
    data = config.as_dict()
    data.pop("threshold", None)
    return json.dumps(data, sort_keys=True)


def prototype_key(ctx: Context, points: PointSet, base: Base | None = None) -> str:
    text = "|".join([ctx.sid, ctx.embedder.cache_key.digest(), scoring_config_key(ctx.config),
                     json.dumps(points.as_dict()), base.digest if base is not None else ""])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def ensure_embedded(ctx: Context, z: int) -> bool:
    """Embed slice z unless it is cached; returns True when it had to be computed."""
    if ctx.embedder.is_cached(z):
        return False
    ctx.embedder.embed(z)
    return True


def enough_points(ctx: Context, points: PointSet) -> bool:
    """True when the points make a prototype under the session's mode (a positive; best mode: a negative too)."""
    return len(points.positive) > 0 and not (ctx.config.uses_pixels and len(points.negative) == 0)


def keyed_points(ctx: Context, points: PointSet, base: Base | None) -> PointSet:
    """The points the shown prototype is made of: none while a base is shown as it is, else all of them."""
    return PointSet() if base is not None and not enough_points(ctx, points) else points


def prototype_and_scorer(ctx: Context, points: PointSet) -> tuple[Prototype, Scorer] | str:
    """The prototype of the points and its scorer (memoised), or a message saying what to click next.

    With a base chosen on the Segment page (``current_base``): the points added to it, or, until there are enough
    points to add, the base as it is."""
    base = current_base()
    problem = base_problem(ctx, base)
    if problem is not None:
        return problem
    enough = enough_points(ctx, points)
    if not enough and base is None:
        if len(points.positive) == 0:
            return "Click positive points on the structure (the switch above the image selects positive or negative)."
        return "Best mode's pixel classifier needs negative points too: click some background."
    key = prototype_key(ctx, keyed_points(ctx, points, base), base)
    found = _recall("prototype", key)
    if found is None:
        if base is None:  # fits best mode's classifier once; the stack's PCA basis, as the live step
            scorer = build_scorer(ctx.embedder, points, ctx.config, stack_basis=True)
        elif enough:
            scorer = adapt_scorer(base.prototype, ctx.embedder, points, ctx.config)
        else:
            scorer = Scorer(base.prototype, ctx.config)
        found = _remember("prototype", key, (scorer.prototype, scorer))
    return found


def preview_config(config: PipelineConfig) -> PipelineConfig:
    """The patch-level part of ``config``: cosine scores on the patch grid, no pixel classifier (the preview)."""
    return dataclasses.replace(config, pixel_classifier="none", patch_components=0, upsampling=Upsampling.NEAREST,
                               threshold=ThresholdSpec("top", 10.0), z_sigma=0.0, cleanup=Cleanup())


def pixel_ready(ctx: Context, points: PointSet, z: int, base: Base | None = None) -> bool:
    """True when best mode's prototype of these points and slice z's pixel score map are memoised."""
    key = prototype_key(ctx, points, base)
    return key in _memo("prototype") and (key, z) in _memo("scores")


def preview_scores(ctx: Context, points: PointSet, z: int, base: Base | None = None) -> np.ndarray:
    """(h, w) float32 patch-grid cosine scores of the points' patch prototypes (added to the base's) on slice z
    (memoised)."""
    key = "preview|" + prototype_key(ctx, points, base)
    scorer = _recall("preview", key)
    if scorer is None:
        config = preview_config(ctx.config)
        # the preview thresholds nothing: no calibration, so one patch score map per click, not two
        scorer = _remember("preview", key, build_scorer(ctx.embedder, points, config, calibrate=False) if base is None
                           else adapt_scorer(base.prototype, ctx.embedder, points, config))
    found = _recall("preview_scores", (key, z))
    if found is None:
        found = _remember("preview_scores", (key, z), scorer.score_map(ctx.embedder, z))
    return found


def score_map(ctx: Context, key: str, scorer: Scorer, z: int) -> np.ndarray:
    found = _recall("scores", (key, z))
    if found is None:
        found = _remember("scores", (key, z), scorer.score_map(ctx.embedder, z))
    return found


def threshold_spec(kind: str, top_percent: float, score: float) -> ThresholdSpec:
    if kind == "top":
        return ThresholdSpec("top", float(top_percent))
    if kind == "score":
        return ThresholdSpec("score", float(score))
    return ThresholdSpec(kind)


def default_threshold(config: PipelineConfig) -> tuple[str, float, float]:
    """(kind, top %, score) the threshold controls start from for this configuration."""
    spec = config.threshold
    return (spec.kind, float(spec.value) if spec.kind == "top" else 10.0,
            float(spec.value) if spec.kind == "score" else 0.0)


def sync_threshold_defaults(ctx: Context) -> None:
    """Start the threshold controls from the mode's default, and again whenever the mode's default changes."""
    kind, top, score = default_threshold(ctx.config)
    if state.get("segment.threshold_source") != str(ctx.config.threshold):
        state.put("segment.threshold_source", str(ctx.config.threshold))
        state.set_bound("segment.th_kind", kind)
        state.set_bound("segment.th_top", top)
        state.set_bound("segment.th_score", score)


def request_otsu() -> None:
    """on_click of the Otsu button: the next run sets the absolute score to Otsu's threshold."""
    st.session_state["segment.otsu_request"] = True


def apply_otsu_request(view: View) -> ThresholdSpec | None:
    """After an Otsu click: make the absolute score Otsu's threshold of the view's scores and return its spec
    (None when there was no click or the view has no scores)."""
    if not st.session_state.pop("segment.otsu_request", False) or view.segmentation is None:
        return None
    state.set_bound("segment.th_kind", "score")
    state.set_bound("segment.th_score", round(otsu_score(view), 2))
    return threshold_spec("score", 0, state.get("segment.th_score"))


def choose_threshold(kind: str, key: str) -> None:
    """on_change of a threshold slider: keep its value and make its kind the active one (the control the
    user touches is in charge, e.g. moving the absolute score leaves best mode's calibrated threshold)."""
    state.store(key)
    state.set_bound("segment.th_kind", kind)


def area_share(area_px: int, shape: tuple[int, int]) -> float:
    """Percent of a (Y, X) slice covered by ``area_px`` pixels."""
    return 100.0 * area_px / (shape[0] * shape[1])


def show_threshold_in_effect(view: View, shape: tuple[int, int]) -> None:
    """Let the sliders that are not in charge show the cut in effect: the absolute score of the threshold and the
    share of the slice in the mask (to the slider's 0.5 % step), so that touching one starts from the current mask."""
    if view.segmentation is None:
        return
    kind = state.get("segment.th_kind")
    if kind != "score":
        state.set_bound("segment.th_score", round(min(max(float(view.segmentation.threshold), -1.0), 1.0), 2))
    if kind != "top":
        share = area_share(view.area_px, shape)
        state.set_bound("segment.th_top", min(max(round(share * 2) / 2, 0.5), 100.0))


def choose_slice(ctx: Context, busy: str, widget_key: str | None = None) -> int:
    """The slice slider shared by Segment and Feature space (``segment.z``, middle slice at first; each page
    its own ``widget_key``); the slice is embedded (once, then cached on disk) under a spinner saying ``busy``."""
    n_slices = ctx.n_slices
    if state.get("segment.z") is None or not 0 <= state.get("segment.z") < n_slices:
        state.set_bound("segment.z", n_slices // 2)
    z = st.slider("Slice z", 0, n_slices - 1,
                  **state.widget("segment.z", n_slices // 2, widget_key=widget_key)) if n_slices > 1 else 0
    if not ctx.embedder.is_cached(z):
        with st.spinner(busy.format(z=z)):
            ensure_embedded(ctx, z)
    return z


def current_spec(ctx: Context) -> ThresholdSpec:
    """The threshold the Segment page's controls hold (the mode's default before they were touched)."""
    kind, top, score = default_threshold(ctx.config)
    if state.get("segment.threshold_source") == str(ctx.config.threshold):
        kind = state.get("segment.th_kind", kind)
        top = state.get("segment.th_top", top)
        score = state.get("segment.th_score", score)
    return threshold_spec(kind, top, score)


def segmentation(ctx: Context, key: str, scorer: Scorer, z: int, scores: np.ndarray, spec: ThresholdSpec) -> SliceSegmentation:
    found = _recall("masks", (key, z, str(spec)))
    if found is None:
        found = _remember("masks", (key, z, str(spec)), scorer.segment(ctx.embedder, z, scores, threshold=spec))
    return found


def display_image(ctx: Context, z: int, display: tuple[int, int]) -> np.ndarray:
    """(height, width) float32 display-size slice in [0, 1] (memoised)."""
    key = (ctx.sid, ctx.embedder.cache_key.digest(), z, display)
    found = _recall("grey", key)
    if found is None:
        found = _remember("grey", key, np.clip(render.resize_float(ctx.embedder.normalized(z), display), 0, 1))
    return found


def compute_view(
    ctx: Context,
    z: int,
    spec: ThresholdSpec,
    *,
    opacity: float = 0.5,
    show_heatmap: bool = True,
    show_mask: bool = True,
    display: tuple[int, int] | None = None,
    preview: bool = False,
) -> View:
    """Prototype (all slices' points), this slice's score map and mask, and the overlay PNG; timed per step.

    preview : in best mode, when the pixel result of these points is not memoised yet, return at once a preview
        (``View.preview``): the live step's mask when there are negative points (and no base), else the
        patch-level heatmap; ``View.pending`` when the pixel result can be computed next.
    """
    display = display or render.display_size(ctx.slice_shape)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    grey = display_image(ctx, z, display)
    points = state.point_set(ctx.sid)
    base = current_base()
    problem = base_problem(ctx, base)
    if (problem is None and preview and ctx.config.uses_pixels and len(points.positive)
            and not (len(points.negative) and pixel_ready(ctx, points, z, base))):
        if len(points.negative) and base is None and live_ready(ctx, points, z, spec):
            return _live_view(ctx, z, points, spec, grey, display, opacity, show_heatmap, show_mask, timings, start)
        return _preview_view(ctx, z, points, grey, display, opacity, show_heatmap, timings, start, base)
    built = prototype_and_scorer(ctx, points)
    timings["prototype"] = (time.perf_counter() - start) * 1e3
    if isinstance(built, str):
        png = _overlay(("none", ctx.sid, ctx.embedder.cache_key.digest(), z), grey, display, None, None, True, opacity, show_heatmap, show_mask, timings)
        return View(z, png, display, message=built, timings=_total(timings, start), base=base)
    prototype, scorer = built
    key = prototype_key(ctx, keyed_points(ctx, points, base), base)
    mark = time.perf_counter()
    scores = score_map(ctx, key, scorer, z)
    timings["scores"] = (time.perf_counter() - mark) * 1e3
    mark = time.perf_counter()
    message = None
    try:
        seg = segmentation(ctx, key, scorer, z, scores, spec)
    except ProtoscopeError as error:  # e.g. 'calibrated' without negative points
        seg, message = None, str(error)
    timings["mask"] = (time.perf_counter() - mark) * 1e3
    nearest = not scorer.pixel_level and ctx.config.upsampling is Upsampling.NEAREST
    png = _overlay((key, z, str(spec)), grey, display, scores, seg.mask if seg is not None else None, nearest, opacity,
                   show_heatmap, show_mask, timings)
    if base is not None and not enough_points(ctx, points) and message is None:
        message = (f"'{base.name}' as it was saved, on this stack. Click positive and negative points here to adapt it "
                   "to this stack.")
    classifier = ctx.config.pixel_classifier if scorer.pixel_level else None
    return View(z, png, display, prototype, seg, message, _total(timings, start), base=base, classifier=classifier)


def live_ready(ctx: Context, points: PointSet, z: int, spec: ThresholdSpec) -> bool:
    """True when the live step of these points on slice z is memoised or takes no pixel features to be computed
    (those of slice z and of every slice with points are memoised by the embedder)."""
    if (prototype_key(ctx, points), z, str(spec)) in _memo("live"):
        return True
    ready = set(ctx.embedder.pixel_feature_slices(ctx.config.pixel_max_side))
    return z in ready and all(s in ready for s in points.slices)


def prepare_live(ctx: Context, points: PointSet, z: int) -> bool:
    """Compute (once per slice) the pixel features the live step of these points on slice z needs; True when they
    are all memoised now (False: they do not fit in the embedder's memo together; go on to the pixel classifier)."""
    for s in dict.fromkeys([z, *points.slices]):
        prepare_slice(ctx.embedder, s, ctx.config)
    ready = set(ctx.embedder.pixel_feature_slices(ctx.config.pixel_max_side))
    return z in ready and all(s in ready for s in points.slices)


def live_result(ctx: Context, points: PointSet, z: int, spec: ThresholdSpec) -> LiveResult:
    """The live step's result of the points on slice z under the threshold ``spec`` (memoised)."""
    key = (prototype_key(ctx, points), z, str(spec))
    found = _recall("live", key)
    if found is None:
        found = _remember("live", key, live_click(ctx.embedder, points, ctx.config, z, threshold=spec))
    return found


def _live_view(ctx: Context, z: int, points: PointSet, spec: ThresholdSpec, grey: np.ndarray, display: tuple[int, int],
               opacity: float, show_heatmap: bool, show_mask: bool, timings: dict[str, float], start: float) -> View:
    """The live step's heatmap and mask, shown while the forest refines them."""
    live = live_result(ctx, points, z, spec)
    timings["live"] = (time.perf_counter() - start) * 1e3
    key = ("live", prototype_key(ctx, points), z, str(spec))
    png = _overlay(key, grey, display, live.segmentation.score_map, live.mask, False, opacity, show_heatmap, show_mask,
                   timings)
    timings = _total(timings, start)
    state.put("segment.preview_timings", dict(timings))
    state.put("segment.preview_kind", LIVE_PREVIEW)
    return View(z, png, display, segmentation=live.segmentation, timings=timings, preview=True, pending=True,
                classifier=LIVE_PREVIEW)


def _preview_view(ctx: Context, z: int, points: PointSet, grey: np.ndarray, display: tuple[int, int], opacity: float,
                  show_heatmap: bool, timings: dict[str, float], start: float, base: Base | None = None) -> View:
    grid = preview_scores(ctx, points, z, base)
    timings["preview"] = (time.perf_counter() - start) * 1e3
    key = ("preview", prototype_key(ctx, points, base), z)
    # drawn smooth (bilinear), as best mode's own patch scores would be, not as 14-px blocks
    png = _overlay(key, grey, display, grid, None, False, opacity, show_heatmap, False, timings)
    pending = len(points.negative) > 0
    live_next = pending and base is None and fits_in_memo(ctx.embedder, ctx.config, [z, *points.slices])
    message = ("Patch-level preview (cosine similarity on the cached patch grid) while this slice's pixel features "
               "are computed (once per slice) for the live preview…" if live_next else
               "Patch-level preview (cosine similarity on the cached patch grid) while the pixel classifier "
               "trains on your points…" if pending else
               "Best mode's pixel classifier needs negative points too: click some background. The heatmap is the "
               "patch-level preview of your positive points.")
    timings = _total(timings, start)
    state.put("segment.preview_timings", dict(timings))
    state.put("segment.preview_kind", PATCH_PREVIEW)
    return View(z, png, display, message=message, timings=timings, preview=True, pending=pending, live_next=live_next,
                base=base)


def timing_caption(view: View, config: PipelineConfig, fresh: bool = False) -> str:
    """The server times of the last update, for the caption under the canvas.

    fresh : the view is the pixel result just computed after a preview (the run that shows it only recalled it).
    """
    def steps(t: dict[str, float]) -> str:
        return (f"prototype {t.get('prototype', 0):.0f}, scores {t.get('scores', 0):.0f}, mask {t.get('mask', 0):.0f}, "
                f"image {t.get('image', 0):.0f}")

    t = view.timings
    if not config.uses_pixels:
        return f"Server time {t.get('total', 0):.0f} ms ({steps(t)})"
    shown = f" · mask: {mask_source(view)}" if view.segmentation is not None else ""
    if view.preview:
        kind = LIVE_PREVIEW if view.classifier == LIVE_PREVIEW else PATCH_PREVIEW
        return f"Server time: {kind} {t.get('total', 0):.0f} ms" + shown
    preview = state.get("segment.preview_timings") or {}
    pixel = state.get("segment.pixel_timings") or {}
    click = (f"{state.get('segment.preview_kind') or PATCH_PREVIEW} {preview.get('total', 0):.0f} ms, then pixel "
             f"classifier {pixel.get('total', 0):.0f} ms ({steps(pixel)})")
    if fresh and pixel:
        return f"Server time: {click}{shown}"
    return (f"Server time {t.get('total', 0):.0f} ms" + (f" · last click: {click}" if pixel else f" ({steps(t)})")
            + shown)


def mask_source(view: View) -> str:
    """Which classifier the view's mask comes from, for the caption: 'live linear preview (the pixel classifier
    refines it…)' while the forest is still to come, 'forest (refined)', 'linear', or the patch scores."""
    if view.classifier == LIVE_PREVIEW:
        return f"{LIVE_PREVIEW} (the pixel classifier refines it…)" if view.pending else LIVE_PREVIEW
    if view.classifier == "forest":
        return "forest (refined)"
    return view.classifier or "patch scores"


def _overlay(what, grey, display, scores, mask, nearest, opacity, show_heatmap, show_mask, timings) -> bytes:
    """The overlay PNG, memoised per (prototype, slice, threshold, opacity, switches, display size)."""
    mark = time.perf_counter()
    key = (*what, round(float(opacity), 3), bool(show_heatmap), bool(show_mask), display)
    png = _recall("png", key)
    if png is None:
        png = _remember("png", key, overlay_jpeg(grey, display, scores if show_heatmap else None,
                                                 mask if show_mask else None, nearest=nearest, opacity=opacity))
    timings["image"] = (time.perf_counter() - mark) * 1e3
    return png


def overlay_jpeg(grey: np.ndarray, display: tuple[int, int], scores: np.ndarray | None, mask: np.ndarray | None, *,
                 nearest: bool = False, opacity: float = 0.5) -> bytes:
    """The canvas background as JPEG bytes: the display-size grey slice (height, width) in [0, 1], the heatmap of
    ``scores`` (any resolution; ``nearest``: patch blocks) and the outline of ``mask`` (any resolution)."""
    score_range = render.color_range(_thumbnail(scores)) if scores is not None and not nearest else None
    return render.to_jpeg(render.compose(grey, display, scores=scores, nearest=nearest, opacity=opacity,
                                         score_range=score_range, mask=mask))


#: Score values the heatmap's colour range (1st and 99th percentiles) is taken from, at most (and at least a
#: quarter of this): ~1/10 of the time of the percentiles of a 1024² map, the same colours within ~1 %.
COLOR_RANGE_SAMPLES = 1 << 16


def _thumbnail(scores: np.ndarray) -> np.ndarray:
    """Every n-th row and column of a score map, n such that at most COLOR_RANGE_SAMPLES values are left."""
    step = int(np.ceil(np.sqrt(scores.size / COLOR_RANGE_SAMPLES)))
    return scores[::step, ::step] if step > 1 else scores


def _total(timings: dict[str, float], start: float) -> dict[str, float]:
    timings["total"] = (time.perf_counter() - start) * 1e3
    history = st.session_state.setdefault("segment.timings", [])
    history.append(dict(timings))
    del history[:-50]
    return timings


def otsu_score(view: View) -> float | None:
    """Otsu's threshold of the slice's thresholded scores (for the Otsu button), or None without scores."""
    if view.segmentation is None:
        return None
    return float(otsu_value(view.segmentation.scores))


def area_um2(area_px: int, voxel: VoxelSize | None) -> float | None:
    return None if voxel is None else float(area_px * voxel.x * voxel.y)


def with_threshold(prototype: Prototype, spec: ThresholdSpec) -> Prototype:
    """The prototype with ``spec`` as its threshold (what the Segment page's controls hold when it is saved)."""
    return dataclasses.replace(prototype, config=prototype.config.with_options(threshold=spec))


def unique_name(name: str, taken: list[str]) -> str:
    base = name.strip() or "prototype"
    candidate, index = base, 2
    while candidate in taken:
        candidate, index = f"{base}-{index}", index + 1
    return candidate


def save_prototype(ctx: Context, view: View, spec: ThresholdSpec, name: str) -> SavedPrototype:
    """Keep the view's prototype, with the threshold now in use, in the session (and as .npz bytes)."""
    if view.prototype is None:
        raise ProtoscopeError("there is no prototype yet: click at least one positive point first")
    prototype = with_threshold(view.prototype, spec)
    saved_list = state.get("segment.prototypes")
    saved = SavedPrototype(unique_name(name, [p.name for p in saved_list]), prototype, prototype_to_bytes(prototype), ctx.sid)
    saved_list.append(saved)
    return saved


def mask_tiff_bytes(mask: np.ndarray, voxel: VoxelSize | None) -> bytes:
    """One slice's mask as an ImageJ TIFF (uint8 0/255, voxel size), through core's writer."""
    with tempfile.TemporaryDirectory(prefix="protoscope-mask-") as folder:
        path = write_masks(mask[None], Path(folder) / "mask.tif", voxel_size=voxel)
        return path.read_bytes()
