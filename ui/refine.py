"""The Refine page's work: train a U-Net on prototype heatmaps and apply it (thesis §3.7; core.refine).

Training mirrors ``python -m core refine train``: every chosen slice of every training stack (a
``core.protocol.EvalStack``) becomes a ``RefineSample`` (raw slice, the prototype's heatmap and mask, the ground
truth), the samples are split into training and validation slices, and ``core.refine.train.train_unet`` trains
with early stopping. It runs in a background thread (``TrainJob``), so the page can draw a live loss plot, take
a Cancel (``should_stop``: the best model so far is kept) and be left and come back to. The thread belongs to
the session that started it: it stops at its next step once that session has ended (``ui.jobs.SessionWatch``:
the tab was closed). It never changes torch's process-wide thread count, which every session shares. Applying
runs ``core.refine.apply.refine_stack``, the loop of ``python -m core refine apply``, into a multi-page TIFF,
and stops likewise with its session (nothing is written then).

Heatmaps come from a prototype saved on the Segment page (applied to every slice, as ``refine train`` does),
or from per-slice prototypes built from points sampled on each slice's ground truth (``same_slice_samples``,
the thesis's own U-Net experiments). Models are kept in the session as safetensors bytes; the loaded network
is shared through ``st.cache_resource``, keyed by the SHA-256 of those bytes, and checked against the
heatmaps' backbone on every use.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import streamlit as st

from core.config import PipelineConfig
from core.errors import PrototypeError, ProtoscopeError, RefineError
from core.features.backbones import Backbone
from core.features.embedding_cache import EmbeddingCache
from core.io import stack_label
from core.io.atomic import write_text
from core.io.writers import TiffMaskWriter
from core.metrics import dice
from core.protocol import EvalStack, select_slices
from core.prototypes import Prototype
from core.refine.apply import RefinedSlice, heatmap_mode_note, refine_stack, uses_prototype
from core.refine.files import check_refiner, refiner_bytes, refiner_from_bytes
from core.refine.model import RefineConfig, Refiner
from core.refine.samples import (
    DEFAULT_MAX_SIDE,
    RAW_CLIP_PERCENTILES,
    raw01,
    same_slice_samples,
    split_by_fraction,
    split_by_stack,
    stack_samples,
)
from core.refine.train import EpochReport, train_unet
from core.zspec import parse_z_spec
from ui import jobs, render, resources, settings
from ui.batch import format_eta, montage_slices, safe_name
from ui.evaluate import short_list
from ui.resources import Context

LOG = logging.getLogger("protoscope.app")

INPUT_SETS = {
    "raw+heatmap": "raw + heatmap (the thesis's best)",
    "raw": "raw slice only",
    "heatmap": "heatmap only",
    "raw+heatmap+mask": "raw + heatmap + prototype mask",
}
HEATMAPS = {
    "prototype": "a saved prototype (Segment page), applied to every slice",
    "same-slice": "per-slice prototypes from points sampled on each slice's ground truth",
}
INPUT_SIZES = (32, 64, 128, 192, 256, 384, 512)


# ---- training stacks ------------------------------------------------------------------------------------


def training_stack(path: str | Path, channel: int, *, truth_channel: int | None = None,
                   truth_path: str | Path | None = None) -> EvalStack:
    """A stack with ground truth to train on (a core EvalStack), labelled like every command (``stack_label``)."""
    return EvalStack(Path(path), int(channel), mask_channel=truth_channel,
                     mask_path=Path(truth_path) if truth_path is not None else None, name=stack_label(path))


def describe_stack(spec: EvalStack) -> str:
    """'file · image channel C · truth ...' for the list of training stacks."""
    truth = f"truth channel {spec.mask_channel}" if spec.mask_path is None else f"truth {spec.mask_path.name}"
    return f"{spec.image_path.name} · image channel {spec.image_channel} · {truth}"


def stack_from_context(ctx: Context) -> EvalStack:
    """The open sample as a training stack; RefineError when it has no ground truth."""
    if ctx.truth is None:
        raise RefineError(f"'{ctx.sample.name}' has no ground truth: choose a ground-truth channel or mask file on "
                          "the Open sample page, or leave this stack out and add stacks with ground truth below")
    return training_stack(ctx.sample.path, ctx.channel, truth_channel=ctx.truth.channel, truth_path=ctx.truth.path)


def stack_from_root(path_text: str, channel: int, truth_channel: int | None, truth_path_text: str | None) -> EvalStack:
    """A stack inside the data root with its ground truth (a channel, or a mask file inside the root), checked."""
    path = settings.resolve_in_root(path_text)
    stack = resources.open_cached_stack(path)
    channel = stack.resolve_channel(int(channel))
    if truth_path_text is not None:
        if not truth_path_text.strip():
            raise RefineError(f"give the mask file of '{path.name}' (a path inside the data root), or its truth channel")
        mask_path = settings.resolve_in_root(truth_path_text)
        resources.check_truth_file(resources.open_cached_stack(mask_path), stack)
        return training_stack(path, channel, truth_path=mask_path)
    truth = stack.resolve_channel(int(truth_channel))
    if truth == channel:
        raise RefineError(f"'{path.name}': the ground-truth channel {truth} is the image channel; choose another one")
    return training_stack(path, channel, truth_channel=truth)


def add_stack(stacks: list[EvalStack], new: EvalStack, current: EvalStack | None = None) -> list[EvalStack]:
    """``stacks`` with ``new`` appended; RefineError when a stack of the same name is already there."""
    taken = {s.label for s in stacks} | ({current.label} if current is not None else set())
    if new.label in taken:
        raise RefineError(f"a stack named '{new.label}' is already in the training set; models and reports tell "
                          "stacks apart by file name, so rename one of them")
    return [*stacks, new]


def slice_lists(stacks: Sequence[EvalStack], how: str, count: int, skip: int, z_text: str) -> dict[str, list[int]]:
    """Slices to train on, per stack label: ``count`` evenly spaced after skipping ``skip`` at each end (the thesis
    protocol, core.protocol.select_slices), or the z selection ``z_text`` (core.zspec) in every stack."""
    chosen = {}
    for spec in stacks:
        n_z = int(resources.open_cached_stack(spec.image_path).shape[0])
        if how == "chosen":
            try:
                chosen[spec.label] = sorted(parse_z_spec(z_text, n_z))
            except ProtoscopeError as error:
                raise RefineError(f"'{spec.label}': {error}") from None
        else:
            chosen[spec.label] = select_slices(n_z, int(count), int(skip))[0]
    return chosen


def check_prototype(prototype: Prototype, backbone: Backbone, name: str) -> None:
    """PrototypeError unless the prototype was made with the active backbone (its heatmaps need that backbone)."""
    if prototype.backbone != backbone.spec.name or prototype.embed_dim != backbone.embed_dim:
        raise PrototypeError(
            f"prototype '{name}' was made with backbone '{prototype.backbone}' ({prototype.embed_dim} dims) but "
            f"'{backbone.spec.name}' is active; load '{prototype.backbone}' on the Open sample page, or save a new "
            "prototype on the Segment page"
        )


# ---- the training plan and job --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainPlan:
    """Everything a training run needs, checked before its thread starts.

    heatmaps : 'prototype', 'same-slice', or 'none' (input set 'raw'). validation : ('fraction', f) or
    ('stack', label). Torch's thread count is not part of a plan: it is process-wide, shared by every session.
    """

    stacks: tuple[EvalStack, ...]
    z_values: dict[str, list[int]]
    config: RefineConfig
    heatmaps: str
    prototype: Prototype | None = None
    prototype_name: str = ""
    pipeline: PipelineConfig | None = None
    n_points: int = 25
    points_seed: int = 0
    validation: tuple[str, float | str] = ("fraction", 0.2)

    @property
    def n_slices(self) -> int:
        return sum(len(self.z_values[s.label]) for s in self.stacks)


def make_plan(
    ctx: Context,
    stacks: Sequence[EvalStack],
    z_values: dict[str, list[int]],
    config: RefineConfig,
    *,
    heatmaps: str,
    prototype: Prototype | None = None,
    prototype_name: str = "",
    n_points: int = 25,
    points_seed: int = 0,
    validation: tuple[str, float | str] = ("fraction", 0.2),
) -> TrainPlan:
    """A checked TrainPlan; RefineError / PrototypeError saying what to change."""
    if not stacks:
        raise RefineError("no training stacks: include this stack (it needs a ground truth) or add stacks with ground "
                          "truth from the data root")
    uses_heatmap = config.channels != ("raw",)
    if not uses_heatmap:
        heatmaps = "none"
    elif heatmaps == "prototype":
        if prototype is None:
            raise RefineError(f"input set '{config.input_set}' uses the prototype heatmap: save a prototype on the "
                              "Segment page, or choose per-slice prototypes from the ground truth")
        check_prototype(prototype, ctx.backbone, prototype_name)
    elif heatmaps != "same-slice":
        raise RefineError(f"unknown heatmap source {heatmaps!r}; choose one of {', '.join(HEATMAPS)}")
    kind, value = validation
    if kind == "stack":
        if len(stacks) < 2:
            raise RefineError("holding out a whole stack for validation needs at least two training stacks; add one, "
                              "or validate on a fraction of each stack's slices")
        if value not in {s.label for s in stacks}:
            raise RefineError(f"the validation stack '{value}' is not among the training stacks")
    elif not 0.0 < float(value) < 1.0:
        raise RefineError(f"the validation fraction must lie strictly between 0 and 1, got {value}")
    if sum(len(v) for v in z_values.values()) < 2:
        raise RefineError("training needs at least two slices (one to train on, one to validate); choose more slices")
    return TrainPlan(tuple(stacks), dict(z_values), config, heatmaps, prototype if heatmaps == "prototype" else None,
                     prototype_name, ctx.config, int(n_points), int(points_seed), (kind, value))


@dataclass
class TrainedModel:
    """A refiner kept in the session: the safetensors file content, with a name and a one-line summary."""

    name: str
    data: bytes = field(repr=False)
    summary: str = ""
    input_set: str = ""


class _Stopped(Exception):
    pass


class TrainJob:
    """One training run in a background thread. The page reads its fields; only the thread writes them.

    phase : 'samples' (building samples), 'training', then 'done', 'cancelled' or 'failed'.
    history : one core.refine.EpochReport per finished epoch (the live plot).
    model : the trained model (also after a cancel, when at least one epoch finished), else None.
    watch : the session the job belongs to (``ui.jobs.SessionWatch``); once it has ended the job stops like a
        Cancel, after the current sample or training slice, and ``session_ended`` is True.
    """

    def __init__(self, plan: TrainPlan, backbone: Backbone, cache: EmbeddingCache | None,
                 watch: jobs.SessionWatch | None = None) -> None:
        self.plan = plan
        self.watch = watch
        self.session_ended = False
        self.backbone = backbone
        self.cache = cache
        self.phase = "samples"
        self.samples_done = 0
        self.samples_total = plan.n_slices
        self.samples_started = time.perf_counter()
        self.history: list[EpochReport] = []
        self.n_train = self.n_val = 0
        self.prototype_dice: float | None = None
        self.model: TrainedModel | None = None
        self.error: str | None = None
        self.stopped_early = False
        self.collected = False
        self.started = time.time()
        self.seconds = 0.0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="protoscope-refine-train", daemon=True)

    def start(self) -> "TrainJob":
        self.thread.start()
        return self

    def cancel(self) -> None:
        """Ask the thread to stop: after the current sample or training slice; the best model so far is kept."""
        self._stop.set()

    def should_stop(self) -> bool:
        """Polled by the thread at every step: a Cancel, or the end of the job's session."""
        if self._stop.is_set():
            return True
        if self.watch is not None and self.watch.should_stop():
            self.session_ended = True
            self._stop.set()
            return True
        return False

    @property
    def cancelling(self) -> bool:
        return self._stop.is_set() and self.running

    @property
    def running(self) -> bool:
        return self.phase in ("samples", "training")

    def samples_eta(self) -> float | None:
        if self.samples_done == 0:
            return None
        elapsed = time.perf_counter() - self.samples_started
        return elapsed / self.samples_done * (self.samples_total - self.samples_done)

    # -- the thread
    def _on_slice(self, _done: int, _total: int) -> None:
        self.samples_done += 1  # core counts per stack; the job counts over all stacks
        if self.should_stop():
            raise _Stopped

    def _run(self) -> None:
        # torch's intra-op thread count is process-wide: setting it here would change it for every session
        start = time.perf_counter()
        try:
            phase = self._train()
        except _Stopped:
            phase = "cancelled"
        except ProtoscopeError as error:
            self.error, phase = str(error), "failed"
        except MemoryError:
            self.error, phase = "out of memory: choose fewer slices, a smaller input size or fewer stacks", "failed"
        except Exception as error:  # noqa: BLE001 - a bug must reach the page as one line, not end the thread silently
            LOG.exception("unexpected error while training a refiner")
            self.error, phase = f"unexpected error ({type(error).__name__}: {str(error)[:300]})", "failed"
        self.seconds = time.perf_counter() - start
        if self.session_ended:
            LOG.info("refiner training stopped after %d epoch(s): its session ended", len(self.history))
        self.phase = phase  # last: the page treats the job as finished from here on

    def _train(self) -> str:
        samples = build_samples(self.plan, self.backbone, self.cache, self._on_slice)
        train, val = split(samples, self.plan.validation)
        self.n_train, self.n_val = len(train), len(val)
        if all(s.mask is not None for s in val):
            self.prototype_dice = float(np.mean([dice(s.mask, s.truth) for s in val]))
        self.phase = "training"
        result = train_unet(train, val, self.plan.config, on_epoch=self.history.append, should_stop=self.should_stop,
                            metadata=training_metadata(self.plan, self.backbone))
        self.stopped_early = result.stopped_early
        if result.history:
            self.model = trained_model(result.refiner, self.plan)
        return "cancelled" if result.cancelled else "done"


