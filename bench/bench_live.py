"""Live best mode at the users' slice sizes, beside DINOSim, in one run (issue #13's benchmark).

Run from the repository root (DINOSim runs in its own venv, see bench/peers_dinosim.py):
    .venv/bin/python bench/bench_live.py [--quick] [--dsim-python PY] [--rounds N] [--clicks N] [--work DIR]
Prints tables, writes bench/results/live.json (every sample, the medians and the last line); the last line
printed is the summary other tools parse:

    live: best click 1024 N ms, 3050x2933 N ms; first mask new stack N s; DINOSim ratio ttfh R, click R

What feeds each field (all server-side wall times of this process, medians over the timed rounds):
- ``best click 1024``: best mode's live step at 1024², one click = the points changed by one added positive
  -> an updated pixel mask of the slice; embeddings in the cache and the slice's per-slice work done (the
  clicks after a session's first one; median over rounds x clicks), in ms.
- ``3050x2933``: the same at 3050 x 2933 (the thesis's largest slice), in ms.
- ``first mask new stack``: on a never-seen chunked .ims (3050 x 2933 x 64 uint16, gzip, 32 x 128 x 128
  chunks, Imaris pyramid): seconds from the end of the first slice's embedding to its first best-mode live
  mask, the points on that slice. It holds all the per-stack and per-slice work best mode needs after the
  embedding (the stack's pixel statistics, the slice's pixel features, the stack's PCA basis), started in
  the background as pages/1_Segment.py does once the slice is embedded, then the live click, which waits for
  them. The open -> ready-to-embed time (the stack's intensity range) and the embedding are reported beside it.
- ``DINOSim ratio ttfh``: at 1024², median Protoscope time to first heatmap / median DINOSim time to first
  heatmap. Protoscope: embed one uncached slice (ViT-S/14 random weights, default precision) + the first
  best-mode live click (the slice's per-slice work included), the stack already open and prepared;
  DINOSim: its ``pre_compute_embeddings`` + first click, model loaded.
- ``click``: at 1024², median best live click (as above) / median DINOSim click (one added positive).
A ratio is "n/a" when DINOSim was skipped. R has two decimals; N is an integer, or one decimal below 10.

What else is measured and printed (all in live.json):
- click latency per mode and size (1024², 2048², 3050 x 2933; the vesselNN slice z=5 of
  burgess2014_bbbDisruption tiled): thesis mode, best mode's live step, its forest refinement, the patch
  preview; per-stack preparation (intensity range, pixel statistics); embedding and first clicks;
- DINOSim (napari-dinosim 0.1.5, its defaults) on the same slice at 1024² and 2048², interleaved pair by pair
  with Protoscope's best-mode session of that size (the order flips every pair), so that the drift of a
  shared machine hits both;
- slice change on the chunked .ims (freshly opened, so no z-chunk is decoded): the first image shown (the pyramid
  preview), the full-resolution plane of that slice, then a neighbouring slice whose z-chunk is now decoded;
- ViT-S/14 (random weights) at 980² in fp32 and in the default precision, as a fraction of this machine's
  matmul rate in its compute dtype (a 2048² ``torch.mm`` measured just before each forward): with all cores on
  the wall clock, and with one thread on the process CPU clock (robust to other jobs on a shared machine).

The calls into the project's API that each measurement makes live in one place (the "adapters" section); the
JSON records which API each one used. Nothing is written outside --work (default: a folder in the system temp
dir; the generated .ims is kept there for the next run) and bench/results/live.json.
``--quick``: one timed round, 3 clicks per session (under 15 min on a 2-core CPU); default: 3 rounds, 5 clicks.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import live  # noqa: E402
from core.config import Cleanup, PipelineConfig, Upsampling  # noqa: E402
from core.features.embedding import SliceEmbedder  # noqa: E402
from core.features.embedding_cache import EmbeddingCache  # noqa: E402
from core.io import open_stack  # noqa: E402
from core.io.atomic import atomic_output, write_text  # noqa: E402
from core.io.preview import view_plane  # noqa: E402
from core.pipeline import build_scorer  # noqa: E402
from core.prototypes import PointSet  # noqa: E402
from core.thresholds import ThresholdSpec  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "live.json"
DINOSIM_WORKER = ROOT / "bench" / "peers_dinosim.py"
DEFAULT_DSIM_PYTHON = Path("/work/dsim_venv/bin/python")  # this machine's DINOSim venv (see peers_dinosim.py)
IMAGE = ROOT / ".." / "shared" / "data" / "vesselnn" / "images" / "burgess2014_bbbDisruption.tif"
Z = 5  # the slice clicked on (as in ../shared/tools/peers/side_by_side.py)
# (x, y) in the 512² source slice, valid at every tiled size: positives inside labelled vessels (deepest points
# of the label's distance transform), negatives far from any vessel; one more positive per click.
POSITIVE = [(379, 104), (237, 224), (47, 360)]
NEGATIVE = [(224, 491), (302, 362), (73, 491)]
ADDED = [(55, 134), (484, 261), (172, 87), (120, 300), (400, 420), (300, 40)]
SQUARE_SIZES = (1024, 2048)  # sizes with DINOSim beside
LARGE = (3050, 2933)  # (Y, X): the thesis's largest slice
IMS_SHAPE = (64, 3050, 2933)  # (Z, Y, X) of the chunked .ims
IMS_CHUNKS = (32, 128, 128)  # Imaris' usual uint16 chunks
IMS_Z = 37  # the new stack's first clicked slice (second z-chunk)
IMS_GENERATOR = "bench_live-ims-v1"  # bump when the generated file changes
VIT_S = dict(hidden=384, layers=12, mlp=1536)


# ======================================================================================================
# pure helpers (tests/test_bench_live.py)


def natural_number(value: float | None) -> str:
    """An integer, or one decimal below 10: 1234.4 -> '1234', 7.25 -> '7.2', None/NaN -> 'n/a'."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.1f}" if abs(round(value, 1)) < 10 else f"{value:.0f}"


