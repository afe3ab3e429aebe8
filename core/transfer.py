"""Best mode's pixel classifier on stacks other than the one its examples came from (issue #15).

Why transfer failed: the pixel features are filter responses of the slice clipped to its stack's 5th-95th intensity
percentiles, standardised with the stack's own statistics. Both depend on how much of the stack is structure: in a
stack with 4 % capillaries the 95th percentile lies in the background, so clipping stretches background noise over
[0, 1] and the per-stack standardisation (background-dominated) inflates it further; a classifier trained on a stack
of large vessels (36 % foreground) then marks a third to a half of the capillary stack as structure. Within a stack
these effects are the same for the clicks and the slices scored, so same-file quality does not suffer from them.

What this module adds (options of ``core.config.PipelineConfig``, off by default):

border_rays     > 0: negative examples just outside the structure around every positive click, found along this
                many rays where the smoothed intensity falls to near the background clicks' level (``border_cells``):
                without them the classifier never sees background next to a structure and grows a halo around
                small objects (DSB 2018 nuclei of 8-15 px).
transfer_clip   > 0: pixel examples carry a second block of features, the same filter bank computed on the slice
                normalised to its stack's [clip_low, transfer_clip] percentiles (e.g. 99.5: bright structure is not
                clipped, and background stays dark whatever the foreground share) and not standardised (the forest
                is invariant to a per-feature affine map, so this equals standardising every stack with the source's
                statistics). A prototype applied to the stack its examples came from is scored exactly as before
                (the classifier on the first block); applied to any other stack, or when its examples come from
                several stacks (quick adapt), by a classifier fitted on the second block, at p = 0.5.
self_training   N > 0 (with transfer_clip): on a stack other than the prototype's source (not for quick adapt, whose
                clicks on the stack say what structure is there), the transferred classifier scores N evenly spaced slices;
                its confident pixels (p >= 0.75 structure, p <= 0.25 background; at most SELF_TRAINING_PIXELS per
                class and slice, seeded) train a classifier on the target's own first-block features, which then
                scores the stack (p = 0.5) -- the target's own feature space, labelled by the transferred classifier.

Fitted classifiers are kept per target stack in ``TransferModels`` (one per Scorer), so a stack's slices are scored
by one classifier, and a protocol run fits it once per (reference, target).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from scipy import ndimage

from core.config import PipelineConfig
from core.features import filterbank
from core.features.embedding import stack_intensity_range
from core.pixels import PixelClassifier, example_pixels, filter_features, working_shape
from core.preprocess import PreprocessConfig, normalized_slice, resize

if TYPE_CHECKING:  # pragma: no cover
    from core.features.embedding import SliceEmbedder
    from core.prototypes import Prototype

__all__ = ["SELF_TRAINING_PIXELS", "TransferModels", "border_cells", "border_examples", "example_features",
           "local_examples", "own_stack", "pseudo_labels", "transfer_block_width", "transfer_features", "transfer_range"]

#: Pseudo-labelled pixels per class and slice in self-training (a seeded subsample of the confident ones).
SELF_TRAINING_PIXELS = 2000
#: Score (2p - 1) beyond which a transferred pixel counts as confident: p >= 0.75 structure, p <= 0.25 background.
CONFIDENT_SCORE = 0.5
#: Fewest pseudo-labelled pixels per class for a self-trained classifier; with fewer the transferred one is kept.
MIN_PSEUDO_LABELS = 20
#: Slices pooled for a stack's transfer intensity range (as the stack-wide normalisation pools).
RANGE_SLICES = 16
#: Transfer feature maps kept per embedder (the protocol scores each target slice under several references).
MEMO_SLICES = 6
#: Border examples: how far a ray from a positive click looks for the structure's edge, how far beyond the edge the
#: negative example lies, and the smoothing of the intensity the edge is found on (pixels of the working resolution).
BORDER_MAX_PX = 24
BORDER_BEYOND_PX = 1
BORDER_SIGMA_PX = 1.0
#: The edge is where the smoothed intensity has fallen to the background clicks' level plus this share of the step
#: between the two classes (0.5 = halfway: on vesselNN's soft vessel borders that labels dim vessel rims background).
BORDER_LEVEL = 0.25


def transfer_block_width(config: PipelineConfig) -> int:
    """Columns of the transfer block at the end of every pixel example (0 when ``transfer_clip`` is off)."""
    return filterbank.FilterBankConfig().n_features if config.uses_pixels and config.transfer_clip > 0 else 0


# ---- the transfer features -------------------------------------------------------------------------------

_ranges: "weakref.WeakKeyDictionary[SliceEmbedder, dict]" = weakref.WeakKeyDictionary()
_maps: "weakref.WeakKeyDictionary[SliceEmbedder, OrderedDict]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def transfer_range(embedder: "SliceEmbedder", config: PipelineConfig) -> tuple[float, float]:
    """(low, high) intensities of the transfer normalisation of ``embedder``'s stack: its [clip_low, transfer_clip]
    percentiles pooled over up to RANGE_SLICES evenly spaced slices (memoised per embedder)."""
    percentiles = (config.preprocess.clip_percentiles[0], config.transfer_clip)
    with _lock:
        known = _ranges.setdefault(embedder, {})
        if percentiles not in known:
            known[percentiles] = stack_intensity_range(embedder.stack, embedder.channel, percentiles,
                                                       timepoint=embedder.timepoint, max_slices=RANGE_SLICES)
        return known[percentiles]


def transfer_features(embedder: "SliceEmbedder", z: int, config: PipelineConfig) -> np.ndarray:
    """(h, w, F) float32 filter-bank features of slice z normalised to ``transfer_range`` (not standardised), at the
    pixel branch's working resolution (memoised for the last MEMO_SLICES slices of each embedder)."""
    key = (int(z), int(config.pixel_max_side), config.preprocess.clip_percentiles[0], float(config.transfer_clip))
    with _lock:
        memo = _maps.setdefault(embedder, OrderedDict())
        if key in memo:
            memo.move_to_end(key)
            return memo[key]
    low, high = transfer_range(embedder, config)
    image = normalized_slice(embedder.raw(int(z)), PreprocessConfig(normalization="stack"), (low, high))
    features = filter_features(image, config.pixel_max_side)
    features.flags.writeable = False
    with _lock:
        memo[key] = features
        while len(memo) > MEMO_SLICES:
            memo.popitem(last=False)
    return features


