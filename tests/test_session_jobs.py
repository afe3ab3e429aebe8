"""Long work stops with its session (ui.jobs): the watch's grace period and reconnects, a U-Net training thread
bound to an ended session stops at its next step, the Refine page's apply writes nothing when its session ends,
the watch on a real Streamlit runtime, and in a real browser: closing the tab stops the training thread. No
session code changes torch's process-wide thread count."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.demo import make_demo
from core.refine.model import RefineConfig
from ui import jobs, refine

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_session_counts_as_ended_after_the_grace_period_and_a_reconnect_resets_it():
    active = {"s1": True}
    clock = FakeClock()
    watch = jobs.SessionWatch("s1", grace_s=30, is_active=lambda sid: active[sid], clock=clock)
    assert watch.alive()
    active["s1"] = False  # the tab's connection dropped
    clock.now += 29
    assert watch.alive()  # first seen inactive now: the grace starts here
    clock.now += 29
    assert watch.alive()  # 29 s inactive
    active["s1"] = True  # reconnected
    assert watch.alive()
    active["s1"] = False
    clock.now += 1
    assert watch.alive()  # the clock restarted at the reconnect
    clock.now += 30
    assert not watch.alive() and watch.should_stop()
    active["s1"] = True
    assert not watch.alive()  # once ended, it stays ended (the work has been told to stop)


def test_no_session_or_no_runtime_never_stops_anything():
    assert jobs.SessionWatch(None, grace_s=0, is_active=lambda sid: False).alive()
    assert jobs.SessionWatch("s", grace_s=0, is_active=lambda sid: None).alive()  # the runtime cannot tell
    assert jobs.runtime_says_active("any") is None  # no Streamlit runtime in this process
    assert jobs.session_watch(grace_s=0).session_id is None  # no script run on this thread
    assert not jobs.session_watch(grace_s=0).should_stop()


def test_stop_when_combines_checks():
    flags = {"a": False, "b": False}
    stop = jobs.stop_when(lambda: flags["a"], None, lambda: flags["b"])
    assert not stop()
    flags["b"] = True
    assert stop()


def test_the_watch_asks_the_real_streamlit_runtime():
    """Streamlit 1.67's Runtime.is_active_session, through runtime.get_instance(): an unknown session is not active."""
    from streamlit.runtime import Runtime, RuntimeConfig
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
    from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager

    assert Runtime._instance is None
    Runtime(RuntimeConfig(script_path=str(PROJECT_ROOT / "app.py"),
                          media_file_storage=MemoryMediaFileStorage("/media"),
                          uploaded_file_manager=MemoryUploadedFileManager("/upload")))
    try:
        assert jobs.runtime_says_active("no-such-session") is False
        watch = jobs.SessionWatch("no-such-session", grace_s=0)
        assert watch.should_stop()
    finally:
        Runtime._instance = None


# ---- a training thread bound to an ended session --------------------------------------------------------


@pytest.fixture(scope="module")
def stack_path(tmp_path_factory) -> Path:
    """A 4-slice 64 x 64 stack: channel 0 image, channel 1 truth."""
    image, mask = make_demo(shape=(4, 64, 64), seed=3)
    path = tmp_path_factory.mktemp("jobs") / "tiny.tif"
    tifffile.imwrite(path, np.stack([image, mask.astype(np.uint16)], axis=1), imagej=True, metadata={"axes": "ZCYX"})
    return path


def raw_plan(stack_path: Path, epochs: int = 200) -> refine.TrainPlan:
    """Raw slices only (no backbone, no heatmaps): 3 training slices and 1 validation slice at 32 px."""
    spec = refine.training_stack(stack_path, 0, truth_channel=1)
    config = RefineConfig(input_set="raw", input_size=32, max_epochs=epochs, patience=epochs, augment=False)
    return refine.TrainPlan((spec,), {spec.label: [0, 1, 2, 3]}, config, "none", validation=("fraction", 0.25))


def test_a_training_thread_of_an_ended_session_stops_at_its_next_step(stack_path, one_torch_thread):
    calls = []

    def ended(session_id: str) -> bool:
        calls.append(session_id)
        return False

    job = refine.TrainJob(raw_plan(stack_path), None, None, jobs.SessionWatch("closed-tab", grace_s=0, is_active=ended))
    job.start().thread.join(60)
    assert not job.thread.is_alive()
    # the first poll (after the first sample slice) finds the session gone: no further slice, no epoch
    assert job.phase == "cancelled" and job.session_ended
    assert job.samples_done == 1 and job.history == [] and job.model is None
    assert calls == ["closed-tab"]


def test_a_session_ending_mid_training_stops_before_the_next_training_slice(stack_path, one_torch_thread):
    job = None
    polls_after_end = []

    def active(_session_id: str) -> bool:
        alive = len(job.history) < 1  # the tab closes once the first epoch has finished
        if not alive:
            polls_after_end.append(len(job.history))
        return alive

    job = refine.TrainJob(raw_plan(stack_path), None, None, jobs.SessionWatch("tab", grace_s=0, is_active=active))
    job.start().thread.join(120)
    assert not job.thread.is_alive()
    assert job.phase == "cancelled" and job.session_ended
    assert len(job.history) == 1  # of 200 epochs: stopped at the first training slice of epoch 2
    assert polls_after_end == [1]  # asked once; from then on the watch stays ended without asking
    assert job.model is not None  # the best model so far is kept, as after a Cancel


def test_a_running_session_trains_to_the_end(stack_path, one_torch_thread):
    job = refine.TrainJob(raw_plan(stack_path, epochs=2), None, None,
                          jobs.SessionWatch("tab", grace_s=0, is_active=lambda sid: True))
    job.start().thread.join(120)
    assert job.phase == "done" and not job.session_ended and len(job.history) == 2


