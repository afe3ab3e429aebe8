"""Refiner inputs from stacks: one ``RefineSample`` per slice, built through the prototype pipeline (docs/refine.md).

Per slice the refiner (``core.refine.model``) needs

- raw : the slice clipped to its own 5th-95th percentiles and scaled to [0, 1] (thesis §3.3), at
  the slice's own size. Always per slice, whatever the prototype's normalisation: the network must
  see the same kind of input at training and at application time (the model file records it);
- heatmap : the prototype's per-pixel score map of the slice (``SliceSegmentation.scores``: the
  patch grid nearest-resized in thesis mode, the pixel-level map in best mode), after the optional
  z-smoothing of the prototype's configuration, so it is exactly the map the mask was cut from;
- mask : the prototype mask of that slice;
- truth : the ground truth (label > 0), for training and evaluation.

Two ways to get the prototype: one saved prototype applied to every slice (``stack_samples``, what
``python -m core refine train/apply`` do), or a prototype built on each slice itself from points
sampled on its ground truth (``same_slice_samples``, the thesis's same-slice heatmaps of Table 4.3;
the points are those of ``core.protocol``'s same-slice runs for the same seed). Either way the
heatmaps and masks come from one ``core.window.ScoreWindow`` over a fitted ``Scorer``: a per-slice
prototype is built with ``core.pipeline.build_scorer``, so its pixel classifier is fitted once per
(slice, seed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from core import pixels
from core.config import PipelineConfig
from core.errors import ProtoscopeError
from core.features.embedding import SliceEmbedder
from core.io import Stack, open_stack, stack_label
from core.pipeline import Scorer, build_scorer
from core.preprocess import intensity_range, rescale, resize
from core.protocol import EvalStack, TruthReader, default_margin, protocol_points
from core.prototypes import Prototype
from core.refine.model import RefineSample
from core.window import ScoreWindow

__all__ = [
    "DEFAULT_MAX_SIDE", "RAW_CLIP_PERCENTILES", "PrototypeMaps", "SliceCallback", "raw01", "same_slice_samples",
    "same_slice_scorer", "slice_sample", "split_by_fraction", "split_by_stack", "stack_label", "stack_samples",
    "working_shape",
]

#: Percentiles (%) the raw channel is clipped to, per slice (thesis §3.3).
RAW_CLIP_PERCENTILES: tuple[float, float] = (5.0, 95.0)
#: Longest side (px) of the samples ``refine train/apply`` keep: the network input is at most 980 px,
#: and 100 full-size 3000 x 3000 samples would hold ~9 GB.
DEFAULT_MAX_SIDE = 1024

SliceCallback = Callable[[int, int], None]
"""(done, total) after each slice."""


def raw01(image: np.ndarray, clip_percentiles: tuple[float, float] = RAW_CLIP_PERCENTILES) -> np.ndarray:
    """(Y, X) raw slice, any real dtype -> (Y, X) float32 in [0, 1].

    Clipped to this slice's own ``clip_percentiles`` and rescaled linearly (a flat slice gives zeros).

    >>> raw01(np.arange(101, dtype=np.uint8).reshape(1, 101))[0, [0, 50, 100]].round(3).tolist()
    [0.0, 0.5, 1.0]
    """
    low, high = intensity_range(image, clip_percentiles)
    return rescale(image, low, high)


class PrototypeMaps:
    """Heatmap and mask of any slice of one stack under one prototype, as ``apply`` computes them.

    prototype : a Prototype (its Scorer is built here, fitting its pixel classifier once), or an already
        fitted Scorer (e.g. from ``core.pipeline.build_scorer``), which is used as it is.
    The z-smoothing (``config.z_sigma``) goes through one ``core.window.ScoreWindow``: walking the slices
    in increasing z computes each score map once.
    """

    def __init__(self, embedder: SliceEmbedder, prototype: Prototype | Scorer, config: PipelineConfig | None = None) -> None:
        scorer = prototype if isinstance(prototype, Scorer) else Scorer(prototype, config)
        self.window = ScoreWindow(scorer, embedder)

    @property
    def embedder(self) -> SliceEmbedder:
        return self.window.embedder

    @property
    def scorer(self) -> Scorer:
        return self.window.scorer

    def __call__(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        """(heatmap (Y, X) float32 scores, mask (Y, X) bool) of slice z."""
        segmentation = self.window.segment(z)
        return segmentation.scores.astype(np.float32), segmentation.mask


def working_shape(shape: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(Y, X) scaled so that the longer side is at most ``max_side`` px (unchanged when it already is, or None).

    >>> working_shape((3000, 1500), 1024)
    (1024, 512)
    """
    if max_side is None:
        return int(shape[0]), int(shape[1])
    return pixels.working_shape(shape, max_side)


