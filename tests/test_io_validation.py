"""Readers validate at the edge, once: declared sizes and counts, empty axes, pixel types, the plane limit."""

from __future__ import annotations

import struct

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

import core.io.base as base
from core.errors import StackError
from core.io import Stack, open_stack
from core.io.base import MAX_PLANE_PIXELS
from helpers_io import ramp_tczyx, str_attr, write_ims

CH0 = "DataSet/ResolutionLevel 0/TimePoint 0/Channel 0"


@pytest.fixture
def ims(tmp_path):
    """(T=1, C=2, Z=3, Y=20, X=24) uint16 with chunks (3, 16, 16) (Z chunk clipped to 3): Data padded to (3, 32, 32)."""
    data = ramp_tczyx(1, 2, 3, 20, 24)
    return write_ims(tmp_path / "v.ims", data), data


def _set(path, group, name, value):
    with h5py.File(path, "r+") as f:
        del f[group].attrs[name]
        str_attr(f[group], name, value)


def test_the_limit_is_2_to_the_28_pixels():
    assert MAX_PLANE_PIXELS == 16384 * 16384 == 268_435_456


# -- .ims declared sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-5", "abc", "12.5", "1e400", "nan"])
def test_declared_size_that_is_not_a_positive_whole_number_is_refused(ims, value):
    path, _ = ims
    _set(path, CH0, "ImageSizeY", value)
    with pytest.raises(StackError, match=rf"^'v.ims': {CH0} declares ImageSizeY='{value}'; it must be a whole "
                                         r"number of at least 1 \(the .ims header is damaged"):
        open_stack(path)


def test_declared_size_larger_than_the_data_is_refused_before_any_read(ims, monkeypatch):
    path, _ = ims
    for axis in "XY":
        _set(path, CH0, f"ImageSize{axis}", "1000000")
    reads = []
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda self, key: reads.append(key))
    with pytest.raises(StackError, match=r"^'v.ims': .*Channel 0 declares ImageSizeY=1000000 but its Data holds only "
                                         r"32 along Y \(Data shape \(3, 32, 32\), Z, Y, X\)"):
        open_stack(path)
    assert reads == []


def test_a_declared_size_within_the_padding_is_what_is_read(ims):
    """ImageSizeX=30 lies inside the padded 32 columns: legal, and exactly 30 columns come back."""
    path, data = ims
    for c in (0, 1):
        _set(path, CH0.replace("Channel 0", f"Channel {c}"), "ImageSizeX", "30")
    with h5py.File(path, "r+") as f:
        del f["DataSetInfo/Image"].attrs["X"]
    with open_stack(path) as stack:
        assert stack.shape == (3, 2, 20, 30)
        plane = stack.read_slice(2, 1)
    assert plane.shape == (20, 30)
    np.testing.assert_array_equal(plane[:, :24], data[0, 1, 2])
    assert (plane[:, 24:] == 0).all()  # write_ims pads with 0


def test_channels_of_one_level_must_declare_one_size(ims):
    path, _ = ims
    _set(path, CH0.replace("Channel 0", "Channel 1"), "ImageSizeZ", "2")
    with pytest.raises(StackError, match=r"Channel 1 is \(2, 20, 24\) \(Z, Y, X\) but .*Channel 0 is \(3, 20, 24\)"):
        open_stack(path)


def test_image_xyz_must_agree_with_the_level_0_size(ims):
    path, _ = ims
    _set(path, "DataSetInfo/Image", "Z", "4")
    with pytest.raises(StackError, match=r"DataSetInfo/Image declares Z=4 but ResolutionLevel 0 declares "
                                         r"ImageSizeZ=3; the .ims header contradicts itself"):
        open_stack(path)


@pytest.mark.parametrize("group, name, value, message", [
    ("DataSetInfo/Image", "Noc", "3", r"declares Noc=3 channels but the file holds 2 channel groups"),
    ("DataSetInfo/Image", "Noc", "-1", r"declares Noc='-1'; it must be a whole number"),
    ("DataSetInfo/TimeInfo", "FileTimePoints", "2", r"declares FileTimePoints=2 but the file holds 1 TimePoint"),
    ("DataSetInfo/TimeInfo", "FileTimePoints", "x", r"declares FileTimePoints='x'"),
    ("DataSetInfo/TimeInfo", "DatasetTimePoints", "0", r"declares DatasetTimePoints='0'"),
])
def test_declared_channel_and_timepoint_counts_are_checked(ims, group, name, value, message):
    path, _ = ims
    with h5py.File(path, "r+") as f:
        if name in f[group].attrs:
            del f[group].attrs[name]
        str_attr(f[group], name, value)
    with pytest.raises(StackError, match=rf"^'v.ims': DataSetInfo/.*{message}"):
        open_stack(path)


