"""The prototype pipeline on one slice: embeddings -> score map -> mask (docs/spec/PIPELINE.md A.4-A.6 and part B).

thesis : score on the (h, w) patch grid, keep the top 10 % of patches, nearest-resize that patch mask to the
         original (Y, X) slice (14-px blocks at 980 px).
best   : a pixel-level score (the patch score upsampled bilinearly or image-guided, or the pixel branch of
         ``core.pixels``), with a threshold that follows the data (calibrated on the user's points, or
         Otsu), optionally smoothed along z and cleaned up.

A ``Scorer`` binds a prototype to a configuration (and, for the pixel branch, to the classifier fitted on
the prototype's examples). ``Scorer.score_map`` gives a slice's raw score map — the (h, w) patch grid, or
the working-resolution pixel map — which can be averaged along z before ``Scorer.segment`` thresholds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from skimage import morphology

from core.config import Cleanup, PipelineConfig, Upsampling
from core.errors import PrototypeError
from core.grid import grid_to_pixels_nearest, points_to_patches, upsample_bilinear
from core.io.channels import channel_name
from core.pixels import PixelClassifier, example_pixels
from core.preprocess import pooled_intensity_range
from core.prototypes import PointSet, Prototype, build_references, collect_examples, now_iso
from core.scoring import score_embeddings
from core.transfer import TransferModels, border_examples, example_features, local_examples
from core.thresholds import ThresholdSpec, apply_threshold, calibrate_threshold, threshold_value

if TYPE_CHECKING:  # pragma: no cover
    from core.features.embedding import SliceEmbedder


@dataclass(frozen=True)
class SliceSegmentation:
    """Result on one slice.

    score_map : the raw map the scorer produced: (h, w) patch scores, or (h, w) working-resolution pixel
    scores in best mode's pixel branch. scores : (Y, X) float32 per-pixel scores (the nearest resize of
    the grid in thesis mode). mask : (Y, X) bool. threshold : the absolute score threshold used (for top:P,
    the lowest selected score).
    """

    score_map: np.ndarray
    scores: np.ndarray
    mask: np.ndarray
    threshold: float


# ---- pieces ---------------------------------------------------------------------------------------------


def grid_scores(embeddings: np.ndarray, prototype: Prototype, config: PipelineConfig | None = None) -> np.ndarray:
    """(h, w, D) patch embeddings -> (h, w) float32 S = Sp - λ·Sn with the prototype's references."""
    config = config or prototype.config
    if embeddings.shape[-1] != prototype.embed_dim:
        raise PrototypeError(
            f"the prototype holds {prototype.embed_dim}-dimensional embeddings but this backbone gives "
            f"{embeddings.shape[-1]}; use the backbone that made the prototype ({prototype.backbone})"
        )
    return score_embeddings(
        embeddings,
        prototype.positive_references,
        prototype.negative_references,
        negative_weight=config.negative_weight,
        scoring=config.scoring,
        knn_k=config.knn_k,
    )


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter: ``source`` smoothed so that its edges follow ``guide``.

    guide, source : (Y, X) float32. radius : window radius in pixels. eps : regularisation (guide units²).
    """
    size = 2 * radius + 1
    mean_guide = ndimage.uniform_filter(guide, size)
    mean_source = ndimage.uniform_filter(source, size)
    covariance = ndimage.uniform_filter(guide * source, size) - mean_guide * mean_source
    variance = ndimage.uniform_filter(guide * guide, size) - mean_guide * mean_guide
    a = covariance / (variance + eps)
    b = mean_source - a * mean_guide
    return (ndimage.uniform_filter(a, size) * guide + ndimage.uniform_filter(b, size)).astype(np.float32)


def pixel_scores(
    scores_grid: np.ndarray,
    slice_shape: tuple[int, int],
    upsampling: Upsampling,
    guide: np.ndarray | None = None,
) -> np.ndarray:
    """(h, w) patch scores -> (Y, X) float32 per-pixel scores by the chosen upsampling.

    guide : (Y, X) float32 normalised slice, needed for ``guided``.
    """
    if upsampling is Upsampling.NEAREST:
        return grid_to_pixels_nearest(scores_grid, slice_shape).astype(np.float32)
    upsampled = upsample_bilinear(scores_grid, slice_shape)
    if upsampling is Upsampling.GUIDED:
        if guide is None:
            raise ValueError("guided upsampling needs the slice as guide")
        patch_pixels = max(slice_shape) / max(scores_grid.shape)
        radius = max(1, int(round(patch_pixels / 2)))
        # eps in guide units² (guide in [0, 1]): edges with contrast above ~0.1 are kept.
        upsampled = guided_filter(guide.astype(np.float32), upsampled, radius, eps=1e-2)
    return upsampled


def clean_mask(mask: np.ndarray, cleanup: Cleanup) -> np.ndarray:
    """Optional closing, small-object removal and small-hole filling of a (Y, X) bool mask."""
    result = mask
    if cleanup.closing_px > 0:
        result = ndimage.binary_closing(result, structure=morphology.disk(cleanup.closing_px))
    if cleanup.min_size_px > 0:
        result = morphology.remove_small_objects(result, max_size=cleanup.min_size_px - 1)
    if cleanup.hole_size_px > 0:
        result = morphology.remove_small_holes(result, max_size=cleanup.hole_size_px - 1)
    return result.astype(bool)


def segment_scores(
    scores_grid: np.ndarray,
    slice_shape: tuple[int, int],
    config: PipelineConfig,
    *,
    calibrated: float | None = None,
    guide: np.ndarray | None = None,
    threshold: ThresholdSpec | None = None,
) -> SliceSegmentation:
    """Threshold a patch score map into a full-resolution mask according to ``config``."""
    spec = threshold or config.threshold
    if config.upsampling is Upsampling.NEAREST:
        grid_mask = apply_threshold(scores_grid, spec, calibrated)
        value = threshold_value(scores_grid, spec, calibrated)
        mask = grid_to_pixels_nearest(grid_mask, slice_shape)
        scores = grid_to_pixels_nearest(scores_grid, slice_shape).astype(np.float32)
    else:
        scores = pixel_scores(scores_grid, slice_shape, config.upsampling, guide)
        mask = apply_threshold(scores, spec, calibrated)
        value = threshold_value(scores, spec, calibrated)
    if config.cleanup.active:
        mask = clean_mask(mask, config.cleanup)
    return SliceSegmentation(scores_grid.astype(np.float32), scores, mask.astype(bool), value)


def segment_pixel_map(
    score_map: np.ndarray,
    slice_shape: tuple[int, int],
    config: PipelineConfig,
    *,
    calibrated: float | None = None,
    threshold: ThresholdSpec | None = None,
) -> SliceSegmentation:
    """Threshold a working-resolution pixel score map (bilinearly brought to (Y, X))."""
    spec = threshold or config.threshold
    if score_map.shape == tuple(slice_shape):
        scores = score_map.astype(np.float32)  # a copy: the result's score_map and scores are separate arrays
    else:
        scores = upsample_bilinear(score_map, slice_shape)  # a new float32 array (no second copy at 3k x 3k)
    mask = apply_threshold(scores, spec, calibrated)
    value = threshold_value(scores, spec, calibrated)
    if config.cleanup.active:
        mask = clean_mask(mask, config.cleanup)
    return SliceSegmentation(score_map.astype(np.float32), scores, np.asarray(mask, dtype=bool), value)


def scores_at_points(scores: np.ndarray, xy: np.ndarray, slice_shape: tuple[int, int]) -> np.ndarray:
    """Score values under points (x, y): per pixel for (Y, X) maps, per cell for coarser maps."""
    if len(xy) == 0:
        return np.zeros(0, np.float32)
    if scores.shape == tuple(slice_shape):
        return scores[xy[:, 1], xy[:, 0]].astype(np.float32)
    cells = points_to_patches(xy, slice_shape, scores.shape)
    return scores[cells[:, 0], cells[:, 1]].astype(np.float32)


# ---- the scorer -----------------------------------------------------------------------------------------


def _uses_patch_components(embedder: "SliceEmbedder", config: PipelineConfig) -> bool:
    # The filter bank's patch features are pooled pixel features: appending them adds nothing.
    return config.patch_components > 0 and embedder.backbone.spec.family != "filterbank"


PatchBasis = tuple[np.ndarray, np.ndarray]  # ((D, k) basis, (D,) mean): PCA of patch embeddings (fit_projection)


def pixel_feature_map(
    embedder: "SliceEmbedder", z: int, config: PipelineConfig, prototype: Prototype | None, *,
    basis: PatchBasis | None = None,
) -> np.ndarray:
    """(h, w, F') float32 standardised pixel features of slice z at the working resolution (core.pixels), read-only.

    The patch-embedding components use the prototype's PCA basis (``basis`` when no prototype is given; none
    when neither has one). Memoised per slice by the embedder (``SliceEmbedder.pixel_feature_map``): every
    click and scorer of a slice reads the same array.
    """
    if prototype is not None:
        basis = None if prototype.pixel_projection is None else (prototype.pixel_projection,
                                                                 prototype.pixel_projection_mean)
    return embedder.pixel_feature_map(z, config.pixel_max_side, standardize=config.pixel_standardize,
                                      projection=None if basis is None else basis[0],
                                      projection_mean=None if basis is None else basis[1])


class Scorer:
    """A prototype bound to a configuration; computes score maps and masks of any slice of any stack."""

    def __init__(self, prototype: Prototype, config: PipelineConfig | None = None) -> None:
        self.prototype = prototype
        self.config = config or prototype.config
        self.pixel_model: PixelClassifier | None = None
        if self.config.uses_pixels:
            if prototype.pixel_positive_examples is None or prototype.pixel_negative_examples is None:
                raise PrototypeError(
                    "this prototype has no pixel examples (it was made without the pixel classifier); "
                    "rebuild it in best mode or use pixel_classifier=none"
                )

            self.pixel_model = PixelClassifier(self.config.pixel_classifier, *local_examples(prototype))
            # other stacks: core.transfer's classifiers when the examples carry a transfer block
            self.transfer = TransferModels(prototype, self.config,
                                           lambda embedder, z: pixel_feature_map(embedder, z, self.config, self.prototype))

    @property
    def pixel_level(self) -> bool:
        return self.pixel_model is not None

    def score_map(self, embedder: "SliceEmbedder", z: int) -> np.ndarray:
        """Raw score map of slice z: (h, w) patch grid, or working-resolution pixel scores."""
        if self.pixel_model is not None:
            if self.transfer.applies(embedder):
                return self.transfer.score_map(embedder, z)
            return self.pixel_model.score(pixel_feature_map(embedder, z, self.config, self.prototype))
        return grid_scores(embedder.embed(z), self.prototype, self.config)

    def segment(
        self,
        embedder: "SliceEmbedder",
        z: int,
        score_map: np.ndarray | None = None,
        *,
        threshold: ThresholdSpec | None = None,
    ) -> SliceSegmentation:
        """Mask of slice z from its (possibly z-smoothed) score map (computed when not given)."""
        if score_map is None:
            score_map = self.score_map(embedder, z)
        calibrated = self.prototype.calibrated_threshold
        if self.pixel_model is not None:
            if self.transfer.applies(embedder):
                calibrated = 0.0  # the transferred classifiers cut at p = 0.5 (the clicks were on another stack)
            return segment_pixel_map(score_map, embedder.slice_shape, self.config, calibrated=calibrated, threshold=threshold)
        guide = embedder.normalized(z) if self.config.upsampling is Upsampling.GUIDED else None
        return segment_scores(
            score_map, embedder.slice_shape, self.config, calibrated=calibrated, guide=guide, threshold=threshold
        )

    def full_scores(self, embedder: "SliceEmbedder", z: int, score_map: np.ndarray) -> np.ndarray:
        """(Y, X) per-pixel scores as thresholded (for calibration and display)."""
        if self.pixel_model is not None:
            shape = embedder.slice_shape
            return score_map if score_map.shape == tuple(shape) else upsample_bilinear(score_map, shape)
        guide = embedder.normalized(z) if self.config.upsampling is Upsampling.GUIDED else None
        return pixel_scores(score_map, embedder.slice_shape, self.config.upsampling, guide)


# A forest on more examples learns nothing new from clicks but costs linear time (100k examples: 16 s on
# 2 cores); ordinary clicking (50 points x 13 pixels at radius 2) stays far below this.
MAX_PIXEL_EXAMPLES = 10_000  # per class

# ---- building prototypes --------------------------------------------------------------------------------


def build_prototype(
    embedder: "SliceEmbedder",
    points: PointSet,
    config: PipelineConfig,
    *,
    seed: int = 0,
) -> Prototype:
    """Prototypes from clicked points (any number of slices), with the threshold calibrated on them."""
    return build_scorer(embedder, points, config, seed=seed).prototype


def build_scorer(
    embedder: "SliceEmbedder",
    points: PointSet,
    config: PipelineConfig,
    *,
    seed: int = 0,
    stack_basis: bool = False,
    calibrate: bool = True,
) -> Scorer:
    """Like ``build_prototype``, but returns the ready Scorer (its ``.prototype`` is the new prototype), so
    that the pixel classifier fitted for calibration is not fitted again.

    stack_basis : for the patch components of best mode with a ViT backbone, use the PCA basis fitted once per
        stack (``SliceEmbedder.patch_basis(per_stack=True)``, as the app does) instead of the basis of the
        points' slices (the default, which evaluations use: the same points give the same prototype).
    calibrate : calibrate the threshold on the points (False: no calibrated threshold, and no score map computed
        for it; the app's patch preview, which thresholds nothing).
    """
    _check_points(embedder, points, config)
    embeddings = {z: embedder.embed(z) for z in points.slices}
    positive, negative = collect_examples(points, embeddings.__getitem__, embedder.slice_shape)
    prototype = _points_prototype(embedder, points, config, positive, negative, seed)
    point_features = None
    if config.uses_pixels:
        prototype, point_features = _with_pixel_examples(embedder, prototype, embeddings, seed=seed,
                                                         stack_basis=stack_basis)
    return _calibrated(embedder, prototype, point_features) if calibrate else Scorer(prototype)


def _check_points(embedder: "SliceEmbedder", points: PointSet, config: PipelineConfig) -> None:
    """PrototypeError unless the points can make a prototype on this stack under ``config``."""
    if len(points.positive) == 0:
        raise PrototypeError("at least one positive point is needed to build prototypes")
    for z in points.slices:
        if not 0 <= z < embedder.n_slices:
            raise PrototypeError(f"a point lies on slice z={z}, but the stack has slices 0-{embedder.n_slices - 1}")
    if config.uses_pixels and len(points.negative) == 0:
        raise PrototypeError("the pixel classifier of best mode needs negative points too; click some background")


def source_intensity_range(embedder: "SliceEmbedder", points: PointSet) -> tuple[float, float]:
    """The (low, high) intensity percentiles a prototype records of its source: the stack-wide range when the
    embedder normalises per stack, else the range pooled over the clicked slices (at most 4; their planes are
    already read)."""
    if embedder.stack_range is not None:
        return embedder.stack_range
    slices = [embedder.raw(z) for z in points.slices[:4]]
    return pooled_intensity_range(slices, embedder.preprocess.clip_percentiles)


def target_intensity_range(embedder: "SliceEmbedder", z: int | None = None) -> tuple[float, float]:
    """The (low, high) intensity percentiles of a target, comparable with ``Prototype.intensity_range``: the
    stack-wide range when the embedder normalises per stack, else the range of slice z (default: the middle
    slice; one plane read)."""
    if embedder.stack_range is not None:
        return embedder.stack_range
    z = embedder.n_slices // 2 if z is None else z
    return pooled_intensity_range([embedder.raw(z)], embedder.preprocess.clip_percentiles)


def _points_prototype(embedder: "SliceEmbedder", points: PointSet, config: PipelineConfig, positive: np.ndarray,
                      negative: np.ndarray, seed: int) -> Prototype:
    """A prototype of ``points`` on the embedder's stack with these (N, D) unit patch examples (no pixel examples,
    no calibrated threshold yet)."""
    return Prototype(
        positive_references=build_references(positive, config, seed),
        negative_references=build_references(negative, config, seed),
        positive_examples=positive,
        negative_examples=negative,
        config=config,
        backbone=embedder.backbone.spec.name,
        weights_id=embedder.backbone.weights_id,
        embed_dim=int(positive.shape[-1]),
        points=points,
        source_file=str(embedder.stack.path),
        channel=embedder.channel,
        timepoint=embedder.timepoint,
        intensity_range=source_intensity_range(embedder, points),
        source_channel_name=channel_name(embedder.stack, embedder.channel),
        created=now_iso(),
        backbone_label=embedder.backbone.label(),
    )


def _calibrated(embedder: "SliceEmbedder", prototype: Prototype, point_features: "PointFeatures | None") -> Scorer:
    """The Scorer of ``prototype``, its threshold calibrated on the prototype's points when there are negatives."""
    scorer = Scorer(prototype)
    if len(prototype.points.negative):
        calibrated = calibrate_on_points(embedder, prototype, scorer, point_features=point_features)
        # The calibrated threshold does not change the fitted classifier: keep it.
        scorer.prototype = dataclasses.replace(prototype, calibrated_threshold=calibrated)
    return scorer


