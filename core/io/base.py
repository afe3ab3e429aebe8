"""The stack model every reader shares: `Stack`, `VoxelSize`, units, labels and the default-channel rule.

A :class:`Stack` is lazy: opening reads only metadata, and :meth:`Stack.read_slice` reads exactly one
``(Y, X)`` plane in the native dtype. The readers are subclasses in `core.io.tiff` (TIFF / OME-TIFF /
ImageJ), `core.io.images` (PNG / JPEG / BMP and image folders) and `core.io.ims` (Imaris);
:func:`core.io.open_stack` (in `core.io.opening`) picks one by the path.

Axis conventions: ``Stack.shape`` is ``(Z, C, Y, X)`` at resolution level 0 and time point 0;
``level_shape(level)`` is ``(Z, Y, X)``. Voxel sizes are in µm.

>>> from core.io import default_image_channel, open_stack
>>> with open_stack("sample.ims") as stack:          # doctest: +SKIP
...     image = stack.read_slice(10, channel=default_image_channel(stack))   # (Y, X) uint16

Supported formats and their details are documented in ``docs/formats.md``.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from core.errors import StackError

__all__ = [
    "VoxelSize",
    "Stack",
    "rgb_to_grey",
    "bool_to_uint8",
    "natural_sort_key",
    "stack_label",
    "lab_convention_channel",
    "SUPPORTED_SUFFIXES",
    "IMS_SUFFIXES",
    "TIFF_SUFFIXES",
    "IMAGE_SUFFIXES",
    "unit_to_um",
    "MAX_PLANE_PIXELS",
    "check_plane_pixels",
    "check_pixel_dtype",
]

IMS_SUFFIXES = (".ims",)
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SUPPORTED_SUFFIXES = IMS_SUFFIXES + TIFF_SUFFIXES + IMAGE_SUFFIXES  # plus a folder of images

#: The largest plane (Y * X pixels) a reader accepts: 2**28 = 16384 x 16384. One plane is read into memory
#: at a time and the features, scores and masks of a slice are a few times its size, so a larger plane
#: (a slide scan, or a damaged header declaring 10^6 x 10^6) is refused when the file is opened.
MAX_PLANE_PIXELS = 1 << 28

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
        _check_stack_facts(Path(path).name, shape, dtype, n_timepoints, level_shapes)
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
        zz, c, t, lv = self._check_plane(z, channel, timepoint, level)
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

    def read_region(self, z: int, channel: int = 0, *, rows: tuple[int, int], cols: tuple[int, int],
                    timepoint: int = 0, level: int = 0) -> np.ndarray:
        """Read part of one plane: (y1 - y0, x1 - x0) array in the native dtype, rows y0..y1-1, columns x0..x1-1.

        rows, cols : (start, stop) in pixels at that level, 0 <= start < stop <= Y (or X).
        Same checks and errors as `read_slice`. Chunked formats (.ims) decode only the chunks the region
        touches (for 32-deep chunks still 32 planes of them); others read the plane and crop it.
        """
        zz, c, t, lv = self._check_plane(z, channel, timepoint, level)
        _, n_y, n_x = self._level_shapes[lv]
        bounds = []
        for what, span, size in (("rows", rows, n_y), ("columns", cols, n_x)):
            if not isinstance(span, (tuple, list)) or len(span) != 2:
                raise StackError(f"{what} must be (start, stop) pixels, got {span!r} (for '{self.name}')")
            start, stop = (_as_index(v, what, self) for v in span)
            if not 0 <= start < stop <= size:
                raise StackError(f"{what} {start}..{stop - 1} requested but '{self.name}' has {what} 0..{size - 1}"
                                 f"{f' at level {lv}' if self.n_levels > 1 else ''}")
            bounds.extend((start, stop))
        y0, y1, x0, x1 = bounds
        return np.ascontiguousarray(self._read_region(zz, c, t, lv, y0, y1, x0, x1))

    def plane_is_cheap(self, z: int, channel: int = 0, *, timepoint: int = 0, level: int = 0) -> bool:
        """Whether `read_slice` returns this plane without decompressing more than the plane itself.

        True for formats that store one plane per page or file (TIFF, images); an .ims reader answers
        whether the plane's z-chunk is already decoded in memory (or too small to matter). Lets a viewer
        show a preview first instead of waiting (`core.io.preview.view_plane`). Never reads pixels.
        Raises StackError for out-of-range indices, as `read_slice`.
        """
        self._check_plane(z, channel, timepoint, level)
        return True

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

    def _read_region(self, z: int, c: int, t: int, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._read_plane(z, c, t, level)[y0:y1, x0:x1]

    def _close(self) -> None:
        pass

    # -- checks -------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StackError(f"'{self.name}' was closed; open it again with open_stack")

    def _check_plane(self, z: int, channel: int, timepoint: int, level: int) -> tuple[int, int, int, int]:
        """(z, channel, time point, level) checked as `read_slice` documents; StackError otherwise."""
        self._check_open()
        c = self.resolve_channel(channel)
        t = self._check_timepoint(timepoint)
        lv = self._check_level(level)
        n_z = self._level_shapes[lv][0]
        zz = _as_index(z, "z", self)
        if not 0 <= zz < n_z:
            where = f" at level {lv}" if self.n_levels > 1 else ""
            raise StackError(f"slice z={zz} requested but '{self.name}' has z 0..{n_z - 1}{where}")
        return zz, c, t, lv

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


def check_plane_pixels(name: str, n_y: int, n_x: int, what: str = "planes") -> None:
    """StackError when a (Y, X) plane of file `name` exceeds MAX_PLANE_PIXELS (the limit is named)."""
    if int(n_y) * int(n_x) > MAX_PLANE_PIXELS:
        raise StackError(
            f"'{name}' has {what} of {n_x} x {n_y} = {int(n_x) * int(n_y):,} pixels (X x Y), more than the "
            f"{MAX_PLANE_PIXELS:,} (2^28, e.g. 16384 x 16384) Protoscope reads; crop or downsample the stack "
            "first (e.g. in Fiji)"
        )


def check_pixel_dtype(name: str, dtype: Any) -> np.dtype:
    """The dtype if planes can hold it as intensities (bool, integers, floats); StackError otherwise."""
    dt = np.dtype(dtype)
    if dt.kind not in "biuf" or dt.fields is not None or dt.subdtype is not None:
        raise StackError(
            f"'{name}' has pixel type {dt.name if dt.kind in 'biufc' else str(dt)}, which is not an intensity; "
            "supported: bool, unsigned and signed integers, floats (convert the file, e.g. in Fiji)"
        )
    return dt


def _check_stack_facts(name: str, shape: Sequence[int], dtype: Any, n_timepoints: int,
                       level_shapes: Sequence[Sequence[int]] | None) -> None:
    """Every reader's edge check: sizes are positive integers, the plane fits the limit, the dtype is numeric.

    Readers check their own format's declarations against the data first (a damaged .ims header, a
    truncated TIFF); this is the rule the shared `Stack` holds for all of them.
    """
    sizes = list(shape) + [n_timepoints] + [v for s in (level_shapes or []) for v in s]
    if len(shape) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
                                  for v in sizes):
        raise StackError(f"'{name}' declares a shape {tuple(shape)} that is not four whole numbers (Z, C, Y, X); "
                         "the file is damaged")
    for what, value in zip(("z slices (Z)", "channels (C)", "rows (Y)", "columns (X)"), shape):
        if value < 1:
            raise StackError(f"'{name}' has {value} {what}; a stack needs at least one (the file holds no "
                             "pixels or its header is damaged)")
    if n_timepoints < 1:
        raise StackError(f"'{name}' has {n_timepoints} time points; a stack needs at least one (the file is "
                         "damaged)")
    for level, lshape in enumerate(level_shapes or []):
        if len(lshape) != 3 or min(lshape) < 1:
            raise StackError(f"'{name}' has resolution level {level} of size {tuple(lshape)} (Z, Y, X); every "
                             "size must be at least 1 (the file is damaged)")
    check_plane_pixels(name, shape[2], shape[3])
    check_pixel_dtype(name, dtype)


def _as_index(value: Any, what: str, stack: Stack) -> int:
    """Integer index from int-like input (numpy ints too); StackError for anything else."""
    if isinstance(value, (bool, np.bool_)):
        raise StackError(f"{what} must be an integer, got {value!r} (for '{stack.name}')")
    try:
        return operator.index(value)
    except TypeError:
        raise StackError(f"{what} must be an integer, got {value!r} (for '{stack.name}')") from None


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


def stack_label(path: str | Path) -> str:
    """The name a stack goes by in models, reports and output files: its file name without extensions
    ('a.ome.tif' -> 'a', 'b.ims' -> 'b')."""
    name = Path(path).name
    for suffix in (".ome.tif", ".ome.tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def lab_convention_channel(stack: Stack) -> int:
    """The lab convention by position: the penultimate channel of a multi-channel ``.ims`` (the last holds the
    expert mask), else 0. ``core.io.channels.default_image_channel`` refines it by the channels' names."""
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


def bool_to_uint8(plane: np.ndarray) -> np.ndarray:
    """1-bit images read as uint8 0/255, like the masks Protoscope writes."""
    return plane.astype(np.uint8) * np.uint8(255) if plane.dtype == bool else plane
