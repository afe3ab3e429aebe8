"""Several processes at once: six `python -m core apply` sharing one embedding cache give the single-process masks
and leave a valid cache that a seventh run reads without embedding; a MaskVolume's scratch file left by a killed
process is removed by the next MaskVolume and never lies in the output folder; and a batch larger than the
embedding memo, without a disk cache, embeds every slice once (no pre-embedding pass that the memo forgets)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from core.batch import MaskVolume, apply_prototype, embeds_ahead, plan_batch, remove_stale_scratch, scratch_dir
from core.config import PipelineConfig
from core.demo import make_demo
from core.features.backbones import load_backbone
from core.features.embedding import SliceEmbedder
from core.features.embedding_cache import EmbeddingCache
from core.io import open_stack
from core.pipeline import build_prototype
from core.prototypes import PointSet, load_prototype

PROJECT = Path(__file__).resolve().parents[2]
N_SLICES = 10
N_PROCESSES = 6


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "core", *map(str, args)]


def cli_env() -> dict[str, str]:
    # one thread per process: six processes share two cores
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def stack_and_prototype(tmp_path_factory):
    """A 10-slice 96 x 96 synthetic vessel stack (channel 0 image, 1 truth) and a thesis-mode filter-bank prototype
    of 4 + 4 points on slice 2 (made with --no-cache, so no cache exists yet)."""
    folder = tmp_path_factory.mktemp("concurrent")
    image, mask = make_demo(shape=(N_SLICES, 96, 96), seed=5)
    path = folder / "small.tif"
    tifffile.imwrite(path, np.stack([image, mask.astype(np.uint16)], axis=1), imagej=True,
                     resolution=(1 / 0.8, 1 / 0.8), metadata={"axes": "ZCYX", "spacing": 2.0, "unit": "um"})
    rows, cols = np.nonzero(mask[2])
    background_rows, background_cols = np.nonzero(mask[2] == 0)
    pick = np.linspace(0, len(rows) - 1, 4).astype(int)
    pick_background = np.linspace(0, len(background_rows) - 1, 4).astype(int)
    points = {"positive": [[int(cols[i]), int(rows[i]), 2] for i in pick],
              "negative": [[int(background_cols[i]), int(background_rows[i]), 2] for i in pick_background]}
    (folder / "points.json").write_text(json.dumps(points))
    prototype = folder / "proto.npz"
    made = subprocess.run(cli("prototype", path, "--points", folder / "points.json", "--out", prototype, "--channel", "0",
                              "--backbone", "filterbank", "--mode", "thesis", "--option", "image_size=196",
                              "--no-cache"), cwd=PROJECT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    return path, prototype


def read_masks(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as handle:
        return handle.series[0].asarray()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_six_concurrent_applies_share_one_cache(stack_and_prototype, tmp_path):
    stack, prototype = stack_and_prototype
    apply = ["--prototype", prototype, "--channel", "0", "--z", "all", "--backbone", "filterbank"]
    # the reference: one process, its own cache
    single = subprocess.run(cli("apply", stack, *apply, "--out", tmp_path / "single.tif", "--cache", tmp_path / "own"),
                            cwd=PROJECT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    reference = read_masks(tmp_path / "single.tif")
    assert reference.shape == (N_SLICES, 96, 96) and 0 < (reference == 255).mean() < 0.5

    shared = tmp_path / "shared-cache"
    processes = [subprocess.Popen(cli("apply", stack, *apply, "--out", tmp_path / f"run{i}.tif", "--cache", shared,
                                      "--areas", tmp_path / f"run{i}.csv"),
                                  cwd=PROJECT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(N_PROCESSES)]
    finished = [(p.wait(timeout=600), p.communicate()[1]) for p in processes]
    assert [code for code, _ in finished] == [0] * N_PROCESSES, [err[-2000:] for _, err in finished]
    for i in range(N_PROCESSES):
        np.testing.assert_array_equal(read_masks(tmp_path / f"run{i}.tif"), reference)
        assert (tmp_path / f"run{i}.csv").read_text().count("\n") == N_SLICES + 1

    # the cache afterwards: one valid HDF5 file holding every slice, each equal to a fresh embedding (float16)
    files = sorted(shared.glob("*.h5"))
    assert len(files) == 1
    with h5py.File(files[0], "r") as handle:
        assert sorted(int(name) for name in handle["slices"]) == list(range(N_SLICES))
        stored = {int(name): handle["slices"][name][()] for name in handle["slices"]}
    config = load_prototype(prototype).config
    with open_stack(stack) as opened:
        fresh = SliceEmbedder(opened, 0, load_backbone("filterbank"), config.preprocess)
        for z in (0, 5, N_SLICES - 1):
            np.testing.assert_array_equal(stored[z], fresh.embed(z).astype(np.float16))
        cached = SliceEmbedder(opened, 0, load_backbone("filterbank"), config.preprocess, cache=EmbeddingCache(shared))
        assert cached.cached_slices() == set(range(N_SLICES))

    # a seventh run reads every slice from the cache: it writes nothing into it (a computed slice is always
    # put into the cache, which would rewrite the file), and its masks are the same
    before = file_digest(files[0])
    seventh = subprocess.run(cli("apply", stack, *apply, "--out", tmp_path / "run7.tif", "--cache", shared),
                             cwd=PROJECT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert seventh.returncode == 0, seventh.stderr
    assert file_digest(files[0]) == before and sorted(shared.glob("*.h5")) == files
    np.testing.assert_array_equal(read_masks(tmp_path / "run7.tif"), reference)


# ---- MaskVolume scratch files ----------------------------------------------------------------------------

HOLDER = """
import sys, time
import numpy as np
from core.batch import MaskVolume
volume = MaskVolume([0, 1, 2], (64, 64), directory=sys.argv[1])
volume(1, np.ones((64, 64), bool))
volume.full_stack(5)
print(volume.path, flush=True)
time.sleep(600)
"""


def test_a_killed_process_leaves_no_scratch_file_behind(tmp_path, monkeypatch):
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PROTOSCOPE_TMP": str(scratch)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        path = Path(holder.stdout.readline().strip())
        assert path.parent == scratch and path.name == f"masks-{holder.pid}-{path.name.split('-')[2]}"
        assert path.exists() and path.with_name(path.stem + "-full.npy").exists()
        assert list(out.iterdir()) == []  # the output folder the caller passed holds nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: no close, no atexit
        holder.wait(timeout=30)
        holder.stdout.close()
    assert sorted(p.name for p in scratch.iterdir()) == sorted([path.name, path.stem + "-full.npy"])  # left behind

    monkeypatch.setenv("PROTOSCOPE_TMP", str(scratch))
    assert scratch_dir() == scratch
    volume = MaskVolume([4], (8, 8), directory=out)
    try:
        assert [p.name for p in scratch.iterdir()] == [volume.path.name]  # the dead process's files are gone
        assert volume.path.name.startswith(f"masks-{os.getpid()}-")
        assert list(out.iterdir()) == []
    finally:
        volume.close()
    assert list(scratch.iterdir()) == []


def test_scratch_files_of_live_processes_stay(tmp_path):
    mine = tmp_path / f"masks-{os.getpid()}-abc123.npy"
    parent = tmp_path / f"masks-{os.getppid()}-abc123-full.npy"
    other = tmp_path / "notes.npy"  # not a scratch name: never touched
    for path in (mine, parent, other):
        path.write_bytes(b"x")
    assert remove_stale_scratch(tmp_path) == []
    assert all(p.exists() for p in (mine, parent, other))


def test_the_default_scratch_folder_is_in_the_system_temp(monkeypatch):
    import tempfile

    monkeypatch.delenv("PROTOSCOPE_TMP", raising=False)
    folder = scratch_dir()
    assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("protoscope-")
    with MaskVolume([0, 1], (4, 4)) as volume:
        assert volume.path.parent == folder and volume.array.shape == (2, 4, 4)
        path = volume.path
    assert not path.exists()


# ---- one embedding per slice when the memo is too small -------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    name: str = "counting"
    family: str = "test"
    patch_size: int = 14


class CountingBackbone:
    """Embeds a (S, S) image as a (S/14, S/14, 2) grid: (patch mean, 1 - patch mean); counts slices embedded."""

    spec = _Spec()
    weights_id = "none"
    is_random = False
    patch_size = 14
    embed_dim = 2

    def __init__(self):
        self.calls = 0

    def label(self):
        return "counting test features"

    def signature(self):
        return "counting-v1"

    def embed(self, image01):
        self.calls += 1
        h, w = image01.shape[0] // 14, image01.shape[1] // 14
        means = image01[: h * 14, : w * 14].reshape(h, 14, w, 14).mean(axis=(1, 3))
        return np.stack([means, 1.0 - means], axis=-1).astype(np.float32)


@pytest.fixture
def squares(tmp_path):
    """6 slices of 140 x 140 px, a bright 70 x 70 square in the top-left quarter."""
    volume = np.full((6, 140, 140), 100, np.uint16)
    volume[:, :70, :70] = 1000
    path = tmp_path / "squares.tif"
    tifffile.imwrite(path, volume, imagej=True, metadata={"axes": "ZYX"})
    return path


@pytest.mark.parametrize("z_sigma", [0, 1])
def test_a_batch_larger_than_the_memo_embeds_each_slice_once(squares, z_sigma):
    config = PipelineConfig.thesis().with_options(image_size=140, threshold="score:0", z_sigma=z_sigma)
    backbone = CountingBackbone()
    embedder = SliceEmbedder(open_stack(squares), 0, backbone, config.preprocess)
    embedder.memo_bytes = 2 * embedder.embedding_nbytes  # 10 x 10 x 2 float32 = 800 bytes a slice: 2 of 6 fit
    prototype = build_prototype(embedder, PointSet(np.array([[10, 10, 0]]), np.array([[120, 120, 0]])), config)
    plan = plan_batch(embedder, prototype, range(6))
    assert plan.embeds and not embeds_ahead(embedder, plan)
    embedder.clear_memo()
    backbone.calls = 0
    events, masks = [], {}
    result = apply_prototype(embedder, prototype, list(range(6)), masks.__setitem__,
                             on_progress=lambda phase, done, total, eta: events.append(phase))
    assert backbone.calls == 6  # a pre-embedding pass would make it 12: the memo forgets them before the masks
    assert set(events) == {"mask"} and result.area_px == [4900] * 6


def test_a_batch_that_fits_the_memo_or_has_a_cache_still_embeds_first(squares, tmp_path):
    config = PipelineConfig.thesis().with_options(image_size=140, threshold="score:0")
    for cache, memo_slices in ((None, 6), (EmbeddingCache(tmp_path / "cache"), 2)):
        backbone = CountingBackbone()
        embedder = SliceEmbedder(open_stack(squares), 0, backbone, config.preprocess, cache=cache)
        embedder.memo_bytes = memo_slices * embedder.embedding_nbytes
        prototype = build_prototype(embedder, PointSet(np.array([[10, 10, 0]]), np.array([[120, 120, 0]])), config)
        assert embeds_ahead(embedder, plan_batch(embedder, prototype, range(6)))
        backbone.calls = 0
        events = []
        apply_prototype(embedder, prototype, list(range(6)), lambda z, m: None,
                        on_progress=lambda phase, done, total, eta: events.append(phase))
        # slice 0 was embedded for the prototype: in the memo (still counted by the pass) or in the cache
        assert events.count("embed") == (6 if cache is None else 5)
        assert backbone.calls == 5
