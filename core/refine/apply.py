"""A trained refiner over the slices of a stack: the one loop behind ``python -m core refine apply`` and the
app's Refine page.

Per slice: the sample as at training time (``core.refine.samples.slice_sample``: the raw slice clipped to
the percentiles the model records, the prototype's heatmap and mask through one ``ScoreWindow``, shrunk to
the model's ``max_side``), the U-Net's probability at the sample's size, that probability resized back to
the slice, the threshold, and the (Y, X) bool mask handed to a sink (a TIFF writer, a list, ...).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from core.errors import RefineError, ZSpecError
from core.features.embedding import SliceEmbedder
from core.io import Stack
from core.preprocess import resize
from core.prototypes import Prototype
from core.refine.files import check_refiner
from core.refine.model import Refiner
from core.refine.samples import DEFAULT_MAX_SIDE, RAW_CLIP_PERCENTILES, PrototypeMaps, slice_sample

ProgressCallback = Callable[[int, int, float | None], None]
"""(done, total, eta_seconds or None) after each slice."""


@dataclass(frozen=True)
class RefinedSlice:
    """One refined slice, at the slice's own size.

    mask : (Y, X) bool, the refined mask.
    prototype_mask : (Y, X) bool, the prototype mask the refiner read (nearest-resized back from the sample),
        or None when the refiner reads the raw slice only.
    """

    z: int
    mask: np.ndarray
    prototype_mask: np.ndarray | None = None


@dataclass
class RefineRun:
    """What ``refine_stack`` did: the refined slices in order, their mask areas (pixels), seconds taken."""

    z_values: list[int] = field(default_factory=list)
    area_px: list[int] = field(default_factory=list)
    cancelled: bool = False
    seconds: float = 0.0

    @property
    def volume_voxels(self) -> int:
        return int(sum(self.area_px))


def uses_prototype(refiner: Refiner) -> bool:
    """True when the refiner reads the prototype's heatmap (and maybe its mask), i.e. needs a prototype."""
    return refiner.config.channels != ("raw",)


def sample_settings(refiner: Refiner) -> tuple[tuple[float, float], int | None]:
    """(raw clip percentiles, max_side in px) the refiner's samples were made with (its metadata 'source'),
    falling back to the defaults of ``core.refine.samples`` for models that do not record them."""
    source = refiner.metadata.get("source") or {}
    clip = tuple(source.get("raw_clip_percentiles") or RAW_CLIP_PERCENTILES)
    return (float(clip[0]), float(clip[1])), source.get("max_side", DEFAULT_MAX_SIDE)


def heatmap_mode_note(refiner: Refiner, prototype: Prototype | None, *, what: str = "the prototype") -> str | None:
    """A warning when the refiner was trained on heatmaps of another pipeline mode than ``prototype``'s, else None.

    what : how the note calls the prototype (e.g. "prototype 'vessels'").
    """
    if prototype is None or not uses_prototype(refiner):
        return None
    trained = (refiner.metadata.get("source") or {}).get("heatmap_mode")
    if trained in (None, prototype.config.mode.value):
        return None
    return (f"the model was trained on {trained}-mode heatmaps but {what} is in {prototype.config.mode.value} mode; "
            "the refined masks may be poor")


def _eta(start: float, done: int, total: int) -> float | None:
    if done == 0:
        return None
    return (time.perf_counter() - start) / done * (total - done)


def refine_stack(
    refiner: Refiner,
    stack: Stack,
    channel: int,
    z_values: Sequence[int],
    sink: Callable[[RefinedSlice], None],
    *,
    prototype: Prototype | None = None,
    embedder: SliceEmbedder | None = None,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RefineRun:
    """Refine slices ``z_values`` of ``stack`` (in that order) and hand each one to ``sink(RefinedSlice)``.

    stack, channel : the stack and its resolved image channel.
    prototype, embedder : the prototype whose heatmap and mask the refiner reads, and the embedder of
        (stack, channel) with the prototype's backbone and preprocessing; both needed unless the refiner
        reads the raw slice only (then both are ignored).
    on_progress : ``(done, total, eta_seconds)`` after each slice. should_stop : polled before each slice;
        when it returns True the run ends with ``cancelled=True`` (a writer sink should then be discarded).

    Resizing back: the sample may be smaller than the slice (``max_side``). The U-Net's probabilities
    (``Refiner.predict_proba``, at the sample's size) are resized back to the slice size (bilinear,
    ``core.preprocess.resize``) and only then thresholded at the refiner's threshold, so the mask's edges
    fall where the probability crosses the threshold at full resolution rather than following the
    blocky edges of a small mask blown up. The prototype mask is resized back with nearest neighbours.

    Raises RefineError when a prototype is needed but missing, or when the refiner was trained on another
    backbone's heatmaps; ZSpecError for a slice outside the stack.
    """
    n_slices = int(stack.shape[0])
    bad = [int(z) for z in z_values if not 0 <= int(z) < n_slices]
    if bad:
        raise ZSpecError(f"{stack.path}: slice z={bad[0]} is outside the stack (0-{n_slices - 1})")
    maps = None
    if uses_prototype(refiner):
        if prototype is None or embedder is None:
            raise RefineError(f"the refiner reads the prototype heatmap (input set {refiner.config.input_set!r}); "
                              "give the prototype and an embedder of the stack")
        check_refiner(refiner, expected_backbone=prototype.backbone)
        maps = PrototypeMaps(embedder, prototype)
    clip, max_side = sample_settings(refiner)
    shape = (int(stack.shape[2]), int(stack.shape[3]))
    run = RefineRun()
    started = time.perf_counter()
    for index, z in enumerate(z_values):
        if should_stop is not None and should_stop():
            run.cancelled = True
            break
        sample = slice_sample(stack, channel, int(z), maps=maps, max_side=max_side, clip_percentiles=clip)
        probability = refiner.predict_proba(sample)
        mask = resize(probability, shape) >= refiner.threshold  # resize is the identity at the slice's own size
        proto = None
        if sample.mask is not None:
            proto = sample.mask if sample.mask.shape == shape else resize(sample.mask.astype(np.float32), shape,
                                                                           mode="nearest") > 0.5
        sink(RefinedSlice(int(z), mask, proto))
        run.z_values.append(int(z))
        run.area_px.append(int(mask.sum()))
        if on_progress is not None:
            on_progress(index + 1, len(z_values), _eta(started, index + 1, len(z_values)))
    run.seconds = time.perf_counter() - started
    return run
