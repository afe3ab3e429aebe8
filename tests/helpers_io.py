"""Test helpers for the stack I/O tests: a small, independent Imaris writer following docs/spec/FORMAT.md.

`write_ims` writes what ImarisWriter writes (root attributes, |S1 string attributes, padded chunked
Data, ImageSize attributes, histograms, DataSetInfo/Image, Channel and TimeInfo) with plain h5py,
so the reader is tested against files it did not write itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import h5py
import hdf5plugin
import numpy as np


def str_attr(obj: h5py.HLObject, name: str, value: str | bytes) -> None:
    """Rank-1 array of 1-char NULLTERM strings (docs/spec/FORMAT.md §3)."""
    raw = value if isinstance(value, bytes) else value.encode("latin-1")
    data = np.frombuffer(raw, dtype="S1") if raw else np.array([b""], "S1")
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(1)
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    aid = h5py.h5a.create(obj.id, name.encode("latin-1"), tid, h5py.h5s.create_simple((len(data),)))
    aid.write(np.ascontiguousarray(data), mtype=tid)


def attr_text(obj: h5py.HLObject, name: str) -> str:
    return b"".join(obj.attrs[name].tolist()).decode("latin-1")


def next_level(vol: np.ndarray) -> np.ndarray:
    """ImarisWriter's pyramid step on (Z, Y, X): floor(mean) of 2x2x2 blocks, size floor(n/2)."""
    z, y, x = (s // 2 for s in vol.shape)
    block = vol[: 2 * z, : 2 * y, : 2 * x].astype(np.float64)
    mean = block.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5))
    return (np.floor(mean) if vol.dtype.kind in "ui" else mean).astype(vol.dtype)


