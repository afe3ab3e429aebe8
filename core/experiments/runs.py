"""The thesis's experiments (chapter 4) as reproducible reports: tables as lists of dicts, plotly figures.

Every experiment runs the evaluation protocol of ``core.protocol`` (evenly spaced slices with both structure
and background in the ground truth; per slice and seed, points sampled from the ground truth with a margin
from the boundary, exactly the points ``core.protocol.evaluate`` samples) for one or more loaded backbones:

- ``backbones``    Table 4.2 + Fig. 4.3: same-slice Dice / IoU / HD95, mean ± std per backbone, and mean
                   Dice per stack and backbone (grouped bars).
- ``separability`` Table 4.1 + Figs. 4.1/4.2: per evaluated slice, the patch embeddings labelled structure /
                   background by the ground truth (``metrics.patch_labels`` at the embedding grid) ->
                   silhouette (cosine) and leave-one-out kNN accuracy (k = 10); mean ± std per backbone; PCA
                   and UMAP scatter of one representative slice (the slice with the median silhouette) with the
                   mean positive / negative prototypes of that slice's sampled points.
- ``points``       Fig. 4.6: same-slice Dice for 1 ... 50 points per class (box plot per count).
- ``threshold``    Fig. 4.7: same-slice Dice against the top-% threshold (2-30 %, step 2): the prototypes and
                   the score map are built once per slice and seed, only the threshold varies.
- ``transfer``     Fig. 4.9 + Table B.1 (+ Table 4.4): the n x n matrix of mean Dice ± std, rows the reference
                   stack and columns the target stack (same-file on the diagonal, cross-file elsewhere).

A run returns an ``Experiment`` (tables, figures, notes); ``write_report`` writes the tables as CSV, the
figures as HTML (and PNG through kaleido when a browser is available) and a README.md + run.json saying the
command, the backbones (with a loud note for random weights), the date and the machine.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from core.features.backbones import RANDOM_LABEL
from core.window import neighbourhood, z_smoothed
from core.config import PipelineConfig
from core.features.embedding import SliceEmbedder
from core.errors import ProtoscopeError
from core.io import open_stack
from core.io.atomic import atomic_output
from core.metrics import dice, iou, knn_accuracy, patch_labels, silhouette, summarize
from core.pipeline import build_prototype, build_scorer
from core.protocol import (
    EvalStack,
    EvaluationResult,
    Method,
    ProtocolSettings,
    TruthReader,
    default_margin,
    evaluate,
    evaluated_slices,
    protocol_points,
)
from core.scoring import l2_normalize
from core.thresholds import ThresholdSpec

if TYPE_CHECKING:  # pragma: no cover
    from core.features.backbones import Backbone
    from core.features.embedding_cache import EmbeddingCache

EXPERIMENTS = ("backbones", "separability", "points", "threshold", "transfer")
#: Points per class of the point-sensitivity experiment (thesis Fig. 4.6).
POINT_COUNTS = (1, 2, 5, 10, 15, 20, 25, 30, 40, 50)
#: Top-% thresholds of the threshold-sensitivity experiment (thesis Fig. 4.7).
TOP_PERCENTS = tuple(float(p) for p in range(2, 31, 2))
RANDOM_NOTE = "RANDOM WEIGHTS — plumbing only, not results"
#: Thesis Figs. 4.1/4.2: structure orange, background blue, positive prototype green, negative red.
COLOURS = {"structure": "#ff7f0e", "background": "#1f77b4", "positive prototype": "#2ca02c",
           "negative prototype": "#d62728"}
TITLES = {
    "backbones": "Backbone comparison (thesis Table 4.2, Fig. 4.3)",
    "separability": "Feature-space separability (thesis Table 4.1, Figs. 4.1/4.2)",
    "points": "Point sensitivity (thesis Fig. 4.6)",
    "threshold": "Threshold sensitivity (thesis Fig. 4.7)",
    "transfer": "Prototype transfer (thesis Fig. 4.9, Tables 4.4 and B.1)",
}
FILES = {
    "backbones": {
        "summary.csv": "Table 4.2: same-slice Dice, IoU, HD95 (px, µm) mean ± std per backbone",
        "per_stack.csv": "Fig. 4.3: mean ± std Dice per stack and backbone",
        "slices.csv": "one row per (backbone, stack, slice, seed)",
        "dice_per_stack": "Fig. 4.3: grouped bars of mean Dice per stack and backbone (error bars: std)",
    },
    "separability": {
        "summary.csv": "Table 4.1: silhouette (cosine) and kNN accuracy (k = 10) mean ± std per backbone, and the "
                       "accuracy of always answering the larger class (majority_accuracy) to compare kNN with",
        "slices.csv": "one row per (backbone, stack, slice): patch counts, silhouette, kNN accuracy",
        "projection.csv": "the 2-D PCA/UMAP coordinates drawn in the scatter plots (slice: see above)",
        "projection_<backbone>": "Figs. 4.1/4.2: PCA and UMAP of the representative slice's patch embeddings",
    },
    "points": {
        "summary.csv": "mean ± std and median Dice per backbone and number of points per class",
        "slices.csv": "one row per (points per class, backbone, stack, slice, seed)",
        "dice_vs_points": "Fig. 4.6: box plot of same-slice Dice per number of points (the line: mean)",
    },
    "threshold": {
        "summary.csv": "mean ± std Dice per backbone, stack ('all' = every slice pooled) and top-% threshold",
        "slices.csv": "one row per (backbone, stack, slice, seed, threshold), with the mask's area fraction",
        "dice_vs_threshold": "Fig. 4.7: mean Dice against the top-% threshold per stack and pooled",
    },
    "transfer": {
        "matrix.csv": "Table B.1: 'mean ± std' Dice, rows reference stack, columns target stack",
        "cells.csv": "the matrix as numbers (Dice and IoU mean ± std and counts per cell)",
        "settings.csv": "Table 4.4: same slice / same file / cross file Dice, IoU, HD95 mean ± std",
        "slices.csv": "one row per (reference, target slice, seed)",
        "transfer_matrix_<backbone>": "Fig. 4.9: annotated heatmap of the transfer matrix",
    },
}

Log = Callable[[str], None]


@dataclass(frozen=True)
class Experiment:
    """One experiment's results.

    tables : CSV name (without .csv) -> rows (dicts with the same keys).
    figures : file stem -> plotly Figure.
    notes : things the reader should know (skipped slices, shallow stacks, ...).
    info : facts for the report (mode, configuration, slices per stack, seconds, ...).
    """

    name: str
    tables: dict[str, list[dict]]
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


# ---- the protocol's slices and points --------------------------------------------------------------


@dataclass
class _Opened:
    spec: EvalStack
    image: Any
    truth: TruthReader
    channel: int
    z_values: list[int]

    def margin(self, settings: ProtocolSettings, config: PipelineConfig) -> int:
        if settings.margin_px is not None:
            return settings.margin_px
        return default_margin((self.image.shape[2], self.image.shape[3]), config)


@contextlib.contextmanager
def _opened_stacks(stacks: Sequence[EvalStack], settings: ProtocolSettings, notes: list[str]) -> Iterator[list[_Opened]]:
    """Open the stacks and pick the evaluated slices exactly as ``core.protocol.evaluate`` does."""
    opened: list[_Opened] = []
    try:
        for spec in stacks:
            image = open_stack(spec.image_path)
            truth = TruthReader(spec, image)
            entry = _Opened(spec, image, truth, image.resolve_channel(spec.image_channel), [])
            opened.append(entry)
            entry.z_values, stack_notes = evaluated_slices(spec, image, truth, settings)
            notes.extend(stack_notes)
        labels = [entry.spec.label for entry in opened]
        if len(set(labels)) != len(labels):
            raise ProtoscopeError("two stacks have the same name; give them distinct file names")
        yield opened
    finally:
        for entry in opened:
            entry.truth.close()
            entry.image.close()


def _check_backbones(backbones: Sequence["Backbone"]) -> dict[str, str]:
    """name -> label; distinct names required (rows are keyed by the backbone's name)."""
    if not backbones:
        raise ProtoscopeError("no backbone given; add --backbone NAME (e.g. filterbank)")
    names = [b.spec.name for b in backbones]
    if len(set(names)) != len(names):
        raise ProtoscopeError(f"backbone names repeat ({', '.join(names)}); give each backbone once")
    return {b.spec.name: b.label() for b in backbones}


def _mean_std(rows: Sequence[dict], metric: str) -> tuple[float, float]:
    values = [r[metric] for r in rows if r.get(metric) is not None]
    return summarize(values) if values else (float("nan"), float("nan"))


def _group(rows: Sequence[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def _info(config: PipelineConfig, settings: ProtocolSettings, slices: dict[str, list[int]], started: float,
          result: EvaluationResult | None = None, **extra: Any) -> dict:
    info = {"config": config.as_dict(), "config_text": config.describe(), "settings": dataclasses.asdict(settings),
            "slices": slices, "seconds": round(time.perf_counter() - started, 1), **extra}
    if result is not None:
        # backbones and transfer may share one evaluation: its time is reported with both
        info["evaluation_seconds"] = round(result.seconds, 1)
        info["evaluated_settings"] = sorted({row["setting"] for row in result.rows})
    return info


# ---- backbones (Table 4.2, Fig. 4.3) ----------------------------------------------------------------


def backbone_tables(result: EvaluationResult, labels: dict[str, str], method: str) -> dict[str, list[dict]]:
    """Same-slice rows of an evaluation -> {'summary': per backbone, 'per_stack': per (backbone, stack), 'slices'}."""
    rows = [r for r in result.rows if r["setting"] == "same-slice" and r["method"] == method]
    summary = []
    for (backbone,), group in _group(rows, "backbone").items():
        entry = {"backbone": backbone, "backbone_label": labels.get(backbone, backbone), "method": method, "n": len(group)}
        for metric in ("dice", "iou", "hd95_px", "hd95_um"):
            entry[metric], entry[f"{metric}_std"] = _mean_std(group, metric)
        summary.append(entry)
    per_stack = []
    for (backbone, stack), group in _group(rows, "backbone", "stack").items():
        mean, std = _mean_std(group, "dice")
        per_stack.append({"backbone": backbone, "backbone_label": labels.get(backbone, backbone), "stack": stack,
                          "n": len(group), "dice": mean, "dice_std": std})
    return {"summary": summary, "per_stack": per_stack, "slices": rows}


def run_backbones(stacks: Sequence[EvalStack], backbones: Sequence["Backbone"], config: PipelineConfig,
                  settings: ProtocolSettings = ProtocolSettings(), *, cache: "EmbeddingCache | None" = None,
                  log: Log | None = None, result: EvaluationResult | None = None) -> Experiment:
    """Same-slice protocol per backbone (Table 4.2) and mean Dice per stack (Fig. 4.3).

    result : an evaluation that already holds the same-slice rows (``run_experiments`` shares one with transfer).
    """
    started = time.perf_counter()
    labels = _check_backbones(backbones)
    method = config.mode.value
    if result is None:
        result = evaluate(stacks, [Method(method, config)], backbones,
                          dataclasses.replace(settings, settings=("same-slice",)), cache=cache, log=log)
    tables = backbone_tables(result, labels, method)
    figures = {"dice_per_stack": backbones_figure(tables["per_stack"], result.stacks, n_seeds=len(settings.seeds))}
    return Experiment("backbones", tables, figures, list(result.notes), _info(config, settings, result.slices, started, result))


# ---- separability (Table 4.1, Figs. 4.1/4.2) ---------------------------------------------------------


def separability_scores(embeddings: np.ndarray, truth: np.ndarray, *, k: int = 10, seed: int = 0,
                        max_samples: int = 4000) -> dict:
    """Silhouette (cosine) and leave-one-out kNN accuracy of one slice's patches labelled by the ground truth.

    embeddings : (h, w, D) patch embeddings. truth : (Y, X) bool ground truth of the slice (Y >= h, X >= w).
    Returns {'n_patches', 'structure_fraction', 'majority_accuracy', 'silhouette', 'knn_accuracy'};
    majority_accuracy = max(structure_fraction, 1 - structure_fraction) is the kNN accuracy of always answering
    the larger class (the floor to compare kNN accuracy with). silhouette is nan when the
    patch grid holds one class only (the slice's structure is smaller than half a patch everywhere).
    """
    h, w, d = embeddings.shape
    labels = patch_labels(truth, (h, w)).reshape(-1)
    flat = embeddings.reshape(-1, d)
    fraction = float(labels.mean())
    return {
        "n_patches": int(labels.size),
        "structure_fraction": fraction,
        # what kNN accuracy a classifier answering the larger class everywhere would reach
        "majority_accuracy": max(fraction, 1.0 - fraction),
        "silhouette": silhouette(flat, labels, max_samples=max_samples, seed=seed),
        "knn_accuracy": knn_accuracy(flat, labels, k=k) if 0 < labels.sum() < labels.size else float("nan"),
    }


def projection_rows(embeddings: np.ndarray, labels: np.ndarray, positive: np.ndarray, negative: np.ndarray, *,
                    methods: Sequence[str] = ("pca", "umap"), max_points: int = 2000, umap_max_samples: int = 2000,
                    seed: int = 0) -> tuple[list[dict], dict[str, tuple[float, float] | None]]:
    """2-D PCA / UMAP coordinates of unit patch embeddings and the two prototypes.

    embeddings : (N, D) patch embeddings (L2-normalised here: the pipeline compares them by cosine).
    labels : (N,) bool, True = structure. positive, negative : (D,) unit prototypes.
    PCA is fitted on all N patches; UMAP (seeded) on up to ``umap_max_samples`` of the drawn patches. At most
    ``max_points`` patches (a seeded subsample) are returned.
    Returns (rows {'method', 'kind', 'x', 'y'}, explained variance per method (PCA only, else None)).
    """
    from core.projection import pca_2d, umap_2d

    unit = l2_normalize(np.asarray(embeddings, dtype=np.float32))
    extra = l2_normalize(np.vstack([positive, negative]).astype(np.float32))
    n = unit.shape[0]
    shown = np.arange(n)
    if n > max_points:
        shown = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
    kinds = np.where(np.asarray(labels).reshape(-1)[shown], "structure", "background")
    rows: list[dict] = []
    explained: dict[str, tuple[float, float] | None] = {}
    for method in methods:
        if method == "pca":
            projection = pca_2d(unit, extra)
            coords = projection.coords[shown]
        elif method == "umap":
            projection = umap_2d(unit[shown], extra, seed=seed, max_samples=umap_max_samples)
            coords = projection.coords
        else:
            raise ProtoscopeError(f"unknown projection {method!r}; use pca or umap")
        explained[method] = projection.explained_variance
        rows += [{"method": method, "kind": str(kind), "x": float(x), "y": float(y)} for kind, (x, y) in zip(kinds, coords)]
        for kind, (x, y) in zip(("positive prototype", "negative prototype"), projection.extra_coords):
            rows.append({"method": method, "kind": kind, "x": float(x), "y": float(y)})
    return rows, explained


def run_separability(stacks: Sequence[EvalStack], backbones: Sequence["Backbone"], config: PipelineConfig,
                     settings: ProtocolSettings = ProtocolSettings(), *, cache: "EmbeddingCache | None" = None,
                     log: Log | None = None, k: int = 10, projections: Sequence[str] = ("pca", "umap"),
                     max_points: int = 2000, umap_max_samples: int = 2000) -> Experiment:
    """Silhouette and kNN accuracy per slice and backbone (Table 4.1) and PCA/UMAP scatters (Figs. 4.1/4.2).

    The embeddings are those of ``config``'s preprocessing. The representative slice is the one whose
    silhouette (averaged over the backbones) is closest to the median; the prototypes drawn are the thesis's
    mean prototypes of that slice's points for the first seed.
    """
    started = time.perf_counter()
    log = log or (lambda message: None)
    labels = _check_backbones(backbones)
    notes: list[str] = []
    rows: list[dict] = []
    projection: list[dict] = []
    figures: dict[str, Any] = {}
    mean_config = dataclasses.replace(PipelineConfig.thesis(), preprocess=config.preprocess)
    with _opened_stacks(stacks, settings, notes) as opened:
        embedders = {(b.spec.name, o.spec.label): SliceEmbedder(o.image, o.channel, b, config.preprocess, cache=cache)
                     for b in backbones for o in opened}
        for backbone in backbones:
            log(f"[separability / {backbone.spec.name}] {sum(len(o.z_values) for o in opened)} slices")
            for entry in opened:
                embedder = embedders[(backbone.spec.name, entry.spec.label)]
                for z in entry.z_values:
                    scores = separability_scores(embedder.embed(z), entry.truth(z), k=k)
                    rows.append({"backbone": backbone.spec.name, "stack": entry.spec.label, "z": z, **scores})
        summary = []
        for backbone in backbones:
            group = [r for r in rows if r["backbone"] == backbone.spec.name]
            entry = {"backbone": backbone.spec.name, "backbone_label": labels[backbone.spec.name], "n": len(group)}
            for metric in ("silhouette", "knn_accuracy", "majority_accuracy"):
                entry[metric], entry[f"{metric}_std"] = _mean_std(group, metric)
            entry["k"] = k
            summary.append(entry)
        stack_name, z = representative_slice(rows)
        explained_by_backbone = {}
        if projections:
            target = next(o for o in opened if o.spec.label == stack_name)
            truth = target.truth(z)
            points = protocol_points(truth, z, settings.seeds[0], settings.n_points, target.margin(settings, config))
            for backbone in backbones:
                log(f"[separability / {backbone.spec.name}] projections of {stack_name} z={z}: {', '.join(projections)}")
                embedder = embedders[(backbone.spec.name, stack_name)]
                grid = embedder.embed(z)
                prototype = build_prototype(embedder, points, mean_config, seed=settings.seeds[0])
                if len(prototype.negative_references) == 0:
                    notes.append(f"{stack_name} z={z}: no negative points; prototypes not drawn")
                    continue
                cells, explained = projection_rows(
                    grid.reshape(-1, grid.shape[-1]), patch_labels(truth, grid.shape[:2]).reshape(-1),
                    prototype.positive_references[0], prototype.negative_references[0],
                    methods=projections, max_points=max_points, umap_max_samples=umap_max_samples,
                    seed=settings.seeds[0])
                explained_by_backbone[backbone.spec.name] = explained
                cells = [{"backbone": backbone.spec.name, **row} for row in cells]
                projection += cells
                figures[f"projection_{backbone.spec.name}"] = projection_figure(
                    cells, labels[backbone.spec.name], explained, where=f"{stack_name} z={z}")
    tables = {"summary": summary, "slices": rows}
    if projection:
        tables["projection"] = projection
    slices = {o: sorted({r["z"] for r in rows if r["stack"] == o}) for o in dict.fromkeys(r["stack"] for r in rows)}
    return Experiment("separability", tables, figures, notes,
                      _info(config, settings, slices, started, representative={"stack": stack_name, "z": z},
                            explained_variance=explained_by_backbone))


def representative_slice(rows: Sequence[dict]) -> tuple[str, int]:
    """(stack, z) whose silhouette, averaged over backbones, is closest to the median of all slices."""
    by_slice = _group(rows, "stack", "z")
    means = {key: np.nanmean([r["silhouette"] for r in group]) if any(np.isfinite(r["silhouette"]) for r in group)
             else np.nan for key, group in by_slice.items()}
    finite = {key: value for key, value in means.items() if np.isfinite(value)}
    if not finite:
        return next(iter(by_slice))
    median = float(np.median(list(finite.values())))
    return min(finite, key=lambda key: abs(finite[key] - median))


# ---- points (Fig. 4.6) ------------------------------------------------------------------------------


def run_points(stacks: Sequence[EvalStack], backbones: Sequence["Backbone"], config: PipelineConfig,
               settings: ProtocolSettings = ProtocolSettings(), *, cache: "EmbeddingCache | None" = None,
               log: Log | None = None, counts: Sequence[int] = POINT_COUNTS) -> Experiment:
    """Same-slice protocol for every number of points per class in ``counts`` (Fig. 4.6)."""
    started = time.perf_counter()
    log = log or (lambda message: None)
    labels = _check_backbones(backbones)
    method = config.mode.value
    rows: list[dict] = []
    notes: list[str] = []
    slices: dict[str, list[int]] = {}
    for count in counts:
        if count < 1:
            raise ProtoscopeError(f"point counts must be at least 1, got {count}")
        log(f"[points] {count} point(s) per class")
        result = evaluate(stacks, [Method(method, config)], backbones,
                          dataclasses.replace(settings, n_points=int(count), settings=("same-slice",)), cache=cache)
        rows += [{"n_points": int(count), **row} for row in result.rows]
        notes = list(result.notes)
        slices = result.slices
    summary = []
    for (backbone, count), group in _group(rows, "backbone", "n_points").items():
        entry = {"backbone": backbone, "backbone_label": labels[backbone], "n_points": count, "n": len(group)}
        entry["dice"], entry["dice_std"] = _mean_std(group, "dice")
        entry["dice_median"] = float(np.median([r["dice"] for r in group]))
        entry["iou"], entry["iou_std"] = _mean_std(group, "iou")
        entry["hd95_px"], entry["hd95_px_std"] = _mean_std(group, "hd95_px")
        summary.append(entry)
    tables = {"summary": summary, "slices": rows}
    return Experiment("points", tables, {"dice_vs_points": points_figure(rows, labels)}, notes,
                      _info(config, settings, slices, started, counts=list(counts)))


# ---- threshold (Fig. 4.7) ---------------------------------------------------------------------------


def run_threshold(stacks: Sequence[EvalStack], backbones: Sequence["Backbone"], config: PipelineConfig,
                  settings: ProtocolSettings = ProtocolSettings(), *, cache: "EmbeddingCache | None" = None,
                  log: Log | None = None, percents: Sequence[float] = TOP_PERCENTS) -> Experiment:
    """Same-slice Dice for every top-% threshold (Fig. 4.7).

    Prototypes (the protocol's points) and the score map are made once per slice and seed; each threshold
    then only re-thresholds that map (``Scorer.segment(..., threshold=top:P)``). The thesis runs this in
    thesis mode, where the mask holds exactly round(h·w·P/100) patches of the grid.
    """
    started = time.perf_counter()
    log = log or (lambda message: None)
    labels = _check_backbones(backbones)
    specs = [ThresholdSpec("top", float(p)) for p in percents]
    rows: list[dict] = []
    notes: list[str] = []
    with _opened_stacks(stacks, settings, notes) as opened:
        for backbone in backbones:
            for entry in opened:
                log(f"[threshold / {backbone.spec.name}] {entry.spec.label}: {len(entry.z_values)} slices x "
                    f"{len(settings.seeds)} seeds x {len(specs)} thresholds")
                embedder = SliceEmbedder(entry.image, entry.channel, backbone, config.preprocess, cache=cache)
                margin = entry.margin(settings, config)
                for z in entry.z_values:
                    truth = entry.truth(z)
                    for seed in settings.seeds:
                        points = protocol_points(truth, z, seed, settings.n_points, margin)
                        scorer = build_scorer(embedder, points, config, seed=seed)
                        sigma = config.z_sigma
                        maps = {k: scorer.score_map(embedder, k) for k in neighbourhood(z, sigma, embedder.n_slices)}
                        score_map = z_smoothed(maps, z, sigma, embedder.n_slices)
                        for spec in specs:
                            mask = scorer.segment(embedder, z, score_map, threshold=spec).mask
                            rows.append({"backbone": backbone.spec.name, "stack": entry.spec.label, "z": z, "seed": seed,
                                         "top_percent": spec.value, "dice": dice(mask, truth), "iou": iou(mask, truth),
                                         "mask_fraction": float(mask.mean()), "truth_fraction": float(truth.mean())})
        slices = {o.spec.label: o.z_values for o in opened}
    summary = threshold_summary(rows, labels)
    return Experiment("threshold", {"summary": summary, "slices": rows}, {"dice_vs_threshold": threshold_figure(summary)},
                      notes, _info(config, settings, slices, started, percents=[float(p) for p in percents]))


def threshold_summary(rows: Sequence[dict], labels: dict[str, str]) -> list[dict]:
    """Mean ± std Dice and IoU per (backbone, stack, threshold), and per (backbone, threshold) with stack 'all'."""
    summary = []
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        mine = [r for r in rows if r["backbone"] == backbone]
        groups = list(_group(mine, "stack", "top_percent").items())
        groups += [(("all", p), group) for (p,), group in _group(mine, "top_percent").items()]
        for (stack, percent), group in groups:
            entry = {"backbone": backbone, "backbone_label": labels[backbone], "stack": stack,
                     "top_percent": percent, "n": len(group)}
            entry["dice"], entry["dice_std"] = _mean_std(group, "dice")
            entry["iou"], entry["iou_std"] = _mean_std(group, "iou")
            entry["mask_fraction"], _ = _mean_std(group, "mask_fraction")
            summary.append(entry)
    return summary


# ---- transfer (Fig. 4.9, Tables 4.4 and B.1) ---------------------------------------------------------


def transfer_tables(result: EvaluationResult, labels: dict[str, str], method: str) -> dict[str, list[dict]]:
    """{'matrix': Table B.1 as text, 'cells': the matrix as numbers, 'settings': Table 4.4, 'slices': rows}."""
    rows = [r for r in result.rows if r["method"] == method]
    transfer_rows = [r for r in rows if r["setting"] in ("same-file", "cross-file")]
    iou_cells = _group(transfer_rows, "backbone", "ref_stack", "stack")
    matrix_rows, cells, settings_rows = [], [], []
    for backbone in labels:
        matrix = result.transfer_matrix(method, backbone)
        for reference in result.stacks:
            text = {"backbone": backbone, "reference": reference}
            for target in result.stacks:
                mean, std = matrix[reference][target]
                group = iou_cells.get((backbone, reference, target), [])
                iou_mean, iou_std = _mean_std(group, "iou")
                cells.append({"backbone": backbone, "backbone_label": labels[backbone], "reference": reference,
                              "target": target, "setting": "same-file" if reference == target else "cross-file",
                              "n": len(group), "dice": mean, "dice_std": std, "iou": iou_mean, "iou_std": iou_std})
                text[target] = f"{mean:.3f} ± {std:.3f}" if group else ""
            matrix_rows.append(text)
        for setting in ("same-slice", "same-file", "cross-file"):
            group = [r for r in rows if r["backbone"] == backbone and r["setting"] == setting]
            if not group:
                continue
            entry = {"backbone": backbone, "backbone_label": labels[backbone], "setting": setting, "n": len(group)}
            for metric in ("dice", "iou", "hd95_px"):
                entry[metric], entry[f"{metric}_std"] = _mean_std(group, metric)
            settings_rows.append(entry)
    return {"matrix": matrix_rows, "cells": cells, "settings": settings_rows, "slices": rows}


def run_transfer(stacks: Sequence[EvalStack], backbones: Sequence["Backbone"], config: PipelineConfig,
                 settings: ProtocolSettings = ProtocolSettings(), *, cache: "EmbeddingCache | None" = None,
                 log: Log | None = None, result: EvaluationResult | None = None) -> Experiment:
    """Same-slice, same-file and cross-file protocol; the transfer matrix per backbone (Fig. 4.9, Table B.1)."""
    started = time.perf_counter()
    labels = _check_backbones(backbones)
    method = config.mode.value
    if result is None:
        result = evaluate(stacks, [Method(method, config)], backbones,
                          dataclasses.replace(settings, settings=("same-slice", "same-file", "cross-file")),
                          cache=cache, log=log)
    tables = transfer_tables(result, labels, method)
    figures = {f"transfer_matrix_{name}": transfer_figure([c for c in tables["cells"] if c["backbone"] == name], result.stacks)
               for name in labels}
    notes = list(result.notes)
    if len(result.stacks) < 2:
        notes.append("one stack only: the matrix has no cross-file cells")
    return Experiment("transfer", tables, figures, notes, _info(config, settings, result.slices, started, result))


# ---- several at once --------------------------------------------------------------------------------


def run_experiments(names: Sequence[str], stacks: Sequence[EvalStack], backbones: Sequence["Backbone"],
                    config: PipelineConfig, settings: ProtocolSettings = ProtocolSettings(), *,
                    threshold_config: PipelineConfig | None = None, cache: "EmbeddingCache | None" = None,
                    log: Log | None = None, counts: Sequence[int] = POINT_COUNTS,
                    percents: Sequence[float] = TOP_PERCENTS, projections: Sequence[str] = ("pca", "umap"),
                    max_points: int = 2000, umap_max_samples: int = 2000,
                    on_done: Callable[[Experiment], None] | None = None) -> dict[str, Experiment]:
    """Run the named experiments (in EXPERIMENTS order); backbones and transfer share one evaluation.

    threshold_config : the configuration of the threshold sweep (default: ``config`` when it is thesis mode,
        else the thesis configuration with ``config``'s preprocessing).
    on_done : called with each finished experiment (e.g. to write its report before the next one starts).
    """
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown:
        raise ProtoscopeError(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)} or all")
    _check_backbones(backbones)
    log = log or (lambda message: None)
    if threshold_config is None:
        threshold_config = config if config.mode.value == "thesis" else dataclasses.replace(
            PipelineConfig.thesis(), preprocess=config.preprocess)
    shared: EvaluationResult | None = None
    if "backbones" in names and "transfer" in names:
        shared = evaluate(stacks, [Method(config.mode.value, config)], backbones,
                          dataclasses.replace(settings, settings=("same-slice", "same-file", "cross-file")),
                          cache=cache, log=log)
    done: dict[str, Experiment] = {}
    for name in EXPERIMENTS:
        if name not in names:
            continue
        log(f"== {name}")
        if name == "backbones":
            experiment = run_backbones(stacks, backbones, config, settings, cache=cache, log=log, result=shared)
        elif name == "transfer":
            experiment = run_transfer(stacks, backbones, config, settings, cache=cache, log=log, result=shared)
        elif name == "separability":
            experiment = run_separability(stacks, backbones, config, settings, cache=cache, log=log,
                                          projections=projections, max_points=max_points,
                                          umap_max_samples=umap_max_samples)
        elif name == "points":
            experiment = run_points(stacks, backbones, config, settings, cache=cache, log=log, counts=counts)
        else:
            experiment = run_threshold(stacks, backbones, threshold_config, settings, cache=cache, log=log,
                                       percents=percents)
        done[name] = experiment
        if on_done is not None:
            on_done(experiment)
    return done


# ---- figures ----------------------------------------------------------------------------------------


def is_random_label(label: str) -> bool:
    """True when a Backbone.label() says the weights are random."""
    return RANDOM_LABEL in label or "RANDOM WEIGHTS" in label.upper()


def _mark(fig, labels: Sequence[str], subtitle: str = "") -> None:
    """Backbone labels (and a subtitle) under the title; a red banner when any backbone has random weights."""
    lines = [subtitle] if subtitle else []
    lines += list(dict.fromkeys(labels))
    title = fig.layout.title.text or ""
    fig.update_layout(title={"text": title + "<br><sup>" + "<br>".join(lines) + "</sup>", "x": 0.02, "xanchor": "left"},
                      margin={"t": 90 + 18 * len(lines)}, template="plotly_white")
    if any(is_random_label(label) for label in labels):
        fig.add_annotation(text=f"<b>{RANDOM_NOTE}</b>", xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                           font={"size": 26, "color": "rgba(200,0,0,0.55)"}, textangle=-20)


def backbones_figure(per_stack: Sequence[dict], stacks: Sequence[str] | None = None, *, n_seeds: int | None = None):
    """Fig. 4.3: grouped bars of mean Dice (± std) per stack (x) and backbone (colour; legend = backbone label)."""
    import plotly.graph_objects as go

    stacks = list(stacks or dict.fromkeys(r["stack"] for r in per_stack))
    fig = go.Figure()
    labels = []
    for (backbone,), group in _group(per_stack, "backbone").items():
        by_stack = {r["stack"]: r for r in group}
        label = group[0]["backbone_label"]
        labels.append(label)
        fig.add_bar(name=label, showlegend=True, x=stacks, y=[by_stack[s]["dice"] if s in by_stack else None for s in stacks],
                    error_y={"type": "data", "array": [by_stack[s]["dice_std"] if s in by_stack else None for s in stacks]})
    seeds = f", {n_seeds} seed(s)" if n_seeds else ""
    fig.update_layout(title="Mean Dice per stack and backbone (same slice" + seeds + ")", barmode="group",
                      yaxis={"title": "Dice", "range": [0, 1]}, xaxis={"title": "stack"},
                      legend={"orientation": "h", "y": -0.25}, width=1000, height=560)
    _mark(fig, labels)
    return fig


def projection_figure(rows: Sequence[dict], label: str, explained: dict | None = None, where: str = ""):
    """Figs. 4.1/4.2: one panel per projection; structure orange, background blue, prototypes green / red."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    methods = list(dict.fromkeys(r["method"] for r in rows))
    titles = []
    for method in methods:
        ratio = (explained or {}).get(method)
        titles.append(f"PCA (PC1 {ratio[0]:.0%}, PC2 {ratio[1]:.0%} of variance)" if method == "pca" and ratio
                      else method.upper())
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=titles)
    for column, method in enumerate(methods, start=1):
        for kind in ("background", "structure", "positive prototype", "negative prototype"):
            part = [r for r in rows if r["method"] == method and r["kind"] == kind]
            if not part:
                continue
            prototype = kind.endswith("prototype")
            fig.add_scatter(
                x=[r["x"] for r in part], y=[r["y"] for r in part], mode="markers", name=kind, legendgroup=kind,
                showlegend=column == 1, row=1, col=column,
                marker={"color": COLOURS[kind], "size": 16 if prototype else 4, "opacity": 1.0 if prototype else 0.5,
                        "line": {"width": 2, "color": "black"} if prototype else {"width": 0}},
            )
    fig.update_layout(title=f"Patch embeddings{' of ' + where if where else ''} (structure / background by ground truth)",
                      legend={"orientation": "h", "y": -0.12}, width=1200, height=600)
    _mark(fig, [label])
    return fig


def points_figure(rows: Sequence[dict], labels: dict[str, str]):
    """Fig. 4.6: box plot of same-slice Dice per number of points per class (one colour per backbone)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for (backbone,), group in _group(rows, "backbone").items():
        fig.add_box(name=labels[backbone], showlegend=True, x=[str(r["n_points"]) for r in group], y=[r["dice"] for r in group],
                    boxmean=True, boxpoints=False)
    fig.update_layout(title="Same-slice Dice against the number of points per class", boxmode="group",
                      xaxis={"title": "points per class (positive = negative)", "type": "category"},
                      yaxis={"title": "Dice", "range": [0, 1]}, legend={"orientation": "h", "y": -0.2},
                      width=1000, height=560)
    _mark(fig, list(labels.values()), "box: quartiles, whiskers 1.5 IQR; dashed line: mean")
    return fig


def threshold_figure(summary: Sequence[dict]):
    """Fig. 4.7: mean Dice against the top-% threshold, one line per stack and a thick pooled mean per backbone."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    backbones = list(dict.fromkeys(r["backbone"] for r in summary))
    labels = {r["backbone"]: r["backbone_label"] for r in summary}
    fig = make_subplots(rows=1, cols=len(backbones), shared_yaxes=True,
                        subplot_titles=[labels[b].split(" · ")[0] for b in backbones])
    for column, backbone in enumerate(backbones, start=1):
        mine = [r for r in summary if r["backbone"] == backbone]
        for (stack,), group in _group(mine, "stack").items():
            group = sorted(group, key=lambda r: r["top_percent"])
            pooled = stack == "all"
            fig.add_scatter(x=[r["top_percent"] for r in group], y=[r["dice"] for r in group], mode="lines+markers",
                            name="mean (all slices)" if pooled else stack, legendgroup=stack, showlegend=column == 1,
                            line={"width": 4, "color": "black"} if pooled else {"width": 1.5}, row=1, col=column)
            if pooled:
                best = max(group, key=lambda r: r["dice"])
                fig.add_annotation(x=best["top_percent"], y=best["dice"], text=f"best {best['top_percent']:g} %: "
                                   f"{best['dice']:.3f}", row=1, col=column, showarrow=True, arrowhead=2, ay=-40)
        fig.update_xaxes(title_text="top-% threshold (share of patches kept)", row=1, col=column)
    fig.update_yaxes(title_text="Dice", range=[0, 1], row=1, col=1)
    fig.update_layout(title="Same-slice Dice against the top-% threshold", width=max(900, 600 * len(backbones)),
                      height=560, legend={"orientation": "h", "y": -0.2})
    _mark(fig, list(labels.values()))
    return fig


def transfer_figure(cells: Sequence[dict], stacks: Sequence[str] | None = None):
    """Fig. 4.9: heatmap of mean Dice, rows reference stack, columns target stack, annotated 'mean ± std'."""
    import plotly.graph_objects as go

    stacks = list(stacks or dict.fromkeys(c["reference"] for c in cells))
    by_cell = {(c["reference"], c["target"]): c for c in cells}
    z = [[by_cell[(r, t)]["dice"] if (r, t) in by_cell else None for t in stacks] for r in stacks]
    text = [[f"{by_cell[(r, t)]['dice']:.3f}<br>± {by_cell[(r, t)]['dice_std']:.3f}"
             if (r, t) in by_cell and by_cell[(r, t)]["n"] else "" for t in stacks] for r in stacks]
    label = cells[0]["backbone_label"] if cells else ""
    fig = go.Figure(go.Heatmap(z=z, x=stacks, y=stacks, text=text, texttemplate="%{text}", zmin=0, zmax=1,
                               colorscale="Viridis", colorbar={"title": "Dice"}))
    fig.update_layout(title="Prototype transfer: mean Dice (rows: reference stack, columns: target stack)",
                      xaxis={"title": "target stack", "side": "bottom"},
                      yaxis={"title": "reference stack", "autorange": "reversed"}, width=900, height=800)
    _mark(fig, [label], "diagonal: same file (other slices of the reference stack); elsewhere: cross file")
    return fig


# ---- reports ----------------------------------------------------------------------------------------


def machine_info() -> dict:
    """Host, OS, CPU count, Python / torch / numpy versions."""
    import torch

    from core import __version__

    return {"host": platform.node(), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "protoscope": __version__}


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a report file whole or not at all (reports are regenerated, so an existing one is replaced)."""
    with atomic_output(path, overwrite=True) as temp:
        temp.write_bytes(data)


def _csv_value(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return "" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, np.integer):
        return int(value)
    return "" if value is None else value


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """Rows -> CSV (columns: every key, in first-seen order; floats to 6 significant digits; nan/None empty)."""
    import io

    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(value) for key, value in row.items()})
    _atomic_write(path, buffer.getvalue().encode("utf-8"))


