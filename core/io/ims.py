"""Imaris `.ims` files (HDF5, Imaris 5.5 layout): lazy reading and appending a mask channel.

Layout, attribute encoding and the append recipe follow /work/shared/data/ims/FORMAT.md (sources:
Bitplane's *Imaris5.5 File Format Description*, ImarisWriter and ImarisReader). In short:

- pixels live in ``DataSet/ResolutionLevel r/TimePoint t/Channel c/Data``, (Z, Y, X), chunked and
  padded to whole chunks; the real size is in the group's ``ImageSizeX/Y/Z`` attributes;
- almost every attribute is a string stored as a 1-D array of single characters (``|S1``), not
  always UTF-8 (decoded here as latin-1);
- the voxel size is ``(ExtMax - ExtMin) / size`` from ``DataSetInfo/Image``.

`ImsStack` is what :func:`core.io.open_stack` returns for `.ims`; `append_mask_channel` writes a copy
of a source file with one more channel holding a (Z, Y, X) mask.
"""

from __future__ import annotations

import re
import shutil
import threading
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np

try:
    import hdf5plugin  # noqa: F401 - registers the LZ4 (32004) and other HDF5 filters with h5py
except ImportError:  # gzip/shuffle files still read; LZ4 ones get a message saying what to install
    hdf5plugin = None

from core.errors import StackError
from core.io.base import Stack, VoxelSize, unit_to_um
from core.io.atomic import atomic_output
from core.io.writers import as_mask_array, mask_to_uint8

__all__ = [
    "ImsLayout",
    "ImsStack",
    "append_mask_channel",
    "decode_attr",
    "put_str_attr",
    "read_layout",
    "IMS_DTYPES",
]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
IMS_DTYPES = tuple(np.dtype(t) for t in ("uint8", "uint16", "uint32", "float32"))
_FILTER_NAMES = {1: "gzip/deflate", 2: "shuffle", 32004: "LZ4", 32001: "Blosc", 32015: "Zstd"}
MASK_GZIP_LEVEL = 2  # Imaris' and PyImarisWriter's default deflate level


# ------------------------------------------------------------------------------------------------
# attributes
# ------------------------------------------------------------------------------------------------


