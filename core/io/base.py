"""Stack I/O: open Imaris `.ims`, TIFF / OME-TIFF / ImageJ stacks, single images and image folders.

Everything in Protoscope reads pixels through :func:`open_stack`. A :class:`Stack` is lazy: opening
reads only metadata, and :meth:`Stack.read_slice` reads exactly one ``(Y, X)`` plane in the native
dtype. Nothing here ever loads a whole stack.

Axis conventions: ``Stack.shape`` is ``(Z, C, Y, X)`` at resolution level 0 and time point 0;
``level_shape(level)`` is ``(Z, Y, X)``. Voxel sizes are in µm.

>>> with open_stack("sample.ims") as stack:          # doctest: +SKIP
...     image = stack.read_slice(10, channel=-2)       # (Y, X) uint16, the penultimate channel

Supported formats and their details are documented in ``docs/formats.md``.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, Iterator, Sequence
from xml.etree import ElementTree

import numpy as np

from core.errors import StackError

__all__ = [
    "VoxelSize",
    "Stack",
    "open_stack",
    "rgb_to_grey",
    "natural_sort_key",
    "SUPPORTED_SUFFIXES",
    "unit_to_um",
]

IMS_SUFFIXES = (".ims",)
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SUPPORTED_SUFFIXES = IMS_SUFFIXES + TIFF_SUFFIXES + IMAGE_SUFFIXES  # plus a folder of images

# TIFF pixel types we accept; complex and structured types have no meaning as intensities.
TIFF_DTYPES = tuple(
    np.dtype(t)
    for t in ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
              "float16", "float32", "float64")
)

# ITU-R BT.601 luma weights, the ones Pillow's convert('L') uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class VoxelSize:
    """Size of one voxel in micrometres (µm) along x, y and z."""

    x: float
    y: float
    z: float

    def as_dict(self) -> dict[str, float]:
        return {"x": self.x, "y": self.y, "z": self.z}


class Stack:
    """A lazily read image stack, ``(Z, C, Y, X)`` at level 0 and time point 0.

    Attributes
    ----------
    path : Path of the file or folder.
    format : 'ims' | 'tiff' | 'ome-tiff' | 'imagej-tiff' | 'image' | 'image-folder'.
    shape : (Z, C, Y, X) at level 0, time point 0.
    dtype : numpy dtype of the planes `read_slice` returns.
    channel_names : list of C names (defaults 'Channel 0', 'Channel 1', ...).
    channel_colors : list of C RGB tuples in 0..1, or None where unknown.
    voxel_size : VoxelSize in µm at level 0, or None when the file does not say.
    n_timepoints, n_levels : counts of time points and resolution levels (n_levels is 1 except for .ims).

    Use as a context manager (or call `close`) to release the file handle.
    """

    path: Path
    format: str
    shape: tuple[int, int, int, int]
    dtype: np.dtype
    channel_names: list[str]
    channel_colors: list[tuple[float, float, float] | None]
    voxel_size: VoxelSize | None
    n_timepoints: int
    n_levels: int

    def __init__(
        self,
        path: Path,
        *,
        format: str,
        shape: tuple[int, int, int, int],
        dtype: np.dtype,
        channel_names: Sequence[str] | None = None,
        channel_colors: Sequence[tuple[float, float, float] | None] | None = None,
        voxel_size: VoxelSize | None = None,
        n_timepoints: int = 1,
        level_shapes: Sequence[tuple[int, int, int]] | None = None,
    ) -> None:
        n_c = int(shape[1])
        self.path = Path(path)
        self.format = format
        self.shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
        self.dtype = np.dtype(dtype)
        names = list(channel_names) if channel_names is not None else []
        self.channel_names = [
            names[c] if c < len(names) and names[c] else f"Channel {c}" for c in range(n_c)
        ]
        colors = list(channel_colors) if channel_colors is not None else []
        self.channel_colors = [colors[c] if c < len(colors) else None for c in range(n_c)]
        self.voxel_size = voxel_size
        self.n_timepoints = int(n_timepoints)
        z, _, y, x = self.shape
        self._level_shapes = [tuple(int(v) for v in s) for s in (level_shapes or [(z, y, x)])]
        self.n_levels = len(self._level_shapes)
        self._closed = False

    # -- public API -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """File or folder name, used in messages."""
        return self.path.name

    def level_shape(self, level: int) -> tuple[int, int, int]:
        """(Z, Y, X) size of resolution `level` (0 = full resolution)."""
        return self._level_shapes[self._check_level(level)]  # type: ignore[return-value]

    def level_voxel_size(self, level: int) -> VoxelSize | None:
        """Voxel size in µm at resolution `level`: the level-0 extent divided by that level's size."""
        lz, ly, lx = self.level_shape(level)
        if self.voxel_size is None:
            return None
        z0, _, y0, x0 = self.shape
        v = self.voxel_size
        return VoxelSize(x=v.x * x0 / lx, y=v.y * y0 / ly, z=v.z * z0 / lz)

    def resolve_channel(self, channel: int) -> int:
        """Channel index in 0..C-1; negatives count from the end (-1 = last, -2 = penultimate).

        Raises StackError naming the file and the valid range.
        """
        n_c = self.shape[1]
        c = _as_index(channel, "channel", self)
        if not -n_c <= c < n_c:
            raise StackError(
                f"channel {c} requested but '{self.name}' has channels 0..{n_c - 1} "
                f"(or -{n_c}..-1 counting from the end)"
            )
        return c % n_c

    def read_slice(self, z: int, channel: int = 0, *, timepoint: int = 0, level: int = 0) -> np.ndarray:
        """Read one plane: (Y, X) array in the native dtype, padding cropped.

        z : slice index 0..Z-1 at that level (no negatives, so an off-by-one never wraps around).
        channel : 0..C-1, or negative from the end.
        timepoint, level : 0..n_timepoints-1 and 0..n_levels-1.
        Raises StackError (naming the file and the valid range) for out-of-range indices and for
        unreadable data.
        """
        self._check_open()
        c = self.resolve_channel(channel)
        t = self._check_timepoint(timepoint)
        lv = self._check_level(level)
        n_z = self._level_shapes[lv][0]
        zz = _as_index(z, "z", self)
        if not 0 <= zz < n_z:
            where = f" at level {lv}" if self.n_levels > 1 else ""
            raise StackError(f"slice z={zz} requested but '{self.name}' has z 0..{n_z - 1}{where}")
        plane = self._read_plane(zz, c, t, lv)
        return np.ascontiguousarray(plane)

    def read_slices(self, z_values: Sequence[int], channel: int = 0, *, timepoint: int = 0, level: int = 0,
                    max_bytes: int = 256 << 20) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (z, plane) for each z in `z_values`, in that order; planes as from `read_slice`.

        Same checks as `read_slice`, all done before the first plane is read. Where the storage groups
        planes (an .ims chunk spans e.g. 32 slices) the requested planes of one group are read together,
        so each chunk is decompressed once per group instead of once per plane; at most `max_bytes` of
        planes are held at a time. Other formats read plane by plane.
        """
        self._check_open()
        c = self.resolve_channel(channel)
        t = self._check_timepoint(timepoint)
        lv = self._check_level(level)
        n_z = self._level_shapes[lv][0]
        zs = [_as_index(z, "z", self) for z in z_values]
        bad = [z for z in zs if not 0 <= z < n_z]
        if bad:
            where = f" at level {lv}" if self.n_levels > 1 else ""
            raise StackError(f"slice z={bad[0]} requested but '{self.name}' has z 0..{n_z - 1}{where}")
        for z, plane in self._iter_planes(zs, c, t, lv, max_bytes):
            yield z, np.ascontiguousarray(plane)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (used by `python -m core info --json`)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "shape": list(self.shape),
            "axes": "ZCYX",
            "dtype": self.dtype.name,
            "channels": [
                {"index": c, "name": self.channel_names[c],
                 "color": list(self.channel_colors[c]) if self.channel_colors[c] is not None else None}
                for c in range(self.shape[1])
            ],
            "voxel_size": self.voxel_size.as_dict() if self.voxel_size is not None else None,
            "voxel_unit": "um",
            "n_timepoints": self.n_timepoints,
            "n_levels": self.n_levels,
            "level_shapes": [list(s) for s in self._level_shapes],
        }

    def close(self) -> None:
        """Release the file handle; later reads raise StackError."""
        if not self._closed:
            self._closed = True
            self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def __repr__(self) -> str:
        vs = self.voxel_size
        vs_text = f"{vs.x:g}x{vs.y:g}x{vs.z:g} µm" if vs is not None else "unknown"
        return (f"<{type(self).__name__} '{self.name}' format={self.format} shape(ZCYX)={self.shape} "
                f"dtype={self.dtype.name} voxel={vs_text} T={self.n_timepoints} levels={self.n_levels}>")

    # -- for subclasses -----------------------------------------------------------------------------

    def _read_plane(self, z: int, c: int, t: int, level: int) -> np.ndarray:
        raise NotImplementedError

    def _iter_planes(self, zs: list[int], c: int, t: int, level: int,
                     max_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
        for z in zs:
            yield z, self._read_plane(z, c, t, level)

    def _close(self) -> None:
        pass

    # -- checks -------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StackError(f"'{self.name}' was closed; open it again with open_stack")

    def _check_timepoint(self, timepoint: int) -> int:
        t = _as_index(timepoint, "time point", self)
        if not 0 <= t < self.n_timepoints:
            raise StackError(
                f"time point {t} requested but '{self.name}' has time points 0..{self.n_timepoints - 1}"
            )
        return t

    def _check_level(self, level: int) -> int:
        lv = _as_index(level, "resolution level", self)
        if not 0 <= lv < self.n_levels:
            raise StackError(
                f"resolution level {lv} requested but '{self.name}' has levels 0..{self.n_levels - 1}"
            )
        return lv


def _as_index(value: Any, what: str, stack: Stack) -> int:
    """Integer index from int-like input (numpy ints too); StackError for anything else."""
    if isinstance(value, (bool, np.bool_)):
        raise StackError(f"{what} must be an integer, got {value!r} (for '{stack.name}')")
    try:
        import operator

        return operator.index(value)
    except TypeError:
        raise StackError(f"{what} must be an integer, got {value!r} (for '{stack.name}')") from None


# ------------------------------------------------------------------------------------------------
# open_stack: dispatch by what the path is
# ------------------------------------------------------------------------------------------------


def open_stack(path: str | Path) -> Stack:
    """Open an image stack lazily (only metadata is read).

    path : an Imaris `.ims` file, a TIFF / OME-TIFF / ImageJ TIFF, a PNG / JPEG / BMP image, or a
        folder of such images (one slice per file, natural sort order: 'img2' before 'img10').
    Returns a Stack (context manager). Raises StackError naming the file and the problem.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise StackError(f"'{p}' does not exist (check the path)")
    if p.is_dir():
        return ImageFolderStack(p)
    if not p.is_file():
        raise StackError(f"'{p}' is not a regular file")
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise StackError(
            f"'{p.name}' has an unknown format ({suffix or 'no extension'}); supported: "
            f"{', '.join(SUPPORTED_SUFFIXES)} files, .ome.tif/.ome.tiff, or a folder of images"
        )
    if p.stat().st_size == 0:
        raise StackError(f"'{p.name}' is empty (0 bytes); the file is truncated or was not written")
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise StackError(f"'{p.name}' cannot be read ({exc.strerror or exc}); check its permissions") from None
    if suffix in IMS_SUFFIXES:
        from core.io.ims import ImsStack  # core.io.ims imports this module; import late

        return ImsStack(p)
    if suffix in TIFF_SUFFIXES:
        return TiffStack(p)
    return ImageStack(p)