def start_training(ctx: Context, plan: TrainPlan) -> TrainJob:
    """Start ``plan`` in a background thread bound to the session of the calling script run."""
    return TrainJob(plan, ctx.backbone, resources.embedding_cache(), jobs.session_watch()).start()


def build_samples(plan: TrainPlan, backbone: Backbone, cache: EmbeddingCache | None,
                  on_slice: Callable[[int, int], None] | None = None) -> list:
    """RefineSamples of every stack of the plan (core.refine.samples), at most DEFAULT_MAX_SIDE px per side."""
    samples = []
    for spec in plan.stacks:
        z_values = plan.z_values[spec.label]
        if plan.heatmaps == "same-slice":
            samples += same_slice_samples(spec, z_values, backbone, plan.pipeline, n_points=plan.n_points,
                                          seed=plan.points_seed, cache=cache, max_side=DEFAULT_MAX_SIDE, on_slice=on_slice)
        else:
            samples += stack_samples(spec, z_values, prototype=plan.prototype,
                                     backbone=backbone if plan.prototype is not None else None, cache=cache,
                                     max_side=DEFAULT_MAX_SIDE, on_slice=on_slice)
    if not samples:
        raise RefineError("none of the chosen slices has both structure and background in its ground truth; "
                          "choose other slices")
    return samples