def prepare_png_export() -> None:
    """Point kaleido at Debian's chromium when it is there and the user has not chosen a browser."""
    if "BROWSER_PATH" not in os.environ and Path("/usr/bin/chromium").exists():
        os.environ["BROWSER_PATH"] = "/usr/bin/chromium"


def write_figures(figures: dict[str, Any], folder: Path, *, png: bool = True, include_plotlyjs: str | bool = "cdn",
                  warn: Log | None = None) -> list[Path]:
    """Each figure as ``<stem>.html`` (always) and ``<stem>.png`` (kaleido; a failure warns and keeps the HTML).

    include_plotlyjs : 'cdn' (small files, the browser fetches plotly.js) or True (self-contained, ~4.5 MB each).
    """
    warn = warn or (lambda message: print(message, file=sys.stderr))
    written = []
    for stem, fig in figures.items():
        path = folder / f"{stem}.html"
        _atomic_write(path, fig.to_html(include_plotlyjs=include_plotlyjs, full_html=True).encode("utf-8"))
        written.append(path)
    if png and figures:
        import plotly.io as pio

        prepare_png_export()
        temps = [folder / f".{stem}.tmp.png" for stem in figures]
        try:
            # kaleido's default is 700 x 500 px whatever the layout says
            pio.write_images(list(figures.values()), temps, width=[f.layout.width or 1000 for f in figures.values()],
                             height=[f.layout.height or 600 for f in figures.values()])
            for stem, temp in zip(figures, temps):
                os.replace(temp, folder / f"{stem}.png")
                written.append(folder / f"{stem}.png")
        except Exception as error:  # kaleido needs a Chrome/Chromium; without one the HTML must still stand
            reason = " ".join(str(error).split())  # kaleido's messages span many lines
            warn(f"warning: PNG export failed ({type(error).__name__}: {reason}); the HTML figures are written. "
                 "Set BROWSER_PATH to a Chrome/Chromium executable or use --no-png.")
            for temp in temps:
                with contextlib.suppress(OSError):
                    temp.unlink()
    return written


