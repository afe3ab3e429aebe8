"""AppTest of the Batch page on a Dask cluster (ui.cluster): a scheduler that cannot be reached is one short error;
a batch submitted to a real `dask scheduler` + `dask worker` (started here) runs on after the app's client is gone,
a reopened tab (a new session on the same workspace) follows it to the end and shows the usual result; Cancel
stops a job and **Run batch** resumes it into the same output.

One app session on the demo (two positive and two negative clicks on slice 12, saved) serves the whole module;
the scheduler and worker start while it is made.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.cluster import ApplyRun, read_progress
from core.cluster.run import start_run
from core.io.ome_zarr import MaskStore
from core.workspace import BatchJob, Workspace, load_workspace, save_workspace
from ui import cluster, testing

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
Z = 12


@pytest.fixture
def _private_workspaces():
    """The module's one app session keeps the workspace folder of its environment (conftest's per-test folder would
    move it under the session's feet)."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """The address of a `dask scheduler` with one `dask worker` (one thread) on localhost, started in the background
    (``cluster.connect`` waits for them); both are stopped at the end, also on failure."""
    folder = tmp_path_factory.mktemp("dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "HF_HUB_OFFLINE": "1"}
    processes = [subprocess.Popen(
        [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
         "--idle-timeout", "600"], cwd=folder, env=env, stdout=subprocess.DEVNULL,
        stderr=open(folder / "scheduler.log", "w"), start_new_session=True)]
    try:
        processes.append(subprocess.Popen(
            [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--memory-limit", "2GiB", "--no-dashboard",
             "--death-timeout", "60", "--local-directory", str(folder / "w1"), "--preload", "core.cluster.tasks"],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / "w1.log", "w"),
            start_new_session=True))
        yield address
    finally:
        cluster._cluster.clear()  # the app's client of this scheduler
        for process in reversed(processes):
            _stop(process)


def _wait_for_worker(address: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            cluster.connect(address).client.wait_for_workers(1, timeout=max(1.0, deadline - time.time()))
            return
        except Exception:  # noqa: BLE001 - the scheduler is still starting
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def app(tmp_path_factory, scheduler):
    patch = pytest.MonkeyPatch()
    base = tmp_path_factory.getbasetemp()
    at = testing.demo_with_saved_prototype(base, tmp_path_factory.mktemp("out"), patch, Z)
    at = testing.goto(at, "batch")
    yield at
    patch.undo()


def _reopened(at, timeout: float = 300):
    """A new session on app.py with the first one's address (?ws=): a reloaded or reopened tab."""
    from streamlit.testing.v1 import AppTest

    ws = at.query_params["ws"]
    again = AppTest.from_file(str(testing.PROJECT_ROOT / "app.py"), default_timeout=timeout)
    again.query_params["ws"] = ws if isinstance(ws, str) else ws[0]
    return again.run()


def _until(at, done, timeout: float = 120):
    """Run the page again (what the progress panel's timer does) until ``done(at)``."""
    deadline = time.time() + timeout
    while not done(at):
        shown = [p.proto.text for p in at.get("progress")] + [e.value for e in at.error] + [w.value for w in at.warning]
        assert time.time() < deadline, f"not done after {timeout} s; the page shows {shown}"
        time.sleep(0.5)
        at.run()
    return at


def _finished(at) -> bool:
    return any("Batch finished on the cluster" in s.value for s in at.success)


def test_without_a_scheduler_the_page_runs_here_and_an_unreachable_one_is_a_short_error(app, monkeypatch):
    assert not any(r.key == "_w.batch.where" for r in app.radio)  # nothing configured: today's page
    dead = f"tcp://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("PROTOSCOPE_DASK_SCHEDULER", dead)
    app.run()
    where = app.radio(key="_w.batch.where")
    assert where.value == "cluster"
    assert where.options == [f"on the Dask cluster at {dead}", "here, in the app's process"]
    app.button(key="batch.run").click().run()
    assert not app.exception
    errors = [e.value for e in app.error]
    assert len(errors) == 1 and errors[0].startswith(f"cannot reach the Dask scheduler at {dead} (")
    assert "start one with 'dask scheduler' and workers with 'dask worker" in errors[0]
    assert "batch.job" not in app.session_state or app.session_state["batch.job"] is None
    assert not list(Path(os.environ["PROTOSCOPE_OUTPUT_DIR"]).glob("*.ome.zarr"))  # nothing written