def split(samples: list, validation: tuple[str, float | str]) -> tuple[list, list]:
    """(train, validation) by a fraction of every stack's slices or by holding out one stack (core.refine.samples)."""
    kind, value = validation
    if kind == "stack":
        return split_by_stack(samples, str(value))
    try:
        return split_by_fraction(samples, float(value))
    except ProtoscopeError:
        raise RefineError("no stack has two or more training slices, so none can be held out for validation; choose "
                          "more slices") from None


def training_metadata(plan: TrainPlan, backbone: Backbone) -> dict:
    """Provenance stored in the model file (the same keys as ``python -m core refine train`` writes)."""
    prototype = plan.prototype
    heatmap_config = prototype.config if prototype is not None else (plan.pipeline if plan.heatmaps == "same-slice" else None)
    kind, value = plan.validation
    return {
        "backbone": backbone.spec.name if plan.heatmaps != "none" else None,
        "weights": (prototype.weights_id if prototype is not None else backbone.weights_id) if plan.heatmaps != "none" else None,
        "heatmap_mode": heatmap_config.mode.value if heatmap_config is not None else None,
        "heatmaps": plan.heatmaps,
        "prototype_name": plan.prototype_name if prototype is not None else None,
        "prototype_config": heatmap_config.as_dict() if heatmap_config is not None else None,
        "same_slice": {"n_points": plan.n_points, "seed": plan.points_seed} if plan.heatmaps == "same-slice" else None,
        "raw_clip_percentiles": list(RAW_CLIP_PERCENTILES),
        "max_side": DEFAULT_MAX_SIDE,
        "stacks": [{"stack_id": s.label, "path": str(s.image_path), "image_channel": s.image_channel,
                    "truth": f"channel {s.mask_channel}" if s.mask_path is None else str(s.mask_path),
                    "z": plan.z_values[s.label]} for s in plan.stacks],
        "validation": {"kind": kind, "fraction": float(value)} if kind == "fraction" else {"kind": kind, "stack_id": value},
        "made_by": "protoscope app",
    }


