"""The prototype pipeline on one slice: embeddings -> score map -> mask (PIPELINE.md A.4-A.6 and part B).

thesis : score on the (h, w) patch grid, keep the top 10 % of patches, nearest-resize that patch mask to the
         original (Y, X) slice (14-px blocks at 980 px).
best   : the same score, upsampled (bilinear or image-guided) to (Y, X) before thresholding, with a threshold
         that follows the data (calibrated on the user's points, or Otsu), optionally smoothed along z and
         cleaned up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import ndimage
from skimage import morphology

from core.config import Cleanup, PipelineConfig, Upsampling
from core.errors import PrototypeError
from core.grid import grid_to_pixels_nearest, points_to_patches, upsample_bilinear
from core.prototypes import PointSet, Prototype, build_references, collect_examples, now_iso
from core.scoring import score_embeddings
from core.thresholds import ThresholdSpec, apply_threshold, calibrate_threshold, threshold_value

if TYPE_CHECKING:  # pragma: no cover
    from core.embedding import SliceEmbedder


@dataclass(frozen=True)
class SliceSegmentation:
    """Result on one slice.

    grid_scores : (h, w) float32 patch scores S. scores : (Y, X) float32 per-pixel scores (the nearest
    resize of the grid in thesis mode). mask : (Y, X) bool. threshold : the absolute score threshold used
    (for top:P, the lowest selected score).
    """

    grid_scores: np.ndarray
    scores: np.ndarray
    mask: np.ndarray
    threshold: float


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
        # eps relative to the guide's variance: edges of the slice with contrast above ~10 % are kept.
        upsampled = guided_filter(guide.astype(np.float32), upsampled, radius, eps=1e-2)
    return upsampled


def clean_mask(mask: np.ndarray, cleanup: Cleanup) -> np.ndarray:
    """Optional closing, small-object removal and hole filling of a (Y, X) bool mask."""
    result = mask
    if cleanup.closing_px > 0:
        result = ndimage.binary_closing(result, structure=morphology.disk(cleanup.closing_px))
    if cleanup.min_size_px > 0:
        result = morphology.remove_small_objects(result, max_size=cleanup.min_size_px - 1)
    if cleanup.fill_holes:
        result = ndimage.binary_fill_holes(result)
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


def smooth_along_z(score_maps: Sequence[np.ndarray], sigma: float) -> list[np.ndarray]:
    """Gaussian smoothing (sigma in slices) of consecutive (h, w) score maps along z."""
    if sigma <= 0 or len(score_maps) < 2:
        return [np.asarray(m, dtype=np.float32) for m in score_maps]
    volume = np.stack(score_maps).astype(np.float32)
    smoothed = ndimage.gaussian_filter1d(volume, sigma, axis=0, mode="nearest")
    return list(smoothed)


def scores_at_points(scores: np.ndarray, xy: np.ndarray, slice_shape: tuple[int, int]) -> np.ndarray:
    """Score values under points (x, y): per pixel for (Y, X) maps, per patch for (h, w) grids."""
    if len(xy) == 0:
        return np.zeros(0, np.float32)
    if scores.shape == tuple(slice_shape):
        return scores[xy[:, 1], xy[:, 0]].astype(np.float32)
    cells = points_to_patches(xy, slice_shape, scores.shape)
    return scores[cells[:, 0], cells[:, 1]].astype(np.float32)


def build_prototype(
    embedder: "SliceEmbedder",
    points: PointSet,
    config: PipelineConfig,
    *,
    seed: int = 0,
) -> Prototype:
    """Prototypes from clicked points (any number of slices), with the threshold calibrated on them."""
    if len(points.positive) == 0:
        raise PrototypeError("at least one positive point is needed to build prototypes")
    for z in points.slices:
        if not 0 <= z < embedder.n_slices:
            raise PrototypeError(f"a point lies on slice z={z}, but the stack has slices 0-{embedder.n_slices - 1}")
    embeddings = {z: embedder.embed(z) for z in points.slices}
    positive, negative = collect_examples(points, embeddings.__getitem__, embedder.slice_shape)
    prototype = Prototype(
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
        intensity_range=embedder.stack_range,
        created=now_iso(),
        backbone_label=embedder.backbone.label(),
    )
    if len(negative) == 0:
        return prototype
    calibrated = calibrate_on_points(embedder, prototype, embeddings)
    return _with_threshold(prototype, calibrated)


def calibrate_on_points(
    embedder: "SliceEmbedder", prototype: Prototype, embeddings: dict[int, np.ndarray]
) -> float:
    """Absolute threshold separating the scores under the prototype's own points (at pixel level when
    the configuration thresholds per pixel)."""
    positive_scores: list[np.ndarray] = []
    negative_scores: list[np.ndarray] = []
    config = prototype.config
    for z, embedding in embeddings.items():
        scores = grid_scores(embedding, prototype)
        if config.upsampling is not Upsampling.NEAREST:
            guide = embedder.normalized(z) if config.upsampling is Upsampling.GUIDED else None
            scores = pixel_scores(scores, embedder.slice_shape, config.upsampling, guide)
        pos_xy, neg_xy = prototype.points.on_slice(z)
        positive_scores.append(scores_at_points(scores, pos_xy, embedder.slice_shape))
        negative_scores.append(scores_at_points(scores, neg_xy, embedder.slice_shape))
    return calibrate_threshold(np.concatenate(positive_scores), np.concatenate(negative_scores))


def _with_threshold(prototype: Prototype, calibrated: float) -> Prototype:
    import dataclasses

    return dataclasses.replace(prototype, calibrated_threshold=float(calibrated))


def segment_slice(
    embedder: "SliceEmbedder",
    z: int,
    prototype: Prototype,
    config: PipelineConfig | None = None,
    *,
    threshold: ThresholdSpec | None = None,
) -> SliceSegmentation:
    """Embed (cached) and segment one slice with a prototype."""
    config = config or prototype.config
    scores = grid_scores(embedder.embed(z), prototype, config)
    guide = embedder.normalized(z) if config.upsampling is Upsampling.GUIDED else None
    return segment_scores(
        scores, embedder.slice_shape, config, calibrated=prototype.calibrated_threshold, guide=guide, threshold=threshold
    )