def test_a_cluster_batch_runs_on_without_its_tab_and_a_reopened_tab_shows_it(app, scheduler, monkeypatch, tmp_path):
    from distributed import Client

    monkeypatch.setenv("PROTOSCOPE_DASK_SCHEDULER", scheduler)
    _wait_for_worker(scheduler)
    app.text_input(key="_w.batch.z").input("12:18").run()  # two blocks: slices 0-15 and 16-23
    app.multiselect(key="_w.batch.formats").set_value(["tif", "h5"]).run()
    # another user's task holds the one worker until the gate opens, so the batch waits while the app's client goes
    # away: one block on the worker, the other in the scheduler's queue, which keeps it only for a detached job
    started, gate = tmp_path / "started", tmp_path / "gate"
    with Client(scheduler, timeout=30) as other:
        busy = other.submit(subprocess.run, ["sh", "-c", f"touch '{started}'; while [ ! -e '{gate}' ]; do sleep 0.1; "
                                             "done"], check=True, pure=False)
        deadline = time.time() + 60
        while not started.exists():
            assert time.time() < deadline, "the worker did not start the blocking task"
            time.sleep(0.1)
        app.button(key="batch.run").click().run()
        assert not app.exception and not app.error
        job: BatchJob = app.session_state["batch.job"]
        assert job.scheduler == scheduler and job.formats == ("tif", "h5")
        assert job.stack_name == "synthetic_vessels.ome.tif" and job.store.endswith(".ome.zarr")
        assert Path(job.store).parent == Path(os.environ["PROTOSCOPE_OUTPUT_DIR"])
        assert read_progress(job.store).run_id == job.run_id
        assert any("0 of 6 slices written (0 of 2 blocks)" in p.proto.text for p in app.get("progress"))
        assert any(m.value.startswith(f"**On the cluster** `{scheduler}`") for m in app.markdown)

        # the app's client goes away (its tab closed, the server restarted) before any block ran
        held = cluster.connect(scheduler)
        cluster._cluster.clear()
        held.close()
        assert held.client.status == "closed" and read_progress(job.store).slices_finished == 0
        testing.goto(app, "home")  # app.py saves the workspace
        again = testing.goto(_reopened(app), "batch")
        assert not again.exception and not again.error
        assert again.session_state["batch.job"] == job  # the reopened tab follows the same job
        assert any("0 of 6 slices written" in p.proto.text for p in again.get("progress"))
        gate.touch()
        busy.result(timeout=60)
    _until(again, _finished)
    assert not again.error and again.session_state["batch.job"] is None

    out = Path(job.store).parent
    tif = out / f"{job.base_name}.tif"
    with tifffile.TiffFile(tif) as handle:
        masks = handle.series[0].asarray()
        assert handle.imagej_metadata["spacing"] == pytest.approx(2.0)
    assert masks.shape == (6, 256, 256) and set(np.unique(masks)) <= {0, 255}
    # slice 12 is the mask the Segment page showed for these points, as in a run in the app's process
    np.testing.assert_array_equal(masks[Z - 12] == 255, app.session_state["segment.view"].segmentation.mask)
    zarr_masks = np.asarray(MaskStore.open(job.store).level(0))
    np.testing.assert_array_equal(zarr_masks[12:18], masks)
    assert not zarr_masks[:12].any() and not zarr_masks[18:].any()
    rows = list(csv.DictReader(io.StringIO((out / f"{job.base_name}_areas.csv").read_text())))
    counts = (masks == 255).sum(axis=(1, 2))
    assert [int(r["z"]) for r in rows] == list(range(12, 18)) and [int(r["area_px"]) for r in rows] == counts.tolist()
    metrics = {m.label: m.value for m in again.metric}
    assert metrics["Slices"] == "6" and metrics["Mask voxels"] == f"{int(counts.sum()):,}"
    assert metrics["Volume (µm³)"] == f"{counts.sum() * 0.64 * 2.0:,.0f}"
    labels = [b.label for b in again.get("download_button")]
    assert any(label.startswith(f"Download Multi-page TIFF (ImageJ) · {tif.name}") for label in labels)
    assert any(label.startswith("Download HDF5") for label in labels)
    assert any(label.startswith("Download Per-slice areas (CSV)") for label in labels)
    assert any(c.value.startswith(f"OME-Zarr masks: `{job.store}`") for c in again.caption)
    assert again.session_state["batch.result"].montage_png[:4] == b"\x89PNG"

    testing.goto(again, "home")  # saved: a restarted app finds the finished result, and no job to follow
    saved = load_workspace(os.environ["PROTOSCOPE_WORKSPACES"], again.session_state["workspace.id"])
    assert saved.batch_job is None and saved.batch.files["zarr"] == job.store
    assert saved.batch.result.area_px == counts.tolist()


