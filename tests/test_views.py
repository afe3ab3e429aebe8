"""core.views and ui.views: orthogonal sections (XY, XZ, YZ) in µm aspect, the downsampled mask volume and its
connected pieces, and both app panels rendered in an AppTest."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import OptionError, StackError
from core.io import VoxelSize, open_stack
from core.views import (
    StackPlanes,
    assemble_views,
    choose_level,
    connected_components_summary,
    downsample_volume,
    mask_sections,
    orthogonal_planes,
    read_cost,
)
from helpers_io import write_ims

ARR = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)  # (Z, Y, X): value = 30 z + 6 y + x


@pytest.fixture
def tiny(tmp_path):
    """A (4, 5, 6) one-channel .ims: z 2 µm, y and x 0.5 µm."""
    return write_ims(tmp_path / "tiny.ims", ARR[None, None], voxel_size_xyz=(0.5, 0.5, 2.0))


# -- orthogonal sections --------------------------------------------------------------------------------


def test_sections_through_a_point_are_the_rows_and_columns_of_every_slice(tiny):
    with open_stack(tiny) as stack:
        views = orthogonal_planes(stack, 0, (1, 2, 3))
    assert np.array_equal(views.xy, ARR[1])
    assert np.array_equal(views.xz, ARR[:, 2, :])  # (Z, X)
    assert np.array_equal(views.yz, ARR[:, :, 3])  # (Z, Y)
    assert views.xz[3, 5] == 30 * 3 + 6 * 2 + 5
    assert views.level == 0 and views.planes_read == 4 and views.mask_xy is None


def test_pixel_aspect_comes_from_the_voxel_size(tiny):
    with open_stack(tiny) as stack:
        views = orthogonal_planes(stack, 0, (0, 0, 0))
    assert views.voxel_known
    assert views.pixel_um == {"xy": (0.5, 0.5), "xz": (2.0, 0.5), "yz": (2.0, 0.5)}
    assert views.stretch("xz") == 4.0 and views.stretch("yz") == 4.0 and views.stretch("xy") == 1.0


def test_without_a_voxel_size_pixels_are_square_and_flagged(tmp_path):
    path = write_ims(tmp_path / "novox.ims", ARR[None, None], voxel_size_xyz=None)
    with open_stack(path) as stack:
        views = orthogonal_planes(stack, 0, (0, 0, 0))
    assert not views.voxel_known and views.stretch("xz") == 1.0


def test_a_point_outside_the_stack_names_it(tiny):
    with open_stack(tiny) as stack, pytest.raises(OptionError, match=r"y=5 lies outside 'tiny.ims'.*0\.\.4"):
        orthogonal_planes(stack, 0, (0, 5, 0))
    with open_stack(tiny) as stack, pytest.raises(StackError, match="resolution level 1"):
        orthogonal_planes(stack, 0, (0, 0, 0), level=1)


def test_a_lower_level_is_read_for_big_planes_and_maps_the_point(tmp_path):
    data = (np.arange(8)[:, None, None] * 100 + np.arange(16)[None, :, None] + 0 * np.arange(16)).astype(np.uint16)
    path = write_ims(tmp_path / "two.ims", data[None, None], n_levels=2, voxel_size_xyz=(0.5, 0.5, 2.0))
    with open_stack(path) as stack:
        assert choose_level(stack, max_side=8) == 1  # level 1 is 8 px across: enough for 8
        assert choose_level(stack, max_side=9) == 0
        assert read_cost(stack, 1) == (4, 4 * 8 * 8 * 2)
        views = orthogonal_planes(stack, 0, (5, 9, 3), max_side=8)
    assert views.level == 1 and views.level_point == (2, 4, 1) and views.xz.shape == (4, 8)
    # level 1 = floor of the 2x2x2 mean: z 4,5 and y 8,9 -> 450 + 8.5 -> 458
    assert views.xz[2, 0] == 458
    assert views.pixel_um["xz"] == (4.0, 1.0)


def test_mask_sections_of_some_slices_on_a_coarser_grid():
    masks = np.zeros((2, 8, 8), np.uint8)  # planes of stack z 1 and 5 (of 8)
    masks[0, 4, 6] = 255  # one voxel at z 1, y 4, x 6
    masks[1, :, 2] = 255  # a column line at z 5, x 2
    xy, xz, yz = mask_sections(masks, (5, 4, 2), (8, 8, 8), (4, 4, 4), mask_z=[1, 5])
    assert xy is not None and xy[:, 1].all() and xy.sum() == 4  # x 2 -> column 1 of 4, every row
    expected_xz = np.zeros((4, 4), bool)
    expected_xz[0, 3] = True  # z 1 -> row 0, x 6 -> column 3 (one voxel survives the 2x pooling)
    expected_xz[2, 1] = True  # z 5 -> row 2, the line's x 2 -> column 1
    assert np.array_equal(xz, expected_xz)
    assert yz[2].all() and yz.sum() == 4  # at x 2 only the line of z 5, all along y
    xy_missing, _, _ = mask_sections(masks, (2, 4, 2), (8, 8, 8), (4, 4, 4), mask_z=[1, 5])
    assert xy_missing is None  # z 2 was not segmented


def test_orthogonal_planes_with_a_full_mask_volume(tiny):
    masks = ARR > 100  # z 3 entirely, z 2 from y 4
    with open_stack(tiny) as stack:
        views = orthogonal_planes(stack, 0, (3, 2, 3), masks=masks)
    assert np.array_equal(views.mask_xz, masks[:, 2, :])
    assert np.array_equal(views.mask_yz, masks[:, :, 3])
    assert np.array_equal(views.mask_xy, masks[3])


def test_assemble_views_checks_section_shapes(tiny):
    with open_stack(tiny) as stack, pytest.raises(OptionError, match="XZ section"):
        assemble_views(stack, (0, 0, 0), 0, ARR[0], ARR[:, :, 0], ARR[:, :, 0])


# -- 3-D volume -----------------------------------------------------------------------------------------


def test_downsample_keeps_a_one_voxel_thin_line():
    mask = np.zeros((16, 64, 64), bool)
    mask[7, 33, :] = True  # a line one voxel thin along x
    volume, spacing = downsample_volume(mask, max_voxels=16 ** 3, voxel_size=VoxelSize(0.5, 0.5, 2.0))
    assert volume.shape == (16, 16, 16) and spacing == (2.0, 2.0, 2.0)  # 4 x 4 blocks in y and x: cubes of 2 µm
    assert volume[7, 8].all() and volume.sum() == 16  # y 33 -> 8; every x block of the line keeps it


def test_downsample_reduces_the_longest_axis_first_and_reads_stack_planes(tmp_path):
    mask = np.zeros((4, 30, 30), np.uint8)
    mask[:, 10, 10] = 255
    volume, spacing = downsample_volume(mask, max_voxels=4 * 15 * 15)
    assert volume.shape == (4, 15, 15) and spacing == (1.0, 2.0, 2.0)  # the 4 slices stay
    path = write_ims(tmp_path / "m.ims", mask[None, None])
    with open_stack(path) as stack:
        from_file, _ = downsample_volume(StackPlanes(stack, 0), max_voxels=4 * 15 * 15)
    assert np.array_equal(from_file, volume) and volume[:, 5, 5].all() and volume.sum() == 4


def test_two_blobs_are_two_pieces_and_a_bridge_makes_one():
    mask = np.zeros((10, 10, 10), bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[6:9, 6:9, 6:9] = True  # 27 voxels
    summary = connected_components_summary(mask)
    assert summary.n_components == 2 and summary.sizes == (27, 8)
    assert summary.largest_share == pytest.approx(27 / 35)
    for i in range(3, 6):
        mask[i, i, i] = True  # a diagonal bridge: corners touch, so 26-connected
    summary = connected_components_summary(mask)
    assert summary.n_components == 1 and summary.largest_share == 1.0
    assert "1 connected piece" in summary.sentence()
    assert connected_components_summary(np.zeros((2, 2, 2))).sentence() == "The mask is empty."


# -- real Imaris data -------------------------------------------------------------------------------------


def test_real_ims_sections_at_the_lower_level(shared_data):
    path = shared_data / "ims" / "imariswriter_sample.ims"  # (40, 3, 260, 300), 2 levels; channel 2 = mask
    truth = np.load(shared_data / "ims" / "imariswriter_sample.truth.npz")
    with open_stack(path) as stack:
        assert choose_level(stack, max_side=150) == 1
        views = orthogonal_planes(stack, 0, (20, 130, 150), max_side=150, masks=StackPlanes(stack, 2, level=1))
        assert views.level == 1 and views.level_point == (10, 65, 75)
        level1 = np.stack([stack.read_slice(z, 0, level=1) for z in range(20)])
        full = orthogonal_planes(stack, 0, (20, 130, 150), level=0)
        mask_level1 = np.stack([stack.read_slice(z, 2, level=1) for z in range(20)]) > 0
    assert np.array_equal(views.xz, level1[:, 65, :]) and np.array_equal(views.yz, level1[:, :, 75])
    assert views.xz.shape == (20, 150) and views.yz.shape == (20, 130)
    # level 1 voxels are 0.8 x 1.0 x 4 µm (x, y, z): XZ pixels are 4 µm tall and 0.8 µm wide
    assert views.pixel_um["xz"] == pytest.approx((4.0, 0.8)) and views.pixel_um["yz"] == pytest.approx((4.0, 1.0))
    assert np.array_equal(views.mask_xz, mask_level1[:, 65, :]) and views.mask_xz.any()
    channel0 = truth["data_tczyx"][0, 0]  # (Z, Y, X)
    assert np.array_equal(full.xz, channel0[:, 130, :]) and np.array_equal(full.yz, channel0[:, :, 150])


# -- the app panels ---------------------------------------------------------------------------------------


def _panels_script(image_path: str, mask_path: str, tif_path: str, z_values: list) -> None:
    from types import SimpleNamespace

    import numpy as np

    from ui import resources, views

    stack = resources.open_cached_stack(image_path)
    ctx = SimpleNamespace(stack=stack, channel=0)
    masks = np.load(mask_path)
    views.orthogonal_panel(ctx, 3, masks=masks, key="t.views")
    views.volume_panel(masks, stack.voxel_size, key="t.volume")
    outputs = SimpleNamespace(files={"tif": tif_path}, z_values=z_values, stack_name=stack.name,
                              result=SimpleNamespace(cancelled=False))
    views.batch_views(ctx, outputs, key="t.batch")


@pytest.fixture
def panel_files(tmp_path):
    """An (8, 32, 40) two-level .ims, its (8, 32, 40) mask (a tube through every slice and a blob apart) as .npy,
    and the mask of slices 2..5 written as the Batch page writes it (ImageJ TIFF)."""
    from core.io.writers import write_masks

    z, y, x = np.indices((8, 32, 40))
    image = (10 * z + y + x).astype(np.uint16)
    masks = np.zeros((8, 32, 40), np.uint8)
    masks[:, 10:13, 10:13] = 255  # a tube along z
    masks[2:4, 24:28, 30:36] = 255  # a blob, apart
    image_path = write_ims(tmp_path / "stack.ims", image[None, None], n_levels=2, voxel_size_xyz=(0.5, 0.5, 2.0))
    np.save(tmp_path / "masks.npy", masks)
    tif = write_masks(masks[2:6], tmp_path / "batch.tif", voxel_size=VoxelSize(0.5, 0.5, 2.0))
    return str(image_path), str(tmp_path / "masks.npy"), str(tif), [2, 3, 4, 5]


def test_panels_render_sections_and_the_3d_view(panel_files):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_panels_script, args=panel_files, default_timeout=60).run()
    assert not at.exception, at.exception
    assert not at.error
    captions = " ".join(c.value for c in at.caption)
    assert "Point x 20, y 16, z 3" in captions  # the centre of the slice, z from the page
    assert "voxels 0.5 x 0.5 x 2 µm" in captions  # stacks this small are read at full resolution
    assert "form 2 connected pieces; the largest holds" in captions  # the tube and the blob
    assert len(at.get("plotly_chart")) == 2  # the page's volume and the batch's
    at.number_input(key="_w.t.views.x").set_value(11).run()
    assert "Point x 11, y 16, z 3" in " ".join(c.value for c in at.caption)
    # full resolution is one choice away; the default for this 40 px stack is level 0 anyway
    assert at.selectbox(key="_w.t.views.level").value == 0
    assert not at.exception
