"""The real .ims files in ../shared/data/ims read pixel-exact (skipped when the folder is absent).

Three files were written by Bitplane's ImarisWriter with known arrays (`<name>.truth.npz`); one by
Imaris 7 itself (PtK2Cell) and one is Bitplane's minimal example. Level 1 is checked against
ImarisWriter's rule, floor(mean) of 2x2x2 blocks of the truth (docs/spec/FORMAT.md §4.3).
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from core.io import VoxelSize, open_stack
from helpers_io import next_level

pytestmark = pytest.mark.shared_data

IW_FILES = ["imariswriter_sample.ims", "imariswriter_uint8_2t_lz4.ims", "imariswriter_float32_shufflegzip.ims"]


@pytest.fixture(scope="module")
def ims_dir(shared_data):
    folder = shared_data / "ims"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    return folder


@pytest.fixture(scope="module")
def manifest(ims_dir):
    return json.loads((ims_dir / "imariswriter_samples.manifest.json").read_text())


@pytest.mark.parametrize("name", IW_FILES)
def test_imariswriter_files_read_pixel_exact_all_channels_timepoints_levels(ims_dir, manifest, name):
    truth = np.load(ims_dir / name.replace(".ims", ".truth.npz"))
    data = truth["data_tczyx"]
    n_t, n_c, n_z, n_y, n_x = data.shape
    with open_stack(ims_dir / name) as stack:
        assert stack.format == "ims"
        assert stack.shape == (n_z, n_c, n_y, n_x)
        assert stack.dtype == data.dtype == np.dtype(manifest[name]["dtype"])
        assert stack.n_timepoints == n_t == manifest[name]["timepoints"]
        assert stack.channel_names == [str(s) for s in truth["channel_names"]]
        for t in range(n_t):
            for c in range(n_c):
                for level in range(stack.n_levels):
                    expected = data[t, c]
                    for _ in range(level):
                        expected = next_level(expected)
                    assert stack.level_shape(level) == expected.shape
                    for z in range(expected.shape[0]):
                        plane = stack.read_slice(z, c, timepoint=t, level=level)
                        assert plane.dtype == data.dtype and plane.shape == expected.shape[1:]
                        np.testing.assert_array_equal(plane, expected[z], err_msg=f"{name} t{t} c{c} L{level} z{z}")


@pytest.mark.parametrize("name", IW_FILES)
def test_imariswriter_voxel_sizes_match_manifest(ims_dir, manifest, name):
    expected = manifest[name]["voxel_size_xyz"]
    with open_stack(ims_dir / name) as stack:
        vs = stack.voxel_size
        assert (vs.x, vs.y, vs.z) == pytest.approx(expected, rel=1e-6)  # float32 extents: "3.299999952"


def test_level_counts_of_imariswriter_files(ims_dir):
    # 300x260x40 uint16 -> 2 levels; 256x200x24 uint8 -> 2 levels; 66x48x10 float32 -> 1 (docs/spec/FORMAT.md §4.3)
    counts = {}
    for name in IW_FILES:
        with open_stack(ims_dir / name) as stack:
            counts[name] = (stack.n_levels, stack.level_shape(stack.n_levels - 1))
    assert counts == {
        "imariswriter_sample.ims": (2, (20, 130, 150)),
        "imariswriter_uint8_2t_lz4.ims": (2, (12, 100, 128)),
        "imariswriter_float32_shufflegzip.ims": (1, (10, 48, 66)),
    }


def test_imaris7_ptk2cell_reads_like_raw_hdf5_with_its_metadata(ims_dir):
    path = ims_dir / "zarrnii_tests_PtK2Cell.ims"
    with open_stack(path) as stack, h5py.File(path, "r") as f:
        assert stack.shape == (32, 4, 256, 256)
        assert stack.dtype == np.uint8
        assert stack.channel_names == ["Kinetochores", "Microtubules", "DNA", "Dynactin"]
        assert stack.channel_colors == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0)]
        # ExtMin -0.033, ExtMax 17.118 over 256 px; z -0.1..6.3 over 32 slices
        assert stack.voxel_size == VoxelSize(x=pytest.approx(17.151 / 256), y=pytest.approx(17.151 / 256),
                                             z=pytest.approx(0.2))
        for c in range(4):
            raw = f[f"DataSet/ResolutionLevel 0/TimePoint 0/Channel {c}/Data"]
            for z in (0, 15, 16, 31):  # both sides of the 16-slice chunk border
                np.testing.assert_array_equal(stack.read_slice(z, c), raw[z])
        np.testing.assert_array_equal(stack.read_slice(31, -1), stack.read_slice(31, 3))


def test_bitplane_minimal_example_without_dataset_info_channels(ims_dir):
    path = ims_dir / "ImarisWriter_doc_Minimal_IMS_File.ims"
    with open_stack(path) as stack, h5py.File(path, "r") as f:
        assert stack.shape == (1, 1, 128, 128)
        assert stack.dtype == np.uint16
        assert stack.channel_names == ["Channel 0"] and stack.channel_colors == [None]
        assert stack.n_timepoints == 1 and stack.n_levels == 1
        # ExtMin 3, ExtMax 10 over 128 px; z 0..0.1 over 1 slice
        assert stack.voxel_size == VoxelSize(x=7 / 128, y=7 / 128, z=pytest.approx(0.1))
        np.testing.assert_array_equal(stack.read_slice(0), f["DataSet/ResolutionLevel 0/TimePoint 0/Channel 0/Data"][0])


def test_sample_penultimate_and_last_channel_by_negative_index(ims_dir):
    truth = np.load(ims_dir / "imariswriter_sample.truth.npz")["data_tczyx"]
    with open_stack(ims_dir / "imariswriter_sample.ims") as stack:
        np.testing.assert_array_equal(stack.read_slice(7, -2), truth[0, 1, 7])
        mask = stack.read_slice(7, -1)
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask, truth[0, 2, 7])