def test_cancel_stops_a_cluster_batch_and_run_batch_resumes_it(app, scheduler, monkeypatch):
    """The job is recorded but its blocks are held back (submit_apply replaced by one that only starts the run), so
    Cancel always comes first; Run batch with the same settings then continues the same output."""
    monkeypatch.setenv("PROTOSCOPE_DASK_SCHEDULER", scheduler)
    _wait_for_worker(scheduler)
    real_submit = cluster.submit_apply

    def held_back(targets, on, **kwargs):
        ids = {str(t.store.path): start_run(t, scheduler=on.address, cache_dir="", device=None, blocks_todo=1)
               for t in targets}
        return ApplyRun(targets, ids)

    monkeypatch.setattr(cluster, "submit_apply", held_back)
    testing.goto(app, "batch")
    app.text_input(key="_w.batch.z").input("3:5").run()
    app.button(key="batch.run").click().run()
    assert not app.exception and not app.error
    job = app.session_state["batch.job"]
    assert any("0 of 2 slices written (0 of 1 blocks)" in p.proto.text for p in app.get("progress"))
    assert app.button(key="batch.run").disabled
    app.button(key="batch.job_cancel").click().run()
    assert read_progress(job.store).state == "cancelled"
    assert any("The batch on the cluster is cancelled: 0 of 2 slices are written" in w.value for w in app.warning)
    assert any("**Run batch** resumes the cancelled batch" in c.value for c in app.caption)

    monkeypatch.setattr(cluster, "submit_apply", real_submit)
    app.button(key="batch.run").click().run()
    resumed = app.session_state["batch.job"]
    assert resumed is not None and resumed.store == job.store and resumed.run_id != job.run_id
    _until(app, _finished)
    assert app.session_state["batch.result"].z_values == [3, 4]
    assert read_progress(job.store).state == "finished"


def test_the_workspace_keeps_a_cluster_job_and_reads_workspaces_without_one(tmp_path):
    job = BatchJob("/data/out/a_p.ome.zarr", "r1", "tcp://h:8786", "a.tif", "/data/a.tif", 1, "p", ("tif", "ims"),
                   "calibrated", "a_p", "abc", 12.5)
    saved = save_workspace(Workspace("0123456789abcdef", batch_job=job), tmp_path)
    assert load_workspace(tmp_path, saved.id).batch_job == job
    plain = save_workspace(Workspace("fedcba9876543210"), tmp_path)
    document = (tmp_path / plain.id / "workspace.json").read_text()
    (tmp_path / plain.id / "workspace.json").write_text(document.replace('"batch_job": null,', "").replace(
        ',\n "batch_job": null', ""))
    assert "batch_job" not in (tmp_path / plain.id / "workspace.json").read_text()  # as written before this field
    assert load_workspace(tmp_path, plain.id).batch_job is None
