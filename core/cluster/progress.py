"""Progress and results of an apply run, read from its OME-Zarr output alone.

Any process can ask how a run goes, with nothing but the output's path: the CLI that submitted it, or an app
page reopened after its browser tab was closed while the workers went on. Blocks are marked finished in the
output (``core.io.ome_zarr``), the run's record says when it started and whether it was cancelled, and failed
blocks leave their error there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.batch import BatchResult
from core.cluster.job import ApplySettings
from core.cluster.plan import plan_blocks
from core.io.ome_zarr import MaskStore

__all__ = ["RunProgress", "read_progress", "read_result", "format_eta"]

NOT_STARTED, RUNNING, CANCELLING, CANCELLED, FINISHED, FAILED = (
    "not started", "running", "cancelling", "cancelled", "finished", "failed")


@dataclass(frozen=True)
class RunProgress:
    """How far an apply run is, from its output.

    state : 'not started' (no run submitted yet), 'running', 'cancelling' (cancel asked, blocks still running),
        'cancelled', 'finished' (every requested slice is written), or 'failed' (a block raised: ``failures``).
    slices_* / blocks_* : requested slices / blocks, and how many of them are finished (kept from earlier runs too).
    blocks_running : blocks started and not finished since the run began.
    eta_seconds : remaining time at the rate of this run so far (None until a block of this run finished).
    seconds : since the run started (None before). last_change : Unix time of the last block started or finished.
    failures : block -> error text of blocks that raised and have not finished since.
    """

    path: Path
    state: str
    slices_total: int
    slices_finished: int
    blocks_total: int
    blocks_finished: int
    blocks_running: int = 0
    eta_seconds: float | None = None
    seconds: float | None = None
    last_change: float | None = None
    run_id: str = ""
    failures: dict[int, str] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.slices_finished / self.slices_total if self.slices_total else 1.0

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    def describe(self) -> str:
        """One line, e.g. 'running: 240 of 632 slices (15 of 40 blocks, 2 running), about 3 min left'."""
        running = f", {self.blocks_running} running" if self.blocks_running else ""
        text = (f"{self.state}: {self.slices_finished} of {self.slices_total} slices ({self.blocks_finished} of "
                f"{self.blocks_total} blocks{running})")
        if self.state in (RUNNING, CANCELLING) and self.eta_seconds is not None:
            text += f", about {format_eta(self.eta_seconds)} left"
        if self.failures:
            block, message = next(iter(self.failures.items()))
            text += f"; block {block} failed: {message}"
        return text


def format_eta(seconds: float) -> str:
    """'45 s', '3 min', '2 h 05 min'."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def read_progress(path: str | Path, *, now: float | None = None) -> RunProgress:
    """The progress of the apply run writing the output ``path`` (works from any process).

    Raises StackError when ``path`` is not a Protoscope mask output.
    """
    store = MaskStore.open(path)
    now = time.time() if now is None else now
    settings = ApplySettings.from_dict(store.settings)
    blocks = plan_blocks(store.layout.shape_zyx[0], store.layout.block_slices, settings.z_values)
    started, finished = store.block_times()
    run = store.run_state()
    run_started = float(run.get("started", 0.0)) or None
    done = [b for b in blocks if finished[b.index] > 0]
    slices_finished = sum(len(b.z_values) for b in done)
    slices_total = sum(len(b.z_values) for b in blocks)
    since = run_started or 0.0
    running = sum(1 for b in blocks if finished[b.index] <= 0 and started[b.index] >= since and started[b.index] > 0)
    failures = {block: text for block, text in store.failures().items() if finished[block] <= 0}
    times = np.concatenate([started[started > 0], finished[finished > 0]])
    last_change = float(times.max()) if times.size else None
    eta = None
    if run_started is not None:
        this_run = [b for b in done if finished[b.index] >= run_started]
        slices_now = sum(len(b.z_values) for b in this_run)
        if slices_now:
            eta = (now - run_started) / slices_now * (slices_total - slices_finished)
    if slices_finished == slices_total:
        state = FINISHED
    elif not run:
        state = NOT_STARTED
    elif failures:
        state = FAILED
    elif run.get("cancel"):
        state = CANCELLING if running else CANCELLED
    else:
        state = str(run.get("state", RUNNING))
    return RunProgress(path=Path(path), state=state, slices_total=slices_total, slices_finished=slices_finished,
                       blocks_total=len(blocks), blocks_finished=len(done), blocks_running=running,
                       eta_seconds=eta if state in (RUNNING, CANCELLING) else None,
                       seconds=(now - run_started) if run_started else None, last_change=last_change,
                       run_id=str(run.get("run_id", "")), failures=failures)


def read_result(path: str | Path) -> BatchResult:
    """The per-slice areas and thresholds written so far to the output ``path``, as the one-process run reports
    them (``BatchResult``: ``to_csv``, ``volume_um3``), in z order; slices not written yet are left out (a
    ``cancelled`` result then)."""
    store = MaskStore.open(path)
    settings = ApplySettings.from_dict(store.settings)
    area_px, thresholds = store.areas()
    finished = store.finished_blocks()
    written = [z for z in settings.z_values if store.layout.block_of(z) in finished]
    result = BatchResult(z_values=written, area_px=[int(area_px[z]) for z in written],
                         thresholds=[float(thresholds[z]) for z in written],
                         cancelled=len(written) < len(settings.z_values))
    if store.voxel_size is not None:
        result.pixel_area_um2 = float(store.voxel_size.x * store.voxel_size.y)
        result.z_step_um = float(store.voxel_size.z)
    return result