# ------------------------------------------------------------------------------------------------
# small shared helpers
# ------------------------------------------------------------------------------------------------

_UNIT_TO_UM = {
    "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "micrometers": 1.0, "micrometres": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6, "metre": 1e6,
    "a": 1e-4, "angstrom": 1e-4, "pm": 1e-6, "inch": 25400.0, "in": 25400.0,
}


def unit_to_um(unit: str | None) -> float | None:
    """Micrometres per `unit` ('um', 'µm', 'micron', 'nm', 'mm', ...); None if unknown or 'pixel'."""
    if unit is None:
        return None
    u = unit.strip().lower()
    for mu in ("\\u00b5", "µ", "μ"):  # ImageJ writes the micro sign escaped
        u = u.replace(mu, "u")
    u = u.replace("å", "a")
    return _UNIT_TO_UM.get(u)


def _positive(values: Sequence[float | None]) -> bool:
    return all(v is not None and np.isfinite(v) and v > 0 for v in values)


def stack_label(path: str | Path) -> str:
    """The name a stack goes by in models, reports and output files: its file name without extensions
    ('a.ome.tif' -> 'a', 'b.ims' -> 'b')."""
    name = Path(path).name
    for suffix in (".ome.tif", ".ome.tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def default_image_channel(stack: Stack, requested: int | None = None) -> int:
    """The channel to segment: ``requested`` when given (negatives count from the end), else the lab
    convention: the penultimate channel of a multi-channel ``.ims`` (the last holds the expert mask), else 0.

    Raises StackError when ``requested`` is outside the stack's channels.
    """
    if requested is not None:
        return stack.resolve_channel(requested)
    if stack.format == "ims" and stack.shape[1] >= 2:
        return stack.shape[1] - 2
    return 0


def natural_sort_key(name: str) -> list[Any]:
    """Sort key in which digit runs compare as numbers: 'img2' < 'img10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """(Y, X, 3 or 4) RGB(A) -> (Y, X) luminance 0.299 R + 0.587 G + 0.114 B (alpha ignored).

    Integer input keeps its dtype (rounded to nearest); float input keeps its float dtype.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype == bool:
        rgb = rgb.astype(np.uint8) * 255
    w = np.asarray(LUMA_WEIGHTS, dtype=np.float64 if rgb.dtype.itemsize > 2 else np.float32)
    grey = rgb[..., :3] @ w
    if rgb.dtype.kind == "f":
        return grey.astype(rgb.dtype)
    info = np.iinfo(rgb.dtype)
    return np.clip(np.rint(grey), info.min, info.max).astype(rgb.dtype)


def _bool_to_uint8(plane: np.ndarray) -> np.ndarray:
    """1-bit images read as uint8 0/255, like the masks Protoscope writes."""
    return plane.astype(np.uint8) * np.uint8(255) if plane.dtype == bool else plane


# ------------------------------------------------------------------------------------------------
# TIFF
# ------------------------------------------------------------------------------------------------

_TIFF_CORRUPT_HINTS = ("invalid page offset", "corrupt", "truncat", "failed to read", "invalid tag")


class _LogCapture(logging.Handler):
    """Collects tifffile's log warnings while opening, which are its only sign of a damaged file."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass(frozen=True)
class _AxisPlan:
    """How the axes of a tifffile series map onto (T, Z, C, Y, X).

    axes, shape : the unsqueezed series axes and shape (tifffile letters).
    n_lead : the first n_lead axes select a page; the rest are the axes inside one page.
    t_axes, z_axes, c_axes : positions flattened (row-major) into the T, Z and C index.
    rgb_axis : position of an RGB(A) sample axis reduced to grey, or None.
    """

    axes: str
    shape: tuple[int, ...]
    n_lead: int
    t_axes: tuple[int, ...]
    z_axes: tuple[int, ...]
    c_axes: tuple[int, ...]
    rgb_axis: int | None

    def size(self, positions: tuple[int, ...]) -> int:
        return prod(self.shape[i] for i in positions)

    def index(self, t: int, z: int, c: int) -> tuple[Any, ...]:
        """Full index into the series array: ints on T/Z/C axes, slices on Y, X and RGB."""
        idx: list[Any] = [slice(None)] * len(self.shape)
        for positions, value in ((self.t_axes, t), (self.z_axes, z), (self.c_axes, c)):
            if positions:
                for pos, v in zip(positions, np.unravel_index(value, [self.shape[i] for i in positions])):
                    idx[pos] = int(v)
        return tuple(idx)


def _plan_axes(axes: str, shape: tuple[int, ...], page_size: int, is_rgb: bool) -> _AxisPlan:
    """Assign roles to tifffile axis letters (table in docs/formats.md, section TIFF)."""
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"axes {axes!r} have no Y and X")
    y, x = axes.index("Y"), axes.index("X")
    rgb_axis = None
    if is_rgb and "S" in axes and shape[axes.index("S")] in (3, 4):
        rgb_axis = axes.index("S")
    t_axes = tuple(i for i, a in enumerate(axes) if a == "T")
    c_axes = tuple(i for i, a in enumerate(axes) if a == "C" or (a == "S" and i != rgb_axis))
    z_axes = tuple(i for i, a in enumerate(axes) if a not in "TCSYX")
    # the trailing axes whose sizes multiply to one page are the axes inside a page
    inner, n_lead = 1, None
    for i in range(len(shape) - 1, -1, -1):
        inner *= shape[i]
        if inner == page_size and i <= min(y, x, rgb_axis if rgb_axis is not None else x):
            n_lead = i
            break
    if n_lead is None:
        raise ValueError(f"cannot split axes {axes!r} {shape} into pages of {page_size} values")
    return _AxisPlan(axes, tuple(shape), n_lead, t_axes, z_axes, c_axes, rgb_axis)


def _open_tiff_file(path: Path):
    """tifffile.TiffFile plus its first series, with damage turned into StackError."""
    import tifffile

    capture = _LogCapture()
    tlog = logging.getLogger("tifffile")
    tlog.addHandler(capture)
    previous = tlog.propagate
    tlog.propagate = False  # keep tifffile's damage warnings out of the user's terminal; we report them
    tif = None
    try:
        try:
            tif = tifffile.TiffFile(path)
            series = tif.series[0]
            pages = len(series)
            last = series[pages - 1] if pages and not series.is_truncated else None
        except tifffile.TiffFileError as exc:
            if tif is not None:
                tif.close()
            if "not a tiff file" in str(exc).lower():
                raise StackError(f"'{path.name}' is not a TIFF file (no TIFF header); it may be damaged "
                                 "or have the wrong extension") from None
            raise StackError(f"'{path.name}' is a truncated or corrupt TIFF file ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types on damaged files
            if tif is not None:
                tif.close()
            raise StackError(f"'{path.name}' is a truncated or corrupt TIFF file ({type(exc).__name__}: "
                             f"{exc})") from None
    finally:
        tlog.removeHandler(capture)
        tlog.propagate = previous
    damage = [m for m in capture.messages if any(h in m.lower() for h in _TIFF_CORRUPT_HINTS)]
    if damage or (pages > 1 and last is None and not series.is_truncated):
        tif.close()
        raise StackError(f"'{path.name}' is a truncated or corrupt TIFF file ({'; '.join(damage[:2])})")
    return tif, series


def _tiff_voxel_size(tif, series) -> tuple[VoxelSize | None, list[str] | None, list[Any] | None]:
    """Voxel size (µm), channel names and colours from OME-XML or ImageJ metadata."""
    if series.kind == "ome" and tif.ome_metadata:
        return _ome_metadata(tif.ome_metadata, 0)  # series[0] is the OME-XML's first Image
    if series.kind == "imagej" and tif.imagej_metadata is not None:
        return _imagej_metadata(tif.imagej_metadata, series.keyframe), _imagej_labels(tif.imagej_metadata), None
    return None, None, None


def _ome_metadata(xml: str, image_index: int = 0):
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None, None, None
    images = [el for el in root if el.tag.rsplit("}", 1)[-1] == "Image"]
    if not images:
        return None, None, None
    image = images[min(image_index, len(images) - 1)]
    pixels = next((el for el in image if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, None, None
    channels = [el for el in pixels if el.tag.rsplit("}", 1)[-1] == "Channel"]
    names = [ch.get("Name", "") for ch in channels]
    colors = [_ome_color(ch.get("Color")) for ch in channels]

    def size(axis: str) -> float | None:
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            return None
        factor = unit_to_um(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        try:
            return float(value) * factor if factor is not None else None
        except ValueError:
            return None

    x, y, z = size("X"), size("Y"), size("Z")
    if y is None:
        y = x
    if z is None:
        z = 1.0  # OME leaves it out for single planes; 1 µm like ImageJ's default pixel depth
    voxel = VoxelSize(x, y, z) if _positive([x, y, z]) else None  # type: ignore[arg-type]
    return voxel, names, colors


def _ome_color(value: str | None) -> tuple[float, float, float] | None:
    """OME Channel@Color (signed 32-bit RGBA integer) -> RGB in 0..1."""
    if value is None:
        return None
    try:
        v = int(value) & 0xFFFFFFFF
    except ValueError:
        return None
    return ((v >> 24 & 255) / 255, (v >> 16 & 255) / 255, (v >> 8 & 255) / 255)


def _imagej_metadata(meta: dict, keyframe) -> VoxelSize | None:
    factor = unit_to_um(meta.get("unit"))
    if factor is None:
        return None  # ImageJ without a unit is uncalibrated (pixel units)
    try:
        xres = keyframe.tags["XResolution"].value
        yres = keyframe.tags["YResolution"].value if "YResolution" in keyframe.tags else xres
        x = xres[1] / xres[0] * factor
        y = yres[1] / yres[0] * factor
        z = float(meta.get("spacing", 1.0)) * factor  # ImageJ's default pixel depth is 1
    except (KeyError, ZeroDivisionError, TypeError, ValueError, IndexError):
        return None
    return VoxelSize(x, y, z) if _positive([x, y, z]) else None


def _imagej_labels(meta: dict) -> list[str] | None:
    labels = meta.get("Labels")
    if not labels:
        return None
    n_c = int(meta.get("channels", 1))
    if n_c > 1 and len(labels) >= n_c:
        return [str(s) for s in labels[:n_c]]  # ImageJ order is CZT: the first C labels are z=0's channels
    if n_c == 1 and len(set(labels)) == 1:
        return [str(labels[0])]  # one channel, every slice labelled alike (what `export` writes)
    return None


class TiffStack(Stack):
    """TIFF, OME-TIFF or ImageJ hyperstack read through tifffile's first series, one page at a time."""

    def __init__(self, path: Path) -> None:
        import tifffile

        tif, series = _open_tiff_file(path)
        try:
            kind = series.kind
            fmt = "ome-tiff" if kind == "ome" else "imagej-tiff" if kind == "imagej" else "tiff"
            keyframe = series.keyframe
            dtype = np.dtype(series.dtype)
            if dtype not in TIFF_DTYPES:
                raise StackError(
                    f"'{path.name}' has unsupported pixel type {dtype.name}; TIFF stacks must be one of "
                    f"{', '.join(d.name for d in TIFF_DTYPES)}"
                )
            # JPEG-compressed YCbCr pages decode to RGB; palette pages keep their indices (ImageJ LUTs are
            # display only, the indices are the measured values)
            is_rgb = keyframe.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
            axes, shape = series.get_axes(False), tuple(series.get_shape(False))
            try:
                plan = _plan_axes(axes, shape, int(prod(keyframe.shape)), is_rgb)
            except ValueError as exc:
                raise StackError(f"'{path.name}' has an unsupported TIFF layout: {exc}") from None
            n_t, n_z, n_c = plan.size(plan.t_axes), plan.size(plan.z_axes), plan.size(plan.c_axes)
            voxel, names, colors = _tiff_voxel_size(tif, series)
            if names is not None and len(names) != n_c:
                names = None
            if colors is not None and len(colors) != n_c:
                colors = None
            self._offset = series.dataoffset  # contiguous uncompressed data: read pages by offset
            self._page_nbytes = int(prod(shape[plan.n_lead:])) * dtype.itemsize
            n_pages = int(prod(shape[:plan.n_lead]))
            if self._offset is not None:
                end = self._offset + n_pages * self._page_nbytes
                if end > path.stat().st_size:
                    raise StackError(
                        f"'{path.name}' is a truncated TIFF file: its pixel data end at byte {end} but the "
                        f"file has {path.stat().st_size} bytes"
                    )
            elif series.is_truncated or len(series) < n_pages:
                raise StackError(f"'{path.name}' is a truncated or corrupt TIFF file: {len(series)} pages "
                                 f"found, {n_pages} expected")
        except BaseException:
            tif.close()
            raise
        out_dtype = np.dtype(np.uint8) if dtype == bool else dtype
        super().__init__(
            path, format=fmt, shape=(n_z, n_c, shape[plan.axes.index("Y")], shape[plan.axes.index("X")]),
            dtype=out_dtype, channel_names=names, channel_colors=colors, voxel_size=voxel,
            n_timepoints=n_t,
        )
        self._tif, self._series, self._plan = tif, series, plan
        self._file_dtype = np.dtype(tif.byteorder + dtype.char) if dtype != bool else dtype
        self._lock = threading.RLock()

    def _read_plane(self, z: int, c: int, t: int, level: int) -> np.ndarray:
        plan = self._plan
        index = plan.index(t, z, c)
        lead, inner = index[:plan.n_lead], index[plan.n_lead:]
        page_no = int(np.ravel_multi_index(lead, plan.shape[:plan.n_lead])) if lead else 0
        try:
            with self._lock:
                if self._offset is not None and self._file_dtype != bool:
                    count = self._page_nbytes // self._file_dtype.itemsize
                    page = self._tif.filehandle.read_array(
                        self._file_dtype, count, self._offset + page_no * self._page_nbytes)
                else:
                    tiff_page = self._series[page_no]
                    if tiff_page is None:
                        raise StackError(f"cannot read z={z}, channel {c} of '{self.name}': its TIFF page is "
                                         "missing (a multi-file OME-TIFF needs all its files beside it)")
                    page = tiff_page.asarray()
        except StackError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoders raise many types on damaged data
            raise StackError(f"cannot read z={z}, channel {c} of '{self.name}': the TIFF file is truncated "
                             f"or corrupt ({type(exc).__name__}: {exc})") from None
        page = page.reshape(plan.shape[plan.n_lead:])[inner]
        if plan.rgb_axis is not None:
            kept = [i for i in range(plan.n_lead, len(plan.shape)) if not isinstance(index[i], int)]
            page = np.moveaxis(page, kept.index(plan.rgb_axis), -1)
            page = rgb_to_grey(page)
        return _bool_to_uint8(page)

    def _close(self) -> None:
        self._tif.close()


# ------------------------------------------------------------------------------------------------
# Single images (Pillow) and folders of images
# ------------------------------------------------------------------------------------------------

_PIL_MODE_DTYPES = {
    "1": np.uint8, "L": np.uint8, "LA": np.uint8, "P": np.uint8, "PA": np.uint8,
    "RGB": np.uint8, "RGBA": np.uint8, "RGBX": np.uint8, "CMYK": np.uint8, "YCbCr": np.uint8,
    "LAB": np.uint8, "HSV": np.uint8, "La": np.uint8, "RGBa": np.uint8,
    "I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16, "I;16N": np.uint16,
    "I": np.int32, "F": np.float32,
}


@dataclass(frozen=True)
class _ImageInfo:
    """What one image file holds without decoding it: (Y, X) size and the dtype we will return."""

    height: int
    width: int
    dtype: np.dtype


def _image_info(path: Path) -> _ImageInfo:
    """Header of a single image (PNG/JPEG/BMP via Pillow, TIFF via tifffile)."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        with TiffStack(path) as st:
            if st.shape[0] * st.shape[1] * st.n_timepoints != 1:
                raise StackError(f"'{path.name}' holds {st.shape[0]} slices x {st.shape[1]} channels; a folder "
                                 "stack needs one plane per file")
            return _ImageInfo(st.shape[2], st.shape[3], st.dtype)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode, (width, height) = im.mode, im.size
    except UnidentifiedImageError:
        raise StackError(f"'{path.name}' is not a readable {path.suffix} image (unknown or damaged "
                         "content)") from None
    except OSError as exc:
        raise StackError(f"'{path.name}' cannot be read: {exc}") from None
    if mode not in _PIL_MODE_DTYPES:
        raise StackError(f"'{path.name}' has unsupported image mode {mode!r}; supported: grey, RGB(A), "
                         "palette, 16-bit grey, 32-bit integer or float")
    return _ImageInfo(height, width, np.dtype(_PIL_MODE_DTYPES[mode]))


def _read_image(path: Path) -> np.ndarray:
    """Decode one image to (Y, X): RGB and palette to luminance, 1-bit to 0/255, alpha dropped."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        with TiffStack(path) as st:
            return st.read_slice(0)
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("L", "I", "F") or mode.startswith("I;16"):
                arr = np.asarray(im)
            elif mode == "1":
                arr = _bool_to_uint8(np.asarray(im))
            elif mode in ("LA", "La"):
                arr = np.asarray(im.getchannel(0))
            else:
                arr = rgb_to_grey(np.asarray(im.convert("RGB")))
    except OSError as exc:
        raise StackError(f"'{path.name}' is a truncated or corrupt image ({exc})") from None
    return arr.astype(_PIL_MODE_DTYPES.get(mode, arr.dtype), copy=False)


class ImageStack(Stack):
    """One PNG / JPEG / BMP image: shape (1, 1, Y, X); RGB is reduced to grey."""

    def __init__(self, path: Path) -> None:
        info = _image_info(path)
        super().__init__(path, format="image", shape=(1, 1, info.height, info.width), dtype=info.dtype)

    def _read_plane(self, z: int, c: int, t: int, level: int) -> np.ndarray:
        return _read_image(self.path)


def _suffix_family(suffix: str) -> str:
    s = suffix.lower()
    return {".jpeg": ".jpg", ".tiff": ".tif"}.get(s, s)


class ImageFolderStack(Stack):
    """A folder of single-plane images, one z-slice per file, in natural sort order."""

    def __init__(self, path: Path) -> None:
        files = [p for p in path.iterdir()
                 if p.is_file() and not p.name.startswith(".")
                 and p.suffix.lower() in IMAGE_SUFFIXES + TIFF_SUFFIXES]
        if not files:
            raise StackError(f"folder '{path}' contains no images ({', '.join(IMAGE_SUFFIXES + TIFF_SUFFIXES)})")
        families: dict[str, int] = {}
        for p in files:
            families[_suffix_family(p.suffix)] = families.get(_suffix_family(p.suffix), 0) + 1
        if len(families) > 1:
            listing = ", ".join(f"{n} {fam}" for fam, n in sorted(families.items()))
            raise StackError(f"folder '{path.name}' mixes image types ({listing}); keep one kind of image "
                             "per stack folder")
        files.sort(key=lambda p: natural_sort_key(p.name))
        first = _image_info(files[0])
        for p in files[1:]:
            info = _image_info(p)
            if (info.height, info.width) != (first.height, first.width):
                raise StackError(
                    f"'{p.name}' in folder '{path.name}' is {info.width}x{info.height} pixels but "
                    f"'{files[0].name}' is {first.width}x{first.height}; all slices must have one size"
                )
            if info.dtype != first.dtype:
                raise StackError(
                    f"'{p.name}' in folder '{path.name}' is {info.dtype.name} but '{files[0].name}' is "
                    f"{first.dtype.name}; all slices must have one pixel type"
                )
        self.files = files
        super().__init__(path, format="image-folder", shape=(len(files), 1, first.height, first.width),
                         dtype=first.dtype)

    def _read_plane(self, z: int, c: int, t: int, level: int) -> np.ndarray:
        arr = _read_image(self.files[z])
        if arr.shape != self.shape[2:]:
            raise StackError(f"'{self.files[z].name}' in folder '{self.name}' changed size since the folder "
                             "was opened; open it again")
        return arr