def example_features(embedder: "SliceEmbedder", z: int, config: PipelineConfig, local: np.ndarray) -> np.ndarray:
    """The (h, w, F_local [+ F]) map the pixel examples of slice z are drawn from: the local features ``local`` as
    the classifier on this stack sees them, followed by the transfer block when ``transfer_clip`` is on."""
    if not transfer_block_width(config):
        return local
    return np.concatenate([local, transfer_features(embedder, z, config)], axis=-1)


def local_examples(prototype: "Prototype") -> tuple[np.ndarray, np.ndarray]:
    """The prototype's (positive, negative) pixel examples without the transfer block (whose width the prototype's
    own configuration gives): what the classifier of the examples' own stack is fitted on."""
    width = transfer_block_width(prototype.config)
    positive, negative = prototype.pixel_positive_examples, prototype.pixel_negative_examples
    if not width:
        return positive, negative
    return positive[:, :-width], negative[:, :-width]


def own_stack(prototype: "Prototype", embedder: "SliceEmbedder") -> bool:
    """Whether every example of ``prototype`` came from ``embedder``'s stack and channel (then the local classifier
    scores it, exactly as without the transfer options)."""
    lineage = tuple(getattr(prototype, "lineage", ()) or ())
    if len(lineage) > 1 or len(prototype.positive_examples) > len(prototype.points.positive) \
            or len(prototype.negative_examples) > len(prototype.points.negative):
        return False  # quick adapt: examples of several stacks (or of an unrecorded one)
    if not prototype.source_file:
        return prototype.channel == embedder.channel  # a prototype of unknown source: as before
    return prototype.channel == embedder.channel and _same_file(prototype.source_file, embedder)


def _same_file(source_file: str, embedder: "SliceEmbedder") -> bool:
    if not source_file:
        return False
    try:
        return Path(source_file).resolve() == Path(embedder.stack.path).resolve()
    except (OSError, TypeError, ValueError):
        return str(source_file) == str(embedder.stack.path)


# ---- self-training -------------------------------------------------------------------------------------

def self_training_slices(n_slices: int, count: int) -> list[int]:
    """``count`` evenly spaced slices of a stack of ``n_slices``, away from its ends (all of them when it has no
    more than ``count``).

    >>> self_training_slices(15, 3), self_training_slices(2, 3)
    ([4, 7, 10], [0, 1])
    """
    if n_slices <= count:
        return list(range(n_slices))
    return [int(z) for z in np.unique(np.linspace(0, n_slices - 1, count + 2).round().astype(int))[1:-1]]