PointFeatures = dict[int, tuple[np.ndarray, np.ndarray]]  # z -> (positive, negative) (N, F') features at the points


def _with_pixel_examples(
    embedder: "SliceEmbedder", prototype: Prototype, embeddings: dict[int, np.ndarray], *, seed: int = 0,
    fit_basis: bool = True, stack_basis: bool = False,
) -> tuple[Prototype, PointFeatures]:
    """The prototype with its pixel examples (clicked pixels and their neighbours; at most
    MAX_PIXEL_EXAMPLES per class, a seeded subsample beyond), and the features at the clicked pixels
    themselves, which calibration scores (so it need not compute the maps again).

    fit_basis : fit the patch-embedding PCA basis on these slices (False: keep the prototype's, as an
        adapted prototype must, so that its examples and the base's live in one feature space).
    stack_basis : take the stack's basis (``SliceEmbedder.patch_basis(per_stack=True)``) rather than these
        slices' (see ``build_scorer``).
    """

    config = prototype.config
    if fit_basis and _uses_patch_components(embedder, config):
        basis, mean = embedder.patch_basis(config.patch_components, list(embeddings), per_stack=stack_basis)
        prototype = dataclasses.replace(prototype, pixel_projection=basis, pixel_projection_mean=mean)
    basis = None if prototype.pixel_projection is None else (prototype.pixel_projection, prototype.pixel_projection_mean)
    positive, negative, at_points = pixel_examples(embedder, prototype.points, config, basis, seed=seed)
    prototype = dataclasses.replace(prototype, pixel_positive_examples=positive, pixel_negative_examples=negative)
    return prototype, at_points


