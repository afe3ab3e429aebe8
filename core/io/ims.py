"""Imaris `.ims` files (HDF5, Imaris 5.5 layout): lazy reading with `ImsStack`, and the attribute codec.

Layout and attribute encoding follow docs/spec/FORMAT.md (sources: Bitplane's *Imaris5.5 File Format
Description*, ImarisWriter and ImarisReader). In short:

- pixels live in ``DataSet/ResolutionLevel r/TimePoint t/Channel c/Data``, (Z, Y, X), chunked and
  padded to whole chunks; the real size is in the group's ``ImageSizeX/Y/Z`` attributes (§4.1);
- almost every attribute is a string stored as a 1-D array of single characters (``|S1``), not
  always UTF-8 (decoded here as latin-1; §3);
- the voxel size is ``(ExtMax - ExtMin) / size`` from ``DataSetInfo/Image`` (§5.1).

`ImsStack` is what :func:`core.io.open_stack` returns for `.ims`. Writing a copy with one more channel
(`append_mask_channel`) lives in `core.io.ims_append`, which builds on `open_h5`, `read_layout` and
`put_str_attr` from here.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

try:
    import hdf5plugin  # noqa: F401 - registers the LZ4 (32004) and other HDF5 filters with h5py
except ImportError:  # gzip/shuffle files still read; LZ4 ones get a message saying what to install
    hdf5plugin = None

from core.errors import StackError
from core.io.base import Stack, VoxelSize, unit_to_um

__all__ = [
    "ImsLayout",
    "ImsStack",
    "decode_attr",
    "float_attr",
    "indexed_children",
    "int_attr",
    "open_h5",
    "put_str_attr",
    "read_layout",
    "read_str_attr",
    "IMS_DTYPES",
]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
IMS_DTYPES = tuple(np.dtype(t) for t in ("uint8", "uint16", "uint32", "float32"))
_FILTER_NAMES = {1: "gzip/deflate", 2: "shuffle", 32004: "LZ4", 32001: "Blosc", 32015: "Zstd"}


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
    """Write `value` exactly as ImarisWriter does: rank-1 array of 1-char NULLTERM strings (docs/spec/FORMAT.md §3)."""
    # Imaris strings are single-byte; characters outside latin-1 (e.g. 'λ', 'µ' is fine) become '?'.
    data = np.frombuffer(value.encode("latin-1", errors="replace"), dtype="S1") if value else np.array([b""], "S1")
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(1)
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    if name in obj.attrs:
        del obj.attrs[name]
    aid = h5py.h5a.create(obj.id, name.encode("latin-1"), tid, h5py.h5s.create_simple((len(data),)))
    aid.write(np.ascontiguousarray(data), mtype=tid)


def float_attr(obj: h5py.HLObject, name: str) -> float | None:
    text = read_str_attr(obj, name)
    try:
        return float(text) if text else None
    except ValueError:
        return None


def int_attr(obj: h5py.HLObject, name: str) -> int | None:
    value = float_attr(obj, name)
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
            return h5py.File(path, mode, libver=("earliest", "v108"))  # keep HDF5 1.8 readers (docs/spec/FORMAT.md §1)
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
    size = [int_attr(channel_group, f"ImageSize{a}") for a in "ZYX"]
    if None in size and level == 0 and image is not None:
        size = [int_attr(image, a) for a in "ZYX"]
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
        lo, hi = float_attr(image, f"ExtMin{i}"), float_attr(image, f"ExtMax{i}")
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
