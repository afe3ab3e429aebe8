"""Reading chunked Imaris stacks: slice changes, pyramid previews, and best mode's per-stack statistics.

Run from the repository root:  .venv/bin/python bench/bench_io.py [--shape 64 3050 2933] [--quick]
Writes a synthetic .ims like the bone lab's into a temporary folder (uint16, gzip level 2, Imaris' usual
(32, 128, 128) chunks, 3050 x 2933 px = their largest slice, and Imaris' resolution pyramid: 1525 x 1466,
762 x 733, ... by 2 x 2 binning), with tube-like structure under uneven illumination and noise, then times:

- slice change: `read_slice` of a plane whose z-chunk is not decoded yet, through h5py alone (no z-chunk
  cache: the read path before the cache) and with the z-chunk cache (the whole z-chunk decoded and kept);
  then planes of an already decoded z-chunk (the <= 0.5 s goal); `core.io.preview.preview_plane` of a plane
  whose z-chunk is not decoded (the pyramid preview, <= 0.5 s goal) at the app's display size (640 px) and
  at 1024 px; `view_plane` (time to the first image, and until the full plane is in);
- grouped reads (`read_slices`) and, unless --no-embed, `embed_many` with the filter bank;
- best mode's stack-wide intensity range (`stack_intensity_range`, 5th-95th percentiles pooled over 16 slices):
  whole slices (exact, the rule for small stacks) versus windows (the rule for large stacks), each on a freshly
  opened stack (no z-chunk decoded), interleaved; their gap in units of the exact range; the pyramid levels'
  ranges for comparison (binning averages noise away, so the low percentile rises); reading it back from the
  disk cache; and the Dice between the best-mode masks (filter bank, same clicks) made with each range;
- best mode's per-stack pixel statistics (`SliceEmbedder.pixel_statistics`, max_side 1024): exact (every
  pixel of 8 slices, the rule for small stacks) versus the subsample used for large stacks, their distance
  (|mean difference| and |std ratio - 1| in units of the exact std, median and max over the 49 features),
  reading them back from the disk cache, and what the difference does to a mask: Dice between the best-mode
  masks of one slice (same clicks) standardised with exact versus subsampled statistics, for the forest and
  the linear classifier;
- first-mask preparation on a never-seen stack after the slice's embedding: statistics + the slice's
  filter features + prototype + mask, sequentially (the app starts the statistics in the background).

Prints a table and writes bench/results/io.json. Wall times on a shared 2-core machine are noisy: the
figures that count are the ratios within one run. `--keep DIR` keeps (and reuses) the synthetic file.
`write_synthetic_ims` is importable (bench/bench_live.py uses it for its slice-change figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import PipelineConfig  # noqa: E402
from core.features.backbones import load_backbone  # noqa: E402
from core.features.embedding import SliceEmbedder, range_method, stack_intensity_range  # noqa: E402
from core.features.embedding_cache import EmbeddingCache  # noqa: E402
from core.features.filterbank import FilterBankConfig  # noqa: E402
from core.io.atomic import write_text  # noqa: E402
from core.io.chunks import ZChunkCache  # noqa: E402
from core.io.ims import ImsStack  # noqa: E402
from core.io.preview import level_plane_index, preview_plane, view_plane  # noqa: E402
from core.metrics import dice  # noqa: E402
from core.pipeline import Scorer, build_prototype  # noqa: E402
from core.preprocess import pooled_intensity_range  # noqa: E402
from core.prototypes import PointSet  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "io.json"
CHUNKS = (32, 128, 128)


# ---- the synthetic stack ------------------------------------------------------------------------------


def _text_attr(node: h5py.HLObject, name: str, value: str) -> None:
    """Imaris stores text attributes as arrays of single characters."""
    node.attrs.create(name, np.array(list(value), dtype="S1"))


def pyramid_shapes(shape: tuple[int, int, int], itemsize: int = 2) -> list[tuple[int, int, int]]:
    """Imaris' resolution levels (docs/spec/FORMAT.md 4.3): an axis is halved (floor) while (10 a)^2 exceeds
    the product of the other two, until a level holds at most 1 MiB / itemsize voxels."""
    shapes = [tuple(int(s) for s in shape)]
    while int(np.prod(shapes[-1])) > (1 << 20) // itemsize:
        size = shapes[-1]
        volume = int(np.prod(size))
        smaller = tuple(a // 2 if a > 1 and (10 * a) ** 2 > volume // a else a for a in size)
        if smaller == size:
            break
        shapes.append(smaller)  # type: ignore[arg-type]
    return shapes  # type: ignore[return-value]


def synthetic_planes(shape: tuple[int, int, int], seed: int = 0) -> Iterator[np.ndarray]:
    """(Y, X) uint16 planes: bright tubes (the zero set of a smooth random field, turning slowly with z) under a
    radial illumination falloff, dimmer with depth, plus Gaussian noise (std 60 on a background of 300)."""
    n_z, n_y, n_x = shape
    rng = np.random.default_rng(seed)
    small = (n_y // 8 + 1, n_x // 8 + 1)
    fields = []
    for _ in range(2):
        field = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32), 6)
        field /= field.std()
        fields.append(ndi.zoom(field, (n_y / small[0], n_x / small[1]), order=1)[:n_y, :n_x])
    yy = np.linspace(-1, 1, n_y, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, n_x, dtype=np.float32)[None, :]
    illumination = 1.0 - 0.35 * (yy ** 2 + xx ** 2)
    for z in range(n_z):
        angle = np.float32(z * np.pi / (2 * n_z))
        field = fields[0] * np.cos(angle) + fields[1] * np.sin(angle)
        tubes = np.exp(-(field / np.float32(0.12)) ** 2)
        plane = 300 + 1500 * tubes * illumination * np.float32(1 - 0.3 * z / n_z)
        plane += 60 * rng.standard_normal((n_y, n_x), dtype=np.float32)
        yield np.clip(plane, 0, 65535).astype(np.uint16)


def _binned(volume: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """ImarisWriter's pyramid step: floor of the mean over the blocks that shrink `volume` to `size`."""
    z, y, x = size
    fz = volume.shape[0] // z
    block = volume[: z * fz, : 2 * y, : 2 * x].astype(np.float32)
    return np.floor(block.reshape(z, fz, y, 2, x, 2).mean(axis=(1, 3, 5))).astype(volume.dtype)