def _markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(row: dict, column: str) -> str:
        if column.endswith("±"):
            name = column[:-1].strip()
            mean, std = row.get(name), row.get(f"{name}_std")
            return "" if mean is None or (isinstance(mean, float) and math.isnan(mean)) else f"{mean:.3f} ± {std:.3f}"
        value = row.get(column, "")
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    head = "| " + " | ".join(f"{c[:-1].strip()} (mean ± std)" if c.endswith("±") else c for c in columns) + " |"
    rule = "|" + "---|" * len(columns)
    return "\n".join([head, rule] + ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows])


def headline_table(experiment: Experiment) -> str:
    """The experiment's main result as a markdown table (for README.md)."""
    tables = experiment.tables
    if experiment.name == "backbones":
        return _markdown_table(tables["summary"], ["backbone", "n", "dice ±", "iou ±", "hd95_px ±"])
    if experiment.name == "separability":
        return _markdown_table(tables["summary"], ["backbone", "n", "silhouette ±", "knn_accuracy ±", "majority_accuracy ±"])
    if experiment.name == "points":
        return _markdown_table(tables["summary"], ["backbone", "n_points", "n", "dice ±", "dice_median", "iou ±"])
    if experiment.name == "threshold":
        pooled = [r for r in tables["summary"] if r["stack"] == "all"]
        return _markdown_table(pooled, ["backbone", "top_percent", "n", "dice ±", "iou ±", "mask_fraction"])
    if experiment.name == "transfer":
        parts = [_markdown_table(tables["settings"], ["backbone", "setting", "n", "dice ±", "iou ±", "hd95_px ±"])]
        targets = [k for k in tables["matrix"][0] if k not in ("backbone", "reference")] if tables["matrix"] else []
        parts.append("Dice, rows reference, columns target:\n\n" + _markdown_table(tables["matrix"], ["backbone", "reference", *targets]))
        return "\n\n".join(parts)
    return ""


