"""TIFF, OME-TIFF and ImageJ hyperstacks written by tifffile in the test, read one plane at a time."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from core.errors import StackError
from core.io import VoxelSize, open_stack


def _czyx(n_c=3, n_z=4, n_y=5, n_x=6, dtype=np.uint16):
    """value = 100 c + 10 z + y * x-ish: every plane different and hand-checkable."""
    c, z, y, x = np.indices((n_c, n_z, n_y, n_x))
    return (100 * c + 10 * z + y * n_x + x).astype(dtype)


def test_plain_2d_tiff_is_one_slice_one_channel(tmp_path):
    img = np.arange(20, dtype=np.uint16).reshape(4, 5)
    tifffile.imwrite(tmp_path / "a.tif", img)
    with open_stack(tmp_path / "a.tif") as stack:
        assert stack.format == "tiff" and stack.shape == (1, 1, 4, 5) and stack.dtype == np.uint16
        assert stack.voxel_size is None and stack.n_levels == 1 and stack.n_timepoints == 1
        np.testing.assert_array_equal(stack.read_slice(0), img)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_multipage_zyx(tmp_path, compression):
    zyx = _czyx()[0]
    tifffile.imwrite(tmp_path / "z.tif", zyx, photometric="minisblack", compression=compression)
    with open_stack(tmp_path / "z.tif") as stack:
        assert stack.shape == (4, 1, 5, 6)
        for z in range(4):
            np.testing.assert_array_equal(stack.read_slice(z), zyx[z])
        assert stack.read_slice(3)[0, 0] == 30


def test_imagej_zcyx_hyperstack_with_voxel_size_and_labels(tmp_path):
    czyx = _czyx(n_c=2)
    zcyx = np.ascontiguousarray(czyx.transpose(1, 0, 2, 3))
    tifffile.imwrite(tmp_path / "ij.tif", zcyx, imagej=True, resolution=(1 / 0.4, 1 / 0.5),
                     metadata={"axes": "ZCYX", "spacing": 2.5, "unit": "um", "Labels": ["DAPI", "GFP"] * 4})
    with open_stack(tmp_path / "ij.tif") as stack:
        assert stack.format == "imagej-tiff"
        assert stack.shape == (4, 2, 5, 6)
        assert stack.channel_names == ["DAPI", "GFP"]
        assert stack.voxel_size == VoxelSize(x=pytest.approx(0.4), y=pytest.approx(0.5), z=pytest.approx(2.5))
        for z in range(4):
            for c in range(2):
                np.testing.assert_array_equal(stack.read_slice(z, c), czyx[c, z])
        assert stack.read_slice(2, -1)[0, 0] == 120  # channel 1, z 2


def test_imagej_unit_in_nm_and_escaped_micro_sign(tmp_path):
    data = _czyx(n_c=1)[0]
    tifffile.imwrite(tmp_path / "nm.tif", data, imagej=True, resolution=(1 / 200.0, 1 / 200.0),
                     metadata={"axes": "ZYX", "spacing": 1000.0, "unit": "nm"})
    with open_stack(tmp_path / "nm.tif") as stack:
        assert stack.voxel_size == VoxelSize(x=pytest.approx(0.2), y=pytest.approx(0.2), z=pytest.approx(1.0))
    tifffile.imwrite(tmp_path / "mu.tif", data, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "unit": "\\u00B5m"})
    with open_stack(tmp_path / "mu.tif") as stack:  # no spacing: ImageJ's default depth of 1 unit
        assert stack.voxel_size == VoxelSize(x=0.5, y=0.5, z=1.0)


def test_imagej_tzcyx_timepoints(tmp_path):
    t, z, c, y, x = np.indices((2, 3, 2, 4, 5))
    data = (1000 * t + 100 * c + 10 * z + y + x).astype(np.uint16)
    tifffile.imwrite(tmp_path / "t.tif", data, imagej=True, metadata={"axes": "TZCYX"})
    with open_stack(tmp_path / "t.tif") as stack:
        assert stack.shape == (3, 2, 4, 5) and stack.n_timepoints == 2
        np.testing.assert_array_equal(stack.read_slice(2, 1, timepoint=1), data[1, 2, 1])
        with pytest.raises(StackError, match=r"time point 2 requested but 't.tif' has time points 0\.\.1"):
            stack.read_slice(0, 0, timepoint=2)


def test_ome_tiff_czyx_with_physical_size_and_channel_names(tmp_path):
    czyx = _czyx(n_c=3, dtype=np.uint8)
    path = tmp_path / "s.ome.tif"
    tifffile.imwrite(path, czyx, ome=True, photometric="minisblack",
                     metadata={"axes": "CZYX", "PhysicalSizeX": 0.325, "PhysicalSizeY": 0.325, "PhysicalSizeZ": 1.5,
                               "Channel": {"Name": ["Hoechst", "Phalloidin", "Mask"]}})
    with open_stack(path) as stack:
        assert stack.format == "ome-tiff"
        assert stack.shape == (4, 3, 5, 6)
        assert stack.channel_names == ["Hoechst", "Phalloidin", "Mask"]
        assert stack.voxel_size == VoxelSize(0.325, 0.325, 1.5)
        for z in range(4):
            for c in range(3):
                np.testing.assert_array_equal(stack.read_slice(z, c), czyx[c, z])


def test_ome_units_in_nm(tmp_path):
    path = tmp_path / "nm.ome.tif"
    tifffile.imwrite(path, _czyx(n_c=1)[0], ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeY": 250, "PhysicalSizeYUnit": "nm",
                               "PhysicalSizeZ": 0.001, "PhysicalSizeZUnit": "mm"})
    with open_stack(path) as stack:
        assert stack.voxel_size == VoxelSize(x=pytest.approx(0.25), y=pytest.approx(0.25), z=pytest.approx(1.0))


def test_shaped_czyx_tiff_from_tifffile_metadata(tmp_path):
    czyx = _czyx(n_c=2, dtype=np.float32)
    tifffile.imwrite(tmp_path / "cz.tif", czyx, photometric="minisblack", metadata={"axes": "CZYX"})
    with open_stack(tmp_path / "cz.tif") as stack:
        assert stack.shape == (4, 2, 5, 6) and stack.dtype == np.float32
        np.testing.assert_array_equal(stack.read_slice(3, 1), czyx[1, 3])


def test_rgb_tiff_is_reduced_to_luminance(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[1, 0] = (255, 255, 255)
    rgb[1, 1] = (10, 20, 30)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    with open_stack(tmp_path / "rgb.tif") as stack:
        assert stack.shape == (1, 1, 2, 3) and stack.dtype == np.uint8
        # 0.299 R + 0.587 G + 0.114 B, rounded: 76.2, 149.7, 29.1, 255, 18.0
        np.testing.assert_array_equal(stack.read_slice(0), [[76, 150, 29], [255, 18, 0]])


def test_rgb_stack_of_uint16_keeps_dtype(tmp_path):
    rgb = np.zeros((2, 1, 2, 3), np.uint16)
    rgb[1, 0, 0] = (1000, 2000, 3000)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb, photometric="rgb")
    with open_stack(tmp_path / "rgb16.tif") as stack:
        assert stack.shape == (2, 1, 1, 2) and stack.dtype == np.uint16
        assert stack.read_slice(1)[0, 0] == 1815  # 299 + 1174 + 342
        assert stack.read_slice(0)[0, 0] == 0


def test_planar_samples_that_are_not_rgb_are_channels(tmp_path):
    czyx = _czyx(n_c=1, n_z=3)[0]  # one page with 3 grey samples per pixel, stored as planes
    tifffile.imwrite(tmp_path / "s.tif", czyx, photometric="minisblack", planarconfig="separate")
    with open_stack(tmp_path / "s.tif") as stack:
        assert stack.shape == (1, 3, 5, 6)
        np.testing.assert_array_equal(stack.read_slice(0, 2), czyx[2])


def test_bilevel_tiff_reads_as_uint8_0_255(tmp_path):
    mask = np.zeros((2, 4, 9), bool)
    mask[1, 2, 3:7] = True
    tifffile.imwrite(tmp_path / "bits.tif", mask, photometric="minisblack")
    with open_stack(tmp_path / "bits.tif") as stack:
        assert stack.dtype == np.uint8
        np.testing.assert_array_equal(stack.read_slice(1), mask[1].astype(np.uint8) * 255)


def test_big_endian_tiff(tmp_path):
    zyx = _czyx()[1]
    tifffile.imwrite(tmp_path / "be.tif", zyx, byteorder=">", photometric="minisblack")
    with open_stack(tmp_path / "be.tif") as stack:
        plane = stack.read_slice(2)
        assert plane.dtype.isnative
        np.testing.assert_array_equal(plane, zyx[2])


def test_reading_one_plane_reads_one_page(tmp_path, monkeypatch):
    zyx = _czyx(n_c=1, n_z=50, n_y=64, n_x=64)[0]
    tifffile.imwrite(tmp_path / "c.tif", zyx, photometric="minisblack", compression="zlib")
    decoded = []
    original = tifffile.TiffPage.asarray

    def spy(self, *args, **kwargs):
        decoded.append(self.index)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPage, "asarray", spy)
    monkeypatch.setattr(tifffile.TiffFrame, "asarray", spy, raising=False)
    with open_stack(tmp_path / "c.tif") as stack:
        np.testing.assert_array_equal(stack.read_slice(37), zyx[37])
    assert decoded == [37]


# ---- errors ------------------------------------------------------------------------------------------


def test_truncated_uncompressed_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "full.tif", _czyx(n_c=1, n_z=10, n_y=64, n_x=64)[0], photometric="minisblack")
    raw = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StackError, match=r"'cut.tif' is a truncated (or corrupt )?TIFF file"):
        open_stack(tmp_path / "cut.tif")


def test_truncated_compressed_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "full.tif", _czyx(n_c=1, n_z=10, n_y=64, n_x=64)[0], photometric="minisblack",
                     compression="zlib")
    raw = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(StackError, match=r"'cut.tif' is a truncated or corrupt TIFF file"):
        open_stack(tmp_path / "cut.tif")


def test_garbage_with_tif_extension(tmp_path):
    (tmp_path / "junk.tif").write_bytes(b"\x00\x01not a tiff at all" * 20)
    with pytest.raises(StackError, match=r"'junk.tif' is not a TIFF file \(no TIFF header\)"):
        open_stack(tmp_path / "junk.tif")


def test_tiff_header_only(tmp_path):
    (tmp_path / "head.tif").write_bytes(b"II*\x00")
    with pytest.raises(StackError, match=r"'head.tif' is a truncated or corrupt TIFF file"):
        open_stack(tmp_path / "head.tif")


def test_complex_tiff_is_unsupported(tmp_path):
    tifffile.imwrite(tmp_path / "cplx.tif", np.zeros((3, 4), np.complex64))
    with pytest.raises(StackError, match=r"'cplx.tif' has unsupported pixel type complex64; TIFF stacks must be one "
                                         r"of bool, uint8, uint16"):
        open_stack(tmp_path / "cplx.tif")


def test_z_and_channel_out_of_range(tmp_path):
    tifffile.imwrite(tmp_path / "z.tif", _czyx()[0], photometric="minisblack")
    with open_stack(tmp_path / "z.tif") as stack:
        with pytest.raises(StackError, match=r"slice z=4 requested but 'z.tif' has z 0\.\.3"):
            stack.read_slice(4)
        with pytest.raises(StackError, match=r"channel 1 requested but 'z.tif' has channels 0\.\.0"):
            stack.read_slice(0, 1)
        with pytest.raises(StackError, match=r"resolution level 1 requested but 'z.tif' has levels 0\.\.0"):
            stack.read_slice(0, level=1)


def test_read_slices_plane_by_plane_for_tiff(tmp_path):
    zyx = _czyx()[2]
    tifffile.imwrite(tmp_path / "z.tif", zyx, photometric="minisblack")
    with open_stack(tmp_path / "z.tif") as stack:
        got = list(stack.read_slices([3, 0, 3]))
    assert [z for z, _ in got] == [3, 0, 3]
    for z, plane in got:
        np.testing.assert_array_equal(plane, zyx[z])


def test_damaged_compressed_page_is_reported_when_read(tmp_path):
    zyx = _czyx(n_c=1, n_z=6, n_y=64, n_x=64)[0]
    path = tmp_path / "d.tif"
    tifffile.imwrite(path, zyx, photometric="minisblack", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[4].dataoffsets[0]
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 32] = b"\xff" * 32
    path.write_bytes(bytes(raw))
    with open_stack(path) as stack:
        np.testing.assert_array_equal(stack.read_slice(3), zyx[3])
        with pytest.raises(StackError, match=r"cannot read z=4, channel 0 of 'd.tif': the TIFF file is truncated or "
                                             r"corrupt"):
            stack.read_slice(4)