def _shrink(image: np.ndarray | None, shape: tuple[int, int], *, binary: bool = False) -> np.ndarray | None:
    if image is None or image.shape == shape:
        return image
    if binary:
        return resize(image.astype(np.float32), shape, mode="nearest") > 0.5
    return resize(image, shape)  # bilinear, antialiased when shrinking


def slice_sample(
    stack: Stack,
    channel: int,
    z: int,
    *,
    maps: PrototypeMaps | None = None,
    truth: np.ndarray | None = None,
    stack_id: str = "",
    max_side: int | None = None,
    clip_percentiles: tuple[float, float] = RAW_CLIP_PERCENTILES,
) -> RefineSample:
    """The sample of slice z: raw01 of the slice, heatmap and mask from ``maps``, the given (Y, X) bool truth.

    max_side : when the slice is larger, every plane is resized so that its longer side is max_side px
        (bilinear with antialiasing for raw and heatmap, nearest for mask and truth; see ``working_shape``).
    """
    heatmap, mask = maps(z) if maps is not None else (None, None)
    same_plane = maps is not None and maps.embedder.stack is stack and maps.embedder.channel == stack.resolve_channel(channel)
    # the heatmap has just read this plane into the embedder's memo: no second read
    plane = maps.embedder.raw(z) if same_plane else stack.read_slice(z, channel)
    raw = raw01(plane, clip_percentiles)
    shape = working_shape(raw.shape, max_side)
    return RefineSample(raw=np.clip(_shrink(raw, shape), 0.0, 1.0), heatmap=_shrink(heatmap, shape),
                        mask=_shrink(mask, shape, binary=True), truth=_shrink(truth, shape, binary=True),
                        stack_id=stack_id, z=int(z))


def stack_samples(
    spec: EvalStack,
    z_values: Sequence[int] | Callable[[int], Sequence[int]],
    *,
    prototype: Prototype | None = None,
    backbone=None,
    cache=None,
    with_truth: bool = True,
    max_side: int | None = DEFAULT_MAX_SIDE,
    on_slice: SliceCallback | None = None,
) -> list[RefineSample]:
    """One sample per slice of one stack, with heatmap and mask from one saved prototype.

    spec : the stack, its image channel and its ground truth (needed when ``with_truth``).
    z_values : slice indices, or a function of the stack's slice count returning them.
    prototype, backbone : the prototype and the loaded backbone it was made with (``core.features.backbones``);
        without a prototype the samples have raw (and truth) only (the 'raw' input set).
    cache : an ``EmbeddingCache`` or None.
    max_side : longest side of the samples in px (larger slices are shrunk, see ``slice_sample``); None keeps
        the slice size.
    Returns RefineSamples in the order of ``z_values``, ``stack_id = spec.label``.
    """
    if prototype is not None and backbone is None:
        raise ValueError("a prototype needs the backbone it was made with")
    samples: list[RefineSample] = []
    with open_stack(spec.image_path) as stack:
        channel = stack.resolve_channel(spec.image_channel)
        zs = list(z_values(stack.shape[0]) if callable(z_values) else z_values)
        for z in zs:
            if not 0 <= z < stack.shape[0]:
                raise ProtoscopeError(f"{spec.image_path}: slice z={z} is outside the stack (0-{stack.shape[0] - 1})")
        truth = TruthReader(spec, stack) if with_truth else None
        try:
            maps = None
            if prototype is not None:
                embedder = SliceEmbedder(stack, channel, backbone, prototype.config.preprocess, cache=cache)
                maps = PrototypeMaps(embedder, prototype)
            for index, z in enumerate(zs):
                samples.append(slice_sample(stack, channel, z, maps=maps, truth=truth(z) if truth else None,
                                            stack_id=spec.label, max_side=max_side))
                if on_slice is not None:
                    on_slice(index + 1, len(zs))
        finally:
            if truth is not None:
                truth.close()
    return samples


