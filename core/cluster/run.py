"""Running blocks: on Dask workers (a ``LocalCluster`` started here, or a running scheduler) or in this process.

    with Cluster(workers=2) as cluster:                       # or Cluster(scheduler="tcp://host:8786")
        run = submit_apply([target], cluster, cache_dir=cache)  # target: core.cluster.job.prepare_apply(...)
        run.wait(on_block=print)                                # or poll run.progress() from anywhere
    read_result(target.store.path).to_csv()

A run gets a fresh id, written into each output's run record before its tasks are submitted; a task stops when
the record names another run (a newer submission took the output over) or asks to cancel (``request_cancel``,
from any process). Finished blocks are skipped, so submitting again resumes. Dask reschedules the block of a
worker that died on another worker (the output's chunks are simply written again); a block that raised is
recorded in the output and reported by ``ApplyRun.wait``, the other blocks go on.

``detach=True`` hands the tasks to the scheduler with ``fire_and_forget``: they run to the end even when the
submitting process goes away (the app's tab closed), and ``read_progress(out)`` follows them from anywhere.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from concurrent.futures import CancelledError
from typing import Any, Callable, Sequence

from core.batch import BatchResult
from core.cluster.job import ApplyTarget, EmbedJob
from core.cluster.plan import Block
from core.cluster.progress import RunProgress, read_progress, read_result
from core.cluster.tasks import (
    CANCELLED,
    FINISHED,
    SUPERSEDED,
    BlockOutcome,
    apply_block,
    embed_block,
    prime_backbone,
)
from core.errors import ClusterError, OptionError, ProtoscopeError
from core.features.backbones import Backbone
from core.io.ome_zarr import MaskStore

__all__ = ["ClusterError", "Cluster", "ApplyRun", "submit_apply", "run_apply_here", "request_cancel", "run_embed",
           "start_run"]

MAX_LOCAL_WORKERS = 256


class Cluster:
    """Dask workers to run blocks on: ``workers=N`` starts a ``LocalCluster`` of N one-thread worker processes on
    this machine (stopped by ``close``); ``scheduler='tcp://host:8786'`` connects to a running scheduler (its workers
    are left running). Use as a context manager.

    Raises OptionError for a bad ``workers`` count or both/neither options, ClusterError when the scheduler cannot
    be reached within ``timeout`` seconds.
    """

    def __init__(self, *, workers: int | None = None, scheduler: str | None = None, timeout: float = 20.0,
                 memory_limit: str | int = "auto") -> None:
        import dask
        from distributed import Client, LocalCluster

        if (workers is None) == (scheduler is None):
            raise OptionError("give either a number of local workers or a scheduler address, not both or neither")
        self.local = None
        if workers is not None:
            if isinstance(workers, bool) or not 1 <= int(workers) <= MAX_LOCAL_WORKERS:
                raise OptionError(f"--workers must be a whole number 1-{MAX_LOCAL_WORKERS}, got {workers!r}")
            # no dashboard, and no statistical profiler (it samples every worker thread 100 times a second for it)
            with dask.config.set({"distributed.worker.profile.enabled": False}):
                self.local = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                          dashboard_address=":0", silence_logs=logging.ERROR,
                                          memory_limit=memory_limit)
            self.client = Client(self.local)
            self.address = str(self.local.scheduler_address)
        else:
            address = str(scheduler).strip()
            _check_reachable(address, timeout)
            try:
                self.client = Client(address, timeout=timeout)
            except (OSError, TimeoutError, ValueError) as error:
                raise ClusterError(f"cannot reach the Dask scheduler at {address} ({error}); start one with "
                                   f"'dask scheduler' and workers with 'dask worker {address}', or check the address"
                                   ) from None
            self.address = address

    @property
    def n_workers(self) -> int:
        return len(self.client.nthreads())

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.local is not None:
                self.local.close()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_reachable(address: str, timeout: float) -> None:
    """ClusterError at once when nothing listens at a tcp:// scheduler address (the Dask client would retry until
    its timeout); other protocols are left to the client."""
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme != "tcp":
        return
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ClusterError(f"'{address}' is not a scheduler address; give e.g. tcp://host:8786")
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10.0)):
            pass
    except OSError as error:
        raise ClusterError(f"cannot reach the Dask scheduler at {address} ({error.strerror or error}); start one with "
                           f"'dask scheduler' and workers with 'dask worker {address}', or check the address") from None


def start_run(target: ApplyTarget, *, scheduler: str, cache_dir: str | None, device: str | None,
              blocks_todo: int) -> str:
    """Write a new run record into the target's output (clearing a cancel request) and return its id."""
    run_id = uuid.uuid4().hex
    target.store.set_run_state(run_id=run_id, state="running", started=time.time(), cancel=None, finished_at=None,
                               stack_path=str(target.stack_path), cache_dir=cache_dir or "", device=device,
                               scheduler=scheduler, submitted_by=f"{socket.gethostname()}:{os.getpid()}",
                               blocks_todo=blocks_todo)
    return run_id


