"""Appending a mask channel to a copy of an .ims file (docs/spec/FORMAT.md §8)."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

import core.io.ims_append
from core.errors import StackError
from core.io.ims_append import append_mask_channel
from core.io import open_stack
from core.io.writers import write_masks
from helpers_io import attr_text, next_level, ramp_tczyx, raw_datasets, sha256, write_ims


def _mask(shape, seed=0, fraction=0.3):
    return np.random.default_rng(seed).random(shape) < fraction


@pytest.fixture
def source(tmp_path):
    """(T=2, C=2, Z=9, Y=21, X=34) uint16 in (4, 16, 16) chunks, 2 levels."""
    data = ramp_tczyx(2, 2, 9, 21, 34)
    return write_ims(tmp_path / "src.ims", data, n_levels=2), data


def _channel_attrs_are_s1(group, names):
    for name in names:
        value = group.attrs[name]
        assert value.dtype == np.dtype("S1") and value.ndim == 1, name
        assert group.attrs.get_id(name).get_type().get_strpad() == h5py.h5t.STR_NULLTERM, name


def test_appended_channel_round_trips_and_originals_stay_identical(source, tmp_path):
    src, data = source
    src_hash = sha256(src)
    mask = _mask((9, 21, 34))
    out = append_mask_channel(src, tmp_path / "out.ims", mask, timepoint=1, channel_name="Bone", color=(1, 0, 1),
                              description="test mask")
    assert out == tmp_path / "out.ims"
    assert sha256(src) == src_hash  # the source is never written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ims", "src.ims"]  # no temp left

    with open_stack(out) as stack:
        assert stack.shape == (9, 3, 21, 34)
        assert stack.channel_names[-1] == "Bone" and stack.channel_colors[-1] == (1.0, 0.0, 1.0)
        expected1 = mask.astype(np.uint16) * 255
        for z in range(9):
            np.testing.assert_array_equal(stack.read_slice(z, -1, timepoint=1), expected1[z])
            assert not stack.read_slice(z, -1, timepoint=0).any()  # other time points: zeros
            for c in range(2):
                np.testing.assert_array_equal(stack.read_slice(z, c, timepoint=1), data[1, c, z])
        level1 = next_level(expected1)  # floor(mean 2x2x2): 0, 31, 63, ... 255 at edges
        for z in range(4):
            np.testing.assert_array_equal(stack.read_slice(z, 2, timepoint=1, level=1), level1[z])
        assert stack.read_slice(0, 2, level=1).max() == 0

    old, new = raw_datasets(src), raw_datasets(out)
    assert set(new) - set(old) == {f"DataSet/ResolutionLevel {r}/TimePoint {t}/Channel 2/Data"
                                   for r in range(2) for t in range(2)}
    for key, raw in old.items():
        assert new[key] == raw, key  # stored chunk bytes identical


def test_appended_channel_layout_attributes_and_histograms(source, tmp_path):
    src, _ = source
    mask = _mask((9, 21, 34), seed=1)
    out = append_mask_channel(src, tmp_path / "out.ims", mask, channel_name="Bone", description="why")
    with h5py.File(out, "r") as f:
        for r, size in ((0, (9, 21, 34)), (1, (4, 10, 17))):
            for t in range(2):
                ref = f[f"DataSet/ResolutionLevel {r}/TimePoint {t}/Channel 0/Data"]
                group = f[f"DataSet/ResolutionLevel {r}/TimePoint {t}/Channel 2"]
                data = group["Data"]
                assert data.dtype == ref.dtype == np.uint16
                assert data.shape == ref.shape and data.chunks == ref.chunks
                assert data.compression == "gzip" and data.compression_opts == 2
                assert not data[size[0]:].any() and not data[:, size[1]:].any() and not data[:, :, size[2]:].any()
                _channel_attrs_are_s1(group, ["ImageSizeX", "ImageSizeY", "ImageSizeZ", "HistogramMin", "HistogramMax"])
                assert [attr_text(group, f"ImageSize{a}") for a in "XYZ"] == [str(s) for s in size[::-1]]
                assert attr_text(group, "HistogramMin") == "0.000" and attr_text(group, "HistogramMax") == "256.000"
                assert attr_text(group, "HistogramMax1024") == "256.000"
                hist, hist1024 = group["Histogram"][()], group["Histogram1024"][()]
                assert hist.dtype == np.uint64 and hist.shape == (256,)
                assert hist1024.dtype == np.uint64 and hist1024.shape == (257,)  # one bin per value 0..256
                values = data[: size[0], : size[1], : size[2]]
                np.testing.assert_array_equal(hist1024, np.bincount(values.ravel(), minlength=257))
                assert hist.sum() == np.prod(size)
                if r == 0 and t == 0:
                    assert hist1024[255] == mask.sum() and hist1024[0] == mask.size - mask.sum()
                    assert hist[254] == mask.sum()  # 256 bins over [0, 256]: value 255 -> bin floor(255*256/257)
                if t == 1:
                    assert hist1024[0] == np.prod(size)
        info = f["DataSetInfo/Channel 2"]
        _channel_attrs_are_s1(info, ["Name", "Color", "ColorMode", "ColorRange", "ColorOpacity", "GammaCorrection"])
        assert {k: attr_text(info, k) for k in info.attrs} == {
            "Name": "Bone", "Description": "why", "Color": "1.000 0.000 1.000", "ColorMode": "BaseColor",
            "ColorRange": "0.000 255.000", "ColorOpacity": "1.000", "GammaCorrection": "1.000",
        }
        assert attr_text(f["DataSetInfo/Image"], "Noc") == "3"
        assert f.id.get_create_plist().get_version()[0] <= 2  # HDF5 1.8-readable superblock kept


def test_uint8_file_gets_uint8_histograms(tmp_path):
    data = ramp_tczyx(1, 1, 6, 20, 30, dtype=np.uint8)
    src = write_ims(tmp_path / "u8.ims", data, n_levels=2, compression="lz4")
    mask = _mask((6, 20, 30), seed=2)
    out = append_mask_channel(src, tmp_path / "u8_mask.ims", mask)
    with h5py.File(out, "r") as f:
        group = f["DataSet/ResolutionLevel 0/TimePoint 0/Channel 1"]
        assert group["Data"].dtype == np.uint8
        assert "Histogram1024" not in group
        assert attr_text(group, "HistogramMax") == "255.000"
        hist = group["Histogram"][()]
        assert hist[255] == mask.sum() and hist[0] == mask.size - mask.sum()
    with open_stack(out) as stack:
        np.testing.assert_array_equal(stack.read_slice(5, -1), mask[5].astype(np.uint8) * 255)


def test_write_masks_ims_dispatch_and_memmap_input(source, tmp_path):
    src, _ = source
    mm = np.lib.format.open_memmap(tmp_path / "mask.npy", mode="w+", dtype=np.uint8, shape=(9, 21, 34))
    mm[:] = _mask((9, 21, 34), seed=3)
    mm.flush()
    out = write_masks(np.load(tmp_path / "mask.npy", mmap_mode="r"), tmp_path / "m.ims", source_ims=src)
    with open_stack(out) as stack:
        np.testing.assert_array_equal(stack.read_slice(4, 2), (mm[4] > 0).astype(np.uint16) * 255)


def test_refuses_overwrite_same_file_wrong_shape_and_bad_timepoint(source, tmp_path):
    src, _ = source
    mask = _mask((9, 21, 34))
    existing = tmp_path / "exists.ims"
    existing.write_bytes(b"keep me")
    with pytest.raises(StackError, match=r"exists.ims' already exists; .*overwrite=True"):
        append_mask_channel(src, existing, mask)
    assert existing.read_bytes() == b"keep me"
    append_mask_channel(src, existing, mask, overwrite=True)
    with open_stack(existing) as stack:
        assert stack.shape[1] == 3

    src_hash = sha256(src)
    with pytest.raises(StackError, match=r"src.ims' is the source file itself"):
        append_mask_channel(src, src, mask, overwrite=True)
    with pytest.raises(StackError, match=r"is the source file itself"):
        append_mask_channel(src, tmp_path / "." / "src.ims", mask, overwrite=True)
    assert sha256(src) == src_hash

    with pytest.raises(StackError, match=r"mask has shape \(Z, Y, X\) = \(9, 21, 33\) but 'src.ims' is \(9, 21, 34\)"):
        append_mask_channel(src, tmp_path / "bad.ims", mask[:, :, :33])
    with pytest.raises(StackError, match=r"time point 2 requested but 'src.ims' has time points 0\.\.1"):
        append_mask_channel(src, tmp_path / "bad.ims", mask, timepoint=2)
    with pytest.raises(StackError, match=r"needs the source \.ims file"):
        write_masks(mask, tmp_path / "bad.ims")
    assert not (tmp_path / "bad.ims").exists()


def test_failure_midway_leaves_nothing(source, tmp_path, monkeypatch):
    src, _ = source

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(core.io.ims_append, "_write_lower_level", explode)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        append_mask_channel(src, tmp_path / "half.ims", _mask((9, 21, 34)))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---- the real files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ims_dir(shared_data):
    folder = shared_data / "ims"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    return folder


@pytest.mark.shared_data
def test_appending_the_samples_own_mask_reproduces_imariswriters_channel(ims_dir, tmp_path):
    """ImarisWriter wrote channel 2 (a 0/255 mask); our copy of it must match data and histograms."""
    src = ims_dir / "imariswriter_sample.ims"
    src_hash = sha256(src)
    truth = np.load(ims_dir / "imariswriter_sample.truth.npz")["data_tczyx"]
    out = append_mask_channel(src, tmp_path / "sample_mask.ims", truth[0, 2] > 0, channel_name="Copy")
    assert sha256(src) == src_hash
    with h5py.File(src, "r") as f_src, h5py.File(out, "r") as f_out:
        for r in range(2):
            theirs = f_src[f"DataSet/ResolutionLevel {r}/TimePoint 0/Channel 2"]
            ours = f_out[f"DataSet/ResolutionLevel {r}/TimePoint 0/Channel 3"]
            np.testing.assert_array_equal(ours["Data"][()], theirs["Data"][()])
            np.testing.assert_array_equal(ours["Histogram"][()], theirs["Histogram"][()])
            np.testing.assert_array_equal(ours["Histogram1024"][()], theirs["Histogram1024"][()])
            for name in ("ImageSizeX", "ImageSizeY", "ImageSizeZ", "HistogramMin", "HistogramMax",
                         "HistogramMin1024", "HistogramMax1024"):
                assert attr_text(ours, name) == attr_text(theirs, name), name
    old, new = raw_datasets(src), raw_datasets(out)
    assert all(new[key] == raw for key, raw in old.items())
    with open_stack(out) as stack:
        assert stack.channel_names == ["Nuclei", "Ramp x+2y+50z", "Mask", "Copy"]
        np.testing.assert_array_equal(stack.read_slice(20, -1), truth[0, 2, 20])


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["ImarisWriter_doc_Minimal_IMS_File.ims", "zarrnii_tests_PtK2Cell.ims",
                                  "imariswriter_uint8_2t_lz4.ims"])
def test_append_to_other_real_files(ims_dir, tmp_path, name):
    src = ims_dir / name
    copy = tmp_path / name
    shutil.copyfile(src, copy)  # a writable copy in tmp: the shared folder is read-only
    with open_stack(copy) as stack:
        z, c, y, x = stack.shape
        n_t = stack.n_timepoints
    mask = _mask((z, y, x), seed=4)
    out = append_mask_channel(copy, tmp_path / f"masked_{name}", mask, timepoint=n_t - 1)
    with open_stack(out) as stack:
        assert stack.shape == (z, c + 1, y, x)
        assert stack.channel_names[-1] == "Protoscope mask"
        np.testing.assert_array_equal(stack.read_slice(z - 1, -1, timepoint=n_t - 1),
                                      mask[z - 1].astype(stack.dtype) * 255)
    old, new = raw_datasets(copy), raw_datasets(out)
    assert all(new[key] == raw for key, raw in old.items())
    with h5py.File(out, "r") as f:
        info = f["DataSetInfo"]
        # the official reader needs DataSetInfo/Channel c for every channel and TimeInfo (docs/spec/FORMAT.md §5.2)
        assert all(f"Channel {i}" in info for i in range(c + 1)) and "TimeInfo" in info
        if "Noc" in info["Image"].attrs:
            assert attr_text(info["Image"], "Noc") == str(c + 1)
