"""Channel rules by name (core.io.channels) on hand-made name lists, synthetic and real Imaris files; and PNG /
JPEG images through open_stack, the filter-bank embedder and the pipeline (issue 11, points 1 and 2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import tifffile
import pytest
from PIL import Image

from core.config import PipelineConfig
from core.errors import StackError
from core.features.backbones import load_backbone
from core.features.embedding import MIN_SLICE_SIDE, SliceEmbedder
from core.io import open_stack
from core.io.base import lab_convention_channel
from core.io.channels import (
    PROTOSCOPE_MASK_NAME,
    channel_label,
    default_image_channel,
    guess_truth_channel,
    is_protoscope_mask,
    is_test_pattern,
    matching_channel,
)
from core.io.writers import write_masks
from core.pipeline import build_scorer
from core.prototypes import PointSet
from tests.helpers_io import write_ims

TWO_PHOTON = ["Smoothed", "Vessels", "Ground truth"]


# ---- names only ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("names, expected", [
    (TWO_PHOTON, 2),
    (["Smoothed", "Vessels"], None),
    (["GroundTruth", "img"], 0),
    (["raw", "ground_truth"], 1),
    (["raw", "LABELS"], 1),
    (["raw", "Segmentation", "Mask"], 1),  # a segmentation reads more like a truth than a bare mask
    (["raw", "Mask", "Ground truth"], 2),  # 'ground truth' beats 'mask' whatever the order
    (["raw", "annotation"], 1),
    (["raw", "GT"], 1),
    (["Nuclei", "Ramp x+2y+50z", "Mask"], 2),
    (["Vessels", "Protoscope mask"], None),  # our own result is no ground truth
    (["Smoothed", "Vessels", "Ground truth", "Protoscope mask"], 2),
    (["Masking dye", "Labelling"], None),  # words that only contain 'mask' / 'label'
    ([], None),
])
def test_guess_truth_channel(names, expected):
    assert guess_truth_channel(names) == expected


def test_guess_truth_channel_never_returns_the_image_channel():
    assert guess_truth_channel(["Mask", "Ground truth"], image_channel=1) == 0
    assert guess_truth_channel(["Vessels", "Ground truth"], image_channel=1) is None


def test_protoscope_mask_name_is_the_writers_default():
    import inspect

    assert inspect.signature(write_masks).parameters["channel_name"].default == PROTOSCOPE_MASK_NAME
    assert is_protoscope_mask("Protoscope mask") and is_protoscope_mask("protoscope_mask 2")
    assert not is_protoscope_mask("Mask") and not is_protoscope_mask("Vessels")


def test_test_patterns():
    assert is_test_pattern("Ramp x+2y+50z") and is_test_pattern("Ramp (x+y+7z+40t)%256")
    assert is_test_pattern("intensity gradient") and not is_test_pattern("Rampart") and not is_test_pattern("Nuclei")


def test_channel_label_and_matching_channel():
    assert channel_label(TWO_PHOTON, 1) == "1 · Vessels"
    assert channel_label(["", "b"], 0) == "0"
    assert matching_channel(TWO_PHOTON, "vessels") == 1
    assert matching_channel(["Ground truth", "Vessels", "Smoothed"], " VESSELS ") == 1  # order differs
    assert matching_channel(TWO_PHOTON, "groundtruth") == 2  # spaces do not count
    assert matching_channel(TWO_PHOTON, "Nuclei") is None
    assert matching_channel(TWO_PHOTON, None) is None and matching_channel(TWO_PHOTON, "  ") is None


# ---- stacks -------------------------------------------------------------------------------------------


def _ims(path: Path, names: list[str]) -> Path:
    data = np.zeros((1, len(names), 2, 16, 16), np.uint8)
    return write_ims(path, data, chunks=(2, 16, 16), channel_names=names)


@pytest.mark.parametrize("names, expected", [
    (TWO_PHOTON, 1),  # the lab rule (second to last) stands: Vessels
    (["Smoothed", "Vessels", "Ground truth", "Protoscope mask"], 1),  # the app's own copy: still Vessels
    (["Vessels", "Ground truth", "Smoothed"], 0),  # rule -> "Ground truth": the nearest other channel, lower first
    (["Nuclei", "Ramp x+2y+50z", "Mask"], 0),  # rule -> the ramp: the real channel instead
    (["Ramp", "Mask"], 0),  # nothing better than the ramp: at least no mask
    (["Mask"], 0),
])
def test_default_image_channel_on_ims(tmp_path, names, expected):
    with open_stack(_ims(tmp_path / "s.ims", names)) as stack:
        assert stack.channel_names == names
        assert default_image_channel(stack) == expected


def test_default_image_channel_on_tiff(tmp_path):
    import tifffile

    path = tmp_path / "s.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 16, 16), np.uint8), metadata={
        "axes": "ZCYX", "Channel": {"Name": ["Ground truth", "Vessels", "Protoscope mask"]}})
    with open_stack(path) as stack:
        assert lab_convention_channel(stack) == 0  # the plain rule picks the truth
        assert default_image_channel(stack) == 1
        assert guess_truth_channel(stack.channel_names) == 0
        assert channel_label(stack, 2) == "2 · Protoscope mask"


def test_real_imaris_files(shared_data, tmp_path):
    folder = shared_data / "ims"
    with open_stack(folder / "imariswriter_sample.ims") as stack:  # Nuclei, Ramp x+2y+50z, Mask
        assert lab_convention_channel(stack) == 1  # the old rule: the ramp
        assert default_image_channel(stack) == 0
        assert guess_truth_channel(stack.channel_names) == 2
    with open_stack(folder / "zarrnii_tests_PtK2Cell.ims") as stack:  # Kinetochores, Microtubules, DNA, Dynactin
        assert default_image_channel(stack) == lab_convention_channel(stack) == 2
        assert guess_truth_channel(stack.channel_names) is None
        assert channel_label(stack, 3) == "3 · Dynactin"
        assert matching_channel(stack, "dna") == 2
    # the app's own Imaris copy (one more channel, 'Protoscope mask') defaults like its source
    source = tmp_path / "cell.ims"
    shutil.copyfile(folder / "zarrnii_tests_PtK2Cell.ims", source)
    with open_stack(source) as stack:
        masks = np.zeros(stack.shape[:1] + stack.shape[2:], bool)
    copy = write_masks(masks, tmp_path / "cell_masks.ims", source_ims=source)
    with open_stack(copy) as stack:
        assert stack.channel_names[-1] == PROTOSCOPE_MASK_NAME and stack.shape[1] == 5
        assert lab_convention_channel(stack) == 3  # the old rule: Dynactin, the source's last channel
        assert default_image_channel(stack) == 2
        assert guess_truth_channel(stack.channel_names) is None


# ---- PNG / JPEG images (point 1) ----------------------------------------------------------------------


def _images(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    disc = ((yy - 24) ** 2 + (xx - 20) ** 2) < 100  # a bright disc left, noise elsewhere
    grey = (rng.random((48, 64)) * 60 + disc * 150).astype(np.uint8)
    paths = {"grey8": folder / "grey8.png", "rgb": folder / "rgb.png", "grey16": folder / "grey16.png",
             "jpeg": folder / "grey.jpg"}
    Image.fromarray(grey).save(paths["grey8"])
    Image.fromarray(np.stack([grey, grey // 2, grey], axis=-1)).save(paths["rgb"])
    Image.fromarray(grey.astype(np.uint16) * 250).save(paths["grey16"])
    Image.fromarray(grey).save(paths["jpeg"], quality=95)
    return paths


@pytest.mark.parametrize("kind, dtype", [("grey8", np.uint8), ("rgb", np.uint8), ("grey16", np.uint16),
                                         ("jpeg", np.uint8)])
def test_png_and_jpeg_images_embed_and_segment(tmp_path, kind, dtype):
    path = _images(tmp_path)[kind]
    config = PipelineConfig.best()
    with open_stack(path) as stack:
        assert stack.shape == (1, 1, 48, 64) and stack.dtype == dtype
        embedder = SliceEmbedder(stack, 0, load_backbone("filterbank"), config.preprocess)
        grid = embedder.embed(0)
        assert grid.ndim == 3 and grid.shape[:2] == (70, 70)  # 980 px input / 14 px patches
        assert not embedder.raw(0).flags.writeable
        points = PointSet(np.array([[20, 24, 0], [22, 22, 0]]), np.array([[55, 8, 0], [55, 40, 0]]))
        scorer = build_scorer(embedder, points, config)
        mask = scorer.segment(embedder, 0).mask
    assert mask.shape == (48, 64)
    assert mask[24, 20] and not mask[8, 55] and not mask[40, 55]  # the disc, not the noise


@pytest.mark.parametrize("shape", [(1, 1), (15, 200), (200, 8)])
def test_tiny_images_are_refused_at_once(tmp_path, shape):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.full(shape, 7, np.uint8)).save(path)
    with open_stack(path) as stack, pytest.raises(StackError, match=rf"tiny.png.*{shape[0]} x {shape[1]} px.*at "
                                                                 rf"least {MIN_SLICE_SIDE} x {MIN_SLICE_SIDE}"):
        SliceEmbedder(stack, 0, load_backbone("filterbank"))


def test_the_smallest_allowed_image_embeds(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(path)
    with open_stack(path) as stack:
        assert SliceEmbedder(stack, 0, load_backbone("filterbank")).embed(0).shape[:2] == (70, 70)


def test_info_names_the_default_channels(tmp_path, capsys):
    """`python -m core info` shows the defaults every command and the app take, by index and name."""
    from core.cli.main import main

    path = tmp_path / "named.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 16, 16), np.uint16), metadata={
        "axes": "ZCYX", "Channel": {"Name": ["Ground truth", "Autofluorescence", "Vessels"]}})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "default image channel: 1 · Autofluorescence" in out  # position 0 is the truth: the nearest other
    assert "ground truth (by name): 0 · Ground truth" in out
