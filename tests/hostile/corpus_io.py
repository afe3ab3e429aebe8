"""Hostile and odd input files for the stack readers, built from scratch (no shared data).

`write_corpus(folder)` writes every file and returns ``[(path, expectation), ...]`` where expectation is
``'error'`` (``python -m core info`` / ``export`` must refuse it with one ``error:`` line naming the file)
or ``'ok'`` (both must succeed). The damaged `.ims` files start from a valid one written by
`helpers_io.write_ims` and change one thing each; the TIFF and PNG headers that declare absurd sizes
are written byte by byte, so they stay a few hundred bytes.

Run ``python tests/hostile/corpus_io.py FOLDER`` to write the corpus somewhere and list it.
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import tifffile
from PIL import Image

if __package__ in (None, ""):  # run as a script: make tests/ importable for helpers_io
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_io import ramp_tczyx, str_attr, write_ims  # noqa: E402

__all__ = ["write_corpus", "ERROR", "OK"]

ERROR, OK = "error", "ok"

# (T, C, Z, Y, X) of the valid base .ims: small, two channels, chunks (4, 16, 16) -> padded (4, 32, 32)
_BASE = (1, 2, 3, 20, 24)


# ---- .ims ------------------------------------------------------------------------------------------


def _base_ims(path: Path, *, n_levels: int = 1) -> Path:
    return write_ims(path, ramp_tczyx(*_BASE), n_levels=n_levels)


def _set_attr(path: Path, group: str, name: str, value: str) -> None:
    with h5py.File(path, "r+") as f:
        obj = f[group]
        if name in obj.attrs:
            del obj.attrs[name]
        str_attr(obj, name, value)


def _ims_with_attr(group: str, name: str, value: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        _base_ims(path)
        _set_attr(path, group, name, value)
    return make


_CH0 = "DataSet/ResolutionLevel 0/TimePoint 0/Channel 0"
_CH1 = "DataSet/ResolutionLevel 0/TimePoint 0/Channel 1"


def _ims_declared_huge(path: Path) -> None:
    """ImageSizeX/Y = 10^6 on every channel while Data are (4, 32, 32)."""
    _base_ims(path)
    for group in (_CH0, _CH1):
        _set_attr(path, group, "ImageSizeX", "1000000")
        _set_attr(path, group, "ImageSizeY", "1000000")
    _set_attr(path, "DataSetInfo/Image", "X", "1000000")
    _set_attr(path, "DataSetInfo/Image", "Y", "1000000")


def _ims_truncated(path: Path) -> None:
    _base_ims(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _ims_no_dataset(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.create_group("Something/Else").create_dataset("Data", data=np.zeros((2, 4, 4), np.uint16))


def _ims_channel_without_data(path: Path) -> None:
    _base_ims(path)
    with h5py.File(path, "r+") as f:
        del f[f"{_CH1}/Data"]


def _ims_level1_missing_channel(path: Path) -> None:
    _base_ims(path, n_levels=2)
    with h5py.File(path, "r+") as f:
        del f["DataSet/ResolutionLevel 1/TimePoint 0/Channel 1"]


def _ims_timepoint_gap(path: Path) -> None:
    write_ims(path, ramp_tczyx(3, 1, 2, 8, 8))
    with h5py.File(path, "r+") as f:
        del f["DataSet/ResolutionLevel 0/TimePoint 1"]


def _ims_big_empty(path: Path, shape: tuple[int, int, int], chunks: tuple[int, int, int]) -> None:
    """A valid-looking .ims whose Data is huge but never written (HDF5 stores no chunks: a tiny file)."""
    with h5py.File(path, "w", libver=("earliest", "v108")) as f:
        str_attr(f, "DataSetDirectoryName", "DataSet")
        group = f.create_group(_CH0)
        group.create_dataset("Data", shape=shape, dtype=np.uint8, chunks=chunks)
        for axis, size in zip("ZYX", shape):
            str_attr(group, f"ImageSize{axis}", str(size))


def _ims_int16(path: Path) -> None:
    write_ims(path, ramp_tczyx(1, 1, 2, 8, 8).astype(np.int16))


def _ims_empty_axis(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.create_group(_CH0).create_dataset("Data", shape=(0, 16, 16), dtype=np.uint16, chunks=(1, 16, 16),
                                            maxshape=(None, 16, 16))


def _ims_dataset_as_group(path: Path) -> None:
    """'TimePoint 0' is a dataset where a group belongs."""
    with h5py.File(path, "w") as f:
        f.create_group("DataSet/ResolutionLevel 0").create_dataset("TimePoint 0", data=np.zeros(3))


# ---- TIFF ------------------------------------------------------------------------------------------


def _tiff_header_ifd(width: int, height: int, bits: int = 8, data_bytes: bytes = b"") -> bytes:
    """A minimal little-endian grey TIFF: one strip holding `data_bytes` (may be shorter than declared)."""
    entries = [  # tag, type (3 SHORT, 4 LONG), value
        (256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, 1), (262, 3, 1),
        (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, width * height * bits // 8),
    ]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(entries) + 4
    body = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3
                                                       else struct.pack("<I", value))
        body += packed
    body += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + body + data_bytes


def _tiff_huge_header(path: Path) -> None:
    """Declares 20000 x 20000 uint8 (4 * 10^8 pixels, over the 2^28 limit) and holds 16 bytes."""
    path.write_bytes(_tiff_header_ifd(20000, 20000, data_bytes=b"\x00" * 16))


def _tiff_zero_pages(path: Path) -> None:
    path.write_bytes(b"II*\x00" + struct.pack("<I", 0))  # first IFD offset 0: no pages at all


def _tiff_zero_width(path: Path) -> None:
    path.write_bytes(_tiff_header_ifd(0, 8))


def _tiff_truncated(path: Path) -> None:
    tifffile.imwrite(path, np.arange(4 * 32 * 32, dtype=np.uint16).reshape(4, 32, 32), photometric="minisblack")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _tiff(array: np.ndarray) -> Callable[[Path], None]:
    def make(path: Path) -> None:  # minisblack: a (3, Y, X) stack must not become one planar RGB page
        tifffile.imwrite(path, array, photometric="minisblack")
    return make


# ---- PNG -------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_huge_header(path: Path) -> None:
    """A PNG whose IHDR says 100000 x 100000 grey (10^10 pixels) with a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _png_truncated(path: Path) -> None:
    Image.fromarray(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _png(array: np.ndarray, mode: str | None = None) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
        image.save(path)
    return make


def _text(content: bytes) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.write_bytes(content)
    return make


_RNG = np.random.default_rng(12)

#: file name -> (writer, expectation)
CORPUS: dict[str, tuple[Callable[[Path], None], str]] = {
    # .ims
    "valid.ims": (lambda p: _base_ims(p, n_levels=2), OK),
    "truncated.ims": (_ims_truncated, ERROR),
    "size_y_zero.ims": (_ims_with_attr(_CH0, "ImageSizeY", "0"), ERROR),
    "size_z_negative.ims": (_ims_with_attr(_CH0, "ImageSizeZ", "-5"), ERROR),
    "size_x_text.ims": (_ims_with_attr(_CH0, "ImageSizeX", "twenty"), ERROR),
    "size_x_fraction.ims": (_ims_with_attr(_CH0, "ImageSizeX", "12.5"), ERROR),
    "size_declared_huge.ims": (_ims_declared_huge, ERROR),
    "channels_disagree.ims": (_ims_with_attr(_CH1, "ImageSizeX", "17"), ERROR),
    "image_x_contradicts.ims": (_ims_with_attr("DataSetInfo/Image", "X", "23"), ERROR),
    "noc_zero.ims": (_ims_with_attr("DataSetInfo/Image", "Noc", "0"), ERROR),
    "noc_five_for_two.ims": (_ims_with_attr("DataSetInfo/Image", "Noc", "5"), ERROR),
    "file_timepoints_negative.ims": (_ims_with_attr("DataSetInfo/TimeInfo", "FileTimePoints", "-1"), ERROR),
    "no_dataset_group.ims": (_ims_no_dataset, ERROR),
    "channel_without_data.ims": (_ims_channel_without_data, ERROR),
    "level1_missing_channel.ims": (_ims_level1_missing_channel, ERROR),
    "timepoint_gap.ims": (_ims_timepoint_gap, ERROR),
    "plane_over_limit.ims": (lambda p: _ims_big_empty(p, (1, 20000, 20000), (1, 256, 256)), ERROR),
    "chunks_over_limit.ims": (lambda p: _ims_big_empty(p, (8, 8192, 8192), (8, 8192, 8192)), ERROR),
    "int16.ims": (_ims_int16, ERROR),
    "empty_z_axis.ims": (_ims_empty_axis, ERROR),
    "dataset_as_group.ims": (_ims_dataset_as_group, ERROR),
    "text.ims": (_text(b"not an imaris file\n" * 20), ERROR),
    "empty.ims": (_text(b""), ERROR),
    # TIFF
    "text.tif": (_text(b"hello, I am plain text\n"), ERROR),
    "empty.tif": (_text(b""), ERROR),
    "zero_pages.tif": (_tiff_zero_pages, ERROR),
    "zero_width.tif": (_tiff_zero_width, ERROR),
    "complex64.tif": (_tiff((np.ones((2, 4, 4)) * (1 + 2j)).astype(np.complex64)), ERROR),
    "truncated.tif": (_tiff_truncated, ERROR),
    "plane_over_limit.tif": (_tiff_huge_header, ERROR),
    "all_nan.tif": (_tiff(np.full((3, 6, 5), np.nan, np.float32)), OK),
    "one_voxel.tif": (_tiff(np.array([[[4242]]], np.uint16)), OK),
    "bilevel.tif": (_tiff(np.eye(8, dtype=bool)), OK),
    "float64.tif": (_tiff(np.linspace(-1, 1, 2 * 5 * 7).reshape(2, 5, 7)), OK),
    "int8.tif": (_tiff(np.arange(-8, 8, dtype=np.int8).reshape(1, 4, 4)), OK),
    # PNG
    "one_pixel.png": (_png(np.array([[200]], np.uint8)), OK),
    "sixteen_bit.png": (_png(np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 97), OK),
    "rgba.png": (_png(_RNG.integers(0, 256, (9, 11, 4), dtype=np.uint8)), OK),
    "palette.png": (_png(_RNG.integers(0, 256, (7, 6, 3), dtype=np.uint8), mode="P"), OK),
    "text.png": (_text(b"GIF89a? no, text\n"), ERROR),
    "truncated.png": (_png_truncated, ERROR),
    "header_over_limit.png": (_png_huge_header, ERROR),
}


def write_corpus(folder: str | Path) -> list[tuple[Path, str]]:
    """Write every corpus file into `folder` (created); returns [(path, 'error' | 'ok'), ...] in a fixed order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, (make, expectation) in CORPUS.items():
        path = folder / name
        make(path)
        out.append((path, expectation))
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile_corpus")
    for file, expected in write_corpus(target):
        print(f"{expected:6s} {file.stat().st_size:>9d} B  {file}")
