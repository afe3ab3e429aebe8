"""Score my prototype (core.protocol.score_prototype): a user's own prototype against the ground truth, per slice.

The stack: 4 slices of 140 x 140 px with a bright 70 x 70 square (top-left quarter, on the 14-px patch grid at
image_size 140); channel 1 is that square as ground truth, channel 2 the square moved down by 14 rows, channel 3
empty on slice 3. The hand-made backbone (tests/test_pipeline.py: patch mean features) recovers the square exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.config import PipelineConfig
from core.errors import PrototypeError, StackError
from core.features.backbones import load_backbone
from core.features.embedding import SliceEmbedder
from core.io import open_stack
from core.metrics import segmentation_scores
from core.pipeline import Scorer, build_prototype
from core.prototypes import PointSet
from core.protocol import EvalStack, score_prototype
from core.thresholds import ThresholdSpec
from tests.test_pipeline import HandmadeBackbone

CONFIG = PipelineConfig.thesis().with_options(image_size=140, threshold="score:0")  # a 10 x 10 patch grid


@pytest.fixture(scope="module")
def square(tmp_path_factory) -> Path:
    image = np.full((4, 140, 140), 100, np.uint16)
    image[:, :70, :70] = 1000
    truth, moved, partly_empty = (np.zeros_like(image) for _ in range(3))
    truth[:, :70, :70] = 1
    moved[:, 14:84, :70] = 1
    partly_empty[:3, :70, :70] = 1
    path = tmp_path_factory.mktemp("score") / "square.tif"
    tifffile.imwrite(path, np.stack([image, truth, moved, partly_empty], 1), imagej=True,
                     resolution=(1 / 0.5, 1 / 0.5), metadata={"axes": "ZCYX", "spacing": 2.0, "unit": "um"})
    return path


@pytest.fixture(scope="module")
def prototype(square):
    with open_stack(square) as stack:
        embedder = SliceEmbedder(stack, 0, HandmadeBackbone(), CONFIG.preprocess)
        return build_prototype(embedder, PointSet(np.array([[10, 10, 0]]), np.array([[120, 120, 0]])), CONFIG)


def test_a_prototype_whose_masks_are_the_truth_scores_dice_one(square, prototype):
    result = score_prototype(prototype, EvalStack(square, 0, mask_channel=1), [3, 1], backbone=HandmadeBackbone(),
                             name="square")
    assert result.slices == {"square": [1, 3]}
    assert [(r["method"], r["setting"], r["z"], r["dice"], r["iou"], r["hd95_px"]) for r in result.rows] == [
        ("square", "prototype", 1, 1.0, 1.0, 0.0), ("square", "prototype", 3, 1.0, 1.0, 0.0)]
    assert result.rows[0]["ref_stack"] == "square" and result.rows[0]["mask_fraction"] == 0.25
    (summary,) = result.summary()
    assert (summary["n"], summary["dice"], summary["iou"]) == (2, 1.0, 1.0)


def test_a_truth_moved_by_one_patch_gives_the_hand_computed_scores(square, prototype):
    # the 70 x 70 mask against the same square 14 rows lower: overlap 56 x 70 = 3920 px of 4900 each
    # Dice 2 * 3920 / 9800 = 0.8, IoU 3920 / 5880 = 2/3; every boundary pixel is at most 14 px from the other
    result = score_prototype(prototype, EvalStack(square, 0, mask_channel=2), [0], backbone=HandmadeBackbone())
    (row,) = result.rows
    assert row["dice"] == pytest.approx(0.8) and row["iou"] == pytest.approx(2 / 3)
    assert 0 < row["hd95_px"] <= 14.0 and row["hd95_um"] == pytest.approx(row["hd95_px"] * 0.5)
    with open_stack(square) as stack:
        mask = Scorer(prototype).segment(SliceEmbedder(stack, 0, HandmadeBackbone(), CONFIG.preprocess), 0).mask
        expected = segmentation_scores(mask, stack.read_slice(0, 2) > 0, pixel_size_um=(0.5, 0.5))
    assert (row["dice"], row["iou"], row["hd95_px"]) == (expected.dice, expected.iou, expected.hd95_px)


def test_the_threshold_and_the_configuration_can_be_overridden(square, prototype):
    # the square's 25 patches tie: top 10 % keeps the first 10 of them in raster order, top 20 % the first 20
    spec = EvalStack(square, 0, mask_channel=1)
    ten = score_prototype(prototype, spec, [0], backbone=HandmadeBackbone(), threshold=ThresholdSpec("top", 10.0))
    assert (ten.rows[0]["mask_fraction"], ten.rows[0]["dice"], ten.rows[0]["iou"]) == pytest.approx(
        (0.10, 2 * 10 / (10 + 25), 10 / 25))
    twenty = score_prototype(prototype, spec, [0], backbone=HandmadeBackbone(),
                             config=CONFIG.with_options(threshold="top:20"))
    assert (twenty.rows[0]["mask_fraction"], twenty.rows[0]["dice"]) == pytest.approx((0.20, 2 * 20 / (20 + 25)))


def test_slices_without_structure_are_skipped_with_a_note(square, prototype):
    result = score_prototype(prototype, EvalStack(square, 0, mask_channel=3), [2, 3], backbone=HandmadeBackbone())
    assert [r["z"] for r in result.rows] == [2]
    assert result.notes == ["square: 1 slices without both structure and background skipped"]


def test_a_prototype_of_another_backbone_or_a_slice_outside_is_refused(square, prototype):
    spec = EvalStack(square, 0, mask_channel=1)
    with pytest.raises(PrototypeError, match="made with backbone 'handmade' .* but 'filterbank' .* is selected"):
        score_prototype(prototype, spec, [0], backbone=load_backbone("filterbank"))
    with pytest.raises(StackError, match="slice 7 requested, but the stack has slices 0-3"):
        score_prototype(prototype, spec, [7], backbone=HandmadeBackbone())
