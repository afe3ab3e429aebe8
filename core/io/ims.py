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

import itertools
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
from core.io.base import MAX_PLANE_PIXELS, Stack, VoxelSize, check_plane_pixels, unit_to_um
from core.io.chunks import ZChunkCache, decode_region, default_chunk_cache

__all__ = [
    "ImsLayout",
    "ImsStack",
    "check_channel_data",
    "decode_attr",
    "declared_count",
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
_STACK_TOKENS = itertools.count(1)  # distinct per ImsStack, for its keys in a shared ZChunkCache
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


def _group(f: h5py.File, path: str, name: str) -> h5py.Group:
    """The HDF5 group at `path`; StackError when it is missing or is a dataset."""
    obj = f.get(path)
    if not isinstance(obj, h5py.Group):
        raise StackError(f"'{name}': {path} is {'missing' if obj is None else 'a dataset, not a group'}; the .ims "
                         "file is damaged")
    return obj


def declared_count(obj: h5py.HLObject, attr: str, where: str, name: str) -> int | None:
    """A size or count the file declares as text ('300'), or None when absent or empty.

    Raises StackError naming the file, the attribute and its value when the text is not a whole number
    >= 1 (zero, negative, '12.5', 'abc', '1e400'): such a header is damaged, and guessing a size from it
    is how a reader ends up allocating terabytes or indexing an empty axis.
    """
    text = read_str_attr(obj, attr)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value.is_integer() and value >= 1):  # NaN and inf fail is_integer
        raise StackError(f"'{name}': {where} declares {attr}={text!r}; it must be a whole number of at least 1 "
                         "(the .ims header is damaged; re-export the file from Imaris or its source)")
    return int(value)


@dataclass(frozen=True)
class _LevelCheck:
    """One resolution level as validated: its unpadded (Z, Y, X) size and the dtype of its Data."""

    size: tuple[int, int, int]
    dtype: np.dtype


def _channel_data(f: h5py.File, where: str, name: str) -> tuple[h5py.Group, h5py.Dataset]:
    """The channel group at `where` and its 3-D `Data`; StackError when either is missing or malformed."""
    group = _group(f, where, name)
    data = group.get("Data")
    if not isinstance(data, h5py.Dataset):
        raise StackError(f"'{name}' has no dataset {where}/Data; the .ims file is incomplete")
    if data.ndim != 3:
        raise StackError(f"'{name}': {where}/Data has {data.ndim} dimensions, expected 3 (Z, Y, X)")
    return group, data


def _checked_size(group: h5py.Group, data: h5py.Dataset, where: str, level: int,
                  fallback: tuple[int | None, int | None, int | None], name: str) -> _LevelCheck:
    """(Z, Y, X) size and dtype of one channel's Data: its ImageSize* (else `fallback`, else the Data shape),
    each a whole number >= 1 and within the Data shape; chunks and plane within MAX_PLANE_PIXELS."""
    declared = tuple(declared_count(group, f"ImageSize{a}", where, name) for a in "ZYX")
    declared = tuple(d if d is not None else b for d, b in zip(declared, fallback))
    size = tuple(int(d) if d is not None else int(n) for d, n in zip(declared, data.shape))
    for axis, want, have in zip("ZYX", size, data.shape):
        if have < 1:
            raise StackError(f"'{name}': {where}/Data is empty (shape {data.shape}); the .ims file holds no pixels "
                             "there")
        if want > have:
            raise StackError(
                f"'{name}': {where} declares ImageSize{axis}={want} but its Data holds only {have} along {axis} "
                f"(Data shape {data.shape}, Z, Y, X); the header does not match the data (the .ims file is damaged)"
            )
    chunks = data.chunks or data.shape
    if int(np.prod(chunks, dtype=np.int64)) > MAX_PLANE_PIXELS:
        raise StackError(f"'{name}': {where}/Data is stored in chunks of {chunks} values, more than the "
                         f"{MAX_PLANE_PIXELS:,} Protoscope decompresses at a time; re-save the file with Imaris' "
                         "usual chunks (e.g. 32 x 128 x 128)")
    check_plane_pixels(name, size[1], size[2], f"level-{level} planes")
    dtype = data.dtype.newbyteorder("=") if data.dtype.kind in "uif" else data.dtype
    return _LevelCheck(size, dtype)  # type: ignore[arg-type]


def _same_as_level(this: _LevelCheck, level: _LevelCheck, where: str, level_dir: str, name: str) -> None:
    if this.size != level.size:
        raise StackError(f"'{name}': {where} is {this.size} (Z, Y, X) but {level_dir}/TimePoint 0/Channel 0 is "
                         f"{level.size}; all channels and time points of a level have one size (the .ims file is "
                         "damaged)")
    if this.dtype != level.dtype:
        raise StackError(f"'{name}': {where} is {this.dtype.name} but {level_dir}/TimePoint 0/Channel 0 is "
                         f"{level.dtype.name}; an .ims file has one pixel type for all channels")