def write_synthetic_ims(path: Path, shape: tuple[int, int, int], *, pyramid: bool = True) -> list[tuple[int, int, int]]:
    """Write `synthetic_planes` as an Imaris 5.5 file: (32, 128, 128) chunks (smaller where a level is smaller),
    gzip level 2, padded to whole chunks, with the pyramid when asked. Returns the levels' (Z, Y, X).
    Holds one z-chunk of level 0 and all of level 1 in memory (~0.6 + 0.3 GB at 64 x 3050 x 2933)."""
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    shapes = pyramid_shapes(shape) if pyramid else [shape]
    n_z, n_y, n_x = shape
    with h5py.File(path, "w") as f:
        for key, value in (("DataSetDirectoryName", "DataSet"), ("DataSetInfoDirectoryName", "DataSetInfo"),
                           ("ImarisDataSet", "ImarisDataSet"), ("ImarisVersion", "5.5.0"),
                           ("ThumbnailDirectoryName", "Thumbnail")):
            _text_attr(f, key, value)
        f.attrs.create("NumberOfDataSets", np.array([1], dtype=np.uint32))
        datasets = []
        for level, size in enumerate(shapes):
            chunks = tuple(min(c, s) for c, s in zip(CHUNKS, size))
            padded = tuple(-(-s // c) * c for s, c in zip(size, chunks))
            group = f.create_group(f"DataSet/ResolutionLevel {level}/TimePoint 0/Channel 0")
            datasets.append(group.create_dataset("Data", shape=padded, dtype=np.uint16, chunks=chunks,
                                                 compression="gzip", compression_opts=2))
            for axis, value in zip("XYZ", size[::-1]):
                _text_attr(group, f"ImageSize{axis}", str(value))
        level1 = np.empty(shapes[1], np.uint16) if len(shapes) > 1 else None
        planes = synthetic_planes(shape)
        for z0 in range(0, n_z, CHUNKS[0]):
            depth = min(CHUNKS[0], n_z - z0)
            block = np.stack([next(planes) for _ in range(depth)])
            datasets[0][z0:z0 + depth, :n_y, :n_x] = block
            if level1 is not None:
                fz = n_z // shapes[1][0]
                first, last = z0 // fz, min(shapes[1][0], (z0 + depth) // fz)
                if last > first:
                    level1[first:last] = _binned(block[: (last - first) * fz], (last - first, *shapes[1][1:]))
        previous = level1
        for level in range(1, len(shapes)):
            if level > 1:
                previous = _binned(previous, shapes[level])
            z, y, x = shapes[level]
            datasets[level][:z, :y, :x] = previous
        image = f.create_group("DataSetInfo/Image")
        for i, size in enumerate((n_x, n_y, n_z)):
            _text_attr(image, f"ExtMin{i}", "0.000")
            _text_attr(image, f"ExtMax{i}", f"{size * (2.0 if i == 2 else 0.5):.3f}")
    return shapes


# ---- measurements -------------------------------------------------------------------------------------


def _timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def _timed_cpu(function) -> tuple[float, float, object]:
    """(wall s, CPU s of this process, all threads, value): CPU time moves less than wall time when other
    jobs load the machine, so it tells roughly what an idle machine would take (divided by the cores used)."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = function()
    return time.perf_counter() - wall, time.process_time() - cpu, value


@contextmanager
def _fresh(path: Path, cache_bytes: int | None = None) -> Iterator[ImsStack]:
    """The stack opened with its own empty z-chunk cache (default bound unless given), so runs do not share."""
    stack = ImsStack(path, chunk_cache=ZChunkCache(cache_bytes) if cache_bytes is not None else ZChunkCache())
    try:
        yield stack
    finally:
        stack.close()


def slice_change(path: Path, repeats: int) -> dict:
    """Plane reads cold (h5py alone, and through the z-chunk cache), warm, pyramid previews and view_plane."""
    rows: dict[str, dict] = {}
    with _fresh(path) as stack:
        n_z, depth = stack.shape[0], CHUNKS[0]
    zchunks = list(range(0, n_z, depth))
    cold_h5py, cold_cached, warm = [], [], []
    for repeat in range(repeats):  # interleaved, so that both see the same load
        z = zchunks[repeat % len(zchunks)] + 3
        with _fresh(path, 0) as stack:  # no cache: h5py reads one plane, decoding its 32-deep chunks
            cold_h5py.append(_timed_cpu(lambda: stack.read_slice(z))[:2])
        with _fresh(path) as stack:
            cold_cached.append(_timed_cpu(lambda: stack.read_slice(z))[:2])
            warm.extend(_timed(lambda k=k: stack.read_slice(z + k))[0] for k in (1, 2, 5, 9))
    rows["plane_cold_h5py"] = {"s_median": float(np.median([w for w, _ in cold_h5py])),
                               "cpu_s_median": float(np.median([c for _, c in cold_h5py])), "runs": len(cold_h5py),
                               "note": "read_slice without the z-chunk cache (the read path before it)"}
    rows["plane_cold_decode_zchunk"] = {"s_median": float(np.median([w for w, _ in cold_cached])),
                                        "cpu_s_median": float(np.median([c for _, c in cold_cached])),
                                        "runs": len(cold_cached),
                                        "note": "read_slice decoding (up to 4 threads) and caching the whole z-chunk"}
    rows["plane_zchunk_decoded"] = {"s_median": float(np.median(warm)), "s_max": float(np.max(warm)),
                                    "runs": len(warm), "note": "read_slice of another plane of a decoded z-chunk"}
    for max_side in (640, 1024):
        times, level, shape = [], 0, None
        for repeat in range(repeats):
            z = zchunks[repeat % len(zchunks)] + 7
            with _fresh(path) as stack:
                seconds, (plane, level) = _timed(lambda: preview_plane(stack, z, max_side))
                times.append(seconds)
                shape = plane.shape
        rows[f"preview_{max_side}"] = {"s_median": float(np.median(times)), "level": level, "shape": list(shape),
                                       "runs": len(times), "note": "pyramid preview, its z-chunk not decoded"}
    first, full = [], []
    for repeat in range(repeats):
        z = zchunks[repeat % len(zchunks)] + 11
        with _fresh(path) as stack:
            start = time.perf_counter()
            view = view_plane(stack, z)
            first.append(time.perf_counter() - start)
            if view.loading is not None:
                view.loading.result()
            full.append(time.perf_counter() - start)
            again = _timed(lambda: view_plane(stack, z))
            assert again[1].full, "the full plane must be cheap once loaded"
    rows["view_plane"] = {"first_image_s_median": float(np.median(first)), "full_plane_s_median": float(np.median(full)),
                          "runs": len(first), "note": "view_plane(max_side=640) on a plane whose z-chunk is not decoded"}
    return rows


def _feature_distance(exact: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> dict:
    mean_gap = np.abs(other[0] - exact[0]) / np.maximum(exact[1], 1e-12)
    std_gap = np.abs(other[1] / np.maximum(exact[1], 1e-12) - 1)
    names = FilterBankConfig().feature_names()
    return {"mean_gap_over_std_median": float(np.median(mean_gap)), "mean_gap_over_std_max": float(mean_gap.max()),
            "std_ratio_gap_median": float(np.median(std_gap)), "std_ratio_gap_max": float(std_gap.max()),
            "worst_feature": names[int(np.argmax(np.maximum(mean_gap, std_gap)))]}


def _clicks(plane: np.ndarray, z: int, count: int = 12, seed: int = 1) -> PointSet:
    """Clicks on slice z: positive on the brightest smoothed pixels (tubes), negative on the darkest (background)."""
    smooth = ndi.gaussian_filter(plane.astype(np.float32), 4)
    rng = np.random.default_rng(seed)
    flat = smooth.ravel()
    high = np.flatnonzero(flat > np.percentile(flat, 97))
    low = np.flatnonzero(flat < np.percentile(flat, 40))
    pos, neg = rng.choice(high, count, replace=False), rng.choice(low, count, replace=False)
    to_xyz = lambda idx: np.column_stack([idx % plane.shape[1], idx // plane.shape[1], np.full(len(idx), z)])  # noqa: E731
    return PointSet(to_xyz(pos), to_xyz(neg))


def statistics_and_first_mask(path: Path, folder: Path) -> dict:
    """Exact versus subsampled statistics, the disk cache, the masks' Dice, and the first-mask preparation."""
    config = PipelineConfig.for_mode("best")
    max_side = config.pixel_max_side
    backbone = load_backbone("filterbank")
    rows: dict[str, dict] = {}
    cache = EmbeddingCache(folder / "cache")
    with _fresh(path) as stack:
        range_seconds, range_cpu, embedder = _timed_cpu(
            lambda: SliceEmbedder(stack, 0, backbone, config.preprocess, cache=cache))
        rows["embedder_init"] = {"s": range_seconds, "cpu_s": range_cpu,
                                 "note": "SliceEmbedder init in best mode: the stack-wide intensity range "
                                         "(windows of 16 planes), no z-chunk decoded, disk cache empty"}
        z = stack.shape[0] // 2 + 1
        embed_seconds, _ = _timed(lambda: embedder.embed(z))
        # first mask after the slice's embedding, statistics not yet known (the worst case: no warm-up)
        stats_seconds, stats_cpu, subsampled = _timed_cpu(lambda: embedder.pixel_statistics(max_side))
        filters_seconds, _ = _timed(lambda: embedder.pixel_filters(z, max_side))
        points = _clicks(embedder.raw(z), z)
        mask_seconds, prototype = _timed(lambda: build_prototype(embedder, points, config))
        segment_seconds, seg_sub = _timed(lambda: Scorer(prototype).segment(embedder, z))
        rows["first_mask_new_stack"] = {
            "embed_s": embed_seconds, "statistics_s": stats_seconds, "slice_filters_s": filters_seconds,
            "prototype_s": mask_seconds, "segment_s": segment_seconds,
            "after_embedding_s": stats_seconds + filters_seconds + mask_seconds + segment_seconds,
            "note": "sequential; the app computes the statistics in the background while the slice embeds"}
        again = SliceEmbedder(stack, 0, backbone, config.preprocess, cache=cache, stack_range=embedder.stack_range)
        cached_seconds, from_disk = _timed(lambda: again.pixel_statistics(max_side))
        assert all(np.array_equal(a, b) for a, b in zip(from_disk, subsampled)), "disk cache must round-trip"
        rows["statistics_from_disk_cache"] = {"s": cached_seconds}
        exact_embedder = SliceEmbedder(stack, 0, backbone, config.preprocess, stack_range=embedder.stack_range)
        exact_embedder.exact_stats_pixels = 1 << 62
        exact_seconds, exact_cpu, exact = _timed_cpu(lambda: exact_embedder.pixel_statistics(max_side))
        rows["statistics"] = {"exact_s": exact_seconds, "subsampled_s": stats_seconds,
                              "exact_cpu_s": exact_cpu, "subsampled_cpu_s": stats_cpu,
                              **_feature_distance(exact, subsampled)}
        for classifier in ("forest", "linear"):
            chosen = config.with_options(pixel_classifier=classifier) if classifier != config.pixel_classifier else config
            masks = []
            for which in (exact_embedder, embedder):
                proto = build_prototype(which, points, chosen)
                masks.append(Scorer(proto).segment(which, z).mask)
            rows[f"dice_exact_vs_subsampled_{classifier}"] = {
                "dice": float(dice(masks[0], masks[1])), "mask_fraction": float(masks[0].mean())}
    return rows


def intensity_range(path: Path, folder: Path, repeats: int) -> dict:
    """Stack-wide intensity range: whole sampled slices versus windows (timed cold, interleaved), the pyramid
    levels' ranges, the disk cache, and the Dice of the best-mode masks made with each range."""
    config = PipelineConfig.for_mode("best")
    percentiles = config.preprocess.clip_percentiles
    exact_runs, window_runs = [], []
    for _ in range(repeats):  # interleaved, so that both see the same load
        with _fresh(path) as stack:
            window_runs.append(_timed_cpu(lambda: stack_intensity_range(stack, 0, percentiles)))
        with _fresh(path) as stack:
            exact_runs.append(_timed_cpu(lambda: stack_intensity_range(stack, 0, percentiles, exact_pixels=1 << 62)))
    exact, windows = exact_runs[0][2], window_runs[0][2]
    span = exact[1] - exact[0]

    def gaps(found: tuple[float, float]) -> dict:
        return {"low_gap_of_range": (found[0] - exact[0]) / span, "high_gap_of_range": (found[1] - exact[1]) / span}

    with _fresh(path) as stack:
        method = range_method(stack.shape[0], stack.shape[2:])
    rows: dict[str, dict] = {"stack_range": {
        "method": method, "exact": list(exact), "windows": list(windows), **gaps(windows),
        "exact_s_median": float(np.median([r[0] for r in exact_runs])),
        "exact_cpu_s_median": float(np.median([r[1] for r in exact_runs])),
        "windows_s_median": float(np.median([r[0] for r in window_runs])),
        "windows_cpu_s_median": float(np.median([r[1] for r in window_runs])), "runs": repeats,
        "note": "gaps: (windows - exact) / (exact high - exact low); each run on a freshly opened stack"}}
    with _fresh(path) as stack:
        n_z = stack.shape[0]
        z_values = np.unique(np.linspace(0, n_z - 1, min(16, n_z)).round().astype(int))
        for level in range(1, min(3, stack.n_levels)):
            planes = [p for _, p in stack.read_slices([level_plane_index(stack, int(z), level) for z in z_values],
                                                      0, level=level)]
            found = pooled_intensity_range(planes, percentiles)
            rows[f"stack_range_pyramid_level{level}"] = {"range": list(found), **gaps(found),
                                                         "shape": list(stack.level_shape(level))}
        cache = EmbeddingCache(folder / "range-cache")
        stack_intensity_range(stack, 0, percentiles, cache=cache)
        seconds, again = _timed(lambda: stack_intensity_range(stack, 0, percentiles, cache=cache))
        assert again == windows, "the disk cache must give the computed range back"
        rows["stack_range_from_disk_cache"] = {"s": seconds}
        z = n_z // 2 + 1
        backbone = load_backbone("filterbank")
        embedders = [SliceEmbedder(stack, 0, backbone, config.preprocess, stack_range=found) for found in (exact, windows)]
        points = _clicks(embedders[0].raw(z), z)
        for classifier in ("forest", "linear"):
            chosen = config.with_options(pixel_classifier=classifier) if classifier != config.pixel_classifier else config
            masks = [Scorer(build_prototype(which, points, chosen)).segment(which, z).mask for which in embedders]
            rows[f"dice_range_exact_vs_windows_{classifier}"] = {
                "dice": float(dice(masks[0], masks[1])), "mask_fraction": float(masks[0].mean()),
                "note": "each embedder with its own (subsampled) pixel statistics"}
    return rows


def grouped_reads(path: Path, planes: list[int], embed: bool) -> dict:
    rows: dict[str, dict] = {}
    with _fresh(path) as stack:
        seconds, _ = _timed(lambda: sum(1 for _ in stack.read_slices(planes, 0)))
        rows["read_slices"] = {"planes": len(planes), "s_per_plane": seconds / len(planes)}
        if embed:
            backbone = load_backbone("filterbank")
            embedder = SliceEmbedder(stack, 0, backbone)
            seconds, _ = _timed(lambda: embedder.embed_many(planes))
            rows["embed_many"] = {"planes": len(planes), "s_per_plane": seconds / len(planes)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 3050, 2933], metavar=("Z", "Y", "X"))
    parser.add_argument("--planes", type=int, default=32, help="consecutive planes read in the grouped runs")
    parser.add_argument("--repeats", type=int, default=3, help="cold runs per figure (each on another z-chunk)")
    parser.add_argument("--no-embed", action="store_true", help="skip the embed_many run")
    parser.add_argument("--quick", action="store_true", help="1 repeat, no embed_many")
    parser.add_argument("--keep", type=Path, help="folder to keep (and reuse) the synthetic .ims in")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    shape = tuple(args.shape)
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(prefix="bench-io-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"synthetic_{'x'.join(map(str, shape))}.ims"
        if not path.exists():
            seconds, levels = _timed(lambda: write_synthetic_ims(path, shape))
            print(f"wrote {path.name}: levels {levels}, {path.stat().st_size / 1e6:.0f} MB, in {seconds:.0f} s", flush=True)
        results = {"slice_change": slice_change(path, repeats)}
        _print(results["slice_change"])
        results["intensity_range"] = intensity_range(path, Path(scratch), repeats)
        _print(results["intensity_range"])
        results["statistics"] = statistics_and_first_mask(path, Path(scratch))
        _print(results["statistics"])
        planes = list(range(min(args.planes, shape[0])))
        results["grouped_reads"] = grouped_reads(path, planes, embed=not (args.no_embed or args.quick))
        _print(results["grouped_reads"])
    payload = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1min": os.getloadavg()[0]},
        "shape_zyx": list(shape), "chunks": list(CHUNKS), "compression": "gzip level 2", **results,
    }
    write_text(args.out, json.dumps(payload, indent=2), overwrite=True)
    print(f"wrote {args.out}")


def _print(rows: dict[str, dict]) -> None:
    for name, row in rows.items():
        figures = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "note")
        print(f"{name:<34} {figures}", flush=True)


if __name__ == "__main__":
    main()
