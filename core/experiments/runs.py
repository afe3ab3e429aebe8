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
- ``threshold``    Fig. 4.7: same-slice Dice against the top-% threshold (2-30 %, step 2): the scorer is
                   fitted and the score map (``core.window.ScoreWindow``) made once per slice and seed, only
                   the threshold varies.
- ``transfer``     Fig. 4.9 + Table B.1 (+ Table 4.4): the n x n matrix of mean Dice ± std, rows the reference
                   stack and columns the target stack (same-file on the diagonal, cross-file elsewhere); with
                   ``adapt`` in the protocol's settings, Table 4.4 gains the adapt row (3 + 3 points on the target).

A run returns an ``Experiment`` (tables, figures, notes; ``core.experiments.base``) whose figures are drawn
by ``core.experiments.figures``; ``core.experiments.report.write_report`` writes the tables as CSV, the
figures as HTML (and PNG through kaleido when a browser is available) and a README.md + run.json saying the
command, the backbones (with a loud note for random weights), the date and the machine.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from core.config import PipelineConfig
from core.errors import ProtoscopeError
from core.experiments.base import EXPERIMENTS, Experiment, Log, group_rows
from core.experiments.figures import (
    backbones_figure,
    points_figure,
    projection_figure,
    threshold_figure,
    transfer_figure,
)
from core.features.embedding import SliceEmbedder
from core.metrics import dice, iou, knn_accuracy, patch_labels, silhouette, summarize
from core.pipeline import build_prototype, build_scorer
from core.projection import pca_2d, umap_2d
from core.protocol import (
    EvalStack,
    EvaluationResult,
    Method,
    ADAPT,
    ProtocolSettings,
    evaluate,
    open_eval_stacks,
    protocol_points,
)
from core.scoring import l2_normalize
from core.thresholds import ThresholdSpec
from core.window import ScoreWindow

if TYPE_CHECKING:  # pragma: no cover
    from core.features.backbones import Backbone
    from core.features.embedding_cache import EmbeddingCache

__all__ = ["POINT_COUNTS", "TOP_PERCENTS", "backbone_tables", "projection_rows", "representative_slice",
           "run_backbones", "run_experiments", "run_points", "run_separability", "run_threshold", "run_transfer",
           "separability_scores", "threshold_summary", "transfer_tables"]

#: Points per class of the point-sensitivity experiment (thesis Fig. 4.6).
POINT_COUNTS = (1, 2, 5, 10, 15, 20, 25, 30, 40, 50)
#: Top-% thresholds of the threshold-sensitivity experiment (thesis Fig. 4.7).
TOP_PERCENTS = tuple(float(p) for p in range(2, 31, 2))


# ---- shared by the runs -----------------------------------------------------------------------------


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
    for (backbone,), group in group_rows(rows, "backbone").items():
        entry = {"backbone": backbone, "backbone_label": labels.get(backbone, backbone), "method": method, "n": len(group)}
        for metric in ("dice", "iou", "hd95_px", "hd95_um"):
            entry[metric], entry[f"{metric}_std"] = _mean_std(group, metric)
        summary.append(entry)
    per_stack = []
    for (backbone, stack), group in group_rows(rows, "backbone", "stack").items():
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
    with open_eval_stacks(stacks, settings) as opened:
        notes += [note for entry in opened for note in entry.notes]
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
    by_slice = group_rows(rows, "stack", "z")
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
    for (backbone, count), group in group_rows(rows, "backbone", "n_points").items():
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

    The scorer (the protocol's points) is fitted once per slice and seed and its ``ScoreWindow`` computes the
    raw score maps of the slice's z window once; each threshold is then ``window.segment(z, threshold=top:P)``,
    exactly the mask batch and protocol would make with that threshold. The thesis runs this in thesis mode,
    where the mask holds exactly round(h·w·P/100) patches of the grid.
    """
    started = time.perf_counter()
    log = log or (lambda message: None)
    labels = _check_backbones(backbones)
    specs = [ThresholdSpec("top", float(p)) for p in percents]
    rows: list[dict] = []
    notes: list[str] = []
    with open_eval_stacks(stacks, settings) as opened:
        notes += [note for entry in opened for note in entry.notes]
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
                        # one fit per (slice, seed); the window keeps the raw maps, so a threshold costs
                        # only the z averaging and the thresholding
                        window = ScoreWindow(build_scorer(embedder, points, config, seed=seed), embedder)
                        for spec in specs:
                            mask = window.segment(z, threshold=spec).mask
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
        groups = list(group_rows(mine, "stack", "top_percent").items())
        groups += [(("all", p), group) for (p,), group in group_rows(mine, "top_percent").items()]
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
    iou_cells = group_rows(transfer_rows, "backbone", "ref_stack", "stack")
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
        for setting in ("same-slice", "same-file", "cross-file", ADAPT):
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
    """Same-slice, same-file and cross-file protocol (and adapt when ``settings.settings`` holds it); the transfer
    matrix per backbone (Fig. 4.9, Table B.1)."""
    started = time.perf_counter()
    labels = _check_backbones(backbones)
    method = config.mode.value
    if result is None:
        result = evaluate(stacks, [Method(method, config)], backbones,
                          dataclasses.replace(settings, settings=_transfer_settings(settings)), cache=cache, log=log)
    tables = transfer_tables(result, labels, method)
    figures = {f"transfer_matrix_{name}": transfer_figure([c for c in tables["cells"] if c["backbone"] == name], result.stacks)
               for name in labels}
    notes = list(result.notes)
    if len(result.stacks) < 2:
        notes.append("one stack only: the matrix has no cross-file cells")
    return Experiment("transfer", tables, figures, notes, _info(config, settings, result.slices, started, result))


def _transfer_settings(settings: ProtocolSettings) -> tuple[str, ...]:
    """The protocol settings the transfer experiment evaluates: the thesis's three, and adapt when asked for."""
    return ("same-slice", "same-file", "cross-file", *((ADAPT,) if ADAPT in settings.settings else ()))


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
                          dataclasses.replace(settings, settings=_transfer_settings(settings)), cache=cache, log=log)
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
