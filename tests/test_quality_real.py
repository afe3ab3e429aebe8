"""On real vessel stacks (../shared/data/vesselnn): the filterbank pipeline must beat a plain Otsu threshold
of the same slice (same-slice protocol). Skipped when the developers' data are absent."""

import numpy as np
import pytest

from core.features.backbones import load_backbone
from core.config import PipelineConfig
from core.protocol import EvalStack, Method, ProtocolSettings, evaluate

pytestmark = pytest.mark.shared_data

STACKS = ("burgess2014_tgMouse", "santos2015_lowContrastVessels")


def test_filterbank_same_slice_dice_beats_otsu(shared_data, tmp_path):
    root = shared_data / "vesselnn"
    stacks = [EvalStack(root / "images" / f"{name}.tif", 0, mask_path=root / "labels" / f"{name}.tif") for name in STACKS]
    settings = ProtocolSettings(seeds=(0,), n_slices=3, skip_ends=2, settings=("same-slice",))
    result = evaluate(stacks, [Method("best", PipelineConfig.best()), Method("otsu")], [load_backbone("filterbank")], settings)
    dice = {}
    for method in ("best", "otsu"):
        rows = [r for r in result.rows if r["method"] == method]
        assert len(rows) == 6  # 2 stacks x 3 slices x 1 seed, the same slices for both methods
        dice[method] = float(np.mean([r["dice"] for r in rows]))
    assert dice["best"] >= dice["otsu"], dice
