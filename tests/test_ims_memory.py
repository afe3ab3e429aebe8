"""Opening a big .ims and reading one slice must not load the stack.

The test file holds 200 x 4000 x 4000 uint16 (6.4 GB of pixels, padded to 224 x 4096 x 4096 in
(32, 128, 128) chunks like Imaris writes) but only ~30 MB on disk: one gzip-compressed chunk is
written to every chunk position with `write_direct_chunk`. Each chunk holds
value = 1000 * (z % 32 + 1) + (x % 128) // 64, so any plane is hand-checkable.
The peak resident memory (VmHWM) of a fresh subprocess is measured before and after.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import h5py
import numpy as np

from helpers_io import str_attr

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (200, 4000, 4000)
CHUNKS = (32, 128, 128)
LIMIT_MB = 300


def _build_big_ims(path: Path) -> None:
    padded = tuple(-(-s // c) * c for s, c in zip(SHAPE, CHUNKS))
    z, _, x = np.indices(CHUNKS)
    chunk = (1000 * (z + 1) + x // 64).astype(np.uint16)
    payload = zlib.compress(chunk.tobytes(), 6)
    with h5py.File(path, "w", libver=("earliest", "v108")) as f:
        for key, value in (("DataSetDirectoryName", "DataSet"), ("DataSetInfoDirectoryName", "DataSetInfo"),
                           ("ImarisDataSet", "ImarisDataSet"), ("ImarisVersion", "5.5.0"),
                           ("ThumbnailDirectoryName", "Thumbnail")):
            str_attr(f, key, value)
        f.attrs.create("NumberOfDataSets", np.array([1], dtype=np.uint32))
        group = f.create_group("DataSet/ResolutionLevel 0/TimePoint 0/Channel 0")
        data = group.create_dataset("Data", shape=padded, dtype=np.uint16, chunks=CHUNKS, compression="gzip",
                                    compression_opts=6)
        for axis, size in zip("XYZ", SHAPE[::-1]):
            str_attr(group, f"ImageSize{axis}", str(size))
        for z0 in range(0, padded[0], CHUNKS[0]):
            for y0 in range(0, padded[1], CHUNKS[1]):
                for x0 in range(0, padded[2], CHUNKS[2]):
                    data.id.write_direct_chunk((z0, y0, x0), payload)
        image = f.create_group("DataSetInfo/Image")
        for i, (lo, hi) in enumerate([(0, 1600), (0, 1600), (0, 400)]):
            str_attr(image, f"ExtMin{i}", f"{lo:.3f}")
            str_attr(image, f"ExtMax{i}", f"{hi:.3f}")


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np, h5py, hdf5plugin
    import core.io, core.io.ims

    def vm_hwm_mb():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    before = vm_hwm_mb()
    with core.io.open_stack(sys.argv[1]) as stack:
        plane = stack.read_slice(133, 0)
        shape, voxel = stack.shape, stack.voxel_size
    after = vm_hwm_mb()
    x = (np.arange(4000) % 128) // 64
    expected_row = (1000 * (133 % 32 + 1) + x).astype(np.uint16)
    print(json.dumps({
        "before_mb": before, "after_mb": after, "shape": shape, "plane_shape": plane.shape,
        "dtype": plane.dtype.name, "rows_ok": bool((plane == expected_row[None, :]).all()),
        "voxel": [voxel.x, voxel.y, voxel.z],
    }))
""")


def test_open_and_read_one_slice_of_6gb_stack_stays_under_300mb(tmp_path):
    path = tmp_path / "big.ims"
    _build_big_ims(path)
    assert path.stat().st_size < 50e6  # the test file really is small on disk
    result = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                            cwd=PROJECT_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    growth = report["after_mb"] - report["before_mb"]
    print(f"peak RSS before {report['before_mb']:.0f} MB, after {report['after_mb']:.0f} MB, growth {growth:.0f} MB")
    assert report["shape"] == [200, 1, 4000, 4000]
    assert report["plane_shape"] == [4000, 4000] and report["dtype"] == "uint16"
    assert report["rows_ok"]
    assert report["voxel"] == [0.4, 0.4, 2.0]
    # one uint16 plane is 32 MB; the whole stack would be 6400 MB
    assert growth < LIMIT_MB