def decode_attr(value: Any) -> str:
    """Imaris attribute value -> str: joins `|S1` arrays, decodes bytes as latin-1, strips NULs."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "S":
            value = b"".join(value.ravel().tolist())
        elif value.dtype.kind == "U":
            value = "".join(value.ravel().tolist())
        elif value.size == 1:
            value = value.ravel()[0]
        else:
            return " ".join(str(v) for v in value.ravel())
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("latin-1")
    return str(value).rstrip("\x00").strip()


def read_str_attr(obj: h5py.HLObject, name: str) -> str | None:
    """Decoded attribute `name` of `obj`, or None when absent."""
    if name not in obj.attrs:
        return None
    try:
        return decode_attr(obj.attrs[name])
    except (OSError, TypeError, ValueError):
        return None


def put_str_attr(obj: h5py.HLObject, name: str, value: str) -> None:
    """Write `value` exactly as ImarisWriter does: rank-1 array of 1-char NULLTERM strings (FORMAT §3)."""
    # Imaris strings are single-byte; characters outside latin-1 (e.g. 'λ', 'µ' is fine) become '?'.
    data = np.frombuffer(value.encode("latin-1", errors="replace"), dtype="S1") if value else np.array([b""], "S1")
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(1)
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    if name in obj.attrs:
        del obj.attrs[name]
    aid = h5py.h5a.create(obj.id, name.encode("latin-1"), tid, h5py.h5s.create_simple((len(data),)))
    aid.write(np.ascontiguousarray(data), mtype=tid)


def _float_attr(obj: h5py.HLObject, name: str) -> float | None:
    text = read_str_attr(obj, name)
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _int_attr(obj: h5py.HLObject, name: str) -> int | None:
    value = _float_attr(obj, name)
    return int(value) if value is not None and value.is_integer() else None


def indexed_children(group: h5py.Group, prefix: str) -> list[int]:
    """Sorted integer indices of the children named '<prefix> <n>' ('Channel 10' after 'Channel 9')."""
    pattern = re.compile(rf"^{re.escape(prefix)} (\d+)$")
    found = [int(m.group(1)) for m in map(pattern.match, group.keys()) if m]
    return sorted(found)


def _parse_color(text: str | None) -> tuple[float, float, float] | None:
    if not text:
        return None
    try:
        rgb = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        return None
    if len(rgb) != 3 or not all(0.0 <= v <= 1.0 for v in rgb):
        return None
    return rgb  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# opening and layout
# ------------------------------------------------------------------------------------------------


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    """h5py.File for `path`, with open failures turned into StackError naming the file and problem."""
    try:
        if mode == "r":
            # best-effort locking: read-only shares and network drives often refuse file locks
            return h5py.File(path, "r", locking="best-effort")
        try:
            return h5py.File(path, mode, libver=("earliest", "v108"))  # keep HDF5 1.8 readers (FORMAT §1)
        except (OSError, ValueError):
            return h5py.File(path, mode)
    except OSError as exc:
        with open(path, "rb") as fh:
            head = fh.read(8)
        if head != HDF5_SIGNATURE:
            raise StackError(
                f"'{path.name}' is not an HDF5 file (no HDF5 signature), so it cannot be an Imaris .ims "
                "file; it may be damaged or have the wrong extension"
            ) from None
        raise StackError(f"'{path.name}' is a truncated or corrupt HDF5 file ({exc})") from None


@dataclass(frozen=True)
class ImsLayout:
    """What an .ims file holds, read from its groups and attributes (no pixel data).

    level_shapes : (Z, Y, X) per resolution level, unpadded (from ImageSizeX/Y/Z).
    voxel_size : µm at level 0 from the extents, or None.
    """

    dataset_dir: str
    info_dir: str
    n_levels: int
    n_timepoints: int
    n_channels: int
    level_shapes: tuple[tuple[int, int, int], ...]
    dtype: np.dtype
    channel_names: tuple[str, ...]
    channel_colors: tuple[tuple[float, float, float] | None, ...]
    voxel_size: VoxelSize | None

    def group_path(self, level: int, timepoint: int, channel: int) -> str:
        return f"{self.dataset_dir}/ResolutionLevel {level}/TimePoint {timepoint}/Channel {channel}"


def _contiguous(indices: list[int], what: str, where: str, name: str) -> int:
    if not indices:
        raise StackError(f"'{name}' has no '{what} 0' group in {where}; the .ims file is incomplete")
    if indices != list(range(len(indices))):
        raise StackError(f"'{name}' has {what} groups {indices} in {where}; expected {what} 0..n-1 "
                         "without gaps (the .ims file is damaged)")
    return len(indices)


def _level_size(channel_group: h5py.Group, data: h5py.Dataset, image: h5py.Group | None,
                level: int) -> tuple[int, int, int]:
    """(Z, Y, X) unpadded size: channel ImageSize*, else DataSetInfo/Image X/Y/Z (level 0), else Data."""
    size = [_int_attr(channel_group, f"ImageSize{a}") for a in "ZYX"]
    if None in size and level == 0 and image is not None:
        size = [_int_attr(image, a) for a in "ZYX"]
    if None in size:
        size = list(data.shape)
    return tuple(min(int(s), int(d)) for s, d in zip(size, data.shape))  # type: ignore[return-value]


def read_layout(f: h5py.File, name: str) -> ImsLayout:
    """Layout of an open .ims file; StackError when it is not an Imaris file or is damaged."""
    dataset_dir = read_str_attr(f, "DataSetDirectoryName") or "DataSet"
    if dataset_dir not in f:
        dataset_dir = "DataSet"
    if dataset_dir not in f or not isinstance(f[dataset_dir], h5py.Group):
        raise StackError(
            f"'{name}' is an HDF5 file but has no 'DataSet' group, so it is not an Imaris .ims file "
            "(expected DataSet/ResolutionLevel 0/TimePoint 0/Channel 0/Data)"
        )
    info_dir = read_str_attr(f, "DataSetInfoDirectoryName") or "DataSetInfo"
    root = f[dataset_dir]
    n_levels = _contiguous(indexed_children(root, "ResolutionLevel"), "ResolutionLevel", dataset_dir, name)
    level0 = root["ResolutionLevel 0"]
    n_t = _contiguous(indexed_children(level0, "TimePoint"), "TimePoint", "ResolutionLevel 0", name)
    tp0 = level0["TimePoint 0"]
    n_c = _contiguous(indexed_children(tp0, "Channel"), "Channel", "ResolutionLevel 0/TimePoint 0", name)
    info = f[info_dir] if info_dir in f and isinstance(f[info_dir], h5py.Group) else None
    image = info["Image"] if info is not None and "Image" in info else None

    shapes = []
    dtype = None
    for r in range(n_levels):
        path = f"{dataset_dir}/ResolutionLevel {r}/TimePoint 0/Channel 0"
        if path not in f or "Data" not in f[path] or not isinstance(f[path]["Data"], h5py.Dataset):
            raise StackError(f"'{name}' has no dataset {path}/Data; the .ims file is incomplete")
        data = f[path]["Data"]
        if data.ndim != 3:
            raise StackError(f"'{name}': {path}/Data has {data.ndim} dimensions, expected 3 (Z, Y, X)")
        shapes.append(_level_size(f[path], data, image, r))
        if r == 0:
            dtype = data.dtype
    assert dtype is not None
    native = dtype.newbyteorder("=") if dtype.kind in "uif" else dtype
    if native not in IMS_DTYPES:
        raise StackError(
            f"'{name}' stores {dtype.name if dtype.kind in 'uifcb' else str(dtype)} pixels, which Imaris does not "
            f"support; supported: {', '.join(d.name for d in IMS_DTYPES)}"
        )
    for c in range(1, n_c):
        other = tp0[f"Channel {c}"].get("Data")
        if isinstance(other, h5py.Dataset) and other.dtype.newbyteorder("=") != native:
            raise StackError(f"'{name}': channel {c} is {other.dtype.name} but channel 0 is {native.name}; "
                             "an .ims file has one pixel type for all channels")

    names, colors = [], []
    for c in range(n_c):
        group = info.get(f"Channel {c}") if info is not None else None
        if isinstance(group, h5py.Group):
            text = read_str_attr(group, "Name")
            names.append("" if text in (None, "(name not specified)") else text)
            colors.append(_parse_color(read_str_attr(group, "Color")))
        else:
            names.append("")
            colors.append(None)

    return ImsLayout(
        dataset_dir=dataset_dir, info_dir=info_dir, n_levels=n_levels, n_timepoints=n_t, n_channels=n_c,
        level_shapes=tuple(shapes), dtype=np.dtype(native),
        channel_names=tuple(n or f"Channel {c}" for c, n in enumerate(names)),
        channel_colors=tuple(colors), voxel_size=_voxel_size(image, shapes[0]),
    )


def _voxel_size(image: h5py.Group | None, shape_zyx: tuple[int, int, int]) -> VoxelSize | None:
    """(ExtMax - ExtMin) / size per axis, converted from the file's Unit (default µm) to µm."""
    if image is None:
        return None
    factor = unit_to_um(read_str_attr(image, "Unit") or "um")
    if factor is None:
        return None
    sizes = {"0": shape_zyx[2], "1": shape_zyx[1], "2": shape_zyx[0]}
    out = []
    for i in "012":
        lo, hi = _float_attr(image, f"ExtMin{i}"), _float_attr(image, f"ExtMax{i}")
        if lo is None or hi is None or not hi > lo or sizes[i] <= 0:
            return None  # absent or degenerate extents: the file does not say
        out.append((hi - lo) / sizes[i] * factor)
    return VoxelSize(x=out[0], y=out[1], z=out[2])


