"""Scale-out on Dask: one process versus 1 and 2 local workers (core.cluster), speed-up and memory per worker.

Run from the repository root:  .venv/bin/python bench/bench_scale.py [--shape 48 512 512] [--repeats 3]
    [--backbone filterbank | dinov2_vits14 (random weights: timing only)] [--mode best|thesis] [--image-size 448]

Writes a synthetic stack (core.demo's vessels) and a prototype built on it, then applies the prototype to every
slice into OME-Zarr, timed:
- ``here``: ``run_apply_here`` in this process (torch and BLAS with their usual threads);
- ``workers=1`` and ``workers=2``: ``submit_apply`` on a ``LocalCluster`` of one-thread workers, each started once
  and warmed up (backbone loaded, scorer fitted) on a few slices before the timed runs, so the figures are steady
  throughput; the start-up is reported apart.
Runs are interleaved (here, 1, 2, 2, 1, here, ...) and their medians compared, since other jobs share this
machine; the CPU seconds of each run (this process, or summed over the workers) are recorded beside the wall
time, because on a machine loaded by other jobs the wall time measures the share of the cores a run got. Peak resident memory per worker process (``ru_maxrss``) is read from the workers after the runs. It also
times writing 2048 x 1725 mask slices into an OME-Zarr output (all pyramid levels), the cost a block adds per slice,
and the CPU work per 2048 x 1725 slice around the backbone (best mode's pixel branch, thesis mode's scoring).
Prints a table and writes bench/results/scale.json (``core.io.atomic``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.batch import apply_prototype  # noqa: E402
from core.cluster import BackboneRecipe, Cluster, prepare_apply, run_apply_here, submit_apply  # noqa: E402
from core.config import PipelineConfig  # noqa: E402
from core.demo import make_demo  # noqa: E402
from core.features.backbones import load_backbone  # noqa: E402
from core.features.embedding import SliceEmbedder  # noqa: E402
from core.io import VoxelSize, open_stack  # noqa: E402
from core.io.atomic import write_text  # noqa: E402
from core.io.ome_zarr import MaskStore  # noqa: E402
from core.pipeline import build_prototype  # noqa: E402
from core.prototypes import PointSet  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scale.json"


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_sample(folder: Path, shape: tuple[int, int, int]) -> tuple[Path, dict]:
    image, truth = make_demo(shape=shape, seed=11)
    path = folder / "sample.tif"
    tifffile.imwrite(path, image[:, None], imagej=True, resolution=(1 / 0.8, 1 / 0.8),
                     metadata={"axes": "ZCYX", "spacing": 2.0, "unit": "um"})
    z = shape[0] // 2
    rows, cols = np.nonzero(truth[z])
    back_rows, back_cols = np.nonzero(truth[z] == 0)
    pick = np.linspace(0, len(rows) - 1, 8).astype(int)
    pick_back = np.linspace(0, len(back_rows) - 1, 8).astype(int)
    points = {"positive": [[int(cols[i]), int(rows[i]), z] for i in pick],
              "negative": [[int(back_cols[i]), int(back_rows[i]), z] for i in pick_back]}
    return path, points


class Bench:
    def __init__(self, folder: Path, stack_path: Path, points: dict, args: argparse.Namespace) -> None:
        self.folder = folder
        self.stack_path = stack_path
        weights = "random" if args.backbone != "filterbank" else "hub"
        self.recipe = BackboneRecipe(args.backbone, weights, 0, None, "cpu" if args.backbone != "filterbank" else None)
        self.backbone = self.recipe.load()
        self.config = PipelineConfig.for_mode(args.mode).with_options(image_size=args.image_size)
        with open_stack(stack_path) as stack:
            embedder = SliceEmbedder(stack, 0, self.backbone, self.config.preprocess)
            self.prototype = build_prototype(embedder, PointSet.from_dict(points), self.config)
            self.n_slices = stack.shape[0]
        self.block_slices = args.block_slices
        self.count = 0

    def target(self, z_values):
        self.count += 1
        out = self.folder / f"run{self.count}.ome.zarr"
        with open_stack(self.stack_path) as stack:
            embedder = SliceEmbedder(stack, 0, self.backbone, self.config.preprocess)
            return prepare_apply(embedder, self.prototype, out, z_values=z_values, backbone=self.recipe,
                                 block_slices=self.block_slices)

    def here(self) -> tuple[float, float]:
        """(wall s, CPU s of this process) of one run here."""
        target = self.target(range(self.n_slices))
        start, cpu = time.perf_counter(), time.process_time()
        run_apply_here([target], backbone=self.backbone)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        shutil.rmtree(target.store.path)
        return seconds, cpu_seconds

    def on(self, cluster: Cluster, z_values=None) -> tuple[float, float]:
        """(wall s, CPU s summed over the workers) of one run on the cluster."""
        target = self.target(range(self.n_slices) if z_values is None else z_values)
        cpu = cluster.client.run(time.process_time)
        start = time.perf_counter()
        submit_apply([target], cluster).wait()
        seconds = time.perf_counter() - start
        cpu_seconds = sum(value - cpu[key] for key, value in cluster.client.run(time.process_time).items())
        shutil.rmtree(target.store.path)
        return seconds, cpu_seconds


def mask_write_seconds(folder: Path, slices: int = 16, shape_yx: tuple[int, int] = (2048, 1725)) -> float:
    """Seconds per slice to write 0/255 masks (about 20 % foreground, smooth) of `shape_yx` into an OME-Zarr store,
    eight slices (one chunk depth) at a time, every pyramid level."""
    store = MaskStore.create(folder / "write.ome.zarr", shape_zyx=(slices, *shape_yx), block_slices=8,
                             identity={}, voxel_size=VoxelSize(1.0, 1.0, 2.0))
    yy, xx = np.mgrid[: shape_yx[0], : shape_yx[1]]
    masks = (np.sin(yy / 37.0) * np.cos(xx / 53.0) > 0.6)[None].repeat(8, 0)
    start = time.perf_counter()
    for z0 in range(0, slices, 8):
        store.write_slices(z0, masks)
    return (time.perf_counter() - start) / slices


def slice_parts(folder: Path, shape_yx: tuple[int, int] = (2048, 1725), slices: int = 3) -> dict:
    """Seconds per slice of the CPU work a worker does around the backbone, on slices of the thesis samples' size:
    best mode's pixel branch (filter features at 1024 px, the forest, upsampling, threshold) and thesis mode's
    scoring and nearest resize (the filter-bank embedding, which a GPU backbone replaces, timed apart)."""
    stack_path, points = write_sample(folder, (slices, *shape_yx))
    backbone = load_backbone("filterbank")
    parts = {}
    with open_stack(stack_path) as stack:
        for mode in ("best", "thesis"):
            config = PipelineConfig.for_mode(mode)
            prototype = build_prototype(SliceEmbedder(stack, 0, backbone, config.preprocess),
                                        PointSet.from_dict(points), config)
            embedder = SliceEmbedder(stack, 0, backbone, config.preprocess)
            embed_s = 0.0
            if config.uses_pixels:  # the stack's statistics are computed once per run, by the submitter
                embedder.pixel_statistics(config.pixel_max_side)
            if mode == "thesis":  # embed first, timed apart, so that apply times only what follows the backbone
                start = time.perf_counter()
                for z in range(slices):
                    embedder.embed(z)
                embed_s = (time.perf_counter() - start) / slices
            start, cpu = time.perf_counter(), time.process_time()
            apply_prototype(embedder, prototype, list(range(slices)), lambda z, mask: None)
            parts[mode] = {"s_per_slice_after_backbone": (time.perf_counter() - start) / slices,
                           "cpu_s_per_slice_after_backbone": (time.process_time() - cpu) / slices,
                           "filterbank_embed_s_per_slice": embed_s or None, "config": config.describe()}
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--backbone", default="filterbank")
    parser.add_argument("--mode", choices=("thesis", "best"), default="best")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--block-slices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-parts", dest="parts", action="store_false",
                        help="skip timing the per-slice CPU work on 2048 x 1725 slices")
    args = parser.parse_args()

    load_at_start = os.getloadavg()
    folder = Path(tempfile.mkdtemp(prefix="protoscope-bench-scale-"))
    try:
        stack_path, points = write_sample(folder, tuple(args.shape))
        bench = Bench(folder, stack_path, points, args)
        times: dict[str, list[float]] = {"here": [], "workers=1": [], "workers=2": []}
        cpu_times: dict[str, list[float]] = {key: [] for key in times}
        startup, memory = {}, {}
        clusters = {}
        try:
            for n in (1, 2):
                start = time.perf_counter()
                clusters[n] = Cluster(workers=n)
                bench.on(clusters[n], z_values=range(min(bench.n_slices, n * args.block_slices)))  # warm every worker
                startup[f"workers={n}"] = time.perf_counter() - start
            order = ["here", 1, 2, 2, 1]
            for repeat in range(args.repeats):
                for item in order if repeat % 2 == 0 else order[::-1]:
                    key = "here" if item == "here" else f"workers={item}"
                    seconds, cpu_seconds = bench.here() if item == "here" else bench.on(clusters[item])
                    times[key].append(seconds)
                    cpu_times[key].append(cpu_seconds)
                    print(f"  {key}: {seconds:.2f} s, {cpu_seconds:.2f} CPU s, load {os.getloadavg()[0]:.1f}",
                          file=sys.stderr)
            for n, cluster in clusters.items():
                memory[f"workers={n}"] = sorted(cluster.client.run(peak_rss_mb).values())
        finally:
            for cluster in clusters.values():
                cluster.close()
        memory["here"] = [peak_rss_mb()]
        write_s = mask_write_seconds(folder)
        parts = slice_parts(folder) if args.parts else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    medians = {key: statistics.median(values) for key, values in times.items()}
    rows = {}
    for key, values in times.items():
        rows[key] = {
            "s_median": medians[key],
            "s_runs": values,
            "s_per_slice": medians[key] / args.shape[0],
            "cpu_s_per_slice": statistics.median(cpu_times[key]) / args.shape[0],
            "speedup_vs_1_worker": medians["workers=1"] / medians[key],
            "peak_rss_mb_per_process": memory.get(key),
            "startup_s": startup.get(key),
        }
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "stack_zyx": list(args.shape),
        "backbone": bench.backbone.label(),
        "config": bench.config.describe(),
        "block_slices": args.block_slices,
        "repeats": args.repeats,
        "runs": rows,
        "omezarr_mask_write_s_per_slice_2048x1725": write_s,
        "cpu_parts_2048x1725": parts,
    }
    write_text(args.out, json.dumps(result, indent=1), overwrite=True)
    print(f"{'run':<10} {'median s':>9} {'s/slice':>8} {'CPU s/slice':>12} {'speed-up':>9} "
          f"{'peak RSS MB per process':>26} {'start s':>8}")
    for key, row in rows.items():
        rss = ", ".join(f"{v:.0f}" for v in row["peak_rss_mb_per_process"] or [])
        start = f"{row['startup_s']:.1f}" if row["startup_s"] is not None else "-"
        print(f"{key:<10} {row['s_median']:>9.2f} {row['s_per_slice']:>8.3f} {row['cpu_s_per_slice']:>12.3f} "
              f"{row['speedup_vs_1_worker']:>9.2f} {rss:>26} {start:>8}")
    print(f"OME-Zarr mask write, 2048 x 1725, all levels: {write_s * 1000:.0f} ms per slice")
    for mode, row in (parts or {}).items():
        print(f"{mode} mode, 2048 x 1725, after the backbone: {row['s_per_slice_after_backbone']:.2f} s per slice "
              f"({row['cpu_s_per_slice_after_backbone']:.2f} s CPU)"
              + (f" (filter-bank embedding {row['filterbank_embed_s_per_slice']:.2f} s)"
                 if row["filterbank_embed_s_per_slice"] else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