def request_cancel(path: str | os.PathLike) -> None:
    """Ask the run writing the output ``path`` to stop (from any process): its tasks stop before their next slice,
    unfinished blocks stay unfinished, and submitting the run again resumes it."""
    MaskStore.open(path).set_run_state(cancel=True)


class ApplyRun:
    """A submitted apply run over one or more outputs (``targets``): poll ``progress()``, ``wait()``, ``cancel()``.

    outcomes : the BlockOutcome of every task that came back (``wait`` or ``run_apply_here`` fill it).
    """

    def __init__(self, targets: Sequence[ApplyTarget], run_ids: dict[str, str], futures: list | None = None,
                 cluster: Cluster | None = None) -> None:
        self.targets = list(targets)
        self.run_ids = run_ids
        self.futures = futures or []
        self.cluster = cluster
        self.outcomes: list[BlockOutcome] = []

    @property
    def paths(self) -> list[str]:
        return [str(t.store.path) for t in self.targets]

    def progress(self) -> list[RunProgress]:
        """Each output's progress, read from the output itself."""
        return [read_progress(path) for path in self.paths]

    def results(self) -> list[BatchResult]:
        """Each output's per-slice areas and thresholds (``read_result``)."""
        return [read_result(path) for path in self.paths]

    @property
    def computed(self) -> list[tuple[str, int]]:
        """(output, block) of the blocks this run segmented (not those skipped, cancelled or superseded)."""
        return [(o.target, o.block) for o in self.outcomes if o.status == FINISHED]

    def cancel(self) -> None:
        """Stop the run: a cancel request in every output, and this client's tasks cancelled."""
        for path in self.paths:
            request_cancel(path)
        if self.futures and self.cluster is not None:
            self.cluster.client.cancel(self.futures, force=True)

    def wait(self, on_block: Callable[[BlockOutcome], None] | None = None) -> list[BlockOutcome]:
        """Wait for every task of this client; ``on_block(outcome)`` as each comes back. Returns the outcomes.

        Raises the first block's error when a block raised (the other blocks still ran; their work is kept), or
        ClusterError when workers kept dying on a block.
        """
        from distributed import as_completed

        errors: list[BaseException] = []
        for future in as_completed(self.futures):
            try:
                outcome = future.result()
            except CancelledError:  # cancelled before it ran
                continue
            except Exception as error:  # noqa: BLE001 - reported after the other blocks came back
                errors.append(_explained(error, future.key))
                continue
            self.outcomes.append(outcome)
            if on_block is not None:
                on_block(outcome)
        self._close_records(errors)
        if errors:
            raise errors[0]
        return self.outcomes

    def _close_records(self, errors: list[BaseException]) -> None:
        for target in self.targets:
            store = target.store
            run = store.run_state()
            if run.get("run_id") != self.run_ids.get(str(store.path)):
                continue  # another run took this output over
            state = read_progress(store.path).state
            store.set_run_state(state=state if state != "running" else ("failed" if errors else "stopped"),
                                finished_at=time.time())


def _explained(error: BaseException, key: Any) -> BaseException:
    if isinstance(error, ProtoscopeError):
        return error
    name = type(error).__name__
    if name == "KilledWorker":
        return ClusterError(f"task {key}: the workers running it died again and again (out of memory? see the "
                            "workers' logs); the finished blocks are kept, run the command again to resume")
    return ClusterError(f"task {key} failed: {name}: {error}")


def _todo(target: ApplyTarget) -> list[Block]:
    finished = target.store.finished_blocks()
    return [block for block in target.blocks() if block.index not in finished]


