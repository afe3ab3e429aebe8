"""Batch apply and embedding on Dask (core.cluster): blocks aligned with the file's z-chunks, the same masks as the
one-process run, resumable, and a worker killed mid-block replaced without a trace in the output.

The cluster tests start a real `dask scheduler` and two `dask worker` processes from this Python's environment
(one thread each, a small memory limit) and stop them, even on failure; they are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

from core.batch import apply_prototype
from core.cli.main import main
from core.cluster import (
    BackboneRecipe,
    Cluster,
    block_slices_for,
    plan_blocks,
    prepare_apply,
    read_progress,
    read_result,
    run_apply_here,
    submit_apply,
    z_chunk_depth,
)
from core.config import PipelineConfig
from core.demo import make_demo
from core.errors import OutputError
from core.features.backbones import load_backbone
from core.features.embedding import SliceEmbedder
from core.features.embedding_cache import EmbeddingCache
from core.io import open_stack
from core.io.ome_zarr import MaskStore
from core.pipeline import build_prototype
from core.prototypes import PointSet, save_prototype
from helpers_io import ramp_tczyx, write_ims

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
N_SLICES, BLOCK = 32, 4  # 8 blocks


def _points(mask: np.ndarray, z: int, count: int = 6) -> dict:
    rows, cols = np.nonzero(mask[z])
    back_rows, back_cols = np.nonzero(mask[z] == 0)
    pick = np.linspace(0, len(rows) - 1, count).astype(int)
    pick_back = np.linspace(0, len(back_rows) - 1, count).astype(int)
    return {"positive": [[int(cols[i]), int(rows[i]), z] for i in pick],
            "negative": [[int(back_cols[i]), int(back_rows[i]), z] for i in pick_back]}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A 32-slice 128 x 128 synthetic stack, a best-mode filter-bank prototype with z-smoothing (so blocks read
    their neighbours' slices) and the one-process masks and areas of every slice."""
    folder = tmp_path_factory.mktemp("cluster")
    image, truth = make_demo(shape=(N_SLICES, 128, 128), seed=5)
    stack_path = folder / "sample.tif"
    tifffile.imwrite(stack_path, np.stack([image, truth.astype(np.uint16)], axis=1), imagej=True,
                     resolution=(1 / 0.8, 1 / 0.8), metadata={"axes": "ZCYX", "spacing": 2.0, "unit": "um"})
    points = _points(truth, 6)
    (folder / "points.json").write_text(json.dumps(points))
    backbone = load_backbone("filterbank")
    config = PipelineConfig.best().with_options(image_size=196, z_sigma=1)
    with open_stack(stack_path) as stack:
        prototype = build_prototype(SliceEmbedder(stack, 0, backbone, config.preprocess), PointSet.from_dict(points),
                                    config)
        masks = np.zeros((N_SLICES, 128, 128), bool)

        def keep(z, mask):
            masks[z] = mask

        result = apply_prototype(SliceEmbedder(stack, 0, backbone, config.preprocess), prototype,
                                 list(range(N_SLICES)), keep, voxel_size=stack.voxel_size)
    save_prototype(prototype, folder / "proto.npz")
    assert 0 < masks.mean() < 0.5  # something to compare
    return SimpleNamespace(folder=folder, stack=stack_path, prototype=prototype, prototype_file=folder / "proto.npz",
                           masks=masks, csv=result.to_csv(), backbone=backbone)


def make_target(sample, out: Path, prototype=None):
    prototype = prototype or sample.prototype
    with open_stack(sample.stack) as stack:
        embedder = SliceEmbedder(stack, 0, sample.backbone, prototype.config.preprocess)
        return prepare_apply(embedder, prototype, out, z_values=range(N_SLICES), backbone=BackboneRecipe("filterbank"),
                             block_slices=BLOCK)


def written_masks(path: Path) -> np.ndarray:
    return np.asarray(MaskStore.open(path).level(0)) == 255


# ---- without a cluster ------------------------------------------------------------------------------------