def pseudo_labels(scores: np.ndarray, features: np.ndarray, rng: np.random.Generator,
                  limit: int = SELF_TRAINING_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) rows of ``features`` (h, w, F) where ``scores`` (h, w, in [-1, 1]) is confident:
    >= CONFIDENT_SCORE and <= -CONFIDENT_SCORE; at most ``limit`` per class (a seeded subsample, in pixel order)."""
    flat_scores = scores.reshape(-1)
    flat = features.reshape(-1, features.shape[-1])
    out = []
    for mask in (flat_scores >= CONFIDENT_SCORE, flat_scores <= -CONFIDENT_SCORE):
        index = np.flatnonzero(mask)
        if len(index) > limit:
            index = np.sort(rng.choice(index, limit, replace=False))
        out.append(flat[index])
    return out[0], out[1]


class TransferModels:
    """The classifiers of one prototype for stacks other than its examples' own, fitted once per stack.

    The transfer block and its normalisation are the prototype's (``prototype.config``: the examples were made so);
    the classifier kind and self-training are ``config``'s, the configuration it is scored under.
    local_features : (embedder, z) -> (h, w, F_local) local pixel features (core.pipeline.pixel_feature_map), used
        by self-training.
    """

    def __init__(self, prototype: "Prototype", config: PipelineConfig,
                 local_features: Callable[["SliceEmbedder", int], np.ndarray], *, seed: int = 0) -> None:
        self.prototype = prototype
        self.config = config
        self.local_features = local_features
        self.seed = seed
        self.width = transfer_block_width(prototype.config)
        self._models: dict[tuple, tuple[PixelClassifier, bool]] = {}
        self._applies: dict[tuple, bool] = {}
        self._transfer: PixelClassifier | None = None
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether the prototype's examples carry a transfer block and ``config`` uses it (transfer_clip > 0; else
        every stack gets the local classifier, as without the option)."""
        examples = self.prototype.pixel_positive_examples
        return (bool(self.width) and self.config.transfer_clip > 0 and examples is not None
                and examples.shape[1] > self.width)

    def applies(self, embedder: "SliceEmbedder") -> bool:
        """Whether ``embedder``'s stack is scored by a transfer classifier (not the local one)."""
        if not self.active:
            return False
        key = self._key(embedder)
        if key not in self._applies:
            self._applies[key] = not own_stack(self.prototype, embedder)
        return self._applies[key]

    def _key(self, embedder: "SliceEmbedder") -> tuple:
        return (str(embedder.stack.path), embedder.channel, embedder.timepoint, embedder.n_slices, embedder.slice_shape)

    def transfer_classifier(self) -> PixelClassifier:
        """The classifier on the transfer block of the prototype's examples (fitted once)."""
        with self._lock:
            if self._transfer is None:
                self._transfer = PixelClassifier(self.config.pixel_classifier,
                                                 self.prototype.pixel_positive_examples[:, -self.width:],
                                                 self.prototype.pixel_negative_examples[:, -self.width:])
            return self._transfer

    def model(self, embedder: "SliceEmbedder") -> tuple[PixelClassifier, bool]:
        """(classifier, on local features) for ``embedder``'s stack: the self-trained classifier on its own features
        when ``self_training`` is on and enough pixels are confident, else the transfer classifier."""
        key = self._key(embedder)
        with self._lock:
            if key in self._models:
                return self._models[key]
        transfer = self.transfer_classifier()
        chosen = (transfer, False)
        # an adapted prototype holds clicks on this stack: they, not pseudo-labels, say what structure is here
        if self.config.self_training > 0 and not _same_file(self.prototype.source_file, embedder):
            rng = np.random.default_rng(self.seed)
            positive, negative = [], []
            for z in self_training_slices(embedder.n_slices, self.config.self_training):
                scores = transfer.score(transfer_features(embedder, z, self.prototype.config))
                pos, neg = pseudo_labels(scores, self.local_features(embedder, z), rng)
                positive.append(pos)
                negative.append(neg)
            positive, negative = np.concatenate(positive), np.concatenate(negative)
            if len(positive) >= MIN_PSEUDO_LABELS and len(negative) >= MIN_PSEUDO_LABELS:
                chosen = (PixelClassifier(self.config.pixel_classifier, positive, negative), True)
        with self._lock:
            return self._models.setdefault(key, chosen)

    def score_map(self, embedder: "SliceEmbedder", z: int) -> np.ndarray:
        """(h, w) working-resolution scores of slice z of a stack ``applies`` holds for, in [-1, 1] (cut at 0)."""
        model, local = self.model(embedder)
        features = self.local_features(embedder, z) if local else transfer_features(embedder, z, self.prototype.config)
        return model.score(features)


