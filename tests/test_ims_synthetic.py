"""Reading .ims files the tests write themselves (helpers_io.write_ims follows docs/spec/FORMAT.md)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from core.errors import StackError
from core.io.ims import decode_attr
from core.io import VoxelSize, open_stack
from helpers_io import next_level, ramp_tczyx, str_attr, write_ims


@pytest.fixture
def two_t_two_levels(tmp_path):
    """(T=2, C=3, Z=9, Y=21, X=34) uint16, chunks (4, 16, 16): padded to (12, 32, 48), 2 levels."""
    data = ramp_tczyx(2, 3, 9, 21, 34)
    path = write_ims(tmp_path / "syn.ims", data, n_levels=2, pad_value=7777,
                     channel_names=["DAPI", "Actin", "Mask"], colors=["0.000 0.000 1.000", "0 1 0", "1.000 1.000 1.000"])
    return path, data


def test_padding_is_cropped_and_values_are_exact(two_t_two_levels):
    path, data = two_t_two_levels
    with h5py.File(path, "r") as f:
        assert f["DataSet/ResolutionLevel 0/TimePoint 0/Channel 0/Data"].shape == (12, 32, 48)
    with open_stack(path) as stack:
        assert stack.shape == (9, 3, 21, 34)
        plane = stack.read_slice(8, 2, timepoint=1)
        assert plane.shape == (21, 34) and plane.dtype == np.uint16
        # value = 1000 t + 100 c + 10 z + y + 3 x
        assert plane[0, 0] == 1000 + 200 + 80
        assert plane[20, 33] == 1000 + 200 + 80 + 20 + 99
        assert 7777 not in plane  # padding value never leaks
        np.testing.assert_array_equal(plane, data[1, 2, 8])


def test_levels_timepoints_and_metadata(two_t_two_levels):
    path, data = two_t_two_levels
    with open_stack(path) as stack:
        assert stack.n_timepoints == 2 and stack.n_levels == 2
        assert stack.level_shape(0) == (9, 21, 34)
        assert stack.level_shape(1) == (4, 10, 17)
        np.testing.assert_array_equal(stack.read_slice(3, 1, timepoint=1, level=1), next_level(data[1, 1])[3])
        assert stack.channel_names == ["DAPI", "Actin", "Mask"]
        assert stack.channel_colors == [(0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 1.0, 1.0)]
        assert stack.voxel_size == VoxelSize(x=pytest.approx(0.5), y=pytest.approx(0.25), z=pytest.approx(2.0))
        assert stack.level_voxel_size(1) == VoxelSize(x=pytest.approx(1.0), y=pytest.approx(0.525),
                                                      z=pytest.approx(4.5))
        desc = stack.describe()
    assert desc["shape"] == [9, 3, 21, 34]
    assert desc["channels"][1] == {"index": 1, "name": "Actin", "color": [0.0, 1.0, 0.0]}
    assert desc["level_shapes"] == [[9, 21, 34], [4, 10, 17]]
    assert desc["voxel_size"] == {"x": pytest.approx(0.5), "y": pytest.approx(0.25), "z": pytest.approx(2.0)}
    assert desc["n_timepoints"] == 2 and desc["format"] == "ims" and desc["dtype"] == "uint16"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.float32])
@pytest.mark.parametrize("compression", ["gzip", "shuffle+gzip", "lz4", "none"])
def test_dtypes_and_compressions(tmp_path, dtype, compression):
    data = ramp_tczyx(1, 2, 5, 19, 23, dtype=dtype)
    path = write_ims(tmp_path / "d.ims", data, compression=compression)
    with open_stack(path) as stack:
        assert stack.dtype == np.dtype(dtype)
        for z in range(5):
            np.testing.assert_array_equal(stack.read_slice(z, -1), data[0, 1, z])


def test_unit_nm_and_latin1_names_and_names_not_specified(tmp_path):
    data = ramp_tczyx(1, 2, 2, 4, 5)
    path = write_ims(tmp_path / "nm.ims", data, unit="nm", voxel_size_xyz=(100.0, 100.0, 500.0),
                     channel_names=[b"Kan\xe4l \xb5", "(name not specified)"])
    with open_stack(path) as stack:
        assert stack.channel_names == ["Kanäl µ", "Channel 1"]
        assert stack.voxel_size == VoxelSize(x=pytest.approx(0.1), y=pytest.approx(0.1), z=pytest.approx(0.5))


def test_decode_attr_forms():
    assert decode_attr(np.array([b"5", b".", b"5", b".", b"0"], dtype="S1")) == "5.5.0"
    assert decode_attr(np.array([b""], dtype="S1")) == ""
    assert decode_attr(b"G:\xc9ajer") == "G:Éajer"
    assert decode_attr(np.array([1], dtype=np.uint32)) == "1"
    assert decode_attr("300") == "300"


def test_missing_extents_gives_no_voxel_size_and_missing_info_gives_defaults(tmp_path):
    data = ramp_tczyx(1, 2, 3, 4, 5)
    with open_stack(write_ims(tmp_path / "a.ims", data, voxel_size_xyz=None)) as stack:
        assert stack.voxel_size is None
    with open_stack(write_ims(tmp_path / "b.ims", data, with_info=False)) as stack:
        assert stack.voxel_size is None
        assert stack.channel_names == ["Channel 0", "Channel 1"]
        assert stack.channel_colors == [None, None]


def test_channel_groups_sorted_by_number_not_text(tmp_path):
    data = ramp_tczyx(1, 12, 2, 3, 4, dtype=np.uint8)
    path = write_ims(tmp_path / "many.ims", data)
    with open_stack(path) as stack:
        assert stack.shape[1] == 12
        assert stack.channel_names[10] == "Synthetic 10"
        np.testing.assert_array_equal(stack.read_slice(1, 10), data[0, 10, 1])
        np.testing.assert_array_equal(stack.read_slice(1, -2), data[0, 10, 1])


def test_reading_one_slice_reads_only_that_plane(two_t_two_levels, monkeypatch):
    """The reader asks h5py for one z-plane, never the whole dataset."""
    path, _ = two_t_two_levels
    requested = []
    original = h5py.Dataset.__getitem__

    def spy(self, key, *args, **kwargs):
        requested.append(key)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    with open_stack(path) as stack:
        stack.read_slice(4, 1)
    data_keys = [k for k in requested if isinstance(k, tuple)]
    assert data_keys == [(4, slice(None, 21), slice(None, 34))]


# ---- errors ------------------------------------------------------------------------------------------


def test_channel_z_timepoint_level_out_of_range_name_file_and_range(two_t_two_levels):
    path, _ = two_t_two_levels
    with open_stack(path) as stack:
        with pytest.raises(StackError, match=r"channel 3 requested but 'syn.ims' has channels 0\.\.2"):
            stack.read_slice(0, 3)
        with pytest.raises(StackError, match=r"channel -4 requested but 'syn.ims' has channels 0\.\.2 \(or -3\.\.-1"):
            stack.resolve_channel(-4)
        with pytest.raises(StackError, match=r"slice z=9 requested but 'syn.ims' has z 0\.\.8"):
            stack.read_slice(9, 0)
        with pytest.raises(StackError, match=r"slice z=-1 requested but 'syn.ims' has z 0\.\.8"):
            stack.read_slice(-1, 0)
        with pytest.raises(StackError, match=r"slice z=4 requested but 'syn.ims' has z 0\.\.3 at level 1"):
            stack.read_slice(4, 0, level=1)
        with pytest.raises(StackError, match=r"time point 2 requested but 'syn.ims' has time points 0\.\.1"):
            stack.read_slice(0, 0, timepoint=2)
        with pytest.raises(StackError, match=r"resolution level 2 requested but 'syn.ims' has levels 0\.\.1"):
            stack.read_slice(0, 0, level=2)
        with pytest.raises(StackError, match=r"resolution level 5 requested but 'syn.ims' has levels 0\.\.1"):
            stack.level_shape(5)
        with pytest.raises(StackError, match="channel must be an integer"):
            stack.read_slice(0, 1.5)
        assert stack.resolve_channel(-1) == 2 and stack.resolve_channel(np.int64(-3)) == 0
    with pytest.raises(StackError, match="'syn.ims' was closed"):
        stack.read_slice(0, 0)


def test_hdf5_without_dataset_is_not_imaris(tmp_path):
    path = tmp_path / "other.ims"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 3, 4), np.uint16))
    with pytest.raises(StackError, match=r"'other.ims' is an HDF5 file but has no 'DataSet' group, so it is not an "
                                         r"Imaris \.ims file"):
        open_stack(path)


def test_truncated_hdf5(tmp_path, two_t_two_levels):
    path, _ = two_t_two_levels
    cut = tmp_path / "cut.ims"
    raw = path.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StackError, match=r"'cut.ims' is a truncated or corrupt HDF5 file \(.*truncated file"):
        open_stack(cut)


def test_corrupt_chunk_is_reported_when_read(tmp_path):
    data = ramp_tczyx(1, 1, 8, 32, 32)
    path = write_ims(tmp_path / "bad.ims", data, chunks=(4, 32, 32))
    with h5py.File(path, "r") as f:
        dsid = f["DataSet/ResolutionLevel 0/TimePoint 0/Channel 0/Data"].id
        offset = dsid.get_chunk_info_by_coord((4, 0, 0)).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 64] = b"\xff" * 64  # damage the deflate stream of the second chunk
    path.write_bytes(bytes(raw))
    with open_stack(path) as stack:
        np.testing.assert_array_equal(stack.read_slice(0), data[0, 0, 0])  # first chunk is fine
        with pytest.raises(StackError, match=r"cannot read z=5, channel 0, time point 0, level 0 of 'bad.ims': the "
                                             r"file is truncated or corrupt"):
            stack.read_slice(5)


def test_garbage_with_ims_extension(tmp_path):
    path = tmp_path / "garbage.ims"
    path.write_bytes(b"this is not hdf5 " * 64)
    with pytest.raises(StackError, match=r"'garbage.ims' is not an HDF5 file \(no HDF5 signature\)"):
        open_stack(path)


@pytest.mark.parametrize("dtype", [np.int16, np.float64])
def test_unsupported_dtype_names_dtype_and_supported_ones(tmp_path, dtype):
    data = ramp_tczyx(1, 1, 2, 3, 4, dtype=np.uint16).astype(dtype)
    path = write_ims(tmp_path / "signed.ims", data)
    name = np.dtype(dtype).name
    with pytest.raises(StackError, match=rf"'signed.ims' stores {name} pixels, which Imaris does not support; "
                                         r"supported: uint8, uint16, uint32, float32"):
        open_stack(path)


def test_gap_in_channel_numbers(tmp_path):
    data = ramp_tczyx(1, 2, 2, 3, 4)
    path = write_ims(tmp_path / "gap.ims", data)
    with h5py.File(path, "r+") as f:
        f.move("DataSet/ResolutionLevel 0/TimePoint 0/Channel 1", "DataSet/ResolutionLevel 0/TimePoint 0/Channel 2")
    with pytest.raises(StackError, match=r"'gap.ims' has Channel groups \[0, 2\]"):
        open_stack(path)


def test_mixed_endianness_big_endian_data_is_returned_native(tmp_path):
    data = ramp_tczyx(1, 1, 3, 5, 6)
    path = write_ims(tmp_path / "be.ims", data)
    with h5py.File(path, "r+") as f:
        group = f["DataSet/ResolutionLevel 0/TimePoint 0/Channel 0"]
        padded_data = group["Data"][()]
        del group["Data"]
        group.create_dataset("Data", data=padded_data.astype(">u2"), chunks=(3, 5, 6))
        str_attr(group, "Extra", "x")
    with open_stack(path) as stack:
        plane = stack.read_slice(2)
        assert plane.dtype == np.dtype("uint16") and plane.dtype.isnative
        np.testing.assert_array_equal(plane, data[0, 0, 2])


# ---- read_slices: several planes per chunk read ------------------------------------------------------


def test_read_slices_equals_read_slice_in_any_order(two_t_two_levels):
    path, data = two_t_two_levels
    zs = [5, 1, 5, 8, 0, 3, 2, 7]  # chunk depth 4: blocks {0..3}, {4..7}, {8}
    with open_stack(path) as stack:
        got = list(stack.read_slices(zs, -1, timepoint=1))
        assert [z for z, _ in got] == zs
        for z, plane in got:
            assert plane.dtype == np.uint16 and plane.flags.c_contiguous
            np.testing.assert_array_equal(plane, data[1, 2, z])
        lv1 = list(stack.read_slices(range(4), 0, level=1))
        for z, plane in lv1:
            np.testing.assert_array_equal(plane, next_level(data[0, 0])[z])


def test_read_slices_reads_each_chunk_band_once_per_group(two_t_two_levels, monkeypatch):
    path, _ = two_t_two_levels
    requested = []
    original = h5py.Dataset.__getitem__

    def spy(self, key, *args, **kwargs):
        requested.append(key)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    with open_stack(path) as stack:
        list(stack.read_slices([0, 2, 3, 6], 0))
    reads = [k for k in requested if isinstance(k, tuple)]
    # z 0, 2, 3 share the chunk block 0..3 and are read as one z-range per band of 16 chunk rows; z 6 alone
    assert reads == [(slice(0, 4), slice(0, 16), slice(None, 34)), (slice(0, 4), slice(16, 21), slice(None, 34)),
                     (6, slice(None, 21), slice(None, 34))]


def test_read_slices_respects_max_bytes_and_checks_first(two_t_two_levels):
    path, data = two_t_two_levels
    with open_stack(path) as stack:
        plane_bytes = 21 * 34 * 2
        got = list(stack.read_slices([0, 1, 2, 3], 1, max_bytes=2 * plane_bytes))
        for z, plane in got:
            np.testing.assert_array_equal(plane, data[0, 1, z])
        gen = stack.read_slices([0, 9], 0)
        with pytest.raises(StackError, match=r"slice z=9 requested but 'syn.ims' has z 0\.\.8"):
            next(gen)


def test_missing_lz4_filter_says_what_to_install(tmp_path, monkeypatch):
    data = ramp_tczyx(1, 1, 2, 3, 4, dtype=np.uint8)
    path = write_ims(tmp_path / "lz4.ims", data, compression="lz4")
    real = h5py.h5z.filter_avail
    monkeypatch.setattr(h5py.h5z, "filter_avail", lambda code: False if code == 32004 else real(code))
    with open_stack(path) as stack:
        with pytest.raises(StackError, match=r"'lz4.ims' is compressed with LZ4 \(HDF5 filter 32004\), which this "
                                             r"Python cannot decode; install the 'hdf5plugin' package"):
            stack.read_slice(0)