def test_blocks_follow_the_files_z_chunks(tmp_path):
    ims = write_ims(tmp_path / "a.ims", ramp_tczyx(1, 1, 10, 20, 20), chunks=(4, 16, 16))
    with open_stack(ims) as stack:
        assert z_chunk_depth(stack) == 4
        assert block_slices_for(4, 10, target=6) == 8  # two chunks
        assert block_slices_for(4, 10, target=1) == 4  # never less than one chunk
    tif = tmp_path / "a.tif"
    tifffile.imwrite(tif, np.zeros((5, 20, 20), np.uint8))
    with open_stack(tif) as stack:
        assert z_chunk_depth(stack) == 1
    blocks = plan_blocks(10, 8, [9, 1, 2])
    assert [(b.index, b.z0, b.z1, b.z_values) for b in blocks] == [(0, 0, 8, (1, 2)), (1, 8, 10, (9,))]


def test_in_process_blocks_equal_the_one_process_run_and_a_rerun_computes_only_the_missing_blocks(sample, tmp_path):
    out = tmp_path / "m.ome.zarr"
    target = make_target(sample, out)
    assert target.store.layout.n_blocks == 8 and target.store.layout.chunk_slices == 4
    assert read_progress(out).state == "not started"
    segmented = []
    interrupted = run_apply_here([target], backbone=sample.backbone, on_slice=segmented.append,
                                 should_stop=lambda: len(segmented) >= 10)  # stops inside the third block
    done = target.store.finished_blocks()
    assert done == {0, 1} and interrupted.computed == [(str(out), 0), (str(out), 1)]
    progress = read_progress(out)
    assert (progress.state, progress.blocks_finished, progress.slices_finished) == ("cancelled", 2, 8)
    again = make_target(sample, out)  # the same run: resumed, not replaced
    rerun = run_apply_here([again], backbone=sample.backbone)
    assert sorted(block for _, block in rerun.computed) == [2, 3, 4, 5, 6, 7]
    assert [o.status for o in rerun.outcomes].count("finished") == 6
    assert np.array_equal(written_masks(out), sample.masks)
    assert read_result(out).to_csv() == sample.csv
    assert read_progress(out).describe() == "finished: 32 of 32 slices (8 of 8 blocks)"


def test_a_rerun_with_another_prototype_or_slices_is_refused(sample, tmp_path):
    out = tmp_path / "m.ome.zarr"
    make_target(sample, out)
    other = build_prototype_thesis(sample)
    with pytest.raises(OutputError) as refused:
        make_target(sample, out, prototype=other)
    assert "m.ome.zarr" in str(refused.value) and "prototype is" in str(refused.value)
    assert "settings mode is best there, thesis in this run" in str(refused.value)
    with open_stack(sample.stack) as stack:
        embedder = SliceEmbedder(stack, 0, sample.backbone, sample.prototype.config.preprocess)
        with pytest.raises(OutputError, match="slices is 0-31 there, 0-9 in this run"):
            prepare_apply(embedder, sample.prototype, out, z_values=range(10), backbone=BackboneRecipe("filterbank"))


def build_prototype_thesis(sample):
    points = PointSet.from_dict(json.loads((sample.folder / "points.json").read_text()))
    config = PipelineConfig.thesis().with_options(image_size=196)
    with open_stack(sample.stack) as stack:
        return build_prototype(SliceEmbedder(stack, 0, sample.backbone, config.preprocess), points, config)


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=PROJECT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_refuses_cluster_options_it_cannot_use(sample, tmp_path, capsys):
    common = ["--prototype", sample.prototype_file, "--channel", "0", "--no-cache"]
    cases = [
        (["apply", sample.stack, *common, "--out", tmp_path / "m.tif", "--workers", "2"], "write OME-Zarr"),
        (["apply", sample.stack, *common, "--out", tmp_path / "m.ome.zarr", "--workers", "2", "--scheduler", "x:1"],
         "not allowed with argument --workers"),
        (["apply", sample.stack, *common, "--out", tmp_path / "m.ome.zarr", "--scheduler",
          f"tcp://127.0.0.1:{free_port()}"], "cannot reach the Dask scheduler"),
        (["apply", sample.stack, sample.stack, *common, "--out", tmp_path / "m.ome.zarr"], "give --out a folder"),
        (["apply", sample.stack, sample.stack, *common, "--out", tmp_path / "many"],
         "would both write sample.ome.zarr"),
        (["apply", sample.stack, *common, "--out", tmp_path / "m.ome.zarr", "--workers", "0"], "--workers must be"),
        (["embed", sample.stack, "--backbone", "filterbank", "--no-cache"], "unrecognized arguments: --no-cache"),
    ]
    for args, expected in cases:
        try:
            status = main([str(a) for a in args])
        except SystemExit as exit_:  # the parser's own refusals
            status = exit_.code
        stderr = capsys.readouterr().err
        assert status == 2 and expected in stderr, (args, stderr)
        assert stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "m.ome.zarr").exists()  # refused before any output was made