# ---- models ---------------------------------------------------------------------------------------------


def model_digest(data: bytes) -> str:
    """SHA-256 (hex) of a model file's bytes: the key of the shared loaded network."""
    return hashlib.sha256(data).hexdigest()


@st.cache_resource(max_entries=8, show_spinner=False)
def _cached_refiner(digest: str, _data: bytes, _name: str) -> Refiner:
    """The refiner of one model file content, loaded once per process (key: ``digest``; ``_data`` and ``_name``
    are not hashed). A file that fails to load raises, and Streamlit caches nothing for it."""
    return refiner_from_bytes(_data, name=_name)


def load_model(data: bytes, *, expected_backbone: str | None = None, name: str = "model") -> Refiner:
    """The refiner of safetensors bytes (loaded once per content, see ``_cached_refiner``), checked to fit heatmaps of
    ``expected_backbone``. ModelFileError for a damaged file, RefineError for a misfit; both name ``model 'name'``.

    The refiner is shared by every session: it is only read (evaluation mode, no gradients).
    """
    where = f"model '{name}'"
    refiner = _cached_refiner(model_digest(data), data, where)
    check_refiner(refiner, expected_backbone=expected_backbone, where=where)
    return refiner


def describe_refiner(refiner: Refiner) -> str:
    meta = refiner.metadata
    source = meta.get("source") or {}
    history = meta.get("history") or []
    best = meta.get("best_epoch")
    dice_text = f", val Dice {history[best]['val_dice']:.3f}" if best is not None and best < len(history) else ""
    heatmaps = f" · heatmaps: {source.get('backbone')} ({source.get('heatmap_mode')} mode)" if source.get("backbone") else ""
    return (f"{refiner.config.input_set} at {refiner.config.input_size} px · threshold {refiner.threshold:g} · "
            f"{meta.get('epochs_run', '?')} epoch(s){dice_text}{heatmaps}")