def write_report(experiment: Experiment, folder: str | Path, *, backbones: Sequence["Backbone"], command: str | None = None,
                 stacks: Sequence[EvalStack] = (), png: bool = True, include_plotlyjs: str | bool = "cdn",
                 warn: Log | None = None) -> list[Path]:
    """Write CSV tables, figures (HTML, PNG), README.md and run.json of one experiment into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in experiment.tables.items():
        write_csv(rows, folder / f"{name}.csv")
        written.append(folder / f"{name}.csv")
    written += write_figures(experiment.figures, folder, png=png, include_plotlyjs=include_plotlyjs, warn=warn)
    random = [b for b in backbones if b.is_random]
    info = {
        "experiment": experiment.name,
        "title": TITLES.get(experiment.name, experiment.name),
        "command": command or "(Python API: core.experiments.runs)",
        "date": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "backbones": [{"name": b.spec.name, "label": b.label(), "random_weights": b.is_random} for b in backbones],
        "random_weights": bool(random),
        "stacks": [{"name": s.label, "image": str(s.image_path), "image_channel": s.image_channel,
                    "mask_channel": s.mask_channel, "mask_file": str(s.mask_path) if s.mask_path else None} for s in stacks],
        "notes": experiment.notes,
        **experiment.info,
        "files": sorted(p.name for p in written),
    }
    if random:
        info["warning"] = RANDOM_NOTE
    _atomic_write(folder / "run.json", json.dumps(info, indent=1, ensure_ascii=False, default=_json_default).encode("utf-8"))
    _atomic_write(folder / "README.md", _readme(experiment, info).encode("utf-8"))
    return written + [folder / "run.json", folder / "README.md"]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _readme(experiment: Experiment, info: dict) -> str:
    lines = [f"# {info['title']}", ""]
    if info["random_weights"]:
        lines += [f"> **{RANDOM_NOTE}.** At least one backbone below has random weights: its numbers and figures "
                  "only show that the code runs end to end; they say nothing about the method.", ""]
    machine = info["machine"]
    settings = info.get("settings", {})
    lines += [
        "```",
        info["command"],
        "```",
        "",
        f"- date: {info['date']}",
        f"- machine: {machine['host']} · {machine['platform']} · {machine['cpus']} CPUs · torch {machine['torch']} · "
        f"protoscope {machine['protoscope']}",
        f"- run time: {info.get('seconds', '?')} s" + (
            f"; the protocol evaluation ({', '.join(info['evaluated_settings'])}) took {info['evaluation_seconds']} s "
            "(one evaluation is shared by backbones and transfer when both run)" if "evaluation_seconds" in info else ""),
        "- backbones:",
    ]
    lines += [f"  - `{b['name']}`: {b['label']}" + ("  **← RANDOM WEIGHTS**" if b["random_weights"] else "")
              for b in info["backbones"]]
    lines += [
        f"- pipeline: `{info.get('config_text', '')}`",
        f"- protocol: {settings.get('n_points')} positive + {settings.get('n_points')} negative points per slice "
        f"(ground truth, margin {settings.get('margin_px') if settings.get('margin_px') is not None else 'half a patch'}), "
        f"seeds {list(settings.get('seeds', []))}, up to {settings.get('n_slices')} slices per stack skipping "
        f"{settings.get('skip_ends')} at each end",
        "- stacks (evaluated slices):",
    ]
    for name, z_values in info.get("slices", {}).items():
        lines.append(f"  - {name}: {len(z_values)} slices, z = {', '.join(map(str, z_values))}")
    if experiment.name == "separability" and info.get("representative"):
        rep = info["representative"]
        lines.append(f"- representative slice (median silhouette): {rep['stack']} z={rep['z']}")
    if experiment.name == "threshold":
        lines.append(f"- thresholds (top %): {', '.join(f'{p:g}' for p in info.get('percents', []))}")
    if experiment.name == "points":
        lines.append(f"- points per class: {', '.join(map(str, info.get('counts', [])))}")
    if info["notes"]:
        lines += ["- notes:"] + [f"  - {note}" for note in info["notes"]]
    lines += ["", "## Result", "", headline_table(experiment), "", "## Files", ""]
    described = FILES.get(experiment.name, {})
    for name in info["files"]:
        stem = name.rsplit(".", 1)[0]
        text = described.get(name) or described.get(stem) or next(
            (t for key, t in described.items() if "<backbone>" in key and stem.startswith(key.split("<")[0])), "")
        lines.append(f"- `{name}`" + (f": {text}" if text else ""))
    lines += ["- `run.json`: everything above, machine readable", ""]
    return "\n".join(lines)


def write_index(folder: str | Path) -> Path:
    """README.md of an output folder listing the experiment subfolders that hold a run.json."""
    folder = Path(folder)
    lines = ["# Protoscope experiments", "", "Each folder holds one experiment: CSV tables, figures (HTML, PNG), README.md "
             "and run.json (command, backbones, date, machine).", ""]
    any_random = False
    for name in EXPERIMENTS:
        run = folder / name / "run.json"
        if not run.exists():
            continue
        info = json.loads(run.read_text(encoding="utf-8"))
        any_random |= bool(info.get("random_weights"))
        backbones = ", ".join(b["label"] for b in info.get("backbones", []))
        lines.append(f"- [{name}]({name}/README.md): {info.get('title', name)} — {backbones} — {info.get('date', '')}")
    if any_random:
        lines[1:1] = ["", f"> **{RANDOM_NOTE}** (see the folders marked so)."]
    path = folder / "README.md"
    _atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path
