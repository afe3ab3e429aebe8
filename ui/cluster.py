"""The Batch page on a Dask cluster: submit a batch, follow it, and finish it into the page's usual result.

The scheduler is the server's setting (``PROTOSCOPE_DASK_SCHEDULER``, ui.settings.dask_scheduler), never typed on
a page. A submitted batch does not depend on the browser session: its tasks go to the scheduler with
``fire_and_forget`` (``core.cluster.submit_apply(detach=True)``), and the Dask client is held per address in
``st.cache_resource`` (shared by sessions, kept while the server runs), never in a session. The session and its
workspace keep only a ``core.workspace.BatchJob`` (session key ``batch.job``): where the OME-Zarr output is.
Progress comes from that output alone (``core.cluster.read_progress``), so a reloaded tab, another tab on the
workspace or a restarted app follows the job as well as the tab that submitted it; Cancel writes a cancel
request into the output (``core.cluster.request_cancel``), which the workers read before each slice.

When every slice is written, the page that sees it first calls ``finish``: the formats asked for are exported from
the OME-Zarr (``core.io.ome_zarr.export_masks``; a run over some slices writes just those slices, as a run in the
app does), the areas go to CSV, and the result becomes a ``ui.batch.BatchOutputs`` like a run in the app's process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import streamlit as st

from core.cluster import (
    ApplyTarget,
    BackboneRecipe,
    Cluster,
    RunProgress,
    prepare_apply,
    read_progress,
    read_result,
    request_cancel,
    submit_apply,
)
from core.cluster.progress import CANCELLING, FINISHED, RUNNING
from core.errors import OutputError
from core.features.embedding import SliceEmbedder
from core.features.embedding_cache import default_cache_dir
from core.io.atomic import write_text
from core.io.ome_zarr import MaskStore, export_masks
from core.io.writers import write_masks
from core.preprocess import PreprocessConfig
from core.prototypes import Prototype
from core.thresholds import ThresholdSpec
from core.workspace import BatchJob
from ui import render, settings
from ui.batch import FORMATS, ZARR, BatchOutputs, base_name, format_eta, montage_slices
from ui.state import BackboneChoice

#: Seconds to reach the scheduler before the page says it cannot be reached.
CONNECT_TIMEOUT_S = 10.0
#: Seconds between two looks at a running job's output (the page's progress panel).
POLL_S = 2.0
#: States of a job whose blocks may still be running (core.cluster.progress).
ACTIVE = (RUNNING, CANCELLING)


def _connected(cluster: Cluster) -> bool:
    return cluster.client.status == "running"


@st.cache_resource(max_entries=4, show_spinner=False, validate=_connected, on_release=lambda c: c.close())
def _cluster(address: str) -> Cluster:
    return Cluster(scheduler=address, timeout=CONNECT_TIMEOUT_S)


def connect(address: str) -> Cluster:
    """The server's client of the scheduler at ``address`` (one per address, shared by sessions; reconnected when
    the scheduler went away). ClusterError, saying what to do, when it cannot be reached."""
    return _cluster(address)


def backbone_recipe(choice: BackboneChoice, overrides: dict | None = None) -> BackboneRecipe:
    """How the workers load the session's backbone: local weights by their resolved path inside the weights root
    (``ui.settings.resolve_weights_path``; the workers must see the same path), DINOv2 config ``overrides`` with
    random weights only (the tests' tiny model), each worker's best device."""
    weights = choice.weights
    if weights not in ("hub", "random") and choice.name != "filterbank":
        weights = str(settings.resolve_weights_path(weights))
    return BackboneRecipe(choice.name, weights, int(choice.seed), overrides if weights == "random" else None)


def submit(embedder: SliceEmbedder, prototype: Prototype, *, prototype_name: str, z_values: Sequence[int],
           formats: Sequence[str], threshold: ThresholdSpec | None, inputs: str, address: str,
           recipe: BackboneRecipe, resume: BatchJob | None = None) -> BatchJob:
    """Submit the batch to the scheduler at ``address`` and return its record; the work runs on without this
    session. ``resume``: an unfinished job of the same settings, whose output is continued (its finished blocks are
    kept). A new job writes ``<output folder>/<stack>_<prototype>_<time>-<tail>.ome.zarr``.

    Raises ClusterError when the scheduler cannot be reached (before anything is written), OutputError and
    OptionError as ``core.cluster.prepare_apply``.
    """
    cluster = connect(address)
    stack = embedder.stack
    if resume is not None:
        store = Path(resume.store)
        base = resume.base_name
    else:
        base = base_name(stack.path, prototype_name)
        store = settings.output_dir(stack.path) / f"{base}.ome.zarr"
    target: ApplyTarget = prepare_apply(embedder, prototype, store, z_values=z_values, backbone=recipe,
                                        threshold=threshold)
    run = submit_apply([target], cluster, cache_dir=default_cache_dir(), detach=True)
    return BatchJob(str(store), run.run_ids[str(target.store.path)], address, stack.name, str(stack.path),
                    int(embedder.channel), prototype_name, tuple(formats),
                    str(threshold or prototype.config.threshold), base, inputs, time.time())


def progress(job: BatchJob) -> RunProgress:
    """How far the job is, read from its output (StackError when the output is gone or damaged)."""
    return read_progress(job.store)


def preprocess_of(job: BatchJob) -> PreprocessConfig:
    """The slice preprocessing the job's workers use (kept in its output)."""
    return ApplyTarget(MaskStore.open(job.store), Path(job.stack_path)).settings.config.preprocess


def cancel(job: BatchJob) -> None:
    """Ask the job's workers to stop before their next slice (finished blocks stay; running it again resumes)."""
    request_cancel(job.store)


def progress_text(done: RunProgress) -> str:
    """The progress bar's line: slices and blocks done, blocks running, the time left."""
    text = (f"{done.slices_finished} of {done.slices_total} slices written ({done.blocks_finished} of "
            f"{done.blocks_total} blocks" + (f", {done.blocks_running} running" if done.blocks_running else "") + ")")
    if done.state == RUNNING:
        text += " · " + format_eta(done.eta_seconds)
    return text


class SelectedSlices:
    """(len(z_values), Y, X) uint8 view of some slices of a mask store's full resolution, read lazily (what
    ``core.io.writers.write_masks`` takes): a run over some slices writes just those, as a run in the app does."""

    def __init__(self, store: MaskStore, z_values: Sequence[int]) -> None:
        self._level = store.level(0)
        self._z = [int(z) for z in z_values]
        self.shape = (len(self._z), *self._level.shape[1:])
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            return np.stack([self._level[z] for z in self._z[key]]) if self._z[key] else \
                np.zeros((0, *self.shape[1:]), np.uint8)
        return self._level[self._z[int(key)]]


def _write_once(path: Path, write) -> None:
    """Write one output file unless it is there already: a finished job's files are named by the job, and written
    atomically, so an existing one is complete (an earlier look at the job, or another tab, wrote it)."""
    if path.exists():
        return
    try:
        write(path)
    except OutputError:
        if not path.exists():
            raise


def finish(job: BatchJob, embedder: SliceEmbedder | None = None) -> BatchOutputs:
    """The finished job's result: the formats it asked for exported from its OME-Zarr, the per-slice areas as CSV
    beside it, and (with ``embedder``, the job's stack and channel) a montage, as a run in the app makes them."""
    store = MaskStore.open(job.store)
    result = read_result(job.store)
    run = store.run_state()
    _, finished_at = store.block_times()
    started = float(run.get("started") or 0.0)
    result.seconds = max(0.0, float(finished_at.max()) - started) if started and finished_at.size else 0.0
    folder = Path(job.store).parent
    n_slices = store.layout.shape_zyx[0]
    every_slice = list(result.z_values) == list(range(n_slices))
    outputs = BatchOutputs(job.stack_name, result, str(folder), {ZARR: job.store}, threshold=job.threshold,
                           inputs=job.inputs, stack_path=job.stack_path, channel=job.channel)
    for key in job.formats:
        path = folder / f"{job.base_name}{FORMATS[key][1]}"
        if key == "ims" or every_slice:
            _write_once(path, lambda p, k=key: export_masks(job.store, p, source_ims=job.stack_path if k == "ims"
                                                              else None))
        else:
            _write_once(path, lambda p: write_masks(
                SelectedSlices(store, result.z_values), p, voxel_size=store.voxel_size,
                channel_name=store.channel_name or "Protoscope mask",
                description=f"Protoscope masks of {job.stack_name} (slices {result.z_values[0]}-"
                            f"{result.z_values[-1]}) exported from {Path(job.store).name}"))
        outputs.files[key] = str(path)
    csv_path = folder / f"{job.base_name}_areas.csv"
    _write_once(csv_path, lambda p: write_text(p, result.to_csv()))
    outputs.files["csv"] = str(csv_path)
    if embedder is not None and result.z_values:
        level = store.level(0)
        picks = montage_slices(list(result.z_values))
        outputs.montage_png = render.to_png(render.montage(
            [embedder.normalized(z) for z in picks], [level[z] > 0 for z in picks], [f"z {z}" for z in picks]))
    return outputs


def resumable(job: BatchJob | None, inputs: str, state: str) -> BatchJob | None:
    """The job a new submission continues: the recorded one when it was made with the same settings (``inputs``)
    and is unfinished and no longer running (cancelled, failed, or stopped); else None (a new output)."""
    if job is None or job.inputs != inputs or state in (FINISHED, RUNNING):
        return None
    return job

