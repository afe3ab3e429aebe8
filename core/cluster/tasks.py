"""What a worker runs: one block of slices, from the stack file to the output's chunks.

A task gets only names (the output folder, a block index, the run id) and reads everything else from the
output itself (``core.cluster.job``): it opens the stack by path (no open file crosses processes), loads the
backbone once per worker process (``BackboneRecipe.load`` goes through ``get_backbone``'s per-process memo),
fits the prototype's scorer once per worker (memoised here), reads embeddings through the embedding cache and
writes its masks, areas and thresholds straight into the output, then marks the block finished.

The masks are those of the one-process ``core.batch.apply_prototype``: the same function segments the block's
slices, with the z-smoothing neighbours outside the block computed as in a one-process run, the stack-wide
intensity range and best mode's pixel statistics taken from the output (computed once by the submitter), so a
block computed twice (a worker died) or by another worker is the same, pixel for pixel.

Before each slice a task looks at the output's run record: when the run was cancelled, or another run took the
output over, it stops without marking its block (``BlockOutcome.status``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from core.batch import ProgressCallback, apply_prototype
from core.cluster.job import ApplySettings, BackboneRecipe, EmbedJob
from core.cluster.plan import Block
from core.features.backbones import Backbone
from core.features.embedding import SliceEmbedder
from core.features.embedding_cache import EmbeddingCache
from core.io import open_stack
from core.io.ome_zarr import MaskStore
from core.pipeline import Scorer
from core.preprocess import PreprocessConfig
from core.prototypes import Prototype, load_prototype

__all__ = ["BlockOutcome", "FixedStatisticsEmbedder", "apply_block", "embed_block", "prime_backbone",
           "forget_memos"]

FINISHED, SKIPPED, CANCELLED, SUPERSEDED = "finished", "skipped", "cancelled", "superseded"


@dataclass(frozen=True)
class BlockOutcome:
    """What one task did. status: 'finished' (computed and marked), 'skipped' (already finished), 'cancelled'
    (the run was cancelled), 'superseded' (another run took the output over); slices: slices segmented."""

    target: str
    block: int
    status: str
    slices: int
    seconds: float
    worker: str


class FixedStatisticsEmbedder(SliceEmbedder):
    """A SliceEmbedder whose best-mode pixel-feature statistics are given (computed once for the whole stack by the
    submitter), so every worker standardises with identical numbers."""

    def __init__(self, *args, pixel_statistics: tuple[int, np.ndarray, np.ndarray] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fixed_pixel_statistics = pixel_statistics

    def pixel_statistics(self, max_side: int, *args, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        fixed = self.fixed_pixel_statistics
        if fixed is not None and int(fixed[0]) == int(max_side):
            return fixed[1], fixed[2]
        return super().pixel_statistics(max_side, *args, **kwargs)


# ---- per-process memos (a worker runs many blocks) ---------------------------------------------------------

_LOCK = threading.Lock()
_PRIMED: dict[str, Backbone] = {}
_PREPARED: OrderedDict[tuple, tuple[ApplySettings, Prototype, Scorer]] = OrderedDict()
_MAX_PREPARED = 4


def _recipe_key(recipe: BackboneRecipe) -> str:
    return json.dumps({**recipe.as_dict(), "device": recipe.device}, sort_keys=True, default=str)


def prime_backbone(recipe: BackboneRecipe, backbone: Backbone) -> None:
    """Use ``backbone`` (already loaded by this process) for ``recipe`` in this process's tasks."""
    with _LOCK:
        _PRIMED[_recipe_key(recipe)] = backbone


def forget_memos() -> None:
    """Drop the memoised backbones, prototypes and scorers of this process."""
    with _LOCK:
        _PRIMED.clear()
        _PREPARED.clear()


def _backbone(recipe: BackboneRecipe) -> Backbone:
    with _LOCK:
        primed = _PRIMED.get(_recipe_key(recipe))
    return primed if primed is not None else recipe.load()


def _prepared(store: MaskStore, device: str | None) -> tuple[ApplySettings, Prototype, Scorer]:
    """The store's settings, prototype and fitted scorer, made once per process and output."""
    key = (store.uid, str(store.path.resolve()), device)
    with _LOCK:
        if key in _PREPARED:
            _PREPARED.move_to_end(key)
            return _PREPARED[key]
    settings = ApplySettings.from_dict(store.settings, device)
    prototype = load_prototype(store.read_blob("prototype"), name=f"the prototype kept in {store.path.name}")
    scorer = Scorer(prototype, settings.config)
    with _LOCK:
        _PREPARED[key] = (settings, prototype, scorer)
        while len(_PREPARED) > _MAX_PREPARED:
            _PREPARED.popitem(last=False)
    return settings, prototype, scorer


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _stop_reason(store: MaskStore, run_id: str) -> str | None:
    run = store.run_state()
    if run.get("run_id") != run_id:
        return SUPERSEDED
    if run.get("cancel"):
        return CANCELLED
    return None