def _check_filters(data: h5py.Dataset, name: str) -> None:
    dcpl = data.id.get_create_plist()
    for i in range(dcpl.get_nfilters()):
        code = dcpl.get_filter(i)[0]
        if not h5py.h5z.filter_avail(code):
            label = _FILTER_NAMES.get(code, f"filter {code}")
            raise StackError(f"'{name}' is compressed with {label} (HDF5 filter {code}), which this Python "
                             "cannot decode; install the 'hdf5plugin' package")


class ImsStack(Stack):
    """An Imaris .ims file read lazily with h5py; `read_slice` asks HDF5 for one cropped z-plane.

    `layout` holds what the file contains (ImsLayout). Reads are serialised with a lock, so one
    stack can be shared between threads (e.g. a Streamlit resource cache).
    """

    def __init__(self, path: Path) -> None:
        path = Path(path)
        f = open_h5(path)
        try:
            layout = read_layout(f, path.name)
        except StackError:
            f.close()
            raise
        except (KeyError, OSError, ValueError, TypeError) as exc:
            f.close()
            raise StackError(f"'{path.name}' is a damaged .ims file ({type(exc).__name__}: {exc})") from None
        z, y, x = layout.level_shapes[0]
        super().__init__(
            path, format="ims", shape=(z, layout.n_channels, y, x), dtype=layout.dtype,
            channel_names=layout.channel_names, channel_colors=layout.channel_colors,
            voxel_size=layout.voxel_size, n_timepoints=layout.n_timepoints, level_shapes=layout.level_shapes,
        )
        self.layout = layout
        self._h5 = f
        self._datasets: dict[tuple[int, int, int], h5py.Dataset] = {}
        self._lock = threading.Lock()

    def _dataset(self, level: int, t: int, c: int) -> h5py.Dataset:
        key = (level, t, c)
        if key not in self._datasets:
            path = self.layout.group_path(level, t, c) + "/Data"
            if path not in self._h5:
                raise StackError(f"'{self.name}' has no {path}; the .ims file is incomplete")
            data = self._h5[path]
            _check_filters(data, self.name)
            self._datasets[key] = data
        return self._datasets[key]

    def _read_plane(self, z: int, c: int, t: int, level: int) -> np.ndarray:
        _, ny, nx = self.level_shape(level)
        with self._lock:
            data = self._dataset(level, t, c)
            try:
                plane = data[z, :ny, :nx]
            except (OSError, ValueError, RuntimeError) as exc:
                raise StackError(
                    f"cannot read z={z}, channel {c}, time point {t}, level {level} of '{self.name}': the "
                    f"file is truncated or corrupt ({exc})"
                ) from None
        return plane.astype(self.dtype, copy=False)

    def _iter_planes(self, zs: list[int], c: int, t: int, level: int,
                     max_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
        """Requested planes in one chunk-deep block are read together, one band of chunk rows at a time."""
        _, ny, nx = self.level_shape(level)
        with self._lock:
            data = self._dataset(level, t, c)
        cz, cy = (data.chunks or (1, ny, nx))[:2]
        per_group = max(1, max_bytes // max(1, ny * nx * self.dtype.itemsize))
        i = 0
        while i < len(zs):
            group = [zs[i]]
            while (i + len(group) < len(zs) and zs[i + len(group)] // cz == zs[i] // cz
                   and len(set(group) | {zs[i + len(group)]}) <= per_group):
                group.append(zs[i + len(group)])
            i += len(group)
            if len(set(group)) == 1:
                plane = self._read_plane(group[0], c, t, level)
                yield from ((z, plane) for z in group)
                continue
            wanted = sorted(set(group))
            out = np.empty((len(wanted), ny, nx), dtype=self.dtype)
            z0, z1 = wanted[0], wanted[-1] + 1
            rows = np.asarray(wanted) - z0
            for y0 in range(0, ny, cy):  # a (z1-z0, cy, X) band decodes each chunk once and stays small
                y1 = min(y0 + cy, ny)
                with self._lock:
                    try:
                        band = data[z0:z1, y0:y1, :nx]
                    except (OSError, ValueError, RuntimeError) as exc:
                        raise StackError(
                            f"cannot read z={z0}..{z1 - 1}, channel {c}, time point {t}, level {level} of "
                            f"'{self.name}': the file is truncated or corrupt ({exc})"
                        ) from None
                out[:, y0:y1] = band[rows]
            index = {z: k for k, z in enumerate(wanted)}
            for z in group:
                yield z, out[index[z]]

    def _close(self) -> None:
        try:
            self._h5.close()
        except Exception:  # noqa: BLE001 - closing a damaged file must not raise
            pass


# ------------------------------------------------------------------------------------------------
# appending a mask channel (FORMAT.md §8)
# ------------------------------------------------------------------------------------------------


def _axis_mode(prev: int, size: int) -> tuple[str, np.ndarray | None]:
    """How level r is made from level r-1 along one axis: kept, halved (floor), or other (nearest)."""
    if size == prev:
        return "same", None
    if size == prev // 2:
        return "half", None
    return "nearest", np.minimum(((np.arange(size) + 0.5) * prev / size).astype(np.int64), prev - 1)


def _source_range(mode: tuple[str, np.ndarray | None], o0: int, o1: int) -> tuple[int, int]:
    kind, index = mode
    if kind == "same":
        return o0, o1
    if kind == "half":
        return 2 * o0, 2 * o1
    assert index is not None
    return int(index[o0]), int(index[o1 - 1]) + 1


def _downsample(block: np.ndarray, modes: Sequence[tuple[str, np.ndarray | None]],
                starts: Sequence[int], ranges: Sequence[tuple[int, int]], dtype: np.dtype) -> np.ndarray:
    """ImarisWriter's pyramid rule: mean of each 2 (x 2 x 2) block, truncated for integer types.

    block : source region of level r-1 starting at `starts`; `ranges` are the output index ranges
    per axis. Axes that are not halved are copied, or sampled nearest for unusual pyramids.
    """
    for axis, ((kind, index), (o0, o1), start) in enumerate(zip(modes, ranges, starts)):
        if kind == "nearest":
            assert index is not None
            block = np.take(block, index[o0:o1] - start, axis=axis)
    n = [o1 - o0 for o0, o1 in ranges]
    f = [2 if kind == "half" else 1 for kind, _ in modes]
    block = block[: n[0] * f[0], : n[1] * f[1], : n[2] * f[2]]
    acc_type = np.float64 if dtype.kind == "f" else np.uint64
    sums = block.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).sum(axis=(1, 3, 5), dtype=acc_type)
    count = f[0] * f[1] * f[2]
    if dtype.kind == "f":
        return (sums / count).astype(dtype)
    return (sums // count).astype(dtype)


def _padded_blocks(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """(z0, y0) of every (chunk-Z x chunk-Y x full-X) band covering the padded dataset."""
    for z0 in range(0, shape[0], chunks[0]):
        for y0 in range(0, shape[1], chunks[1]):
            yield z0, y0


class _Histogram:
    """Imaris histograms of a 0..255 mask channel, as ImarisWriter writes them (FORMAT §4.2).

    uint8: 256 bins over [0, 255], bin = value. Wider types: one bin per integer 0..256 (257 bins,
    `Histogram1024`) and 256 bins over [0, 256] with bin = floor(value * 256 / 257) (`Histogram`),
    which is what the mask channel of Bitplane's own sample file holds.
    """

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.counts = np.zeros(257, dtype=np.uint64)

    def add(self, values: np.ndarray) -> None:
        flat = values.reshape(-1)
        step = 1 << 20  # bincount converts to intp: count in pieces to keep memory small
        for i in range(0, flat.size, step):
            piece = flat[i:i + step]
            if piece.dtype.kind == "f":
                piece = np.floor(piece)
            piece = np.clip(piece, 0, 256).astype(np.intp)
            self.counts += np.bincount(piece, minlength=257)[:257].astype(np.uint64)

    def add_zeros(self, n: int) -> None:
        self.counts[0] += np.uint64(n)

    def write(self, group: h5py.Group) -> None:
        if self.dtype == np.uint8:
            put_str_attr(group, "HistogramMin", "0.000")
            put_str_attr(group, "HistogramMax", "255.000")
            group.create_dataset("Histogram", data=self.counts[:256].astype(np.uint64))
            return
        h256 = np.zeros(256, dtype=np.uint64)
        np.add.at(h256, (np.arange(257) * 256) // 257, self.counts)
        put_str_attr(group, "HistogramMin", "0.000")
        put_str_attr(group, "HistogramMax", "256.000")
        put_str_attr(group, "HistogramMin1024", "0.000")
        put_str_attr(group, "HistogramMax1024", "256.000")
        group.create_dataset("Histogram", data=h256)
        group.create_dataset("Histogram1024", data=self.counts.copy())


def _default_chunks(shape: tuple[int, int, int], dtype: np.dtype) -> tuple[int, int, int]:
    """About 1 MiB chunks like Imaris, for sources whose Data is not chunked."""
    side = 256 if dtype.itemsize == 1 else 128
    return (min(shape[0], 16 if dtype.itemsize == 1 else 32), min(shape[1], side), min(shape[2], side))


def _band(data: h5py.Dataset, z0: int, y0: int) -> np.ndarray:
    """Zeros for the band of whole chunks at (z0, y0) spanning the padded X, clipped at the edges."""
    cz, cy, _ = data.chunks
    return np.zeros((min(cz, data.shape[0] - z0), min(cy, data.shape[1] - y0), data.shape[2]), data.dtype)


def _write_zero_channel(data: h5py.Dataset) -> None:
    """Fill every chunk with zeros by writing one pre-compressed chunk (fast for big files)."""
    chunks = data.chunks
    payload = zlib.compress(np.zeros(chunks, dtype=data.dtype).tobytes(), MASK_GZIP_LEVEL)
    for z0 in range(0, data.shape[0], chunks[0]):
        for y0 in range(0, data.shape[1], chunks[1]):
            for x0 in range(0, data.shape[2], chunks[2]):
                data.id.write_direct_chunk((z0, y0, x0), payload)


def _write_level0(data: h5py.Dataset, masks: Any, size: tuple[int, int, int], hist: _Histogram,
                  tick: Callable[[], None]) -> None:
    """Mask (Z, Y, X) -> 0/255 in the file dtype, written in whole-chunk bands (no re-compression)."""
    nz, ny, nx = size
    cz, cy, _ = data.chunks
    for z0, y0 in _padded_blocks(data.shape, data.chunks):
        band = _band(data, z0, y0)
        z1, y1 = min(z0 + cz, nz), min(y0 + cy, ny)
        if z1 > z0 and y1 > y0:
            part = mask_to_uint8(masks[z0:z1, y0:y1, :nx])
            band[: z1 - z0, : y1 - y0, :nx] = part
            hist.add(part)
        data[z0:z0 + band.shape[0], y0:y0 + band.shape[1], :] = band
        tick()


def _write_lower_level(data: h5py.Dataset, prev: h5py.Dataset, size: tuple[int, int, int],
                       prev_size: tuple[int, int, int], hist: _Histogram, tick: Callable[[], None]) -> None:
    """Level r from the just-written level r-1 of the same channel, band by band, in X pieces."""
    modes = [_axis_mode(p, s) for p, s in zip(prev_size, size)]
    nz, ny, nx = size
    cz, cy, cx = data.chunks
    piece = cx  # keeps the level r-1 block read at a time to about 8 chunks
    for z0, y0 in _padded_blocks(data.shape, data.chunks):
        band = _band(data, z0, y0)
        z1, y1 = min(z0 + cz, nz), min(y0 + cy, ny)
        if z1 > z0 and y1 > y0:
            for x0 in range(0, nx, piece):
                x1 = min(x0 + piece, nx)
                ranges = [(z0, z1), (y0, y1), (x0, x1)]
                src = [_source_range(m, a, b) for m, (a, b) in zip(modes, ranges)]
                block = prev[src[0][0]:src[0][1], src[1][0]:src[1][1], src[2][0]:src[2][1]]
                out = _downsample(block, modes, [s[0] for s in src], ranges, data.dtype)
                band[: z1 - z0, : y1 - y0, x0:x1] = out
                hist.add(out)
        data[z0:z0 + band.shape[0], y0:y0 + band.shape[1], :] = band
        tick()


def _put_channel_info(group: h5py.Group, name: str, color: Sequence[float], description: str,
                      color_range: str = "0.000 255.000") -> None:
    put_str_attr(group, "Name", name)
    put_str_attr(group, "Description", description)
    put_str_attr(group, "Color", " ".join(f"{float(v):.3f}" for v in color))
    put_str_attr(group, "ColorMode", "BaseColor")
    put_str_attr(group, "ColorRange", color_range)
    put_str_attr(group, "ColorOpacity", "1.000")
    put_str_attr(group, "GammaCorrection", "1.000")


def _complete_required_info(f: h5py.File, layout: ImsLayout) -> None:
    """Add DataSetInfo/Channel c and TimeInfo where missing: Bitplane's reader needs them (FORMAT §5.2).

    Existing metadata is never changed.
    """
    info = f.require_group(layout.info_dir)
    for c in range(layout.n_channels):
        if f"Channel {c}" not in info:
            group = info.create_group(f"Channel {c}")
            hist_group = f[layout.group_path(0, 0, c)]
            lo = _float_attr(hist_group, "HistogramMin") or 0.0
            hi = _float_attr(hist_group, "HistogramMax") or float(np.iinfo(layout.dtype).max
                                                                  if layout.dtype.kind == "u" else 1.0)
            _put_channel_info(group, f"Channel {c}", (1.0, 1.0, 1.0), "", f"{lo:.3f} {hi:.3f}")
    if "TimeInfo" not in info:
        group = info.create_group("TimeInfo")
        put_str_attr(group, "DatasetTimePoints", str(layout.n_timepoints))
        put_str_attr(group, "FileTimePoints", str(layout.n_timepoints))
        start = datetime(2000, 1, 1)
        for t in range(layout.n_timepoints):  # 1-based names, strictly increasing times (FORMAT §5.3)
            stamp = (start + timedelta(seconds=t)).strftime("%Y-%m-%d %H:%M:%S.000")
            put_str_attr(group, f"TimePoint{t + 1}", stamp)


def append_mask_channel(
    source_ims: str | Path,
    out_path: str | Path,
    masks: Any,
    *,
    timepoint: int = 0,
    channel_name: str = "Protoscope mask",
    color: Sequence[float] = (1.0, 0.0, 1.0),
    overwrite: bool = False,
    description: str = "",
    progress: Callable[[float], None] | None = None,
) -> Path:
    """Write a copy of `source_ims` with `masks` appended as a new last channel (FORMAT.md §8).

    masks : (Z, Y, X) bool/uint8 (any numeric: nonzero = foreground), the full level-0 size of the
        source; a numpy array or np.memmap, read band by band (a memmap larger than RAM works).
    timepoint : the time point that gets the mask; the others get zeros.
    Every resolution level and time point gets a `Channel C` group with Data of channel 0's dtype,
    padded shape and chunk shape (gzip level 2), ImageSize attributes, and histograms; level r > 0
    holds the truncated mean of 2x2x2 blocks of level r-1 (ImarisWriter's rule, values 0..255).
    DataSetInfo/Channel C gets name, colour (RGB 0..1), BaseColor, range 0..255; Image/Noc is updated.
    The source is only read. The copy is written to a temp file beside `out_path` and renamed.
    progress : optional callback receiving the fraction done (0..1).
    Returns out_path. Raises StackError for a bad source, a mask of the wrong shape, an existing
    `out_path` without `overwrite`, or `out_path` being the source itself.
    """
    source = Path(source_ims)
    out = Path(out_path)
    with ImsStack(source) as stack:
        layout = stack.layout
    masks = as_mask_array(masks, out)
    if tuple(masks.shape) != layout.level_shapes[0]:
        z, y, x = layout.level_shapes[0]
        raise StackError(f"mask has shape (Z, Y, X) = {tuple(masks.shape)} but '{source.name}' is {(z, y, x)} "
                         "at full resolution; the mask must cover the whole stack")
    if not 0 <= int(timepoint) < layout.n_timepoints:
        raise StackError(f"time point {timepoint} requested but '{source.name}' has time points "
                         f"0..{layout.n_timepoints - 1}")
    if len(color) != 3 or not all(0.0 <= float(v) <= 1.0 for v in color):
        raise StackError(f"mask colour {tuple(color)} for '{out.name}' must be three numbers in 0..1 (R, G, B)")

    with atomic_output(out, overwrite=overwrite, source=source) as tmp:
        need = source.stat().st_size + (16 << 20)
        free = shutil.disk_usage(tmp.parent).free
        if free < need:
            raise StackError(f"not enough disk space in '{tmp.parent}' to write '{out.name}': about "
                             f"{need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free")
        shutil.copyfile(source, tmp)
        with open_h5(tmp, "r+") as f:
            _append(f, layout, masks, int(timepoint), channel_name, color, description, progress)
    return out


def _append(f: h5py.File, layout: ImsLayout, masks: Any, timepoint: int, name: str, color: Sequence[float],
            description: str, progress: Callable[[float], None] | None) -> None:
    c_new = layout.n_channels
    total = 0
    for r in range(layout.n_levels):
        ref = f[layout.group_path(r, 0, 0)]["Data"]
        chunks = ref.chunks or _default_chunks(ref.shape, layout.dtype)
        total += len(list(_padded_blocks(ref.shape, chunks)))
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(min(1.0, done[0] / max(total, 1)))

    for t in range(layout.n_timepoints):
        prev: h5py.Dataset | None = None
        for r in range(layout.n_levels):
            tp_group = f[f"{layout.dataset_dir}/ResolutionLevel {r}/TimePoint {t}"]
            ref = tp_group["Channel 0"]["Data"]
            chunks = ref.chunks or _default_chunks(ref.shape, layout.dtype)
            group = tp_group.create_group(f"Channel {c_new}")
            data = group.create_dataset("Data", shape=ref.shape, dtype=ref.dtype, chunks=chunks,
                                        compression="gzip", compression_opts=MASK_GZIP_LEVEL, fillvalue=0)
            size = layout.level_shapes[r]
            for axis, value in zip("XYZ", size[::-1]):
                put_str_attr(group, f"ImageSize{axis}", str(value))
            hist = _Histogram(np.dtype(ref.dtype).newbyteorder("="))
            if t == timepoint:
                if r == 0:
                    _write_level0(data, masks, size, hist, tick)
                else:
                    assert prev is not None
                    _write_lower_level(data, prev, size, layout.level_shapes[r - 1], hist, tick)
            else:
                _write_zero_channel(data)
                hist.add_zeros(int(np.prod(size)))
            hist.write(group)
            prev = data

    _complete_required_info(f, layout)
    info = f.require_group(layout.info_dir)
    if f"Channel {c_new}" in info:
        del info[f"Channel {c_new}"]  # stale metadata of a channel that has no data
    _put_channel_info(info.create_group(f"Channel {c_new}"), name, color, description)
    image = info.get("Image")
    if isinstance(image, h5py.Group) and "Noc" in image.attrs:
        put_str_attr(image, "Noc", str(c_new + 1))