def submit_apply(targets: Sequence[ApplyTarget], cluster: Cluster, *, cache_dir: str | os.PathLike | None = None,
                 device: str | None = None, detach: bool = False) -> ApplyRun:
    """Submit every unfinished block of ``targets`` to the cluster and return at once (an ``ApplyRun``).

    cache_dir : the embedding cache folder the workers use (a shared file system for remote workers); None = none.
    device : the workers' torch device (None: each worker's best).
    detach : ``fire_and_forget``: the tasks run on after this process ends (the app); else they are released
        when this client goes away, unless already running.
    The stack files, the outputs and the cache must be at the same paths on every worker.
    """
    from distributed import fire_and_forget

    cache = os.fspath(cache_dir) if cache_dir is not None else ""
    futures, run_ids = [], {}
    order = 0
    for target in targets:
        todo = _todo(target)
        run_id = start_run(target, scheduler=cluster.address, cache_dir=cache, device=device, blocks_todo=len(todo))
        run_ids[str(target.store.path)] = run_id
        for block in todo:
            key = f"protoscope-apply-{target.store.path.name}-{block.index}-{run_id[:12]}"
            futures.append(cluster.client.submit(apply_block, str(target.store.path), block.index, run_id,
                                                 str(target.stack_path), cache, device, key=key, pure=False,
                                                 priority=-order))
            order += 1
    if detach:
        fire_and_forget(futures)
    return ApplyRun(targets, run_ids, futures, cluster)


def run_apply_here(targets: Sequence[ApplyTarget], *, cache_dir: str | os.PathLike | None = None,
                   device: str | None = None, backbone: Backbone | None = None,
                   on_block: Callable[[BlockOutcome], None] | None = None,
                   on_slice: Callable[[int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> ApplyRun:
    """Run every unfinished block of ``targets`` in this process, one after another (the same tasks the workers
    run; resumable the same way). ``backbone``: the loaded backbone of the targets' recipe, to use instead of
    loading it again. ``on_slice(n)`` after each segmented slice (n = 1), ``on_block`` after each block;
    ``should_stop()`` cancels (between slices). Raises the first error a block raises."""
    cache = os.fspath(cache_dir) if cache_dir is not None else ""
    run = ApplyRun(targets, {})
    progress = (lambda phase, done, total, eta: on_slice(1) if phase == "mask" else None) if on_slice else None
    stopped = False
    for target in targets:
        if backbone is not None:
            prime_backbone(target.settings.backbone, backbone)
        todo = _todo(target)
        run_id = start_run(target, scheduler="in-process", cache_dir=cache, device=device, blocks_todo=len(todo))
        run.run_ids[str(target.store.path)] = run_id
        for block in todo:
            stopped = stopped or (should_stop is not None and should_stop())
            if stopped:
                request_cancel(target.store.path)
                break
            outcome = apply_block(str(target.store.path), block.index, run_id, str(target.stack_path), cache, device,
                                  on_progress=progress, should_stop=should_stop)
            run.outcomes.append(outcome)
            if on_block is not None:
                on_block(outcome)
            if outcome.status == CANCELLED:
                request_cancel(target.store.path)
            if outcome.status in (CANCELLED, SUPERSEDED):
                stopped = True
                break
    run._close_records([])
    return run


def run_embed(jobs: Sequence[tuple[EmbedJob, Sequence[Block]]], cluster: Cluster | None = None, *,
              backbone: Backbone | None = None,
              on_block: Callable[[BlockOutcome], None] | None = None) -> list[BlockOutcome]:
    """Embed the blocks of each job into the embedding cache: on the cluster's workers, or here when ``cluster`` is
    None (``backbone``: this process's loaded one). Returns the outcomes; raises the first block's error."""
    outcomes: list[BlockOutcome] = []
    if cluster is None:
        for job, blocks in jobs:
            if backbone is not None:
                prime_backbone(job.backbone, backbone)
            for block in blocks:
                outcome = embed_block(job, block)
                outcomes.append(outcome)
                if on_block is not None:
                    on_block(outcome)
        return outcomes
    from distributed import as_completed

    futures = [cluster.client.submit(embed_block, job, block, pure=False, priority=-i,
                                     key=f"protoscope-embed-{os.path.basename(job.stack_path)}-{block.index}-"
                                         f"{uuid.uuid4().hex[:8]}")
               for i, (job, block) in enumerate((job, block) for job, blocks in jobs for block in blocks)]
    errors = []
    for future in as_completed(futures):
        try:
            outcome = future.result()
        except Exception as error:  # noqa: BLE001 - reported after the other blocks came back
            errors.append(_explained(error, future.key))
            continue
        outcomes.append(outcome)
        if on_block is not None:
            on_block(outcome)
    if errors:
        raise errors[0]
    return outcomes