def test_cli_apply_to_ome_zarr_in_one_process_equals_the_tiff_run(sample, tmp_path, capsys):
    done = run_cli("apply", sample.stack, "--prototype", sample.prototype_file, "--channel", "0", "--no-cache",
                   "--out", tmp_path / "m.ome.zarr", "--areas", tmp_path / "areas.csv", "--block-slices", "8")
    assert done.returncode == 0, done.stderr
    assert "4 block(s) computed" in done.stderr and "32 slice(s)" in done.stdout
    assert np.array_equal(written_masks(tmp_path / "m.ome.zarr"), sample.masks)
    assert (tmp_path / "areas.csv").read_text() == sample.csv
    (tmp_path / "areas.csv").write_text("stale")
    rerun = ("apply", sample.stack, "--prototype", sample.prototype_file, "--channel", "0", "--no-cache",
             "--out", tmp_path / "m.ome.zarr", "--areas", tmp_path / "areas.csv")
    assert main([str(a) for a in rerun]) == 0
    stderr = capsys.readouterr().err
    assert "4 of 4 blocks are already finished" in stderr and "0 block(s) computed" in stderr
    assert (tmp_path / "areas.csv").read_text() == sample.csv  # rewritten from the output


# ---- on a real Dask cluster ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """End a process we started and its children (its own session), gently first."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A `dask scheduler` and two `dask worker` processes (nanny-supervised, one thread, 2 GiB) on localhost."""
    folder = tmp_path_factory.mktemp("dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "HF_HUB_OFFLINE": "1"}
    processes = []
    try:
        processes.append(subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
             "--idle-timeout", "900"],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / "scheduler.log", "w"),
            start_new_session=True))
        for name in ("w1", "w2"):
            processes.append(subprocess.Popen(
                [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--memory-limit", "2GiB", "--name", name,
                 "--no-dashboard", "--death-timeout", "60", "--local-directory", str(folder / name),
                 "--preload", "core.cluster.tasks"],  # the task's imports (torch, scikit-learn) before the first task
                cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / f"{name}.log", "w"),
                start_new_session=True))
        deadline = time.time() + 60
        while True:
            try:
                cluster = Cluster(scheduler=address, timeout=10)
                break
            except Exception:  # noqa: BLE001 - the scheduler is still starting
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        cluster.client.wait_for_workers(2, timeout=90)
        yield cluster
        cluster.close()
    finally:
        for process in reversed(processes):
            _stop(process)


def _block_of_key(key: str) -> int:
    return int(str(key).rsplit("-", 2)[1])


@pytest.mark.slow
def test_a_worker_killed_mid_block_is_replaced_and_the_masks_equal_the_one_process_run(sample, dask_cluster,
                                                                                        tmp_path):
    client = dask_cluster.client
    pids_before = client.run(os.getpid)  # worker address -> pid of the worker process (its nanny's child)
    out = tmp_path / "m.ome.zarr"
    target = make_target(sample, out)
    run = submit_apply([target], dask_cluster)
    victim = None
    deadline = time.time() + 180
    while victim is None and time.time() < deadline:
        started, finished = target.store.block_times()
        busy = {b for b in range(8) if started[b] > 0 and finished[b] == 0}
        if finished.any() and busy:  # the workers are warm, and one is inside a block
            for address, keys in client.processing().items():
                blocks = [_block_of_key(key) for key in keys if _block_of_key(key) in busy]
                if blocks:
                    victim = (address, blocks[0])
                    break
        time.sleep(0.02)
    assert victim is not None, "no block was seen running"
    pid = pids_before[victim[0]]
    os.kill(pid, signal.SIGKILL)
    killed_mid_block = not target.store.finished_blocks() >= {victim[1]}
    outcomes = run.wait()
    assert np.array_equal(written_masks(out), sample.masks)
    assert read_result(out).to_csv() == sample.csv
    assert target.store.finished_blocks() == set(range(8))
    assert all(not o.worker.endswith(f":{pid}") for o in outcomes if o.block == victim[1]) or not killed_mid_block
    assert any(o.block == victim[1] and o.status == "finished" for o in outcomes) or not killed_mid_block
    client.wait_for_workers(2, timeout=90)  # the nanny started a new worker process
    pids_after = set(client.run(os.getpid).values())
    assert pid not in pids_after and len(pids_after) == 2