def pixel_examples(
    embedder: "SliceEmbedder", points: PointSet, config: PipelineConfig, basis: PatchBasis | None, *, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, PointFeatures]:
    """Best mode's pixel examples of ``points``: (positive (N, F'), negative (M, F')) float32 feature rows of the
    clicked pixels and their neighbours within ``config.augment_radius`` (at most MAX_PIXEL_EXAMPLES per class,
    a subsample seeded by ``seed`` beyond), and per slice the rows under the clicked pixels themselves (what
    calibration scores). ``basis`` : the PCA basis of the patch components, or None."""
    positive: list[np.ndarray] = []
    negative: list[np.ndarray] = []
    at_points: PointFeatures = {}
    for z in points.slices:
        features = pixel_feature_map(embedder, z, config, None, basis=basis)
        examples_map = example_features(embedder, z, config, features)  # + core.transfer's block when on
        pos_xy, neg_xy = points.on_slice(z)
        for xy, bucket in ((pos_xy, positive), (neg_xy, negative)):
            cells = example_pixels(xy, embedder.slice_shape, features.shape[:2], config.augment_radius)
            bucket.append(examples_map[cells[:, 0], cells[:, 1]])
        negative.append(border_examples(embedder, z, config, pos_xy, neg_xy, examples_map))  # none unless border_rays
        at_points[z] = tuple(_features_at(features, xy, embedder.slice_shape) for xy in (pos_xy, neg_xy))
    rng = np.random.default_rng(seed)
    return (_at_most(np.concatenate(positive).astype(np.float32), MAX_PIXEL_EXAMPLES, rng),
            _at_most(np.concatenate(negative).astype(np.float32), MAX_PIXEL_EXAMPLES, rng), at_points)