def trained_model(refiner: Refiner, plan: TrainPlan) -> TrainedModel:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"refiner_{plan.stacks[0].label}_{plan.config.input_set.replace('+', '-')}_{stamp}"
    return TrainedModel(name, refiner_bytes(refiner), describe_refiner(refiner), plan.config.input_set)


def uploaded_model(file_name: str, data: bytes) -> TrainedModel:
    """A model file the user uploaded, checked to be a readable refiner (ModelFileError names the file)."""
    refiner = load_model(data, name=file_name)
    return TrainedModel(Path(file_name).stem, data, describe_refiner(refiner), refiner.config.input_set)


def unique_model_name(name: str, models: Sequence[TrainedModel]) -> str:
    taken = {m.name for m in models}
    candidate, index = name, 2
    while candidate in taken:
        candidate, index = f"{name}-{index}", index + 1
    return candidate


# ---- live display ---------------------------------------------------------------------------------------


def loss_figure(history: Sequence[EpochReport]):
    """Plotly figure: training and validation loss (left axis) and validation Dice (right axis, 0-1) per epoch."""
    import plotly.graph_objects as go

    epochs = [r.epoch + 1 for r in history]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=epochs, y=[r.train_loss for r in history], mode="lines+markers", name="train loss"))
    fig.add_trace(go.Scatter(x=epochs, y=[r.val_loss for r in history], mode="lines+markers", name="val loss"))
    fig.add_trace(go.Scatter(x=epochs, y=[r.val_dice for r in history], mode="lines+markers", name="val Dice",
                             yaxis="y2", line=dict(dash="dot")))
    if history:
        best = history[-1].best_epoch
        fig.add_vline(x=best + 1, line=dict(color="#999", dash="dash"), annotation_text="best", annotation_position="top")
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=30, b=10), xaxis_title="epoch", yaxis_title="combo loss",
                      yaxis2=dict(title="val Dice", overlaying="y", side="right", range=[0, 1], tickmode="linear",
                                  tick0=0, dtick=0.2, showgrid=False),
                      legend=dict(orientation="h", y=1.15), xaxis=dict(dtick=1))
    return fig


