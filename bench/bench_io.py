"""Time reading Imaris planes: one plane at a time versus grouped reads, alone and inside a batch embedding.

Run from the repository root:  .venv/bin/python bench/bench_io.py [--shape 64 3050 2933] [--planes 32]
Writes a synthetic .ims like the bone lab's (uint16, noisy, gzip level 2, Imaris' usual (32, 128, 128)
chunks; 3050 x 2933 px is their largest slice) into a temporary folder, then times:
- `Stack.read_slice` per plane (each read decompresses the whole 32-slice chunk depth of that plane),
- `Stack.read_slices` over `--planes` consecutive planes (each chunk decompressed once for the group),
- `SliceEmbedder.embed_many` over those planes with the filter bank, with the grouped reads it now uses
  and with per-plane reads (the read path before), so the end-to-end gain is visible.
Prints a table and writes bench/results/io.json. Wall times on this machine; other jobs sharing the CPU
inflate them (process CPU time is recorded too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.features.backbones import load_backbone  # noqa: E402
from core.features.embedding import SliceEmbedder  # noqa: E402
from core.io.atomic import write_text  # noqa: E402
from core.io import open_stack  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "io.json"
CHUNKS = (32, 128, 128)


def _text_attr(node: h5py.HLObject, name: str, value: str) -> None:
    """Imaris stores text attributes as arrays of single characters."""
    node.attrs.create(name, np.array(list(value), dtype="S1"))


def write_synthetic_ims(path: Path, shape: tuple[int, int, int]) -> None:
    """(Z, Y, X) uint16 noise over smooth structure, gzip 2, (32, 128, 128) chunks, padded like Imaris."""
    n_z, n_y, n_x = shape
    padded = tuple(-(-s // c) * c for s, c in zip(shape, CHUNKS))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:n_y, :n_x]
    base = (800 + 400 * np.sin(yy / 90.0) * np.cos(xx / 70.0)).astype(np.float32)
    with h5py.File(path, "w") as f:
        for key, value in (("DataSetDirectoryName", "DataSet"), ("DataSetInfoDirectoryName", "DataSetInfo"),
                           ("ImarisDataSet", "ImarisDataSet"), ("ImarisVersion", "5.5.0"),
                           ("ThumbnailDirectoryName", "Thumbnail")):
            _text_attr(f, key, value)
        f.attrs.create("NumberOfDataSets", np.array([1], dtype=np.uint32))
        group = f.create_group("DataSet/ResolutionLevel 0/TimePoint 0/Channel 0")
        data = group.create_dataset("Data", shape=padded, dtype=np.uint16, chunks=CHUNKS, compression="gzip",
                                    compression_opts=2)
        for axis, size in zip("XYZ", shape[::-1]):
            _text_attr(group, f"ImageSize{axis}", str(size))
        for z0 in range(0, n_z, CHUNKS[0]):
            depth = min(CHUNKS[0], n_z - z0)
            block = np.empty((depth, n_y, n_x), np.uint16)  # one chunk depth at a time: ~0.6 GB, not the stack
            for i in range(depth):
                noisy = base + 120 * rng.standard_normal((n_y, n_x), dtype=np.float32)
                block[i] = np.clip(noisy, 0, 65535)
            data[z0:z0 + depth, :n_y, :n_x] = block
        image = f.create_group("DataSetInfo/Image")
        for i, size in enumerate((n_x, n_y, n_z)):
            _text_attr(image, f"ExtMin{i}", "0.000")
            _text_attr(image, f"ExtMax{i}", f"{size * (2.0 if i == 2 else 0.5):.3f}")


def _timed(function) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = function()
    return time.perf_counter() - wall, time.process_time() - cpu, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 3050, 2933], metavar=("Z", "Y", "X"))
    parser.add_argument("--planes", type=int, default=32, help="consecutive planes read in the grouped runs")
    parser.add_argument("--single", type=int, default=3, help="planes timed with read_slice")
    parser.add_argument("--no-embed", action="store_true", help="skip the embed_many runs")
    args = parser.parse_args()
    shape = tuple(args.shape)
    planes = list(range(min(args.planes, shape[0])))
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-io-") as folder:
        path = Path(folder) / "synthetic.ims"
        seconds, _, _ = _timed(lambda: write_synthetic_ims(path, shape))
        print(f"wrote {path.name}: {shape} uint16, {path.stat().st_size / 1e6:.0f} MB on disk, in {seconds:.0f} s")
        with open_stack(path) as stack:
            single = planes[: args.single]
            wall, cpu, _ = _timed(lambda: [stack.read_slice(z, 0) for z in single])
            rows["read_slice"] = {"planes": len(single), "s_per_plane": wall / len(single), "cpu_s": cpu}
            wall, cpu, _ = _timed(lambda: sum(1 for _ in stack.read_slices(planes, 0)))
            rows["read_slices"] = {"planes": len(planes), "s_per_plane": wall / len(planes), "cpu_s": cpu}
            if not args.no_embed:
                backbone = load_backbone("filterbank")
                grouped = SliceEmbedder(stack, 0, backbone)
                wall, cpu, _ = _timed(lambda: grouped.embed_many(planes))
                rows["embed_many_grouped_reads"] = {"planes": len(planes), "s_per_plane": wall / len(planes), "cpu_s": cpu}
                per_plane = SliceEmbedder(stack, 0, backbone, stack_range=grouped.stack_range)
                wall, cpu, _ = _timed(lambda: [per_plane.embed(z) for z in planes])  # embed() reads one plane each
                rows["embed_per_plane_reads"] = {"planes": len(planes), "s_per_plane": wall / len(planes), "cpu_s": cpu}
    print(f"{'run':<28}{'planes':>7}{'s/plane':>10}{'CPU s':>9}")
    for name, row in rows.items():
        print(f"{name:<28}{row['planes']:>7}{row['s_per_plane']:>10.2f}{row['cpu_s']:>9.1f}")
    payload = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "shape_zyx": list(shape), "chunks": list(CHUNKS), "compression": "gzip level 2", "runs": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS, json.dumps(payload, indent=2), overwrite=True)
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