def _at_most(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` as they are when there are at most ``limit``, else a seeded subsample of ``limit`` in order."""
    if len(rows) <= limit:
        return rows
    return rows[np.sort(rng.choice(len(rows), limit, replace=False))]


def _features_at(features: np.ndarray, xy: np.ndarray, slice_shape: tuple[int, int]) -> np.ndarray:
    """(N, F') rows of an (h, w, F') working-resolution feature map under the clicked (x, y) pixels."""

    cells = example_pixels(xy, slice_shape, features.shape[:2], 0)
    return features[cells[:, 0], cells[:, 1]]


def calibrate_on_points(
    embedder: "SliceEmbedder", prototype: Prototype, scorer: Scorer | None = None, *,
    point_features: PointFeatures | None = None,
) -> float:
    """Absolute threshold separating the scores under the prototype's own points, on the same score
    representation that is thresholded (patch grid for nearest upsampling, pixels otherwise).

    point_features : the pixel features at the points, when the caller has them (build_scorer).
    """
    scorer = scorer or Scorer(prototype)
    positive_scores: list[np.ndarray] = []
    negative_scores: list[np.ndarray] = []
    for z in prototype.points.slices:
        pos_xy, neg_xy = prototype.points.on_slice(z)
        if scorer.pixel_model is not None:
            # Only the clicked pixels are needed: score their feature vectors, not the whole slice.
            if point_features is not None and z in point_features:
                at_points = point_features[z]
            else:
                features = pixel_feature_map(embedder, z, prototype.config, prototype)
                at_points = tuple(_features_at(features, xy, embedder.slice_shape) for xy in (pos_xy, neg_xy))
            for rows, bucket in zip(at_points, (positive_scores, negative_scores)):
                bucket.append(scorer.pixel_model.score(rows[None])[0])
            continue
        score_map = scorer.score_map(embedder, z)
        if prototype.config.upsampling is not Upsampling.NEAREST:
            score_map = scorer.full_scores(embedder, z, score_map)
        positive_scores.append(scores_at_points(score_map, pos_xy, embedder.slice_shape))
        negative_scores.append(scores_at_points(score_map, neg_xy, embedder.slice_shape))
    return calibrate_threshold(np.concatenate(positive_scores), np.concatenate(negative_scores))


# ---- quick adapt: a saved prototype and a few clicks on another stack -------------------------------------


def lineage_entry(source_file: str, channel: int | None, points: PointSet, created: str = "") -> dict:
    """One lineage entry: the points of one stack a prototype's examples came from (counts, not coordinates)."""
    return {"source_file": str(source_file), "channel": channel, "positive": int(len(points.positive)),
            "negative": int(len(points.negative)), "created": created}


def prototype_lineage(prototype: Prototype) -> tuple[dict, ...]:
    """Where ``prototype``'s examples came from, oldest first (``Prototype.lineage``).

    A prototype without a recorded lineage is its own points on its source file; when it holds more patch examples
    than points (an adapted prototype read back from a file that lost its lineage), the surplus is one entry of
    unknown source ('').
    """
    recorded = tuple(getattr(prototype, "lineage", ()) or ())
    if recorded:
        return recorded
    own = lineage_entry(prototype.source_file, prototype.channel, prototype.points, prototype.created)
    extra_positive = len(prototype.positive_examples) - own["positive"]
    extra_negative = len(prototype.negative_examples) - own["negative"]
    if extra_positive > 0 or extra_negative > 0:
        inherited = {"source_file": "", "channel": None, "positive": max(extra_positive, 0),
                     "negative": max(extra_negative, 0), "created": ""}
        return inherited, own
    return (own,)


def check_adaptable(base: Prototype, embedder: "SliceEmbedder", config: PipelineConfig) -> None:
    """PrototypeError unless new examples from ``embedder``'s stack can join ``base``'s: the same backbone, weights
    and embedding dimension, and the same mode (``config.mode``); best mode needs the base's pixel examples."""
    backbone = embedder.backbone
    name = backbone.spec.name
    if base.backbone != name:
        raise PrototypeError(f"the base prototype was made with backbone {base.backbone!r} but {name!r} is selected; "
                             f"select {base.backbone!r} to adapt it, or start a new prototype")
    if base.embed_dim != int(backbone.embed_dim):
        raise PrototypeError(f"the base prototype holds {base.embed_dim}-dimensional embeddings but {name!r} gives "
                             f"{backbone.embed_dim}; select the backbone that made it, or start a new prototype")
    if base.weights_id and backbone.weights_id and base.weights_id != backbone.weights_id:
        raise PrototypeError(f"the base prototype was made with other weights of {name!r} ({base.weights_id}, now "
                             f"{backbone.weights_id}); its examples and new ones would not compare")
    if base.config.mode is not config.mode:
        raise PrototypeError(f"the base prototype was made in {base.config.mode.value} mode but "
                             f"{config.mode.value} mode is selected; switch to {base.config.mode.value} mode to "
                             "adapt it, or start a new prototype")
    if config.uses_pixels and (base.pixel_positive_examples is None or base.pixel_negative_examples is None):
        raise PrototypeError("the base prototype has no pixel examples (it was made without the pixel classifier); "
                             "adapt it with pixel_classifier=none, or start a new prototype")


def adapt_prototype(
    base: Prototype,
    embedder: "SliceEmbedder",
    new_points: PointSet,
    config: PipelineConfig | None = None,
    *,
    seed: int = 0,
) -> Prototype:
    """``base`` with the examples of ``new_points`` clicked on ``embedder``'s stack added (quick adapt).

    Keeps the base's patch examples (and best mode's pixel examples, in the base's feature space: its PCA basis of
    patch embeddings is kept) and adds the new points' examples; the references are rebuilt from all of them, the
    threshold is calibrated on the new points only, and the lineage (``prototype_lineage``) is the base's followed
    by this stack's points. ``.points`` are the new points (coordinates of this stack); the source file, channel and
    intensity range are this stack's.

    config : the configuration to adapt under (default: the base's); its mode must be the base's.
    Raises PrototypeError for a base of another backbone, weights, embedding dimension or mode, and for points
    that cannot make a prototype (no positive point; best mode without a negative point on this stack).
    """
    return adapt_scorer(base, embedder, new_points, config, seed=seed).prototype


def adapt_scorer(
    base: Prototype,
    embedder: "SliceEmbedder",
    new_points: PointSet,
    config: PipelineConfig | None = None,
    *,
    seed: int = 0,
) -> Scorer:
    """Like ``adapt_prototype``, but returns the ready Scorer (its ``.prototype`` is the adapted prototype)."""
    config = config or base.config
    check_adaptable(base, embedder, config)
    _check_points(embedder, new_points, config)
    embeddings = {z: embedder.embed(z) for z in new_points.slices}
    positive, negative = collect_examples(new_points, embeddings.__getitem__, embedder.slice_shape)
    positive = np.concatenate([base.positive_examples, positive.reshape(-1, base.embed_dim)]).astype(np.float32)
    negative = np.concatenate([base.negative_examples, negative.reshape(-1, base.embed_dim)]).astype(np.float32)
    prototype = dataclasses.replace(_points_prototype(embedder, new_points, config, positive, negative, seed),
                                    pixel_projection=base.pixel_projection,
                                    pixel_projection_mean=base.pixel_projection_mean)
    point_features = None
    if config.uses_pixels:
        prototype, point_features = _with_pixel_examples(embedder, prototype, embeddings, seed=seed, fit_basis=False)
        prototype = _with_base_pixels(prototype, base, np.random.default_rng(seed))
    lineage = prototype_lineage(base) + (lineage_entry(prototype.source_file, prototype.channel, new_points,
                                                       prototype.created),)
    adapted = dataclasses.replace(prototype, lineage=lineage)
    return _calibrated(embedder, adapted, point_features)


def _with_base_pixels(prototype: Prototype, base: Prototype, rng: np.random.Generator) -> Prototype:
    """``prototype``'s new pixel examples after the base's: all new ones (at most MAX_PIXEL_EXAMPLES per class), and
    of the base's as many as leave the class at most MAX_PIXEL_EXAMPLES, but never fewer than half of that (a
    seeded subsample), so that a few clicks here are not drowned and the base is not forgotten."""
    merged = {}
    for key in ("pixel_positive_examples", "pixel_negative_examples"):
        new, old = getattr(prototype, key), getattr(base, key)
        if new.shape[1] != old.shape[1]:
            raise PrototypeError(f"the base prototype's pixel features have {old.shape[1]} values but this stack's "
                                 f"have {new.shape[1]}; adapt it with the pixel options it was made with "
                                 f"({base.config.describe()})")
        quota = max(MAX_PIXEL_EXAMPLES // 2, MAX_PIXEL_EXAMPLES - len(new))
        merged[key] = np.concatenate([_at_most(old, quota, rng), new]).astype(np.float32)
    return dataclasses.replace(prototype, **merged)


def segment_slice(
    embedder: "SliceEmbedder",
    z: int,
    prototype: Prototype,
    config: PipelineConfig | None = None,
    *,
    threshold: ThresholdSpec | None = None,
) -> SliceSegmentation:
    """Embed (cached) and segment one slice with a prototype (builds a Scorer; reuse one for many slices)."""
    return Scorer(prototype, config).segment(embedder, z, threshold=threshold)
