"""Appending a mask channel to a copy of an Imaris `.ims` file (docs/spec/FORMAT.md §8).

`append_mask_channel` copies the source byte for byte, then adds channel C (the new last index) to every
resolution level and time point: Data of channel 0's dtype, padded shape and chunk shape (gzip level 2),
``ImageSize*`` attributes and ImarisWriter's histograms (§4.2); level r > 0 is ImarisWriter's pyramid rule,
the truncated mean of 2x2x2 blocks of level r-1 (§4.3). The copy is written through `core.io.atomic`.
"""

from __future__ import annotations

import shutil
import zlib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np

from core.errors import StackError
from core.io.atomic import atomic_output
from core.io.channels import PROTOSCOPE_MASK_NAME
from core.io.ims import ImsLayout, ImsStack, float_attr, open_h5, put_str_attr
from core.io.masks import as_mask_array, mask_to_uint8

__all__ = ["append_mask_channel", "MASK_GZIP_LEVEL"]

MASK_GZIP_LEVEL = 2  # Imaris' and PyImarisWriter's default deflate level


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
    """Imaris histograms of a 0..255 mask channel, as ImarisWriter writes them (docs/spec/FORMAT.md §4.2).

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
    """Add DataSetInfo/Channel c and TimeInfo where missing: Bitplane's reader needs them (docs/spec/FORMAT.md §5.2).

    Existing metadata is never changed.
    """
    info = f.require_group(layout.info_dir)
    for c in range(layout.n_channels):
        if f"Channel {c}" not in info:
            group = info.create_group(f"Channel {c}")
            hist_group = f[layout.group_path(0, 0, c)]
            lo = float_attr(hist_group, "HistogramMin") or 0.0
            hi = float_attr(hist_group, "HistogramMax") or float(np.iinfo(layout.dtype).max
                                                                  if layout.dtype.kind == "u" else 1.0)
            _put_channel_info(group, f"Channel {c}", (1.0, 1.0, 1.0), "", f"{lo:.3f} {hi:.3f}")
    if "TimeInfo" not in info:
        group = info.create_group("TimeInfo")
        put_str_attr(group, "DatasetTimePoints", str(layout.n_timepoints))
        put_str_attr(group, "FileTimePoints", str(layout.n_timepoints))
        start = datetime(2000, 1, 1)
        for t in range(layout.n_timepoints):  # 1-based names, strictly increasing times (docs/spec/FORMAT.md §5.3)
            stamp = (start + timedelta(seconds=t)).strftime("%Y-%m-%d %H:%M:%S.000")
            put_str_attr(group, f"TimePoint{t + 1}", stamp)


def append_mask_channel(
    source_ims: str | Path,
    out_path: str | Path,
    masks: Any,
    *,
    timepoint: int = 0,
    channel_name: str = PROTOSCOPE_MASK_NAME,
    color: Sequence[float] = (1.0, 0.0, 1.0),
    overwrite: bool = False,
    description: str = "",
    progress: Callable[[float], None] | None = None,
    sources: Sequence[str | Path] = (),
) -> Path:
    """Write a copy of `source_ims` with `masks` appended as a new last channel (docs/spec/FORMAT.md §8).

    masks : (Z, Y, X) bool/uint8 (any numeric: nonzero = foreground), the full level-0 size of the
        source; a numpy array or np.memmap, read band by band (a memmap larger than RAM works).
    timepoint : the time point that gets the mask; the others get zeros.
    Every resolution level and time point gets a `Channel C` group with Data of channel 0's dtype,
    padded shape and chunk shape (gzip level 2), ImageSize attributes, and histograms; level r > 0
    holds the truncated mean of 2x2x2 blocks of level r-1 (ImarisWriter's rule, values 0..255).
    DataSetInfo/Channel C gets name, colour (RGB 0..1), BaseColor, range 0..255; Image/Noc is updated.
    The source is only read. The copy is written to a temp file beside `out_path` and renamed.
    progress : optional callback receiving the fraction done (0..1).
    sources : the command's other inputs, which `out_path` may not be (the source never is).
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

    with atomic_output(out, overwrite=overwrite, source=source, sources=sources) as tmp:
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
