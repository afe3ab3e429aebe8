"""``kill -9`` in the middle of ``python -m core apply`` (issue #12): no partial output, and an exact rerun.

A 40-slice 256 x 256 synthetic stack is segmented with a filter-bank prototype in thesis mode (980-px model
input: several seconds of work) while the embedding cache fills. The run is killed with SIGKILL once the cache
holds its first slices; no file may appear under the output's name, only the dead process's temp. The same
command is then run again with the same (half-filled, possibly torn) cache: it must succeed, its masks must be
pixel-identical to those of a clean run with a fresh cache, and the dead process's temp must be gone (the next
write into a folder removes the temps of dead processes, ``core.io.atomic.remove_stale_temps``). Finally the
masks must also equal those of a clean run without any cache: a cache may save time, never change a result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.demo import make_demo
from core.io.atomic import TEMP_PATTERN

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHAPE = (40, 256, 256)  # (Z, Y, X)

# three runs of the 40 slices (~10 s each on the 2-core machine) and a killed one
pytestmark = pytest.mark.slow


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "PYTHONPATH": str(PROJECT_ROOT)}


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "core", *map(str, args)]


def _run(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), capture_output=True, text=True, cwd=PROJECT_ROOT, env=env, timeout=600)


def _cache_entries(cache: Path) -> int:
    """Slices written so far into the HDF5 files of the cache (0 while none is readable)."""
    import h5py

    count = 0
    for path in cache.glob("*.h5"):
        try:
            with h5py.File(path, "r", locking=False) as handle:
                count += len(handle.get("slices", {}))
        except (OSError, KeyError):
            continue  # being written right now
    return count


def _masks(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].asarray()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    image, mask = make_demo(shape=SHAPE, seed=11)
    stack = root / "stack.tif"
    tifffile.imwrite(stack, image, imagej=True, resolution=(2.0, 2.0), metadata={"axes": "ZYX", "spacing": 2.0,
                                                                                  "unit": "um"})
    rows, cols = np.nonzero(mask[20])
    background_rows, background_cols = np.nonzero(mask[20] == 0)
    pick = np.linspace(0, len(rows) - 1, 5).astype(int)
    pick_background = np.linspace(0, len(background_rows) - 1, 5).astype(int)
    points = root / "points.json"
    points.write_text(json.dumps({"positive": [[int(cols[i]), int(rows[i]), 20] for i in pick],
                                  "negative": [[int(background_cols[i]), int(background_rows[i]), 20]
                                               for i in pick_background]}))
    env = _env(root)
    prototype = root / "thesis.npz"
    made = _run("prototype", stack, "--points", points, "--out", prototype, "--backbone", "filterbank",
                "--mode", "thesis", "--no-cache", env=env)
    assert made.returncode == 0, made.stderr
    clean = _run("apply", stack, "--prototype", prototype, "--out", root / "clean" / "masks.tif", "--no-cache", env=env)
    assert clean.returncode == 0, clean.stderr
    cached = _run("apply", stack, "--prototype", prototype, "--out", root / "cached" / "masks.tif", "--cache",
                  root / "fresh_cache", env=env)
    assert cached.returncode == 0, cached.stderr
    return {"root": root, "stack": stack, "prototype": prototype, "env": env,
            "clean": _masks(root / "clean" / "masks.tif"), "clean_cached": _masks(root / "cached" / "masks.tif")}


@pytest.fixture(scope="module")
def killed_and_rerun(inputs):
    """Kill an apply that fills a cache, then rerun it: (process id, stray names after the kill, slices cached at the
    kill, the rerun, its output folder)."""
    root, env = inputs["root"], inputs["env"]
    out_dir, cache = root / "out", root / "cache"
    command = _cli("apply", inputs["stack"], "--prototype", inputs["prototype"], "--out", out_dir / "masks.tif",
                   "--cache", cache)


    before = {p: p.stat().st_mtime_ns for p in (inputs["stack"], inputs["prototype"])}
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while _cache_entries(cache) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        finished_early = process.poll() is not None
        os.kill(process.pid, signal.SIGKILL)
        status = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not finished_early, "apply finished before it could be killed; make the stack larger"
    assert status == -signal.SIGKILL
    cached_at_kill = _cache_entries(cache)
    stray = sorted(p.name for p in out_dir.iterdir())
    rerun = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the inputs were never written
    return {"pid": process.pid, "stray": stray, "cached_at_kill": cached_at_kill, "rerun": rerun, "out_dir": out_dir,
            "cache": cache}


def test_kill_9_leaves_only_the_dead_process_temp(killed_and_rerun):
    assert 2 <= killed_and_rerun["cached_at_kill"] < SHAPE[0]  # killed while the cache was filling
    stray = killed_and_rerun["stray"]
    assert "masks.tif" not in stray  # no partial file under the real name
    assert len(stray) == 1 and TEMP_PATTERN.match(stray[0]), stray  # only the dead process's temp
    assert int(TEMP_PATTERN.match(stray[0]).group("pid")) == killed_and_rerun["pid"]


def test_the_rerun_completes_the_cache_removes_the_temp_and_is_exact(inputs, killed_and_rerun):
    rerun, out_dir = killed_and_rerun["rerun"], killed_and_rerun["out_dir"]
    assert rerun.returncode == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["masks.tif"]  # the stray temp was removed
    masks = _masks(out_dir / "masks.tif")
    assert masks.shape == SHAPE and masks.dtype == np.uint8
    np.testing.assert_array_equal(masks, inputs["clean_cached"])
    assert _cache_entries(killed_and_rerun["cache"]) == SHAPE[0]


def test_the_rerun_equals_a_clean_run_without_a_cache(inputs, killed_and_rerun):
    """Fails while SliceEmbedder rounds embeddings through float16 only when a disk cache is used
    (core/features/embedding.py, SliceEmbedder.embed): with and without --cache the masks then differ."""
    assert killed_and_rerun["rerun"].returncode == 0
    masks = _masks(killed_and_rerun["out_dir"] / "masks.tif")
    np.testing.assert_array_equal(masks, inputs["clean"])
