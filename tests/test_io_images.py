"""Single images (PNG/JPEG/BMP via Pillow), folders of images, dispatch errors, and the real data."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from core.errors import StackError
from core.io import natural_sort_key, open_stack, rgb_to_grey


def test_grey_png_is_one_slice(tmp_path):
    img = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(img).save(tmp_path / "g.png")
    with open_stack(tmp_path / "g.png") as stack:
        assert stack.format == "image" and stack.shape == (1, 1, 3, 4) and stack.dtype == np.uint8
        assert stack.voxel_size is None and stack.channel_names == ["Channel 0"]
        np.testing.assert_array_equal(stack.read_slice(0), img)
        np.testing.assert_array_equal(stack.read_slice(0, -1), img)


def test_16bit_png_keeps_uint16(tmp_path):
    img = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(img).save(tmp_path / "g16.png")
    with open_stack(tmp_path / "g16.png") as stack:
        assert stack.dtype == np.uint16
        np.testing.assert_array_equal(stack.read_slice(0), img)


def test_rgb_png_and_bmp_reduced_to_luminance(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
    for name in ("c.png", "c.bmp"):
        Image.fromarray(rgb).save(tmp_path / name)
        with open_stack(tmp_path / name) as stack:
            assert stack.shape == (1, 1, 1, 4) and stack.dtype == np.uint8
            # 0.299 R + 0.587 G + 0.114 B rounded: 76.2 -> 76, 149.7 -> 150, 29.1 -> 29, 18.0 -> 18
            np.testing.assert_array_equal(stack.read_slice(0), [[76, 150, 29, 18]])


def test_rgba_palette_and_1bit(tmp_path):
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (255, 255, 255, 0)  # alpha ignored
    Image.fromarray(rgba).save(tmp_path / "a.png")
    with open_stack(tmp_path / "a.png") as stack:
        np.testing.assert_array_equal(stack.read_slice(0), [[255, 0]])
    Image.fromarray(np.array([[0, 128]], np.uint8)).convert("P").save(tmp_path / "p.png")
    with open_stack(tmp_path / "p.png") as stack:
        np.testing.assert_array_equal(stack.read_slice(0), [[0, 128]])
    Image.fromarray(np.array([[True, False, True]])).save(tmp_path / "b.png")
    with open_stack(tmp_path / "b.png") as stack:
        assert stack.dtype == np.uint8
        np.testing.assert_array_equal(stack.read_slice(0), [[255, 0, 255]])


def test_jpeg_grey_is_close(tmp_path):
    img = np.full((16, 16), 100, np.uint8)
    Image.fromarray(img).save(tmp_path / "j.jpg", quality=95)
    with open_stack(tmp_path / "j.jpg") as stack:
        assert stack.shape == (1, 1, 16, 16)
        assert np.abs(stack.read_slice(0).astype(int) - 100).max() <= 1  # lossy


def test_rgb_to_grey_dtypes():
    assert rgb_to_grey(np.array([[[0.5, 0.5, 0.5]]], np.float32)).dtype == np.float32
    assert rgb_to_grey(np.array([[[0.5, 0.5, 0.5]]], np.float32))[0, 0] == pytest.approx(0.5)
    assert rgb_to_grey(np.array([[[65535, 65535, 65535]]], np.uint16))[0, 0] == 65535


def test_natural_sort_key():
    names = ["img10.png", "img2.png", "img1.png", "IMG3.png"]
    assert sorted(names, key=natural_sort_key) == ["img1.png", "img2.png", "IMG3.png", "img10.png"]


def test_folder_of_images_in_natural_order(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in (0, 1, 2, 10, 11):
        Image.fromarray(np.full((3, 4), z, np.uint8)).save(folder / f"img{z}.png")
    (folder / "notes.txt").write_text("ignored")
    (folder / ".hidden.png").write_bytes(b"ignored")
    with open_stack(folder) as stack:
        assert stack.format == "image-folder" and stack.shape == (5, 1, 3, 4)
        assert [stack.read_slice(z)[0, 0] for z in range(5)] == [0, 1, 2, 10, 11]
        with pytest.raises(StackError, match=r"slice z=5 requested but 'slices' has z 0\.\.4"):
            stack.read_slice(5)


def test_folder_of_single_page_tiffs(tmp_path):
    for z in range(3):
        tifffile.imwrite(tmp_path / f"s_{z}.tif", np.full((2, 3), 1000 * z, np.uint16))
    with open_stack(tmp_path) as stack:
        assert stack.shape == (3, 1, 2, 3) and stack.dtype == np.uint16
        assert stack.read_slice(2)[1, 2] == 2000


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StackError, match=r"folder '.*empty' contains no images \(\.png"):
        open_stack(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(mixed / "b.bmp")
    with pytest.raises(StackError, match=r"folder 'mixed' mixes image types \(1 \.bmp, 1 \.png\)"):
        open_stack(mixed)
    sizes = tmp_path / "sizes"
    sizes.mkdir()
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(sizes / "a1.png")
    Image.fromarray(np.zeros((3, 5), np.uint8)).save(sizes / "a2.png")
    with pytest.raises(StackError, match=r"'a2.png' in folder 'sizes' is 5x3 pixels but 'a1.png' is 4x3"):
        open_stack(sizes)


def test_unknown_extension_lists_supported(tmp_path):
    (tmp_path / "data.czi").write_bytes(b"x")
    with pytest.raises(StackError, match=r"'data.czi' has an unknown format \(\.czi\); supported: \.ims, \.tif, \.tiff, "
                                         r"\.png, \.jpg, \.jpeg, \.bmp"):
        open_stack(tmp_path / "data.czi")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(StackError, match=r"'.*nothere.ims' does not exist"):
        open_stack(tmp_path / "nothere.ims")
    (tmp_path / "zero.tif").write_bytes(b"")
    with pytest.raises(StackError, match=r"'zero.tif' is empty \(0 bytes\)"):
        open_stack(tmp_path / "zero.tif")


def test_truncated_and_garbage_png(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    raw = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    # the header is intact, but the structure is verified when the image is opened
    with pytest.raises(StackError, match=r"^'cut.png' is a truncated or corrupt image \(Truncated File Read\)"):
        open_stack(tmp_path / "cut.png")
    (tmp_path / "junk.png").write_bytes(b"not a png" * 10)
    with pytest.raises(StackError, match=r"'junk.png' is not a readable \.png image"):
        open_stack(tmp_path / "junk.png")


# ---- real data -------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_real_vessel_tiff_and_isbi_folder(shared_data):
    tif = shared_data / "vesselnn" / "images" / "burgess2014_tgMouse.tif"
    folder = shared_data / "isbi2012" / "images"
    if not tif.is_file() or not folder.is_dir():
        pytest.skip("vesselnn / isbi2012 data absent")
    expected = tifffile.imread(tif)
    with open_stack(tif) as stack:
        assert stack.shape == (expected.shape[0], 1, *expected.shape[1:])
        for z in (0, expected.shape[0] - 1):
            np.testing.assert_array_equal(stack.read_slice(z), expected[z])
    with open_stack(folder) as stack:
        assert stack.shape == (30, 1, 512, 512)
        np.testing.assert_array_equal(stack.read_slice(10), np.asarray(Image.open(folder / "10.png")))
        np.testing.assert_array_equal(stack.read_slice(2), np.asarray(Image.open(folder / "2.png")))