def progress_text(job: TrainJob) -> tuple[float, str]:
    """(fraction done, label) for the progress bar."""
    if job.phase == "samples":
        done, total = job.samples_done, max(job.samples_total, 1)
        return min(done / total, 1.0), (f"Preparing samples (heatmaps through the prototype): {done} / {total} slices · "
                                        f"{format_eta(job.samples_eta())}")
    if not job.history:
        return 0.0, f"Training on {job.n_train} slice(s), validating on {job.n_val}: first epoch…"
    last = job.history[-1]
    return ((last.epoch + 1) / last.max_epochs,
            f"Epoch {last.epoch + 1} / {last.max_epochs} · val Dice {last.val_dice:.3f} · at most "
            f"{format_eta(last.eta_s)} (early stopping may end sooner)")


def outcome(job: TrainJob) -> tuple[str, str]:
    """('success' | 'warning' | 'error', message) for a finished job."""
    if job.phase == "failed":
        return "error", f"Training failed: {job.error}"
    best = job.history[job.history[-1].best_epoch] if job.history and job.history[-1].best_epoch >= 0 else None
    score = ""
    if best is not None:
        score = f" Validation Dice {best.val_dice:.3f} at threshold {best.val_threshold:g} (epoch {best.epoch + 1})"
        if job.prototype_dice is not None:
            score += f"; the prototype masks alone: {job.prototype_dice:.3f}"
        score += "."
    if job.phase == "cancelled":
        if job.model is None:
            return "warning", "Training was cancelled before the first epoch finished: no model."
        return "warning", f"Training was cancelled after {len(job.history)} epoch(s); the best model so far is kept.{score}"
    stop = " (stopped early: the validation loss stopped improving)" if job.stopped_early else ""
    return "success", f"Trained {len(job.history)} epoch(s) in {job.seconds:.0f} s{stop}.{score}"


# ---- applying a model -----------------------------------------------------------------------------------


@dataclass
class RefineOutputs:
    """A refined batch, kept in the session for display and downloads."""

    stack_name: str
    model_name: str
    z_values: list[int]
    area_px: list[int]
    pixel_area_um2: float | None
    z_step_um: float | None
    seconds: float
    folder: str = ""
    files: dict[str, str] = field(default_factory=dict)  # 'tif', 'csv' -> path
    montage_png: bytes = b""
    dice_refined: list[float] | None = None
    dice_prototype: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def volume_voxels(self) -> int:
        return int(sum(self.area_px))

    @property
    def volume_um3(self) -> float | None:
        if self.pixel_area_um2 is None or self.z_step_um is None:
            return None
        return float(sum(self.area_px) * self.pixel_area_um2 * self.z_step_um)

    def csv_text(self) -> str:
        lines = ["z,area_px,area_um2" + (",dice_refined,dice_prototype" if self.dice_refined is not None else "")]
        for i, z in enumerate(self.z_values):
            area_um2 = "" if self.pixel_area_um2 is None else f"{self.area_px[i] * self.pixel_area_um2:.6g}"
            line = f"{z},{self.area_px[i]},{area_um2}"
            if self.dice_refined is not None:
                proto = self.dice_prototype[i] if self.dice_prototype is not None else float("nan")
                line += f",{self.dice_refined[i]:.6g},{proto:.6g}"
            lines.append(line)
        return "\n".join(lines) + "\n"


def model_fits(model: TrainedModel, prototype: Prototype | None, prototype_name: str, backbone: Backbone) -> Refiner:
    """The model's refiner, checked against the heatmaps it will see: the prototype's backbone must be the active one
    and the one the model was trained on. RefineError / PrototypeError say what to change."""
    uses_heatmap = model.input_set != "raw"
    if uses_heatmap and prototype is None:
        raise RefineError(f"model '{model.name}' reads the prototype heatmap ({model.input_set}): save a prototype on "
                          "the Segment page and choose it here")
    if uses_heatmap:
        check_prototype(prototype, backbone, prototype_name)
    return load_model(model.data, expected_backbone=prototype.backbone if uses_heatmap else None, name=model.name)


