"""Time the offline filter-bank backbone: pixel_features on square images of several sizes.

Run from the repository root:  .venv/bin/python bench/bench_filterbank.py [--sizes 512 980] [--repeats 3]
Prints a table and writes bench/results/filterbank.json. For each size, one thread and all cores are
timed interleaved (this VM's speed drifts between runs); wall time is the figure that matters, CPU time
(process time, all threads) shows how much of the machine the run got when other jobs share it.
Also times patch_features at 980 px (the 70 x 70 grid the app uses) and, interleaved with ours, a plain
scipy-only reference (gaussian_filter with order= at every sigma, closed-form eigenvalues, the
notes/backbones.md baseline) so that the speed-up is measured under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import scipy
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.features.filterbank import FilterBankConfig, _default_workers, patch_features, pixel_features  # noqa: E402
from core.io.atomic import write_text  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "filterbank.json"


def _test_image(size: int) -> np.ndarray:
    """(size, size) float32 in [0, 1]: smooth blobs plus noise, like a preprocessed fluorescence slice."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size, :size].astype(np.float32)
    image = np.zeros((size, size), np.float32)
    for cy, cx, r in rng.uniform([0, 0, 3], [size, size, 30], size=(40, 3)):
        image += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    image += 0.1 * rng.random((size, size), dtype=np.float32)
    return (image - image.min()) / (image.max() - image.min())


def _reference_scipy(image: np.ndarray, sigmas: tuple[float, ...]) -> np.ndarray:
    """The straightforward scipy-only filter bank (same 49 features, unnormalised maths), for timing only."""

    def eig(a, b, c):
        half_trace, radius = (a + c) / 2, np.hypot((a - c) / 2, b)
        return half_trace + radius, half_trace - radius

    features = [image]
    for s in sigmas:
        g = ndi.gaussian_filter(image, s)
        gx, gy = ndi.gaussian_filter(image, s, order=(0, 1)), ndi.gaussian_filter(image, s, order=(1, 0))
        gxx, gxy, gyy = (ndi.gaussian_filter(image, s, order=o) for o in ((0, 2), (1, 1), (2, 0)))
        st = eig(*(ndi.gaussian_filter(p, s / 2) for p in (gx * gx, gx * gy, gy * gy)))
        features += [g, gxx + gyy, np.hypot(gx, gy), g - ndi.gaussian_filter(image, s / 1.6), *st, *eig(gxx, gxy, gyy)]
    return np.stack(features, axis=-1)


def _time(call) -> tuple[float, float]:
    """(wall s, process CPU s) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def _write_json(path: Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2), overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 980, 2048, 3000])
    parser.add_argument("--repeats", type=int, default=2, help="runs per size and setting (median kept)")
    parser.add_argument("--no-reference", action="store_true", help="skip the plain scipy reference")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    config = FilterBankConfig()
    all_cores = _default_workers()
    thread_settings = sorted({1, all_cores})
    rows = []
    print(f"filterbank {config.signature()}  F={config.n_features}  cores={all_cores}  "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'what':<22} {'size':>6} {'threads':>7} {'wall s':>8} {'cpu s':>8} {'Mpx/s':>7} {'out MiB':>8}")

    def record(what: str, size: int, workers: int, walls: list[float], cpus: list[float], out_bytes: int) -> None:
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        rows.append({
            "what": what, "size": size, "workers": workers, "wall_s_median": round(wall, 3),
            "cpu_s_median": round(cpu, 3), "wall_s_all": [round(t, 3) for t in walls],
            "megapixels_per_s": round(size * size / wall / 1e6, 3), "output_mib": round(out_bytes / 2**20, 1),
            "load_average_1min": round(os.getloadavg()[0], 2),
        })
        print(f"{what:<22} {size:>6} {workers:>7} {wall:>8.2f} {cpu:>8.2f} {size * size / wall / 1e6:>7.2f} "
              f"{out_bytes / 2**20:>8.0f}", flush=True)

    for size in args.sizes:
        image = _test_image(size)
        pixel_features(image[:64, :64], config)  # warm up kernels and thread pool code paths
        times = {w: ([], []) for w in thread_settings}
        reference = ([], [])
        for _ in range(args.repeats):
            for workers in thread_settings:  # interleaved
                wall, cpu = _time(lambda: pixel_features(image, config, workers=workers))
                times[workers][0].append(wall)
                times[workers][1].append(cpu)
            if not args.no_reference:
                wall, cpu = _time(lambda: _reference_scipy(image, config.sigmas))
                reference[0].append(wall)
                reference[1].append(cpu)
        out_bytes = size * size * config.n_features * 4
        for workers in thread_settings:
            record("pixel_features", size, workers, *times[workers], out_bytes)
        if not args.no_reference:
            record("plain scipy reference", size, 1, *reference, out_bytes)

    size = 980
    image = _test_image(size)
    walls, cpus = [], []
    for _ in range(args.repeats):
        wall, cpu = _time(lambda: patch_features(image, 14, config))
        walls.append(wall)
        cpus.append(cpu)
    record("patch_features p=14", size, all_cores, walls, cpus, (size // 14) ** 2 * config.n_features * 4)

    _write_json(args.out, {
        "benchmark": "core.features.filterbank pixel_features / patch_features",
        "signature": config.signature(),
        "n_features": config.n_features,
        "repeats": args.repeats,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "available_cores": all_cores, "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__},
        "results": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