def test_refine_session_code_never_sets_torch_threads(stack_path, one_torch_thread, monkeypatch):
    """Behaviour: a whole training run leaves torch's process-wide thread count alone (the conftest fixture
    set it to 1; a page asking for 2 threads used to change it for every session)."""
    import torch

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    job = refine.TrainJob(raw_plan(stack_path, epochs=1), None, None, None)
    job.start().thread.join(120)
    assert job.phase == "done" and seen == [] and torch.get_num_threads() == 1
    assert not hasattr(refine.TrainPlan, "threads") and "threads" not in refine.make_plan.__code__.co_varnames
    # and no code under ui/ or pages/ (or app.py) calls it at all
    sources = [*PROJECT_ROOT.glob("ui/*.py"), *PROJECT_ROOT.glob("pages/*.py"), PROJECT_ROOT / "app.py"]
    offenders = [p.name for p in sources if re.search(r"set_num_threads\s*\(", p.read_text(encoding="utf-8"))]
    assert offenders == []


# ---- the Refine page's apply -----------------------------------------------------------------------------


def test_refine_apply_of_an_ended_session_writes_nothing(stack_path, tmp_path, monkeypatch, one_torch_thread):
    """apply_model with the session's watch: the run stops before the next slice and no TIFF or CSV appears."""
    from types import SimpleNamespace

    from core.io import open_stack

    job = refine.TrainJob(raw_plan(stack_path, epochs=1), None, None, None)
    job.start().thread.join(120)
    model = job.model
    monkeypatch.setenv("PROTOSCOPE_OUTPUT_DIR", str(tmp_path / "out"))
    stack = open_stack(stack_path)
    ctx = SimpleNamespace(stack=stack, sample=SimpleNamespace(path=str(stack_path), name=stack_path.name), channel=0,
                          truth=None, backbone=None, truth_slice=lambda z: None)
    done = []
    state = {"active": True}
    watch = jobs.SessionWatch("tab", grace_s=0, is_active=lambda sid: state["active"])

    def on_progress(n, total, eta):
        done.append(n)
        state["active"] = n < 2  # the tab closes after the second slice

    assert refine.apply_model(ctx, model, None, [0, 1, 2, 3], on_progress=on_progress,
                              should_stop=watch.should_stop) is None
    assert done == [1, 2]
    out = tmp_path / "out"
    assert not out.exists() or [p.name for p in out.rglob("*") if p.is_file()] == []
    # the same call with a live session writes the TIFF and the CSV; a second session refining the same stack
    # in the same second gets files of its own (not "already exists")
    monkeypatch.setattr(refine.time, "strftime", lambda *args: "20260101-120000")
    first = refine.apply_model(ctx, model, None, [0, 1], should_stop=jobs.SessionWatch(None).should_stop)
    second = refine.apply_model(ctx, model, None, [0, 1], should_stop=jobs.SessionWatch(None).should_stop)
    for outputs in (first, second):
        assert Path(outputs.files["tif"]).exists() and Path(outputs.files["csv"]).exists()
    assert first.files["tif"] != second.files["tif"]
    stack.close()


# ---- a real server, a real tab ---------------------------------------------------------------------------


SCRIPT = '''
import json, sys, threading
from pathlib import Path
import streamlit as st
sys.path.insert(0, {root!r})
from core.refine.model import RefineConfig
from ui import jobs, refine

if "job" not in st.session_state:
    spec = refine.training_stack({stack!r}, 0, truth_channel=1)
    config = RefineConfig(input_set="raw", input_size=32, max_epochs=100000, patience=100000, augment=False)
    plan = refine.TrainPlan((spec,), {{spec.label: [0, 1, 2, 3]}}, config, "none", validation=("fraction", 0.25))
    job = refine.TrainJob(plan, None, None, jobs.session_watch(grace_s=0)).start()
    st.session_state.job = job

    def report(job=job, session_id=jobs.current_session_id()):
        job.thread.join()
        Path({marker!r}).write_text(json.dumps({{"phase": job.phase, "session_ended": job.session_ended,
                                                "epochs": len(job.history), "session_id": session_id}}))

    threading.Thread(target=report, daemon=True).start()
st.write("training started in session", jobs.current_session_id())
'''


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium")
def test_closing_the_tab_stops_the_training_thread(stack_path, tmp_path):
    """streamlit run + chromium: a page starts a TrainJob bound to its session; closing the tab ends the session,
    and the thread stops (it would otherwise train 100,000 epochs)."""
    import json

    from playwright.sync_api import sync_playwright

    marker = tmp_path / "finished.json"
    script = tmp_path / "train_page.py"
    script.write_text(SCRIPT.format(root=str(PROJECT_ROOT), stack=str(stack_path), marker=str(marker)))
    port = _free_port()
    log = open(tmp_path / "streamlit.log", "wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port), "--server.address",
         "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "streamlit.log").read_text()
            time.sleep(0.2)  # polling the health endpoint
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            page.goto(url)
            page.get_by_text("training started in session").wait_for(timeout=60_000)
            assert not marker.exists()  # still training while the tab is open
            page.close()
            deadline = time.monotonic() + 60
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.2)  # waiting for the server-side thread, which has no UI to wait on
            browser.close()
        assert marker.exists(), (tmp_path / "streamlit.log").read_text()[-3000:]
        finished = json.loads(marker.read_text())
        assert finished["phase"] == "cancelled" and finished["session_ended"] is True
        assert finished["epochs"] < 100000
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