@pytest.mark.slow
def test_cancel_on_the_cluster_then_a_rerun_computes_only_the_missing_blocks(sample, dask_cluster, tmp_path):
    out = tmp_path / "m.ome.zarr"
    target = make_target(sample, out)
    run = submit_apply([target], dask_cluster)
    deadline = time.time() + 180
    while len(target.store.finished_blocks()) < 2 and time.time() < deadline:
        time.sleep(0.02)
    run.cancel()
    run.wait()
    # a block already running stops before its next slice, unmarked: 'cancelling' until then
    while read_progress(out).state == "cancelling" and time.time() < deadline:
        time.sleep(0.02)
    assert read_progress(out).state == "cancelled"
    done = target.store.finished_blocks()
    assert 2 <= len(done) < 8
    rerun = submit_apply([make_target(sample, out)], dask_cluster)
    rerun.wait()
    assert sorted(block for _, block in rerun.computed) == sorted(set(range(8)) - done)
    assert np.array_equal(written_masks(out), sample.masks)
    assert read_progress(out).state == "finished"


@pytest.mark.slow
def test_cli_apply_and_embed_on_a_running_scheduler(sample, dask_cluster, tmp_path, capsys):
    cache = tmp_path / "cache"
    embed = ["embed", sample.stack, "--backbone", "filterbank", "--mode", "thesis", "--option", "image_size=196",
             "--channel", "0", "--cache", cache]
    assert main([str(a) for a in [*embed, "--z", "0:12", "--scheduler", dask_cluster.address,
                                  "--block-slices", "4"]]) == 0
    assert "embedded 12 slice(s) of 1 stack(s)" in capsys.readouterr().out
    with open_stack(sample.stack) as stack:
        config = PipelineConfig.thesis().with_options(image_size=196)
        embedder = SliceEmbedder(stack, 0, sample.backbone, config.preprocess, cache=EmbeddingCache(cache))
        assert embedder.cached_slices() == set(range(12))
    assert main([str(a) for a in [*embed, "--z", "0:16"]]) == 0  # here, in this process: only the 4 missing
    assert "4 of 16 slice(s) to embed" in capsys.readouterr().err

    applied = run_cli("apply", sample.stack, "--prototype", sample.prototype_file, "--channel", "0", "--cache", cache,
                      "--out", tmp_path / "m.ome.zarr", "--areas", tmp_path / "areas.csv",
                      "--scheduler", dask_cluster.address, "--block-slices", "4")
    assert applied.returncode == 0, applied.stderr
    assert "2 worker(s)" in applied.stderr and "8 block(s) computed" in applied.stderr
    assert np.array_equal(written_masks(tmp_path / "m.ome.zarr"), sample.masks)
    assert (tmp_path / "areas.csv").read_text() == sample.csv


@pytest.mark.slow
def test_cli_apply_with_local_workers_on_two_stacks(sample, tmp_path):
    second = tmp_path / "second.tif"
    second.write_bytes(sample.stack.read_bytes())
    done = run_cli("apply", sample.stack, second, "--prototype", sample.prototype_file, "--channel", "0", "--no-cache",
                   "--out", tmp_path / "out", "--workers", "2", "--block-slices", "8", "--z", "0:16")
    assert done.returncode == 0, done.stderr
    assert "(started here)" in done.stderr and "4 block(s) computed" in done.stderr
    for name in ("sample", "second"):
        masks = written_masks(tmp_path / "out" / f"{name}.ome.zarr")
        assert np.array_equal(masks[:16], sample.masks[:16]) and not masks[16:].any()
        rows = (tmp_path / "out" / f"{name}.areas.csv").read_text().splitlines()
        assert rows == sample.csv.splitlines()[:17]