def padded(n: int, chunk: int) -> int:
    return -(-n // chunk) * chunk


def write_ims(
    path: Path,
    data_tczyx: np.ndarray,
    *,
    chunks: tuple[int, int, int] = (4, 16, 16),
    n_levels: int = 1,
    compression: str = "gzip",
    ext_min: Sequence[float] = (0.0, 0.0, 0.0),
    voxel_size_xyz: Sequence[float] | None = (0.5, 0.25, 2.0),
    unit: str = "um",
    channel_names: Sequence[str | bytes] | None = None,
    colors: Sequence[str] | None = None,
    pad_value: int = 0,
    with_info: bool = True,
    superblock_v108: bool = True,
) -> Path:
    """Write a (T, C, Z, Y, X) array as an Imaris 5.5 file; lower levels by `next_level`.

    compression : 'gzip', 'shuffle+gzip', 'lz4' or 'none'. `pad_value` fills the chunk padding
    (readers must ignore it).
    """
    n_t, n_c, n_z, n_y, n_x = data_tczyx.shape
    kwargs: dict = {}
    if compression == "gzip":
        kwargs = {"compression": "gzip", "compression_opts": 2}
    elif compression == "shuffle+gzip":
        kwargs = {"compression": "gzip", "compression_opts": 6, "shuffle": True}
    elif compression == "lz4":
        kwargs = dict(hdf5plugin.LZ4())
    libver = ("earliest", "v108") if superblock_v108 else ("latest", "latest")
    with h5py.File(path, "w", libver=libver) as f:
        for key, value in (("DataSetDirectoryName", "DataSet"), ("DataSetInfoDirectoryName", "DataSetInfo"),
                           ("ImarisDataSet", "ImarisDataSet"), ("ImarisVersion", "5.5.0"),
                           ("ThumbnailDirectoryName", "Thumbnail")):
            str_attr(f, key, value)
        f.attrs.create("NumberOfDataSets", np.array([1], dtype=np.uint32))
        for t in range(n_t):
            for c in range(n_c):
                vol = data_tczyx[t, c]
                for r in range(n_levels):
                    if r:
                        vol = next_level(vol)
                    group = f.create_group(f"DataSet/ResolutionLevel {r}/TimePoint {t}/Channel {c}")
                    ch = tuple(min(a, b) for a, b in zip(chunks, (padded(s, 1) for s in vol.shape)))
                    shape = tuple(padded(s, k) for s, k in zip(vol.shape, ch))
                    full = np.full(shape, pad_value, dtype=vol.dtype)
                    full[: vol.shape[0], : vol.shape[1], : vol.shape[2]] = vol
                    group.create_dataset("Data", data=full, chunks=ch, **kwargs)
                    for axis, size in zip("XYZ", vol.shape[::-1]):
                        str_attr(group, f"ImageSize{axis}", str(size))
                    hist, _ = np.histogram(vol, bins=256)
                    group.create_dataset("Histogram", data=hist.astype(np.uint64))
                    str_attr(group, "HistogramMin", f"{float(vol.min()):.3f}")
                    str_attr(group, "HistogramMax", f"{float(vol.max()):.3f}")
        if with_info:
            image = f.create_group("DataSetInfo/Image")
            if voxel_size_xyz is not None:
                sizes = (n_x, n_y, n_z)
                for i in range(3):
                    str_attr(image, f"ExtMin{i}", f"{ext_min[i]:.9f}")
                    str_attr(image, f"ExtMax{i}", f"{ext_min[i] + voxel_size_xyz[i] * sizes[i]:.9f}")
            for axis, size in zip("XYZ", (n_x, n_y, n_z)):
                str_attr(image, axis, str(size))
            str_attr(image, "Unit", unit)
            str_attr(image, "Noc", str(n_c))
            for c in range(n_c):
                group = f.create_group(f"DataSetInfo/Channel {c}")
                name = channel_names[c] if channel_names is not None else f"Synthetic {c}"
                str_attr(group, "Name", name)
                str_attr(group, "Color", colors[c] if colors is not None else "1.000 1.000 1.000")
                str_attr(group, "ColorMode", "BaseColor")
                str_attr(group, "ColorRange", "0.000 255.000")
                str_attr(group, "ColorOpacity", "1.000")
                str_attr(group, "GammaCorrection", "1.000")
            time_info = f.create_group("DataSetInfo/TimeInfo")
            str_attr(time_info, "DatasetTimePoints", str(n_t))
            str_attr(time_info, "FileTimePoints", str(n_t))
            for t in range(n_t):
                str_attr(time_info, f"TimePoint{t + 1}", f"2024-01-01 00:00:{t:02d}.000")
    return path


def ramp_tczyx(n_t: int, n_c: int, n_z: int, n_y: int, n_x: int, dtype=np.uint16) -> np.ndarray:
    """Hand-checkable content: value = 1000 t + 100 c + 10 z + y + 3 x (mod the dtype range)."""
    t, c, z, y, x = np.indices((n_t, n_c, n_z, n_y, n_x))
    values = 1000 * t + 100 * c + 10 * z + y + 3 * x
    if np.dtype(dtype).kind == "f":
        return (values / 4.0 - 50.0).astype(dtype)  # quarters and negatives: exact in float32
    return (values % (np.iinfo(dtype).max + 1)).astype(dtype)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def raw_datasets(path: Path) -> dict[str, bytes]:
    """Every `.../Channel c/Data` in the file -> its raw stored chunk bytes (compressed, as on disk)."""
    out: dict[str, bytes] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: h5py.HLObject) -> None:
            if isinstance(obj, h5py.Dataset) and name.endswith("/Data") and name.startswith("DataSet/"):
                parts = []
                dsid = obj.id
                for i in range(dsid.get_num_chunks()):
                    info = dsid.get_chunk_info(i)
                    _, chunk = dsid.read_direct_chunk(info.chunk_offset)
                    parts.append(repr(info.chunk_offset).encode() + bytes(chunk))
                out[name] = repr((obj.dtype.str, obj.shape, obj.chunks)).encode() + b"".join(parts)
        f.visititems(visit)
    return out