def same_slice_scorer(
    embedder: SliceEmbedder,
    truth: np.ndarray,
    z: int,
    config: PipelineConfig,
    *,
    n_points: int = 25,
    seed: int = 0,
    margin_px: int | None = None,
) -> Scorer:
    """The fitted Scorer of slice z's prototype, from ``n_points`` positive and negative points sampled on its truth.

    The points are those of ``core.protocol``'s same-slice runs (sampling seed ``seed·100003 + z``,
    margin half a patch unless given), so the masks match ``python -m core evaluate``. Built with
    ``core.pipeline.build_scorer``: the pixel classifier (best mode) is fitted once, and ``.prototype``
    is the prototype with its calibrated threshold.
    truth : (Y, X) bool ground truth of slice z, with structure and background.
    """
    if margin_px is None:
        margin_px = default_margin(embedder.slice_shape, config)
    return build_scorer(embedder, protocol_points(truth, z, seed, n_points, margin_px), config, seed=seed)


def same_slice_samples(
    spec: EvalStack,
    z_values: Sequence[int],
    backbone,
    config: PipelineConfig,
    *,
    n_points: int = 25,
    seed: int = 0,
    margin_px: int | None = None,
    cache=None,
    max_side: int | None = None,
    on_slice: SliceCallback | None = None,
) -> list[RefineSample]:
    """One sample per slice, each with the heatmap and mask of a prototype built on that slice.

    The prototype comes from points sampled on the slice's own ground truth (``same_slice_scorer``),
    as in the thesis's U-Net experiments. Slices whose truth lacks structure or background (no points
    to sample) are left out. ``max_side`` as in ``stack_samples`` (default: the slice size).
    Returns RefineSamples in z order, ``stack_id = spec.label``.
    """
    samples: list[RefineSample] = []
    with open_stack(spec.image_path) as stack:
        channel = stack.resolve_channel(spec.image_channel)
        truth_reader = TruthReader(spec, stack)
        try:
            embedder = SliceEmbedder(stack, channel, backbone, config.preprocess, cache=cache)
            zs = sorted(int(z) for z in z_values)
            for index, z in enumerate(zs):
                truth = truth_reader(z)
                if 0 < truth.sum() < truth.size:
                    scorer = same_slice_scorer(embedder, truth, z, config, n_points=n_points, seed=seed,
                                               margin_px=margin_px)
                    samples.append(slice_sample(stack, channel, z, maps=PrototypeMaps(embedder, scorer), truth=truth,
                                                stack_id=spec.label, max_side=max_side))
                if on_slice is not None:
                    on_slice(index + 1, len(zs))
        finally:
            truth_reader.close()
    return samples


def split_by_fraction(samples: Sequence[RefineSample], fraction: float) -> tuple[list[RefineSample], list[RefineSample]]:
    """(train, validation): per stack, ``round(fraction · n)`` evenly spaced slices (at least one) go to validation.

    Evenly spaced in z, so that validation covers the depth of every stack; deterministic.

    >>> s = [RefineSample(np.zeros((4, 4)), None, None, stack_id="a", z=z) for z in range(10)]
    >>> [x.z for x in split_by_fraction(s, 0.2)[1]]
    [2, 7]
    """
    if not 0.0 < fraction < 1.0:
        raise ProtoscopeError(f"--val-fraction must lie strictly between 0 and 1, got {fraction}")
    train: list[RefineSample] = []
    val: list[RefineSample] = []
    for stack_id in dict.fromkeys(s.stack_id for s in samples):
        group = sorted((s for s in samples if s.stack_id == stack_id), key=lambda s: s.z)
        if len(group) < 2:
            train.extend(group)
            continue
        count = min(len(group) - 1, max(1, round(fraction * len(group))))
        # centres of `count` equal bins: avoids always picking the first and last slice
        picks = {int(i) for i in np.floor((np.arange(count) + 0.5) * len(group) / count)}
        for i, sample in enumerate(group):
            (val if i in picks else train).append(sample)
    if not val:
        raise ProtoscopeError("no stack has two or more training slices, so none can be held out for validation; "
                              "select more slices or give --val-stack")
    return train, val


def split_by_stack(samples: Sequence[RefineSample], stack_id: str) -> tuple[list[RefineSample], list[RefineSample]]:
    """(train, validation): every slice of ``stack_id`` validates, the other stacks train."""
    val = [s for s in samples if s.stack_id == stack_id]
    train = [s for s in samples if s.stack_id != stack_id]
    if not val or not train:
        raise ProtoscopeError(
            f"holding out stack {stack_id!r} leaves {len(train)} training and {len(val)} validation slices; "
            "give at least two stacks for --val-stack, or use --val-fraction"
        )
    return train, val