def test_a_dataset_time_point_count_beyond_this_file_is_fine(ims):
    """A time series split over files declares more time points in all than this file holds."""
    path, _ = ims
    _set(path, "DataSetInfo/TimeInfo", "DatasetTimePoints", "5")
    with open_stack(path) as stack:
        assert stack.n_timepoints == 1


def test_every_channel_of_every_level_needs_data_at_time_point_0(tmp_path):
    path = write_ims(tmp_path / "l.ims", ramp_tczyx(2, 2, 4, 8, 8), n_levels=2)
    with h5py.File(path, "r+") as f:
        del f["DataSet/ResolutionLevel 1/TimePoint 0/Channel 1/Data"]
    with pytest.raises(StackError, match=r"'l.ims' has no dataset DataSet/ResolutionLevel 1/TimePoint 0/Channel 1/Data"):
        open_stack(path)


def test_later_time_points_are_checked_before_their_first_read(tmp_path, monkeypatch):
    """Opening checks time point 0 of every level (a time-lapse may hold thousands); each other (level, t, c)
    is checked against its level before it is first read, and refused without reading a pixel."""
    data = ramp_tczyx(3, 2, 4, 8, 8)
    path = write_ims(tmp_path / "t.ims", data, chunks=(4, 8, 8))
    with h5py.File(path, "r+") as f:
        narrow = f["DataSet/ResolutionLevel 0/TimePoint 1/Channel 1"]
        del narrow["Data"]
        narrow.create_dataset("Data", data=np.zeros((4, 8, 3), np.uint16))  # ImageSizeX still says 8
    _set(path, "DataSet/ResolutionLevel 0/TimePoint 2/Channel 0", "ImageSizeZ", "-1")
    with open_stack(path) as stack:
        assert stack.n_timepoints == 3
        np.testing.assert_array_equal(stack.read_slice(3, 0, timepoint=1), data[1, 0, 3])
        reads = []
        original = h5py.Dataset.__getitem__
        monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda self, key: reads.append(key) or original(self, key))
        with pytest.raises(StackError, match=r"^'t.ims': DataSet/ResolutionLevel 0/TimePoint 1/Channel 1 declares "
                                             r"ImageSizeX=8 but its Data holds only 3 along X"):
            stack.read_slice(0, 1, timepoint=1)
        with pytest.raises(StackError, match=r"TimePoint 2/Channel 0 declares ImageSizeZ='-1'; it must be a whole"):
            list(stack.read_slices([0, 1], 0, timepoint=2))
        assert reads == []


def test_chunks_larger_than_the_limit_are_refused(tmp_path):
    path = tmp_path / "c.ims"
    with h5py.File(path, "w") as f:  # never written, so the file stays small
        f.create_group(CH0).create_dataset("Data", shape=(8, 8192, 8192), dtype=np.uint8, chunks=(8, 8192, 8192))
    with pytest.raises(StackError, match=r"stored in chunks of \(8, 8192, 8192\) values, more than the 268,435,456"):
        open_stack(path)


def test_ims_plane_over_the_limit_names_the_limit(tmp_path):
    path = tmp_path / "big.ims"
    with h5py.File(path, "w") as f:
        f.create_group(CH0).create_dataset("Data", shape=(1, 16385, 16384), dtype=np.uint8, chunks=(1, 256, 256))
    with pytest.raises(StackError, match=r"^'big.ims' has level-0 planes of 16384 x 16385 = 268,451,840 pixels "
                                         r"\(X x Y\), more than the 268,435,456 \(2\^28, e.g. 16384 x 16384\)"):
        open_stack(path)