def ratio_text(numerator: float | None, denominator: float | None) -> str:
    """numerator / denominator with two decimals; 'n/a' when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or not math.isfinite(numerator) or not math.isfinite(denominator) \
            or denominator <= 0:
        return "n/a"
    return f"{numerator / denominator:.2f}"


def last_line(best_click_1024_ms: float | None, best_click_large_ms: float | None, first_mask_new_stack_s: float | None,
              ttfh_ratio: str, click_ratio: str) -> str:
    """The summary line other tools parse (exact form in the module docstring)."""
    return (f"live: best click 1024 {natural_number(best_click_1024_ms)} ms, {LARGE[0]}x{LARGE[1]} "
            f"{natural_number(best_click_large_ms)} ms; first mask new stack {natural_number(first_mask_new_stack_s)} s; "
            f"DINOSim ratio ttfh {ttfh_ratio}, click {click_ratio}")


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def spread(values, scale: float = 1.0, digits: int = 0) -> str:
    """'median [min-max]' of values x scale, or '-' when empty."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def tiled(plane: np.ndarray, size_yx: tuple[int, int]) -> np.ndarray:
    """(..., y, x) array tiled (np.tile, repeating from the top left) to cover size_yx, cropped to it."""
    reps = (-(-size_yx[0] // plane.shape[-2]), -(-size_yx[1] // plane.shape[-1]))
    full = np.tile(plane, (1,) * (plane.ndim - 2) + reps)
    return np.ascontiguousarray(full[..., : size_yx[0], : size_yx[1]])


def imaris_level_shapes(shape_zyx: tuple[int, int, int], itemsize: int,
                        stop_voxels: int | None = None) -> list[tuple[int, int, int]]:
    """(Z, Y, X) of each resolution level as Imaris builds its pyramid (docs/spec/FORMAT.md §4.3).

    An axis is halved (rounding down) while it is not particularly small: X when (10 X)² > Y Z, the same for Y
    and Z, never below 1; levels are added while the last one holds more than `stop_voxels` voxels (default
    ImarisWriter's 1 MiB / itemsize). (64, 3050, 2933) uint16 -> 6 levels, Z kept at 64 until level 3.
    """
    stop = (1 << 20) // itemsize if stop_voxels is None else stop_voxels
    shapes = [tuple(int(v) for v in shape_zyx)]
    while np.prod(shapes[-1], dtype=np.int64) > stop:
        z, y, x = shapes[-1]
        new = (z // 2 if (10 * z) ** 2 > y * x and z > 1 else z,
               y // 2 if (10 * y) ** 2 > x * z and y > 1 else y,
               x // 2 if (10 * x) ** 2 > y * z and x > 1 else x)
        if new == shapes[-1]:
            break
        shapes.append(new)
    return shapes


def bin_block(block: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """(z, y, x) block -> floor of the mean over factor-sized boxes (trailing odd planes/rows dropped), as
    ImarisWriter's lower levels (sum in float, truncate)."""
    fz, fy, fx = factors
    z, y, x = (block.shape[0] // fz) * fz, (block.shape[1] // fy) * fy, (block.shape[2] // fx) * fx
    view = block[:z, :y, :x].reshape(z // fz, fz, y // fy, fy, x // fx, fx)
    return (view.sum(axis=(1, 3, 5), dtype=np.float32) / (fz * fy * fx)).astype(block.dtype)


def synthetic_plane(z: int, shape_yx: tuple[int, int]) -> np.ndarray:
    """(Y, X) uint16 smooth structure + noise, different per z (for tests and when the vesselNN data are absent)."""
    rng = np.random.default_rng(z)
    yy, xx = np.ogrid[: shape_yx[0], : shape_yx[1]]
    base = 800 + 400 * np.sin(yy / 37.0 + z / 5.0) * np.cos(xx / 29.0)
    return (base + rng.integers(0, 64, shape_yx)).astype(np.uint16)


def write_chunked_ims(path: Path, shape_zyx: tuple[int, int, int],
                      plane_of: Callable[[int], np.ndarray] | None = None, *,
                      chunks: tuple[int, int, int] = IMS_CHUNKS, gzip_level: int = 2,
                      voxel_um: tuple[float, float, float] = (0.5, 0.5, 2.0),
                      stop_voxels: int | None = None) -> list[tuple[int, int, int]]:
    """Write a one-channel uint16 Imaris 5.5 file with its resolution pyramid, as Imaris lays it out.

    plane_of(z) -> (Y, X) uint16 plane (default: ``synthetic_plane``). Data are padded to whole chunks, gzip at
    `gzip_level` after shuffle, chunks (Z, Y, X) clipped to each level's padded size; lower levels are 2x
    binned (``bin_block``) per ``imaris_level_shapes``. Written one chunk depth at a time (the file is never
    in memory whole) through ``core.io.atomic``. voxel_um : (x, y, z) µm. stop_voxels : see
    ``imaris_level_shapes`` (small values give tiny test files a pyramid). Returns the level shapes.
    """
    import h5py

    from core.io.ims import put_str_attr

    plane_of = plane_of or (lambda z: synthetic_plane(z, shape_zyx[1:]))
    levels = imaris_level_shapes(shape_zyx, 2, stop_voxels)
    depth = chunks[0]
    if any(levels[r][0] != levels[0][0] and depth % (levels[0][0] // levels[r][0]) for r in range(len(levels))):
        raise ValueError(f"chunk depth {depth} is not divisible by the pyramid's z factors for {shape_zyx}")
    with atomic_output(path, overwrite=True) as tmp, h5py.File(tmp, "w", libver=("earliest", "v108")) as f:
        for key, value in (("DataSetDirectoryName", "DataSet"), ("DataSetInfoDirectoryName", "DataSetInfo"),
                           ("ImarisDataSet", "ImarisDataSet"), ("ImarisVersion", "5.5.0"),
                           ("ThumbnailDirectoryName", "Thumbnail")):
            put_str_attr(f, key, value)
        f.attrs.create("NumberOfDataSets", np.array([1], dtype=np.uint32))
        datasets = []
        for r, (lz, ly, lx) in enumerate(levels):
            level_chunks = (min(chunks[0], lz), min(chunks[1], ly), min(chunks[2], lx))
            padded = tuple(-(-s // c) * c for s, c in zip((lz, ly, lx), level_chunks))
            group = f.create_group(f"DataSet/ResolutionLevel {r}/TimePoint 0/Channel 0")
            datasets.append(group.create_dataset("Data", shape=padded, dtype=np.uint16, chunks=level_chunks,
                                                 shuffle=True, compression="gzip", compression_opts=gzip_level))
            for axis, size in zip("ZYX", (lz, ly, lx)):
                put_str_attr(group, f"ImageSize{axis}", str(size))
        for z0 in range(0, shape_zyx[0], depth):
            block = np.stack([plane_of(z) for z in range(z0, min(z0 + depth, shape_zyx[0]))]).astype(np.uint16)
            datasets[0][z0:z0 + len(block), : shape_zyx[1], : shape_zyx[2]] = block
            for r in range(1, len(levels)):
                factors = tuple(int(a // b) for a, b in zip(levels[r - 1], levels[r]))
                block = bin_block(block, factors)
                lz, ly, lx = levels[r]
                start = z0 * lz // shape_zyx[0]
                stop = min(start + block.shape[0], lz)
                datasets[r][start:stop, :ly, :lx] = block[: stop - start, :ly, :lx]
        image = f.create_group("DataSetInfo/Image")
        for key, value in (("X", shape_zyx[2]), ("Y", shape_zyx[1]), ("Z", shape_zyx[0]), ("Noc", 1)):
            put_str_attr(image, key, str(value))
        put_str_attr(image, "Unit", "um")
        for i, (size, voxel) in enumerate(zip(shape_zyx[::-1], voxel_um)):
            put_str_attr(image, f"ExtMin{i}", "0.000")
            put_str_attr(image, f"ExtMax{i}", f"{size * voxel:.3f}")
        channel = f.create_group("DataSetInfo/Channel 0")
        put_str_attr(channel, "Name", "vessels")
        put_str_attr(channel, "Color", "1.000 1.000 1.000")
    return levels


def vit_gflops(size: int, patch: int = 14) -> float:
    """Analytic GFLOP (2 per multiply-add) of one ViT-S/14 forward on a size² image (as bench_backbones.py)."""
    patches = (size // patch) ** 2
    tokens = patches + 1
    h, w = VIT_S["hidden"], VIT_S["mlp"]
    per_layer = 2 * tokens * h * 4 * h + 2 * tokens * h * w * 2 + 4 * tokens * tokens * h
    return (2 * patches * 3 * patch * patch * h + VIT_S["layers"] * per_layer) / 1e9


def size_label(size_yx: tuple[int, int]) -> str:
    """'1024²' for squares, '3050x2933' otherwise."""
    return f"{size_yx[0]}²" if size_yx[0] == size_yx[1] else f"{size_yx[0]}x{size_yx[1]}"


# ======================================================================================================
# adapters: the one place that knows which project API each measurement calls

API = {
    "best_live": "core.live.live_click (linear classifier on the slice's memoised pixel features)",
    "best_forest": "core.live.refine_click (build_scorer + Scorer.segment, the forest, stack PCA basis)",
    "preview": "build_scorer(preview config, as ui.segment.preview_scores) + Scorer.score_map",
    "thesis": "build_scorer(thesis) + Scorer.segment",
    "slice_preparation": "core.live.prepare_slice (the slice's standardised pixel features, the stack's PCA basis)",
    "stack_preparation": "SliceEmbedder(...) (stack intensity range) + SliceEmbedder.pixel_statistics",
    "background_preparation": "SliceEmbedder.warm_up_pixels + core.live.warm_up_slice, as pages/1_Segment.py",
    "slice_change": "core.io.preview.view_plane (pyramid preview + background decode; z-chunk cache)",
    "vit_fraction": "bench/bench_backbones.py interleaved_fractions (980², matmul rate in the compute dtype)",
}


def preview_config(config: PipelineConfig) -> PipelineConfig:
    """The patch-level preview best mode shows for positive points alone (mirrors ui.segment.preview_config; ui is
    not imported)."""
    import dataclasses

    return dataclasses.replace(config, pixel_classifier="none", patch_components=0, upsampling=Upsampling.NEAREST,
                               threshold=ThresholdSpec("top", 10.0), z_sigma=0.0, cleanup=Cleanup())


class BestModeClicks:
    """Best mode's per-click calls on one slice of one embedder: the live step, the refinement, the patch preview."""

    def __init__(self, embedder: SliceEmbedder, z: int, config: PipelineConfig) -> None:
        self.embedder, self.z, self.config = embedder, z, config
        self.last_timings: dict[str, float] = {}

    def prepare_slice(self) -> None:
        """Per-slice work after the embedding and before the first mask (the page starts it in the background)."""
        live.prepare_slice(self.embedder, self.z, self.config)

    def live(self, points: PointSet) -> np.ndarray:
        """Points -> (Y, X) bool mask by the live step; its own step timings (ms) in `last_timings`."""
        result = live.live_click(self.embedder, points, self.config, self.z)
        self.last_timings = dict(result.timings)
        return result.mask

    def refine(self, points: PointSet) -> np.ndarray:
        """Points -> (Y, X) bool mask by the forest refinement."""
        return live.refine_click(self.embedder, points, self.config, self.z).mask

    def preview(self, points: PointSet) -> np.ndarray:
        """Points -> (h, w) patch-grid preview scores."""
        return build_scorer(self.embedder, points, preview_config(self.config)).score_map(self.embedder, self.z)


def thesis_click(embedder: SliceEmbedder, z: int, points: PointSet, config: PipelineConfig) -> np.ndarray:
    return build_scorer(embedder, points, config).segment(embedder, z).mask


def prepare_stack(embedder: SliceEmbedder, config: PipelineConfig) -> None:
    """Best mode's once-per-stack work beyond the intensity range (blocking)."""
    embedder.pixel_statistics(config.pixel_max_side)


def start_background_preparation(embedder: SliceEmbedder, z: int, config: PipelineConfig) -> None:
    """What the Segment page starts once slice z is embedded: the stack's statistics and the slice's features."""
    embedder.warm_up_pixels(config.pixel_max_side)
    live.warm_up_slice(embedder, z, config)


def slice_change(stack, z: int, neighbour: int) -> dict:
    """Move to slice z (its z-chunk not decoded), wait for the full plane, then move to `neighbour` (same z-chunk)."""
    start = time.perf_counter()
    view = view_plane(stack, z)
    first_image = time.perf_counter()
    full = view.image if view.full else view.loading.result()
    full_plane = time.perf_counter()
    again = view_plane(stack, neighbour)
    decoded = time.perf_counter()
    return {"first_image_s": first_image - start, "first_image_level": view.level,
            "first_image_shape": list(view.image.shape), "cold_full_s": full_plane - start,
            "chunk_decoded_s": decoded - full_plane, "chunk_decoded_full": bool(again.full),
            "plane_shape": list(full.shape)}


def vit_fractions(backbones: list, first: bool) -> list[dict]:
    """One interleaved round of [matmul rate in the compute dtype, one 980² forward] per backbone, twice: with all
    cores on the wall clock (what a user gets), then with one torch thread on the process CPU clock (what a loaded
    shared machine cannot distort: other jobs' time slices count neither in the forward nor in the matmul)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_backbones", ROOT / "bench" / "bench_backbones.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = [(r, "wall") for r in module.interleaved_fractions(backbones, (980,), repeats=1,
                                                                 warmup=1 if first else 0)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results += [(r, "cpu") for r in module.interleaved_fractions(backbones, (980,), repeats=1, warmup=0,
                                                                     clock="cpu")]
    finally:
        torch.set_num_threads(threads)
    return [{"precision": r["precision"], "clock": clock, "threads": r["threads"], "forward_s": r["sizes"][0]["forward_s"],
             "gflop": r["sizes"][0]["gflop"], "achieved_gflops": r["sizes"][0]["achieved_gflops_per_s"],
             "mm_gflops": r["sizes"][0]["matmul_gflops_per_s"], "mm_dtype": r["matmul_dtype"],
             "fraction": r["sizes"][0]["fraction"]} for r, clock in results]


# ======================================================================================================
# Protoscope measurements (in this process)


def points_for(added: int, z: int = Z) -> PointSet:
    positive = POSITIVE + ADDED[:added]
    return PointSet(np.array([(x, y, z) for x, y in positive]), np.array([(x, y, z) for x, y in NEGATIVE]))


def _timed(function: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


class Protoscope:
    """Holds the backbones and the work folder; each method runs one measurement and returns its sample."""

    def __init__(self, work: Path, run: Path, source: np.ndarray) -> None:
        import torch

        from core.devices import default_precision
        from core.features.backbones import get_backbone

        torch.set_num_threads(os.cpu_count() or 1)
        self.work, self.run, self.source = work, run, source
        self.default_precision = default_precision(torch.device("cpu"))
        self.vit = get_backbone("dinov2_vits14", "random", precision=self.default_precision)
        self._get_backbone = get_backbone
        self.versions = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                         "default_precision": self.default_precision, "backbone": self.vit.label()}

    def fresh_cache(self) -> EmbeddingCache:
        return EmbeddingCache(self.run / "cache" / uuid.uuid4().hex[:8])

    def stack_path(self, size_yx: tuple[int, int]) -> Path:
        """The vesselNN volume tiled to (Z, *size_yx) as an ImageJ TIFF (written once per work folder)."""
        import tifffile

        path = self.work / "data" / f"vesselnn_tiled_{size_yx[0]}x{size_yx[1]}.tif"
        if not path.exists():
            with atomic_output(path, overwrite=True) as tmp:
                tifffile.imwrite(tmp, tiled(self.source, size_yx), imagej=True, metadata={"axes": "ZYX"})
        return path

    def best_session(self, size_yx: tuple[int, int], clicks: int) -> dict:
        """New embedder on the tiled stack -> per-stack preparation -> embed slice Z -> first live click (TTFH)
        -> `clicks` clicks, each: preview, live step, forest refinement."""
        config = PipelineConfig.best()
        stack = open_stack(self.stack_path(size_yx))
        try:
            range_s, embedder = _timed(lambda: SliceEmbedder(stack, 0, self.vit, config.preprocess,
                                                             cache=self.fresh_cache()))
            stats_s, _ = _timed(lambda: prepare_stack(embedder, config))
            session = BestModeClicks(embedder, Z, config)
            start = time.perf_counter()
            embed_s, embedding = _timed(lambda: embedder.embed(Z))
            slice_s, _ = _timed(session.prepare_slice)
            first_live_s, mask = _timed(lambda: session.live(points_for(0)))
            ttfh_s = time.perf_counter() - start
            first_live_timings = session.last_timings
            first_forest_s, _ = _timed(lambda: session.refine(points_for(0)))
            first_preview_s, grid = _timed(lambda: session.preview(points_for(0)))
            later = []
            for k in range(1, clicks + 1):
                points = points_for(k)
                preview_s, _ = _timed(lambda: session.preview(points))
                live_s, live_mask = _timed(lambda: session.live(points))
                live_timings = session.last_timings
                forest_s, forest_mask = _timed(lambda: session.refine(points))
                later.append({"preview_s": preview_s, "live_s": live_s, "forest_s": forest_s,
                              "live_timings_ms": live_timings, "live_dice_vs_forest": dice(live_mask, forest_mask),
                              "live_fraction": float(live_mask.mean()), "forest_fraction": float(forest_mask.mean())})
            raw = embedder.raw(Z)
            return {"system": "protoscope", "mode": "best", "size": list(size_yx), "stack_range_s": range_s,
                    "pixel_stats_s": stats_s, "embed_s": embed_s, "prepare_slice_s": slice_s,
                    "first_live_s": first_live_s, "first_live_timings_ms": first_live_timings, "ttfh_s": ttfh_s, "first_forest_s": first_forest_s,
                    "first_preview_s": first_preview_s, "clicks": later, "embedding_shape": list(embedding.shape),
                    "mask_shape": list(mask.shape), "preview_shape": list(grid.shape),
                    "slice_sha": _sha(raw)}
        finally:
            stack.close()
            gc.collect()

    def thesis_session(self, size_yx: tuple[int, int], clicks: int) -> dict:
        config = PipelineConfig.thesis()
        stack = open_stack(self.stack_path(size_yx))
        try:
            embedder = SliceEmbedder(stack, 0, self.vit, config.preprocess, cache=self.fresh_cache())
            embed_s, _ = _timed(lambda: embedder.embed(Z))
            first_s, _ = _timed(lambda: thesis_click(embedder, Z, points_for(0), config))
            later = [_timed(lambda k=k: thesis_click(embedder, Z, points_for(k), config))[0] for k in range(1, clicks + 1)]
            return {"system": "protoscope", "mode": "thesis", "size": list(size_yx), "embed_s": embed_s,
                    "first_click_s": first_s, "clicks": [{"click_s": s} for s in later]}
        finally:
            stack.close()
            gc.collect()

    def fresh_link(self, ims: Path) -> Path:
        """A new name for the .ims (a hard link, else a copy): a never-seen stack to every path-keyed cache."""
        link = self.run / "stacks" / f"new_{uuid.uuid4().hex[:8]}.ims"
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(ims, link)
        except OSError:
            shutil.copyfile(ims, link)
        return link

    def new_stack(self, ims: Path) -> dict:
        """Open a never-seen .ims (stack range), embed slice IMS_Z, start the page's background work, first live mask."""
        config = PipelineConfig.best()
        start = time.perf_counter()
        stack = open_stack(self.fresh_link(ims))
        try:
            embedder = SliceEmbedder(stack, 0, self.vit, config.preprocess, cache=self.fresh_cache())
            ready = time.perf_counter()
            embedder.embed(IMS_Z)
            embedded = time.perf_counter()
            start_background_preparation(embedder, IMS_Z, config)
            session = BestModeClicks(embedder, IMS_Z, config)
            mask = session.live(points_for(0, IMS_Z))  # waits for the background work it needs
            done = time.perf_counter()
            return {"open_to_ready_s": ready - start, "embed_s": embedded - ready,
                    "first_mask_after_embed_s": done - embedded, "open_to_first_mask_s": done - start,
                    "first_live_timings_ms": session.last_timings, "mask_fraction": float(mask.mean()),
                    "mask_shape": list(mask.shape)}
        finally:
            stack.close()
            gc.collect()

    def slice_change(self, ims: Path) -> dict:
        """On a freshly opened .ims: slice 3 (its z-chunk not decoded) to its full plane, then slice 4 (decoded)."""
        stack = open_stack(self.fresh_link(ims))
        try:
            return slice_change(stack, 3, 4)
        finally:
            stack.close()
            gc.collect()

    def vit_round(self, first: bool) -> list[dict]:
        """ViT-S/14 random at 980² in fp32 and the default precision: fraction of the matmul rate (one round)."""
        backbones = [self._get_backbone("dinov2_vits14", "random", precision=p)
                     for p in sorted({"fp32", self.default_precision})]
        return vit_fractions(backbones, first)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _sha(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()[:12]


# ======================================================================================================
# DINOSim (its own venv, a long-lived worker process: bench/peers_dinosim.py)


class DinosimWorker:
    """One JSON request per line to bench/peers_dinosim.py running under DINOSim's python; answers parsed."""

    def __init__(self, python: str, log: Path) -> None:
        self.log = open(log, "w")
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen([python, str(DINOSIM_WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, cwd=str(log.parent))
        self.log_path = log

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the DINOSim worker died; see {self.log_path}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"DINOSim: {answer.get('error')}")
        return answer

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - a stuck worker is killed
            self.proc.kill()
        self.log.close()


def start_dinosim(python: str | None, work: Path) -> tuple[DinosimWorker | None, str]:
    """(worker, '') when DINOSim's python answers `info`, else (None, why it is skipped)."""
    if python is None:
        if not DEFAULT_DSIM_PYTHON.exists():
            return None, (f"no --dsim-python given and {DEFAULT_DSIM_PYTHON} does not exist (set-up recipe: "
                          "bench/peers_dinosim.py)")
        python = str(DEFAULT_DSIM_PYTHON)
    if not Path(python).exists():
        return None, f"--dsim-python {python} does not exist"
    worker = DinosimWorker(python, work / "worker_dinosim.log")
    try:
        worker.info = worker.ask(cmd="info")
    except Exception as error:  # noqa: BLE001 - DINOSim is optional; say why and go on
        worker.close()
        return None, f"the DINOSim worker did not start ({error}); see {work / 'worker_dinosim.log'}"
    return worker, ""


def dinosim_request(size_yx: tuple[int, int], clicks: int) -> dict:
    return {"cmd": "session", "image": str(IMAGE.resolve()), "z": Z, "size": list(size_yx),
            "positive": POSITIVE, "added": ADDED, "clicks": clicks}


# ======================================================================================================
# orchestration


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_facts() -> dict:
    flags, model = set(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
    return {"model": model, "cores": os.cpu_count(), **{f: f in flags for f in wanted}}


def ensure_ims(work: Path, source: np.ndarray | None) -> tuple[Path, float | None]:
    """The chunked (64, 3050, 2933) .ims in the work folder, generated when absent or of another generator.

    Planes: the vesselNN volume's planes (cycled over z) tiled to 3050 x 2933, scaled to uint16 (x 8 + 300)
    plus uniform noise 0..63, so that the clicked points mean the same and gzip sees noisy data.
    Returns (path, seconds spent generating, or None when reused).
    """
    path = work / "data" / "chunked_3050x2933x64.ims"
    tag = path.with_suffix(".generator")
    if path.exists() and tag.exists() and tag.read_text() == IMS_GENERATOR:
        return path, None

    def plane_of(z: int) -> np.ndarray:
        if source is None:
            return synthetic_plane(z, IMS_SHAPE[1:])
        rng = np.random.default_rng(z)
        plane = tiled(source[z % len(source)], IMS_SHAPE[1:]).astype(np.uint16) * 8 + 300
        return plane + rng.integers(0, 64, IMS_SHAPE[1:], dtype=np.uint16)

    start = time.perf_counter()
    write_chunked_ims(path, IMS_SHAPE, plane_of)
    write_text(tag, IMS_GENERATOR, overwrite=True)
    return path, time.perf_counter() - start


def run_bench(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    run_dir = work / f"run-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    import tifffile

    source = tifffile.imread(IMAGE) if IMAGE.exists() else None
    if source is None:
        raise SystemExit(f"error: {IMAGE} is absent; the benchmark clicks on the vesselNN slice (../shared/data)")
    run: dict = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
                 "quick": args.quick, "rounds": args.rounds, "clicks": args.clicks, "cpu": cpu_facts(),
                 "platform": platform.platform(), "python": platform.python_version(), "api": API,
                 "loadavg": {"start": loadavg()}, "best": [], "thesis": [], "dinosim": [], "new_stack": [],
                 "slice_change": [], "vit": [], "warmup": {}}
    print(f"bench_live: {'quick' if args.quick else 'full'} run, {args.rounds} round(s), {args.clicks} clicks; "
          f"loadavg {run['loadavg']['start']}; work folder {work}", flush=True)
    ims, generated_s = ensure_ims(work, source)
    run["ims"] = {"path": str(ims), "shape_zyx": list(IMS_SHAPE), "chunks": list(IMS_CHUNKS),
                  "levels": [list(s) for s in imaris_level_shapes(IMS_SHAPE, 2)], "generated_s": generated_s,
                  "bytes": ims.stat().st_size}
    print(f"  .ims {IMS_SHAPE} {'generated in %.0f s' % generated_s if generated_s else 'reused'} "
          f"({ims.stat().st_size / 1e6:.0f} MB)", flush=True)

    proto = Protoscope(work, run_dir, source)
    run["protoscope"] = proto.versions
    dsim, why = start_dinosim(args.dsim_python, run_dir)
    if dsim is None:
        print(f"DINOSim skipped: {why}; its ratios print as n/a", flush=True)
        run["dinosim_skipped"] = why
    else:
        run["dinosim_info"] = dsim.info
    sizes = [(s, s) for s in SQUARE_SIZES] + [LARGE]
    try:
        # warm-up (discarded): kernels, imports, the first sklearn/torch calls of each system
        run["warmup"]["protoscope_s"] = _timed(lambda: proto.best_session((512, 512), 1))[0]
        if dsim is not None:
            run["warmup"]["dinosim_s"] = dsim.ask(cmd="warmup", image=str(IMAGE.resolve()), z=Z, positive=POSITIVE,
                                                  added=ADDED)["warmup_s"]
        for size in sizes:
            proto.stack_path(size)  # write the tiled stacks before timing
        pair = 0
        for rnd in range(1, args.rounds + 1):
            print(f"--- round {rnd}/{args.rounds}  loadavg {loadavg()}", flush=True)
            for size in sizes:
                jobs = [("P", lambda: proto.best_session(size, args.clicks))]
                if dsim is not None and size[0] == size[1]:
                    jobs.append(("D", lambda: dsim.ask(**dinosim_request(size, args.clicks))))
                    if pair % 2:
                        jobs.reverse()
                    pair += 1
                for who, job in jobs:
                    sample = job()
                    sample.update(round=rnd, pair=pair)
                    (run["best"] if who == "P" else run["dinosim"]).append(sample)
                    print_session(sample, rnd)
            for size in sizes:
                sample = proto.thesis_session(size, args.clicks)
                sample["round"] = rnd
                run["thesis"].append(sample)
                print(f"  r{rnd} {size_label(size):10s} P thesis  embed {sample['embed_s']:.2f} s, first click "
                      f"{sample['first_click_s'] * 1000:.0f} ms, clicks {[round(c['click_s'] * 1000) for c in sample['clicks']]} ms",
                      flush=True)
            sample = proto.new_stack(ims)
            sample["round"] = rnd
            run["new_stack"].append(sample)
            print(f"  r{rnd} new stack .ims  open->ready {sample['open_to_ready_s']:.1f} s, embed {sample['embed_s']:.1f} s, "
                  f"first mask after embedding {sample['first_mask_after_embed_s']:.2f} s", flush=True)
            for _ in range(1 if args.quick else 2):
                sample = proto.slice_change(ims)
                sample["round"] = rnd
                run["slice_change"].append(sample)
                print(f"  r{rnd} slice change  first image {sample['first_image_s']:.3f} s (level {sample['first_image_level']}, "
                      f"{sample['first_image_shape']}), full plane {sample['cold_full_s']:.2f} s, plane in the decoded "
                      f"z-chunk {sample['chunk_decoded_s']:.3f} s", flush=True)
            for sample in proto.vit_round(first=rnd == 1):
                sample["round"] = rnd
                run["vit"].append(sample)
                print(f"  r{rnd} ViT-S/14 980² {sample['precision']} ({sample['threads']} thread(s), {sample['clock']} clock): "
                      f"{sample['forward_s']:.2f} s, "
                      f"{sample['achieved_gflops']:.0f} GFLOP/s = {sample['fraction']:.2f} of {sample['mm_dtype']} mm "
                      f"{sample['mm_gflops']:.0f}", flush=True)
    finally:
        if dsim is not None:
            dsim.close()
        run["loadavg"]["end"] = loadavg()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return run


def print_session(sample: dict, rnd: int) -> None:
    size = size_label(tuple(sample["size"]))
    if sample["system"] == "dinosim":
        print(f"  r{rnd} {size:10s} DINOSim   embed {sample['embed_s']:.2f} s, first click {sample['first']['mask_s']:.2f} s, "
              f"clicks {[round(c['mask_s'] * 1000) for c in sample['clicks']]} ms", flush=True)
        return
    clicks = sample["clicks"]
    print(f"  r{rnd} {size:10s} P best    prep {sample['stack_range_s'] + sample['pixel_stats_s']:.1f} s, embed "
          f"{sample['embed_s']:.2f} s, TTFH {sample['ttfh_s']:.2f} s; clicks live {[round(c['live_s'] * 1000) for c in clicks]}"
          f" forest {[round(c['forest_s'] * 1000) for c in clicks]} preview {[round(c['preview_s'] * 1000) for c in clicks]} ms",
          flush=True)


# ======================================================================================================
# summary


NEW_STACK_KEYS = ("open_to_ready_s", "embed_s", "first_mask_after_embed_s", "open_to_first_mask_s")
SLICE_CHANGE_KEYS = ("first_image_s", "cold_full_s", "chunk_decoded_s")


def summarize(run: dict) -> dict:
    """Medians per size and measurement, the DINOSim ratios, and the last line's numbers."""
    out: dict = {"sizes": {}}
    for size in [(s, s) for s in SQUARE_SIZES] + [LARGE]:
        best = [s for s in run["best"] if tuple(s["size"]) == size]
        thesis = [s for s in run["thesis"] if tuple(s["size"]) == size]
        dsim = [s for s in run["dinosim"] if tuple(s["size"]) == size]
        row = {
            "best_live_ms": median(c["live_s"] * 1000 for s in best for c in s["clicks"]),
            "best_forest_ms": median(c["forest_s"] * 1000 for s in best for c in s["clicks"]),
            "preview_ms": median(c["preview_s"] * 1000 for s in best for c in s["clicks"]),
            "thesis_ms": median(c["click_s"] * 1000 for s in thesis for c in s["clicks"]),
            "ttfh_s": median(s["ttfh_s"] for s in best),
            "embed_s": median(s["embed_s"] for s in best),
            "first_live_s": median(s["first_live_s"] for s in best),
            "stack_range_s": median(s["stack_range_s"] for s in best),
            "pixel_stats_s": median(s["pixel_stats_s"] for s in best),
            "thesis_ttfh_s": median(s["embed_s"] + s["first_click_s"] for s in thesis),
            "dinosim_ttfh_s": median(s["embed_s"] + s["first"]["mask_s"] for s in dsim),
            "dinosim_click_ms": median(c["mask_s"] * 1000 for s in dsim for c in s["clicks"]),
            "dinosim_embed_s": median(s["embed_s"] for s in dsim),
            "live_dice_vs_forest": median(c["live_dice_vs_forest"] for s in best for c in s["clicks"]),
        }
        row["ttfh_ratio"] = ratio_text(row["ttfh_s"], row["dinosim_ttfh_s"])
        row["click_ratio"] = ratio_text(row["best_live_ms"], row["dinosim_click_ms"])
        partner = {s["pair"]: s for s in dsim if "pair" in s}
        pairs = [(s, partner[s["pair"]]) for s in best if s.get("pair") in partner]
        row["paired_ttfh_ratios"] = [p["ttfh_s"] / (d["embed_s"] + d["first"]["mask_s"]) for p, d in pairs]
        row["paired_click_ratios"] = [median(c["live_s"] for c in p["clicks"]) / median(c["mask_s"] for c in d["clicks"])
                                      for p, d in pairs if p["clicks"] and d["clicks"]]
        out["sizes"][size_label(size)] = row
    out["new_stack"] = {key: median(s[key] for s in run["new_stack"]) for key in NEW_STACK_KEYS}
    out["slice_change"] = {key: median(s[key] for s in run["slice_change"]) for key in SLICE_CHANGE_KEYS}
    out["vit"] = {}
    for precision, clock in sorted({(s["precision"], s.get("clock", "wall")) for s in run["vit"]}):
        samples = [s for s in run["vit"] if s["precision"] == precision and s.get("clock", "wall") == clock]
        out["vit"][f"{precision} {clock}"] = {"forward_s": median(s["forward_s"] for s in samples),
                                 "mm_gflops": median(s["mm_gflops"] for s in samples),
                                 "fraction": median(s["fraction"] for s in samples)}
    at_1024, large = out["sizes"]["1024²"], out["sizes"][size_label(LARGE)]
    out["last_line"] = last_line(at_1024["best_live_ms"], large["best_live_ms"],
                                 out["new_stack"]["first_mask_after_embed_s"], at_1024["ttfh_ratio"],
                                 at_1024["click_ratio"])
    return out


def _cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tables(run: dict, summary: dict) -> str:
    lines = [f"loadavg start {run['loadavg']['start']}, end {run['loadavg'].get('end')}; CPU {run['cpu']['model']} "
             f"({run['cpu']['cores']} cores); Protoscope {run['protoscope']['backbone']} (torch "
             f"{run['protoscope']['torch']}); DINOSim " + (
                 f"napari-dinosim {run['dinosim_info']['napari_dinosim']}, torch {run['dinosim_info']['torch']}, ViT-S/14 "
                 f"random fp32, {run['dinosim_info']['attn_implementation']} attention" if run.get("dinosim_info")
                 else "skipped"), ""]
    lines.append("Click latency, server side, embeddings cached: median ms [min-max] over rounds x clicks")
    lines.append("| size | thesis | best live step | best forest refinement | patch preview | DINOSim click | "
                 "live / DINOSim | Dice live vs forest |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for size in [(s, s) for s in SQUARE_SIZES] + [LARGE]:
        label = size_label(size)
        best = [s for s in run["best"] if tuple(s["size"]) == size]
        thesis = [s for s in run["thesis"] if tuple(s["size"]) == size]
        dsim = [s for s in run["dinosim"] if tuple(s["size"]) == size]
        row = summary["sizes"][label]
        agreement = row["live_dice_vs_forest"]
        lines.append(f"| {label} | {spread([c['click_s'] for s in thesis for c in s['clicks']], 1000)} | "
                     f"{spread([c['live_s'] for s in best for c in s['clicks']], 1000)} | "
                     f"{spread([c['forest_s'] for s in best for c in s['clicks']], 1000)} | "
                     f"{spread([c['preview_s'] for s in best for c in s['clicks']], 1000)} | "
                     f"{spread([c['mask_s'] for s in dsim for c in s['clicks']], 1000) if dsim else 'n/a'} | "
                     f"{row['click_ratio'] if dsim else 'n/a'} | {'-' if agreement is None else f'{agreement:.3f}'} |")
    steps = ("basis", "examples", "fit", "score", "mask")
    for size in [(s, s) for s in SQUARE_SIZES] + [LARGE]:
        timings = [c.get("live_timings_ms") or {} for s in run["best"] if tuple(s["size"]) == size for c in s["clicks"]]
        if timings:
            lines.append(f"  live step at {size_label(size)}, median ms per step: " + ", ".join(
                f"{step} {_cell(median(t.get(step) for t in timings), 1)}" for step in steps))
    lines.append("")
    lines.append("Time to first heatmap (model loaded, stack open and prepared): median s [min-max]")
    lines.append("| size | Protoscope best: embed + first live mask | of it embed | of it slice features | "
                 "thesis: embed + first mask | DINOSim: embed + first mask | best / DINOSim | "
                 "per-stack prep: range + pixel stats |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for size in [(s, s) for s in SQUARE_SIZES] + [LARGE]:
        label = size_label(size)
        best = [s for s in run["best"] if tuple(s["size"]) == size]
        thesis = [s for s in run["thesis"] if tuple(s["size"]) == size]
        dsim = [s for s in run["dinosim"] if tuple(s["size"]) == size]
        lines.append(f"| {label} | {spread([s['ttfh_s'] for s in best], digits=2)} | "
                     f"{spread([s['embed_s'] for s in best], digits=2)} | "
                     f"{spread([s['prepare_slice_s'] for s in best], digits=2)} | "
                     f"{spread([s['embed_s'] + s['first_click_s'] for s in thesis], digits=2)} | "
                     f"{spread([s['embed_s'] + s['first']['mask_s'] for s in dsim], digits=2) if dsim else 'n/a'} | "
                     f"{summary['sizes'][label]['ttfh_ratio'] if dsim else 'n/a'} | "
                     f"{spread([s['stack_range_s'] for s in best], digits=1)} + "
                     f"{spread([s['pixel_stats_s'] for s in best], digits=1)} |")
    lines.append("")
    ns = run["new_stack"]
    lines.append(f"First mask on a never-seen chunked .ims {IMS_SHAPE[1]}x{IMS_SHAPE[2]}x{IMS_SHAPE[0]} (slice {IMS_Z}), "
                 "median s [min-max]")
    lines.append("| open -> ready to embed (intensity range) | embed | embedding end -> first live mask | "
                 "open -> first mask |")
    lines.append("|---|---|---|---|")
    lines.append("| " + " | ".join(spread([s[k] for s in ns], digits=2) for k in NEW_STACK_KEYS) + " |")
    lines.append("")
    sc = run["slice_change"]
    shape = f"level {sc[0]['first_image_level']}, {sc[0]['first_image_shape']}" if sc else "?"
    lines.append("Slice change on the chunked .ims (freshly opened), median s [min-max]")
    lines.append("| first image (pyramid preview) | full-resolution plane, z-chunk not decoded | "
                 "full-resolution plane, z-chunk decoded |")
    lines.append("|---|---|---|")
    lines.append(f"| {spread([s['first_image_s'] for s in sc], digits=3)} ({shape}) | "
                 f"{spread([s['cold_full_s'] for s in sc], digits=2)} | {spread([s['chunk_decoded_s'] for s in sc], digits=3)} |")
    lines.append("")
    lines.append(f"ViT-S/14 at 980² ({vit_gflops(980):.0f} GFLOP analytic) against a 2048² torch.mm in its compute dtype "
                 "just before")
    lines.append("| precision | threads, clock | forward s | achieved GFLOP/s | mm GFLOP/s | fraction of mm |")
    lines.append("|---|---|---|---|---|---|")
    for key, row in summary["vit"].items():
        precision, clock = key.split(" ")
        samples = [s for s in run["vit"] if s["precision"] == precision and s.get("clock", "wall") == clock]
        lines.append(f"| {precision} | {samples[0].get('threads', '?')}, {clock} | "
                     f"{spread([s['forward_s'] for s in samples], digits=2)} | "
                     f"{_cell(median(s['achieved_gflops'] for s in samples))} | {_cell(row['mm_gflops'])} | "
                     f"{_cell(row['fraction'], 2)} |")
    lines.append("")
    lines.append("APIs measured: " + "; ".join(f"{k}: {v}" for k, v in run["api"].items()))
    if run.get("dinosim_skipped"):
        lines.append(f"DINOSim skipped: {run['dinosim_skipped']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed round, 3 clicks (under 15 min on 2 cores)")
    parser.add_argument("--dsim-python", default=None,
                        help=f"DINOSim venv's python (default: {DEFAULT_DSIM_PYTHON} when it exists, else DINOSim is "
                             "skipped)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; --quick 1)")
    parser.add_argument("--clicks", type=int, default=None, help="clicks per session after the first (default 5; "
                        "--quick 3)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "protoscope-bench-live"),
                        help="work folder: generated stacks (kept), caches of this run (removed)")
    parser.add_argument("--keep", action="store_true", help="keep this run's caches and worker log in --work")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.clicks = min(len(ADDED), args.clicks or (3 if args.quick else 5))
    start = time.perf_counter()
    run = run_bench(args)
    run["summary"] = summarize(run)
    run["wall_s"] = time.perf_counter() - start
    write_text(args.out, json.dumps(run, indent=1), overwrite=True)
    print(tables(run, run["summary"]))
    print(f"wall {run['wall_s'] / 60:.1f} min; wrote {args.out}")
    print(run["summary"]["last_line"])


if __name__ == "__main__":
    main()