# ---- border examples -----------------------------------------------------------------------------------

def border_cells(image: np.ndarray, positive: np.ndarray, negative: np.ndarray, rays: int, *,
                 max_px: int = BORDER_MAX_PX, beyond_px: int = BORDER_BEYOND_PX,
                 sigma_px: float = BORDER_SIGMA_PX, level: float = BORDER_LEVEL) -> np.ndarray:
    """Pixels just outside the structure around the positive clicks, found from the image alone.

    Clicks keep away from object borders (a user clicks inside; the protocol keeps a margin), so the classifier
    never sees the background right next to a structure and grows a halo around small objects. Along ``rays``
    evenly spaced directions from each positive click, the first pixel (within ``max_px``) whose smoothed intensity
    has come within ``level`` of the step between the classes' mean smoothed intensities of the negative clicks' level
    is the edge; the pixel ``beyond_px`` further along the ray becomes a negative example (when it is there too).

    image : (h, w) float slice the pixel features are computed on (working resolution).
    positive, negative : (N, 2) (row, col) clicks at that resolution (negative only sets the background level).
    Returns (M, 2) int64 (row, col), M <= rays x N; none without negative clicks.

    >>> image = np.zeros((21, 21)); image[7:14, 7:14] = 1.0  # a 7 x 7 bright square
    >>> border_cells(image, np.array([[10, 10]]), np.array([[1, 1]]), 4, sigma_px=0.1).tolist()
    [[10, 15], [15, 10], [10, 5], [5, 10]]
    """
    if rays <= 0 or len(positive) == 0 or len(negative) == 0:
        return np.zeros((0, 2), np.int64)
    smooth = ndimage.gaussian_filter(np.asarray(image, np.float32), sigma_px)
    positive_level = float(smooth[positive[:, 0], positive[:, 1]].mean())
    negative_level = float(smooth[negative[:, 0], negative[:, 1]].mean())
    if positive_level == negative_level:
        return np.zeros((0, 2), np.int64)
    edge_level = negative_level + level * (positive_level - negative_level)
    sign = 1.0 if positive_level > negative_level else -1.0  # > 0: structure brighter than background
    steps = np.arange(1, max_px + beyond_px + 1)
    angles = np.arange(rays) * 2 * np.pi / rays
    rows = np.rint(positive[:, 0, None, None] + np.sin(angles)[None, :, None] * steps).astype(np.int64)  # (N, R, S)
    cols = np.rint(positive[:, 1, None, None] + np.cos(angles)[None, :, None] * steps).astype(np.int64)
    inside_image = (rows >= 0) & (rows < image.shape[0]) & (cols >= 0) & (cols < image.shape[1])
    values = smooth[np.clip(rows, 0, image.shape[0] - 1), np.clip(cols, 0, image.shape[1] - 1)]
    outside = inside_image & (sign * (values - edge_level) < 0)
    found = outside[..., :max_px].any(axis=-1)
    edge = outside[..., :max_px].argmax(axis=-1)  # first step on the background side
    target = np.minimum(edge + beyond_px, len(steps) - 1)
    take = np.take_along_axis
    keep = found & take(outside, target[..., None], axis=-1)[..., 0]
    picked_rows = take(rows, target[..., None], axis=-1)[..., 0][keep]
    picked_cols = take(cols, target[..., None], axis=-1)[..., 0][keep]
    return np.stack([picked_rows, picked_cols], axis=1).astype(np.int64)


def border_examples(embedder: "SliceEmbedder", z: int, config: PipelineConfig, positive_xy: np.ndarray,
                    negative_xy: np.ndarray, example_map: np.ndarray) -> np.ndarray:
    """(M, F) rows of ``example_map`` (slice z's example features at the working resolution) at ``border_cells``
    of the clicks ``positive_xy``, ``negative_xy`` ((N, 2) x, y in original pixels), with ``config.border_rays``
    rays per positive click on the slice as the pixel branch sees it; (0, F) when the option is off."""
    if not config.border_rays or len(positive_xy) == 0 or len(negative_xy) == 0:
        return np.zeros((0, example_map.shape[-1]), np.float32)
    shape = working_shape(embedder.slice_shape, config.pixel_max_side)
    image = embedder.normalized(int(z))
    if image.shape != shape:
        image = resize(image, shape)
    positive = example_pixels(positive_xy, embedder.slice_shape, shape, 0)
    negative = example_pixels(negative_xy, embedder.slice_shape, shape, 0)
    cells = border_cells(image, positive, negative, config.border_rays)
    return example_map[cells[:, 0], cells[:, 1]].astype(np.float32)
