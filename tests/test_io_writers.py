"""Mask writers: ImageJ TIFF, OME-TIFF, HDF5, the streaming TiffMaskWriter, and atomic writes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile

from core.errors import StackError
from core.io import VoxelSize, open_stack
from core.io.writers import TiffMaskWriter, mask_to_uint8, write_masks

VOXEL = VoxelSize(x=0.4, y=0.5, z=2.0)


def _masks(n_z=3, n_y=5, n_x=7):
    """Slice z has a bar in row z: hand-checkable and different per slice."""
    m = np.zeros((n_z, n_y, n_x), bool)
    for z in range(n_z):
        m[z, z, 1:5] = True
    return m


def test_mask_to_uint8():
    np.testing.assert_array_equal(mask_to_uint8(np.array([0, 1, 2, -1])), [0, 255, 255, 255])
    np.testing.assert_array_equal(mask_to_uint8(np.array([True, False])), [255, 0])
    assert mask_to_uint8(np.array([0.0, 0.5])).dtype == np.uint8


def test_imagej_tiff_three_pages_not_rgb_with_voxel_size(tmp_path):
    masks = _masks()
    out = write_masks(masks, tmp_path / "m.tif", voxel_size=VOXEL)
    with tifffile.TiffFile(out) as tif:
        assert len(tif.pages) == 3  # 3 slices stay 3 grey pages, not one RGB page
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
        meta = tif.imagej_metadata
        assert meta["slices"] == 3 and meta["unit"] == "um" and meta["spacing"] == pytest.approx(2.0)
        xres = tif.pages[0].tags["XResolution"].value
        assert xres[0] / xres[1] == pytest.approx(2.5)  # pixels per µm
        data = tif.asarray()
    assert data.dtype == np.uint8 and data.shape == (3, 5, 7)
    np.testing.assert_array_equal(data, masks.astype(np.uint8) * 255)
    with open_stack(out) as stack:  # and our reader agrees
        assert stack.format == "imagej-tiff" and stack.shape == (3, 1, 5, 7)
        assert stack.voxel_size == VoxelSize(x=pytest.approx(0.4), y=pytest.approx(0.5), z=pytest.approx(2.0))
        np.testing.assert_array_equal(stack.read_slice(2), masks[2].astype(np.uint8) * 255)


def test_tiff_without_voxel_size_and_one_slice(tmp_path):
    out = write_masks(_masks(n_z=1), tmp_path / "one.tiff")
    with open_stack(out) as stack:
        assert stack.shape == (1, 1, 5, 7) and stack.voxel_size is None
        assert stack.read_slice(0)[0, 1] == 255


def test_ome_tiff(tmp_path):
    masks = _masks()
    out = write_masks(masks, tmp_path / "m.ome.tif", voxel_size=VOXEL, channel_name="Vessels")
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and len(tif.pages) == 3
        assert 'PhysicalSizeX="0.4"' in tif.ome_metadata and 'PhysicalSizeZ="2.0"' in tif.ome_metadata
    with open_stack(out) as stack:
        assert stack.format == "ome-tiff" and stack.shape == (3, 1, 5, 7)
        assert stack.channel_names == ["Vessels"]
        assert stack.voxel_size == VOXEL
        np.testing.assert_array_equal(stack.read_slice(1), masks[1].astype(np.uint8) * 255)


def test_hdf5(tmp_path):
    masks = _masks()
    out = write_masks(masks, tmp_path / "m.h5", voxel_size=VOXEL, description="bone")
    with h5py.File(out, "r") as f:
        data = f["mask"]
        assert data.dtype == np.uint8 and data.chunks == (1, 5, 7) and data.compression == "gzip"
        np.testing.assert_array_equal(data[()], masks.astype(np.uint8) * 255)
        np.testing.assert_allclose(data.attrs["element_size_um"], [2.0, 0.5, 0.4])  # (z, y, x)
        assert data.attrs["axes"] == "ZYX" and data.attrs["description"] == "bone"


class _RecordingArray:
    """A (Z, Y, X) array-like that records which z-ranges the writer asks for."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.requests = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        z = key[0] if isinstance(key, tuple) else key
        self.requests.append(len(range(*z.indices(self.shape[0]))) if isinstance(z, slice) else 1)
        return self.array[key]


def test_masks_are_read_slab_by_slab(tmp_path, monkeypatch):
    import core.io.writers as mw

    monkeypatch.setattr(mw, "_SLAB_BYTES", 2 * 5 * 7)  # two uint8 slices per slab
    mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=np.uint8, shape=(5, 5, 7))
    mm[:] = np.arange(5)[:, None, None] % 2
    mm.flush()
    for name in ("s.tif", "s.ome.tif", "s.h5"):
        masks = _RecordingArray(np.load(tmp_path / "m.npy", mmap_mode="r"))
        out = write_masks(masks, tmp_path / name)
        assert max(masks.requests) == 2 and sum(masks.requests) == 5, name
        if name.endswith(".h5"):
            with h5py.File(out, "r") as f:
                assert f["mask"][()].max(axis=(1, 2)).tolist() == [0, 255, 0, 255, 0]
        else:
            with open_stack(out) as stack:
                assert [int(stack.read_slice(z).max()) for z in range(5)] == [0, 255, 0, 255, 0], name