class _SlabWriter:
    """Collects a block's masks and writes them chunk by chunk (``chunk_slices`` slices at a time, zeros for
    slices not requested), so a worker holds at most one chunk's depth of masks."""

    def __init__(self, store: MaskStore, block: Block) -> None:
        self.store = store
        self.block = block
        self.depth = store.layout.chunk_slices
        self.shape = store.layout.level_shapes_yx[0]
        self.start: int | None = None
        self.slab: np.ndarray | None = None

    def __call__(self, z: int, mask: np.ndarray) -> None:
        start = z - (z - self.block.z0) % self.depth
        if start != self.start:
            self.flush()
            self.start = start
            self.slab = np.zeros((min(self.depth, self.block.z1 - start), *self.shape), np.uint8)
        assert self.slab is not None
        self.slab[z - start] = mask

    def flush(self) -> None:
        if self.slab is not None and self.start is not None:
            self.store.write_slices(self.start, self.slab)
        self.slab, self.start = None, None


def apply_block(out_path: str, block_index: int, run_id: str, stack_path: str | None = None,
                cache_dir: str | None = None, device: str | None = None, *,
                on_progress: ProgressCallback | None = None,
                should_stop: Callable[[], bool] | None = None) -> BlockOutcome:
    """Segment block ``block_index`` of the apply run whose output is ``out_path`` and write it there.

    stack_path, cache_dir, device : this run's (default: the output's run record); cache_dir '' = no cache.
    on_progress, should_stop : as for ``core.batch.apply_prototype`` (in-process runs); the output's run record
        is looked at before every slice anyway.
    Raises what segmenting raises (StackError, BackboneError, ...), after recording it in the output.
    """
    started = time.perf_counter()
    store = MaskStore.open(out_path)
    run = store.run_state()
    stack_path = stack_path or run.get("stack_path")
    cache_dir = cache_dir if cache_dir is not None else run.get("cache_dir", "")
    device = device if device is not None else run.get("device")

    def outcome(status: str, slices: int = 0) -> BlockOutcome:
        return BlockOutcome(str(out_path), block_index, status, slices, time.perf_counter() - started, worker_name())

    reason = _stop_reason(store, run_id)
    if reason is not None:
        return outcome(reason)
    if block_index in store.finished_blocks():
        return outcome(SKIPPED)
    try:
        settings, prototype, scorer = _prepared(store, device)
        z0, z1 = store.layout.block_range(block_index)
        block = Block(block_index, z0, z1, tuple(z for z in settings.z_values if z0 <= z < z1))
        store.mark_started(block_index)
        backbone = _backbone(settings.backbone)
        cache = EmbeddingCache(cache_dir) if cache_dir else None
        writer = _SlabWriter(store, block)
        areas = np.full(z1 - z0, -1, np.int64)
        thresholds = np.full(z1 - z0, np.nan, np.float64)
        with open_stack(stack_path) as stack, warnings.catch_warnings():
            # scikit-learn's forest runs one job inside a Dask worker process and says so on every block
            warnings.filterwarnings("ignore", message="Inside a Dask worker", category=UserWarning)
            embedder = FixedStatisticsEmbedder(stack, settings.channel, backbone, settings.config.preprocess,
                                               cache=cache, timepoint=settings.timepoint,
                                               stack_range=settings.stack_range,
                                               pixel_statistics=settings.pixel_statistics)
            result = apply_prototype(embedder, prototype, list(block.z_values), writer, config=settings.config,
                                     threshold=settings.threshold, scorer=scorer, on_progress=on_progress,
                                     should_stop=lambda: (_stop_reason(store, run_id) is not None
                                                          or (should_stop is not None and should_stop())))
        if result.cancelled:
            reason = _stop_reason(store, run_id) or CANCELLED
            if reason == CANCELLED:
                store.mark_started(block_index, when=0.0)  # not running any more (progress readers)
            return outcome(reason, len(result.area_px))
        writer.flush()
        for z, area, value in zip(result.z_values, result.area_px, result.thresholds):
            areas[z - z0], thresholds[z - z0] = area, value
        store.write_block_results(block_index, areas, thresholds)
        store.mark_finished(block_index)
        return outcome(FINISHED, len(result.area_px))
    except Exception as error:  # noqa: BLE001 - recorded for progress readers in other processes, then raised
        try:
            store.record_failure(block_index, f"{type(error).__name__}: {error}")
        except OSError:
            pass
        raise


def embed_block(job: EmbedJob, block: Block) -> BlockOutcome:
    """Embed the not yet cached slices of ``block`` of ``job``'s stack into the embedding cache."""
    started = time.perf_counter()
    backbone = _backbone(job.backbone)
    with open_stack(job.stack_path) as stack:
        embedder = SliceEmbedder(stack, job.channel, backbone, PreprocessConfig.from_dict(job.preprocess),
                                 cache=EmbeddingCache(job.cache_dir), timepoint=job.timepoint,
                                 stack_range=job.stack_range, memo_bytes=0)
        cached = embedder.cached_slices()
        todo = [z for z in block.z_values if z not in cached]
        reads = embedder.plan_reads(todo)
        for z in todo:
            reads.ready(z)
            embedder.embed(z)
    status = FINISHED if todo else SKIPPED
    return BlockOutcome(str(Path(job.stack_path).name), block.index, status, len(todo), time.perf_counter() - started,
                        worker_name())