def _check_level(f: h5py.File, dataset_dir: str, level: int, n_t: int, n_c: int,
                 image_size: tuple[int | None, int | None, int | None], name: str) -> _LevelCheck:
    """Validate one resolution level: its groups at every time point, and every channel's Data at time point 0.

    image_size : DataSetInfo/Image (Z, Y, X), the fallback for level 0 (None where absent).
    Every time point must hold Channel 0..C-1; at time point 0 each Data must exist, be 3-D, hold at least
    its declared size (the rest is chunk padding), have chunks of at most MAX_PLANE_PIXELS values, and all
    channels must declare one size and one dtype. The Data of later time points are checked against this
    level by `check_channel_data` before their first read (a time-lapse can hold thousands of them, and
    opening must stay quick). Raises StackError naming the group and the mismatch.
    """
    level_dir = f"{dataset_dir}/ResolutionLevel {level}"
    times = indexed_children(_group(f, level_dir, name), "TimePoint")
    if times != list(range(n_t)):
        raise StackError(f"'{name}' has TimePoint groups {times} in ResolutionLevel {level} but {list(range(n_t))} "
                         "in ResolutionLevel 0; the .ims file is damaged")
    for t in range(n_t):
        tp_dir = f"{level_dir}/TimePoint {t}"
        channels = indexed_children(_group(f, tp_dir, name), "Channel")
        if channels != list(range(n_c)):
            raise StackError(f"'{name}' has Channel groups {channels} in {tp_dir} but {list(range(n_c))} in "
                             "ResolutionLevel 0/TimePoint 0; the .ims file is damaged")
    fallback = image_size if level == 0 else (None, None, None)
    found: _LevelCheck | None = None
    for c in range(n_c):
        where = f"{level_dir}/TimePoint 0/Channel {c}"
        this = _checked_size(*_channel_data(f, where, name), where, level, fallback, name)
        if found is None:
            found = this
        else:
            _same_as_level(this, found, where, level_dir, name)
    assert found is not None
    return found


def check_channel_data(f: h5py.File, layout: "ImsLayout", level: int, t: int, c: int, name: str) -> h5py.Dataset:
    """The `Data` of (level, t, c), checked against the level's validated size and dtype; StackError if not.

    `ImsStack` calls it before the first read of each (level, t, c); `read_layout` has checked time point 0.
    """
    where = layout.group_path(level, t, c)
    group, data = _channel_data(f, where, name)
    level_check = _LevelCheck(layout.level_shapes[level], layout.dtype)
    this = _checked_size(group, data, where, level, level_check.size, name)  # absent ImageSize: the level's
    _same_as_level(this, level_check, where, f"{layout.dataset_dir}/ResolutionLevel {level}", name)
    return data


def _check_counts(info: h5py.Group | None, n_c: int, n_t: int, name: str) -> None:
    """The channel and time-point counts DataSetInfo declares (when it does) must match the groups."""
    if info is None:
        return
    image = info.get("Image")
    if isinstance(image, h5py.Group):
        noc = declared_count(image, "Noc", "DataSetInfo/Image", name)
        if noc is not None and noc != n_c:
            raise StackError(f"'{name}': DataSetInfo/Image declares Noc={noc} channels but the file holds {n_c} "
                             "channel groups; the .ims header does not match the data (the file is damaged)")
    time_info = info.get("TimeInfo")
    if isinstance(time_info, h5py.Group):
        in_file = declared_count(time_info, "FileTimePoints", "DataSetInfo/TimeInfo", name)
        if in_file is not None and in_file != n_t:
            raise StackError(f"'{name}': DataSetInfo/TimeInfo declares FileTimePoints={in_file} but the file holds "
                             f"{n_t} TimePoint groups; the .ims header does not match the data (the file is damaged)")
        for spelling in ("DatasetTimePoints", "DataSetTimePoints"):  # both spellings exist (docs/spec/FORMAT.md §5.3)
            total = declared_count(time_info, spelling, "DataSetInfo/TimeInfo", name)
            if total is not None and total < n_t:
                raise StackError(f"'{name}': DataSetInfo/TimeInfo declares {spelling}={total} but the file holds "
                                 f"{n_t} TimePoint groups; the .ims header does not match the data (the file is "
                                 "damaged)")