def test_refuses_to_overwrite_and_unknown_extension(tmp_path):
    target = tmp_path / "m.tif"
    target.write_bytes(b"precious")
    for name in ("m.tif",):
        with pytest.raises(StackError, match=r"'.*m.tif' already exists; choose another name or allow overwriting"):
            write_masks(_masks(), tmp_path / name)
    assert target.read_bytes() == b"precious"
    write_masks(_masks(), target, overwrite=True)
    assert tifffile.imread(target).shape == (3, 5, 7)
    with pytest.raises(StackError, match=r"unknown extension; supported: \.tif, \.tiff, \.ome\.tif"):
        write_masks(_masks(), tmp_path / "m.png")
    with pytest.raises(StackError, match=r"expected \(Z, Y, X\)"):
        write_masks(np.zeros((2, 2, 2, 2)), tmp_path / "four.tif")


def test_tiff_mask_writer_streams_pages_in_caller_order(tmp_path):
    masks = _masks(n_z=4)
    with TiffMaskWriter(tmp_path / "w.tif", voxel_size=VOXEL) as writer:
        for z in (3, 0, 2):
            writer.write(masks[z])
        assert not (tmp_path / "w.tif").exists()  # only the hidden temp exists until close
    data = tifffile.imread(tmp_path / "w.tif")
    np.testing.assert_array_equal(data, masks[[3, 0, 2]].astype(np.uint8) * 255)
    assert [p.name for p in tmp_path.iterdir()] == ["w.tif"]


def test_tiff_mask_writer_removes_temp_on_exception_and_on_bad_pages(tmp_path):
    with pytest.raises(RuntimeError):
        with TiffMaskWriter(tmp_path / "w.tif") as writer:
            writer.write(np.ones((4, 4), bool))
            raise RuntimeError("model crashed")
    assert list(tmp_path.iterdir()) == []
    writer = TiffMaskWriter(tmp_path / "w.tif")
    writer.write(np.ones((4, 4), bool))
    with pytest.raises(StackError, match=r"mask page 1 for 'w.tif' is \(4, 5\) but the first page was \(4, 4\)"):
        writer.write(np.ones((4, 5), bool))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StackError, match=r"no mask pages were written to 'e.tif'"):
        TiffMaskWriter(tmp_path / "e.tif").close()
    assert list(tmp_path.iterdir()) == []


def test_tiff_mask_writer_refuses_existing(tmp_path):
    (tmp_path / "w.tif").write_bytes(b"x")
    with pytest.raises(StackError, match="already exists"):
        TiffMaskWriter(tmp_path / "w.tif")
    with TiffMaskWriter(tmp_path / "w.tif", overwrite=True) as writer:
        writer.write(np.zeros((2, 2), np.uint8))
    assert tifffile.imread(tmp_path / "w.tif").shape == (2, 2)


def test_parent_folder_is_created(tmp_path):
    out = write_masks(_masks(), tmp_path / "new" / "deeper" / "m.tif")
    assert out.is_file()


@pytest.mark.parametrize("name", ["masks.png", "masks", "masks.jpg", "masks.tif.bak", ".tif"])
def test_an_unknown_mask_extension_is_refused_with_the_supported_list(tmp_path, name):
    supported = r"\.tif, \.tiff, \.ome\.tif, \.ome\.tiff, \.h5, \.hdf5, \.ims"
    with pytest.raises(StackError, match=rf"^cannot write masks as '{name}': unknown extension; supported: {supported}$"):
        write_masks(_masks(), tmp_path / name, overwrite=True)
    with pytest.raises(StackError, match=r"unknown extension; supported: \.tif, \.tiff$"):
        TiffMaskWriter(tmp_path / name)
    assert list(tmp_path.iterdir()) == []  # never a TIFF under another name, and no temp


def test_the_streaming_writer_refuses_ome_names_it_would_not_honour(tmp_path):
    with pytest.raises(StackError, match=r"^cannot stream masks to 'm.ome.tif': this writer makes ImageJ TIFF, not "
                                         r"OME-TIFF; supported: \.tif, \.tiff$"):
        TiffMaskWriter(tmp_path / "m.ome.tif")
    assert list(tmp_path.iterdir()) == []
    assert write_masks(_masks(), tmp_path / "M.OME.TIFF").is_file()  # write_masks does write OME-TIFF


def test_mask_writers_refuse_to_replace_any_input(tmp_path):
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.zeros((3, 5, 7), np.uint8), photometric="minisblack")
    before = image.read_bytes()
    with pytest.raises(StackError, match="is the source file itself"):
        write_masks(_masks(), image, overwrite=True, sources=[tmp_path / "other.tif", image])
    with pytest.raises(StackError, match="is the source file itself"):
        TiffMaskWriter(image, overwrite=True, sources=[image])
    assert image.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.tif"]
