"""TIFF, OME-TIFF and ImageJ hyperstacks: `TiffStack`, read through tifffile one page at a time.

tifffile's first series is mapped onto ``(T, Z, C, Y, X)`` by its axis letters (table in
``docs/formats.md``, section TIFF); the voxel size, channel names and colours come from the OME-XML or
the ImageJ metadata. Damaged files raise StackError at open; a page that cannot be decoded raises when
it is read.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, Sequence
from xml.etree import ElementTree

import numpy as np

from core.errors import StackError
from core.io.base import (
    MAX_PLANE_PIXELS,
    Stack,
    VoxelSize,
    bool_to_uint8,
    check_plane_pixels,
    rgb_to_grey,
    unit_to_um,
)

__all__ = ["TiffStack", "TIFF_DTYPES"]

# TIFF pixel types we accept; complex and structured types have no meaning as intensities.
TIFF_DTYPES = tuple(
    np.dtype(t)
    for t in ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
              "float16", "float32", "float64")
)
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
            if len(tif.pages) == 0 or not tif.series:
                tif.close()
                raise StackError(f"'{path.name}' has a TIFF header but no image pages; the file holds no "
                                 "pixels (it was not fully written)")
            series = tif.series[0]
            pages = len(series)
            last = series[pages - 1] if pages and not series.is_truncated else None
        except StackError:
            raise
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
            if len(set(axes)) != len(axes) and len(shape) >= len(keyframe.axes):
                # tifffile labels some shaped series oddly ('XYX' for a (1, 1, 1) stack): trust the page's
                # own axes and call the leading ones z
                axes = "Q" * (len(shape) - len(keyframe.axes)) + keyframe.axes
            if not shape or 0 in shape or 0 in keyframe.shape:
                raise StackError(f"'{path.name}' holds an empty image (shape {shape}, axes {axes or 'none'}); "
                                 "a stack needs at least one pixel along every axis")
            if keyframe.is_tiled and keyframe.tilelength * keyframe.tilewidth > MAX_PLANE_PIXELS:
                raise StackError(f"'{path.name}' is stored in tiles of {keyframe.tilewidth} x "
                                 f"{keyframe.tilelength} pixels, more than the {MAX_PLANE_PIXELS:,} Protoscope "
                                 "decodes at a time; re-save it with ordinary tiles or strips")
            try:
                plan = _plan_axes(axes, shape, int(prod(keyframe.shape)), is_rgb)
            except ValueError as exc:
                raise StackError(f"'{path.name}' has an unsupported TIFF layout: {exc}") from None
            n_t, n_z, n_c = plan.size(plan.t_axes), plan.size(plan.z_axes), plan.size(plan.c_axes)
            # before the truncation check: a header declaring 10^6 x 10^6 is refused by the limit, by name
            check_plane_pixels(path.name, shape[plan.axes.index("Y")], shape[plan.axes.index("X")])
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
        except StackError:
            tif.close()
            raise
        except Exception as exc:  # noqa: BLE001 - odd tags make tifffile's metadata properties raise
            tif.close()
            raise StackError(f"'{path.name}' is a damaged TIFF file ({type(exc).__name__}: {exc})") from None
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
        return bool_to_uint8(page)

    def _close(self) -> None:
        self._tif.close()


def _positive(values: Sequence[float | None]) -> bool:
    return all(v is not None and np.isfinite(v) and v > 0 for v in values)