def read_layout(f: h5py.File, name: str) -> ImsLayout:
    """Layout of an open .ims file, validated; StackError when it is not an Imaris file or is damaged.

    Every declared size and count is checked once here, against the HDF5 groups and dataset shapes
    (docs/formats.md, "What is validated"), so reads never trust a header the data contradict.
    """
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
    level0 = _group(f, f"{dataset_dir}/ResolutionLevel 0", name)
    n_t = _contiguous(indexed_children(level0, "TimePoint"), "TimePoint", "ResolutionLevel 0", name)
    tp0 = _group(f, f"{dataset_dir}/ResolutionLevel 0/TimePoint 0", name)
    n_c = _contiguous(indexed_children(tp0, "Channel"), "Channel", "ResolutionLevel 0/TimePoint 0", name)
    info = f[info_dir] if info_dir in f and isinstance(f[info_dir], h5py.Group) else None
    image = info["Image"] if info is not None and isinstance(info.get("Image"), h5py.Group) else None
    image_size = (tuple(declared_count(image, a, "DataSetInfo/Image", name) for a in "ZYX")
                  if image is not None else (None, None, None))
    _check_counts(info, n_c, n_t, name)

    levels = [_check_level(f, dataset_dir, r, n_t, n_c, image_size, name)  # type: ignore[arg-type]
              for r in range(n_levels)]
    size0 = levels[0].size
    for axis, declared, actual in zip("ZYX", image_size, size0):
        if declared is not None and declared != actual:
            raise StackError(f"'{name}': DataSetInfo/Image declares {axis}={declared} but ResolutionLevel 0 "
                             f"declares ImageSize{axis}={actual}; the .ims header contradicts itself (the file is "
                             "damaged)")
    native = levels[0].dtype
    if native not in IMS_DTYPES:
        raise StackError(
            f"'{name}' stores {native.name if native.kind in 'uifcb' else str(native)} pixels, which Imaris does "
            f"not support; supported: {', '.join(d.name for d in IMS_DTYPES)}"
        )
    for r, level in enumerate(levels[1:], start=1):
        if level.dtype != native:
            raise StackError(f"'{name}': resolution level {r} is {level.dtype.name} but level 0 is {native.name}; "
                             "an .ims file has one pixel type for all levels")
    shapes = [level.size for level in levels]

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
    """An Imaris .ims file read lazily with h5py, keeping recently decoded z-chunks in memory.

    `layout` holds what the file contains (ImsLayout). Reads are serialised with a lock, so one
    stack can be shared between threads (e.g. a Streamlit resource cache).

    Reading one plane decompresses the chunk-deep slab under it (its *z-chunk*, e.g. 32 planes). When that
    z-chunk is worth keeping (`ZChunkCache.worth_caching`: 8 MiB up to the cache's bound), the whole of it is
    decoded (`core.io.chunks.decode_region`, about twice as fast as HDF5's zlib) and kept in `chunk_cache`, so
    that the other planes of the slab cost a copy. Smaller z-chunks, and ones larger than the bound, are read
    one plane at a time through h5py.

    chunk_cache : where decoded z-chunks are kept; by default the cache shared by all stacks
        (`core.io.chunks.default_chunk_cache`, 768 MiB); ``ZChunkCache(0)`` keeps none.
    """

    def __init__(self, path: Path, *, chunk_cache: ZChunkCache | None = None) -> None:
        path = Path(path)
        f = open_h5(path)
        try:
            layout = read_layout(f, path.name)
        except StackError:
            f.close()
            raise
        except (KeyError, OSError, ValueError, TypeError, AttributeError, RuntimeError) as exc:
            # h5py's own errors on damaged metadata, or a dataset where a group should be
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
        self.chunk_cache = chunk_cache if chunk_cache is not None else default_chunk_cache()
        self._owner = next(_STACK_TOKENS)  # this stack's part of the shared cache's keys
        self._decoding: dict[tuple, threading.Event] = {}  # z-chunks being decoded, so no thread decodes one twice
        self._decoding_lock = threading.Lock()

    def _dataset(self, level: int, t: int, c: int) -> h5py.Dataset:
        key = (level, t, c)
        if key not in self._datasets:
            try:
                data = check_channel_data(self._h5, self.layout, level, t, c, self.name)
            except StackError:
                raise
            except (KeyError, OSError, ValueError, TypeError, AttributeError, RuntimeError) as exc:
                raise StackError(f"'{self.name}' is a damaged .ims file ({type(exc).__name__}: {exc})") from None
            _check_filters(data, self.name)
            self._datasets[key] = data
        return self._datasets[key]

    # -- z-chunks -------------------------------------------------------------------------------------

    def _zchunk_span(self, data: h5py.Dataset, z: int, level: int) -> tuple[int, int] | None:
        """(z0, z1) of the chunk-deep slab holding plane z, or None when planes are stored one deep (or
        contiguous), where a plane read decodes nothing more than the plane."""
        depth = int(data.chunks[0]) if data.chunks is not None else 1
        if depth <= 1:
            return None
        z0 = z // depth * depth
        return z0, min(z0 + depth, self.level_shape(level)[0])

    def _zchunk(self, z: int, c: int, t: int, level: int, *, decode: bool) -> tuple[np.ndarray, int] | None:
        """(slab (z1 - z0, Y, X) read-only native dtype, z0) holding plane z: from the cache, or decoded now
        (and cached) when `decode` is set and the slab is worth caching; None otherwise."""
        with self._lock:
            data = self._dataset(level, t, c)
        span = self._zchunk_span(data, z, level)
        if span is None:
            return None
        z0, z1 = span
        key = (self._owner, level, t, c, z0)
        block = self.chunk_cache.get(key)
        if block is not None:
            return block, z0
        _, ny, nx = self.level_shape(level)
        if not decode or not self.chunk_cache.worth_caching((z1 - z0) * ny * nx * self.dtype.itemsize):
            return None
        with self._decoding_lock:
            running = self._decoding.get(key)
            if running is None:
                self._decoding[key] = threading.Event()
        if running is not None:  # another thread decodes it: wait, then take its result
            running.wait()
            block = self.chunk_cache.get(key)
            return (block, z0) if block is not None else None
        try:
            self.chunk_cache.make_room((z1 - z0) * ny * nx * self.dtype.itemsize)
            what = (f"cannot read z={z0}..{z1 - 1}, channel {c}, time point {t}, level {level} of '{self.name}'")
            block = decode_region(data, (z0, 0, 0), (z1, ny, nx), lock=self._lock, what=what)
            block = block.astype(self.dtype, copy=False)
            self.chunk_cache.put(key, block)
            block.flags.writeable = False
            return block, z0
        finally:
            with self._decoding_lock:
                self._decoding.pop(key).set()

    def plane_is_cheap(self, z: int, channel: int = 0, *, timepoint: int = 0, level: int = 0) -> bool:
        """True when plane z's z-chunk is decoded in memory, or when a plane read decodes little anyway
        (planes stored one deep, or z-chunks below the cache's minimum); False when `read_slice` would
        decompress a large chunk-deep slab. Raises StackError for out-of-range indices."""
        z, c, t, lv = self._check_plane(z, channel, timepoint, level)
        with self._lock:
            data = self._dataset(lv, t, c)
        span = self._zchunk_span(data, z, lv)
        if span is None:
            return True
        z0, z1 = span
        _, ny, nx = self.level_shape(lv)
        if (z1 - z0) * ny * nx * self.dtype.itemsize < self.chunk_cache.min_block_bytes:
            return True
        return (self._owner, lv, t, c, z0) in self.chunk_cache

    # -- reads ----------------------------------------------------------------------------------------

    def _read_plane(self, z: int, c: int, t: int, level: int) -> np.ndarray:
        found = self._zchunk(z, c, t, level, decode=True)
        if found is not None:
            block, z0 = found
            return block[z - z0].copy()  # a copy: callers may change what they get
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

    def _read_region(self, z: int, c: int, t: int, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """From the cached z-chunk when there is one; otherwise only the chunks under the region are decoded
        (nothing is cached: a region is read for its own sake, e.g. to sample statistics)."""
        found = self._zchunk(z, c, t, level, decode=False)
        if found is not None:
            block, z0 = found
            return block[z - z0, y0:y1, x0:x1].copy()
        with self._lock:
            data = self._dataset(level, t, c)
        what = f"cannot read z={z}, channel {c}, time point {t}, level {level} of '{self.name}'"
        region = decode_region(data, (z, y0, x0), (z + 1, y1, x1), lock=self._lock, what=what)
        return region[0].astype(self.dtype, copy=False)

    def _iter_planes(self, zs: list[int], c: int, t: int, level: int,
                     max_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
        """Requested planes in one chunk-deep block are read together: from the z-chunk cache when the slab
        is worth caching, otherwise one band of chunk rows at a time."""
        _, ny, nx = self.level_shape(level)
        with self._lock:
            data = self._dataset(level, t, c)
        cz, cy = (data.chunks or (1, ny, nx))[:2]
        per_group = max(1, max_bytes // max(1, ny * nx * self.dtype.itemsize))
        i = 0
        while i < len(zs):
            found = self._zchunk(zs[i], c, t, level, decode=True)
            if found is not None:
                block, z0 = found
                while i < len(zs) and z0 <= zs[i] < z0 + len(block):
                    yield zs[i], block[zs[i] - z0].copy()
                    i += 1
                continue
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
        self.chunk_cache.discard(self._owner)
        try:
            self._h5.close()
        except Exception:  # noqa: BLE001 - closing a damaged file must not raise
            pass