def test_the_limit_applies_to_every_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "MAX_PLANE_PIXELS", 20 * 24 - 1)
    write_ims(tmp_path / "v.ims", ramp_tczyx(1, 1, 1, 20, 24))
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((20, 24), np.uint8))
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / "v.png")
    for name in ("v.ims", "v.tif", "v.png"):
        with pytest.raises(StackError, match=rf"'{name}' has .* 24 x 20 = 480 pixels \(X x Y\), more than the 479"):
            open_stack(tmp_path / name)
    monkeypatch.setattr(base, "MAX_PLANE_PIXELS", 20 * 24)
    for name in ("v.ims", "v.tif", "v.png"):
        with open_stack(tmp_path / name) as stack:
            assert stack.read_slice(0).shape == (20, 24)


# -- TIFF and images -------------------------------------------------------------------------------


def _tiff_header(width: int, height: int) -> bytes:
    """Little-endian grey uint8 TIFF declaring width x height, one strip, 16 bytes of data."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 122),
               (277, 3, 1), (278, 4, height), (279, 4, width * height)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", v, 0) if kind == 3 else struct.pack("<I", v))
        for tag, kind, v in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 16


def test_tiff_declaring_a_huge_plane_is_refused_by_the_limit_not_as_truncated(tmp_path):
    (tmp_path / "h.tif").write_bytes(_tiff_header(20000, 20000))
    with pytest.raises(StackError, match=r"^'h.tif' has planes of 20000 x 20000 = 400,000,000 pixels"):
        open_stack(tmp_path / "h.tif")


def test_tiff_with_a_zero_size_axis_or_no_pages(tmp_path):
    (tmp_path / "w0.tif").write_bytes(_tiff_header(0, 8))
    with pytest.raises(StackError, match=r"^'w0.tif' holds an empty image \(shape \(8, 0\), axes YX\)"):
        open_stack(tmp_path / "w0.tif")
    (tmp_path / "p0.tif").write_bytes(b"II*\x00" + struct.pack("<I", 0))
    with pytest.raises(StackError, match=r"^'p0.tif' has a TIFF header but no image pages"):
        open_stack(tmp_path / "p0.tif")


def test_a_one_voxel_tiff_is_one_voxel(tmp_path):
    """tifffile labels a shaped (1, 1, 1) series 'XYX'; the page's own axes are used instead."""
    tifffile.imwrite(tmp_path / "one.tif", np.array([[[4242]]], np.uint16), photometric="minisblack")
    with open_stack(tmp_path / "one.tif") as stack:
        assert stack.shape == (1, 1, 1, 1)
        assert stack.read_slice(0).tolist() == [[4242]]


def test_a_truncated_png_is_refused_when_opened(tmp_path):
    Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(StackError, match=r"^'t.png' is a truncated or corrupt image"):
        open_stack(tmp_path / "t.png")


# -- the shared Stack rule -------------------------------------------------------------------------


@pytest.mark.parametrize("shape, message", [
    ((0, 1, 4, 4), r"has 0 z slices \(Z\)"),
    ((2, 0, 4, 4), r"has 0 channels \(C\)"),
    ((2, 1, 0, 4), r"has 0 rows \(Y\)"),
    ((2, 1, 4, -5), r"has -5 columns \(X\)"),
])
def test_stack_refuses_empty_or_negative_axes(shape, message):
    with pytest.raises(StackError, match=rf"^'s.tif' {message}; a stack needs at least one"):
        Stack("s.tif", format="tiff", shape=shape, dtype=np.uint8)


@pytest.mark.parametrize("dtype", [np.complex64, object, "S4", [("a", np.uint8), ("b", np.uint8)]])
def test_stack_refuses_pixel_types_that_are_not_intensities(dtype):
    with pytest.raises(StackError, match=r"^'s.tif' has pixel type .*, which is not an intensity"):
        Stack("s.tif", format="tiff", shape=(1, 1, 2, 2), dtype=dtype)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int64, np.float16, np.float64])
def test_stack_accepts_bool_integer_and_float_pixels(dtype):
    assert Stack("s.tif", format="tiff", shape=(1, 1, 2, 2), dtype=dtype).dtype == np.dtype(dtype)


def test_stack_refuses_zero_time_points_and_empty_levels():
    with pytest.raises(StackError, match=r"has 0 time points"):
        Stack("s.ims", format="ims", shape=(1, 1, 2, 2), dtype=np.uint8, n_timepoints=0)
    with pytest.raises(StackError, match=r"resolution level 1 of size \(1, 0, 1\)"):
        Stack("s.ims", format="ims", shape=(1, 1, 2, 2), dtype=np.uint8, level_shapes=[(1, 2, 2), (1, 0, 1)])