def apply_model(
    ctx: Context,
    model: TrainedModel,
    prototype: Prototype | None,
    z_values: Sequence[int],
    *,
    prototype_name: str = "",
    on_progress: Callable[[int, int, float | None], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RefineOutputs | None:
    """Refine slices ``z_values`` of the open stack with ``core.refine.apply.refine_stack`` (the loop of
    ``python -m core refine apply``) into a TIFF and a CSV.

    The masks stream into core's TIFF writer, which renames the file into place only after the last slice: an
    interrupted run leaves no file. With a ground truth, the Dice of the refined and of the prototype masks.
    should_stop : polled before each slice (the page passes its session's watch); when it returns True the run
        ends, nothing is written and the result is None.
    """
    refiner = model_fits(model, prototype, prototype_name, ctx.backbone)
    notes = []
    note = heatmap_mode_note(refiner, prototype, what=f"prototype '{prototype_name}'")
    if note is not None:
        notes.append(note)
    seen = {int(entry["z"]) for key in ("train_slices", "val_slices") for entry in refiner.metadata.get(key) or []
            if entry.get("stack_id") == stack_label(ctx.sample.path)}
    overlap = sorted(seen & set(int(z) for z in z_values))
    if overlap and ctx.truth is not None:
        notes.append(f"{len(overlap)} of these slices were used to train or validate the model ({short_list(overlap)}): "
                     "their Dice is optimistic")
    embedder = None
    if uses_prototype(refiner):
        embedder = resources.embedder_for(ctx.sample.path, ctx.channel, ctx.choice, prototype.config.preprocess)
    stack = ctx.stack
    folder = settings.output_dir(stack.path)
    # the random tail keeps two sessions refining one stack in the same second from claiming one file name
    base = (f"{safe_name(stack_label(Path(stack.path)))}_refined_{time.strftime('%Y%m%d-%H%M%S')}"
            f"-{secrets.token_hex(2)}")
    picks = set(montage_slices(list(z_values)))
    shown: dict[int, np.ndarray] = {}
    dice_refined, dice_prototype = [], []

    def keep(refined: RefinedSlice) -> None:
        writer.write(refined.mask)
        truth = ctx.truth_slice(refined.z)
        if truth is not None:
            dice_refined.append(float(dice(refined.mask, truth)))
            if refined.prototype_mask is not None:
                dice_prototype.append(float(dice(refined.prototype_mask, truth)))
        if refined.z in picks:
            shown[refined.z] = refined.mask

    tif_path = folder / f"{base}.tif"
    try:
        with TiffMaskWriter(tif_path, voxel_size=stack.voxel_size) as writer:
            run = refine_stack(refiner, stack, ctx.channel, list(z_values), keep, prototype=prototype,
                               embedder=embedder, on_progress=on_progress, should_stop=should_stop)
            if run.cancelled:
                raise _Stopped  # leaving the block by an exception discards the half-written TIFF
    except _Stopped:
        return None
    voxel = stack.voxel_size
    outputs = RefineOutputs(
        stack.name, model.name, run.z_values, run.area_px, voxel.x * voxel.y if voxel is not None else None,
        voxel.z if voxel is not None else None, run.seconds, str(folder), {"tif": str(tif_path)},
        dice_refined=dice_refined if len(dice_refined) == len(run.area_px) else None,
        dice_prototype=dice_prototype if len(dice_prototype) == len(run.area_px) else None, notes=notes)
    csv_path = write_text(folder / f"{base}_areas.csv", outputs.csv_text())
    outputs.files["csv"] = str(csv_path)
    order = sorted(shown)
    outputs.montage_png = render.to_png(render.montage([_display_slice(ctx, z) for z in order], [shown[z] for z in order],
                                                       [f"z {z}" for z in order]))
    return outputs


def _display_slice(ctx: Context, z: int) -> np.ndarray:
    """(Y, X) float in [0, 1] for the montage: the slice clipped to its own 5-95 % (what the refiner sees)."""
    return raw01(ctx.stack.read_slice(z, ctx.channel))
