"""core.io.base and core.io.atomic: the default-channel rule, stack labels, and atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from core.errors import StackError
from core.io import default_image_channel, open_stack, stack_label
from core.io.atomic import atomic_output, write_bytes, write_text
from helpers_io import ramp_tczyx, write_ims


@pytest.fixture
def ims5(tmp_path):
    """A 5-channel .ims (T=1, C=5, Z=2, Y=8, X=8): channels 0..4, the last one the expert mask."""
    return write_ims(tmp_path / "five.ims", ramp_tczyx(1, 5, 2, 8, 8))


# -- default_image_channel ------------------------------------------------------------------------


def test_default_channel_of_a_five_channel_ims_is_the_penultimate(ims5):
    with open_stack(ims5) as stack:
        assert stack.shape[1] == 5
        assert default_image_channel(stack) == 3  # 5 - 2: the last channel holds the mask
        # and it is the channel whose plane the ramp says: value = 100 c + 10 z + y + 3 x
        plane = stack.read_slice(1, default_image_channel(stack))
        assert plane[2, 1] == 100 * 3 + 10 * 1 + 2 + 3 * 1


def test_default_channel_of_a_one_channel_ims_is_0(tmp_path):
    with open_stack(write_ims(tmp_path / "one.ims", ramp_tczyx(1, 1, 2, 8, 8))) as stack:
        assert default_image_channel(stack) == 0


def test_default_channel_of_a_tiff_is_0_even_with_several_channels(tmp_path):
    data = np.zeros((2, 3, 4, 5), np.uint16)  # (Z, C, Y, X)
    tifffile.imwrite(tmp_path / "zc.tif", data, imagej=True, metadata={"axes": "ZCYX"})
    with open_stack(tmp_path / "zc.tif") as stack:
        assert stack.shape == (2, 3, 4, 5)
        assert default_image_channel(stack) == 0  # the penultimate rule is an .ims lab convention only


def test_requested_channel_wins_and_negatives_count_from_the_end(ims5):
    with open_stack(ims5) as stack:
        assert default_image_channel(stack, -1) == 4
        assert default_image_channel(stack, -5) == 0
        assert default_image_channel(stack, 0) == 0  # 0 is a request, not "no request"
        assert default_image_channel(stack, 2) == 2


@pytest.mark.parametrize("requested", [5, -6, 99])
def test_out_of_range_channel_raises_stack_error_naming_the_range(ims5, requested):
    with open_stack(ims5) as stack:
        with pytest.raises(StackError, match=r"'five\.ims' has channels 0\.\.4"):
            default_image_channel(stack, requested)


# -- stack_label ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path, label", [
    ("/x/sample_A.ome.tif", "sample_A"),
    ("B.OME.TIFF", "B"),
    ("c.tiff", "c"),
    ("d.ims", "d"),
    ("e.v2.tif", "e.v2"),  # only the image extension goes
])
def test_stack_label(path, label):
    assert stack_label(path) == label


# -- core.io.atomic -------------------------------------------------------------------------------


def _leftovers(folder):
    """Hidden temp files atomic_output may have left ('.~<hex>.<name>')."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".~"))


def test_write_text_refuses_an_existing_file_without_overwrite(tmp_path):
    out = write_text(tmp_path / "r.txt", "first")
    with pytest.raises(StackError, match="already exists"):
        write_text(out, "second")
    assert out.read_text() == "first"
    write_text(out, "second", overwrite=True)
    assert out.read_text() == "second"
    assert _leftovers(tmp_path) == []


def test_write_text_refuses_the_source_itself_even_with_overwrite(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("original")
    for spelling in (source, tmp_path / "." / "in.txt"):
        with pytest.raises(StackError, match="source file itself"):
            write_text(spelling, "clobbered", overwrite=True, source=source)
    assert source.read_text() == "original"
    assert _leftovers(tmp_path) == []


def test_an_exception_inside_atomic_output_leaves_no_temp_file_and_no_output(tmp_path):
    out = tmp_path / "m.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(out) as tmp:
            assert tmp.parent == out.parent and tmp != out  # same folder, so the rename is atomic
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_an_exception_keeps_the_old_file_when_overwriting(tmp_path):
    out = write_bytes(tmp_path / "m.bin", b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(out, overwrite=True) as tmp:
            tmp.write_bytes(b"new, half written")
            raise RuntimeError("boom")
    assert out.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_write_bytes_creates_missing_folders_and_refuses_a_folder(tmp_path):
    out = write_bytes(tmp_path / "a" / "b" / "x.bin", b"\x00\x01")
    assert out.read_bytes() == b"\x00\x01"
    with pytest.raises(StackError, match="is a folder"):
        write_bytes(tmp_path / "a", b"", overwrite=True)
