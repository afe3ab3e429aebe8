"""A prototype records its source channel's name and intensity range, and says when a target is far off."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tifffile

from core.config import PipelineConfig
from core.demo import make_demo
from core.features.backbones import load_backbone
from core.features.embedding import SliceEmbedder
from core.io import open_stack
from core.io.channels import channel_name
from core.pipeline import build_scorer
from core.preprocess import pooled_intensity_range
from core.prototypes import PointSet, load_prototype, save_prototype, target_warnings


@pytest.fixture(scope="module")
def named_stack(tmp_path_factory):
    image, mask = make_demo(shape=(3, 64, 64), seed=4)
    path = tmp_path_factory.mktemp("source") / "named.tif"
    tifffile.imwrite(path, np.stack([image, mask.astype(np.uint16)], axis=1), imagej=True,
                     metadata={"axes": "ZCYX", "Labels": ["Vessels", "Ground truth"] * 3})
    return path


def test_the_source_channel_and_range_are_recorded_and_saved(named_stack, tmp_path):
    config = PipelineConfig.thesis().with_options(image_size=126)
    with open_stack(named_stack) as stack:
        assert channel_name(stack, 0) == "Vessels"
        embedder = SliceEmbedder(stack, 0, load_backbone("filterbank"), config.preprocess)
        points = PointSet(np.array([[30, 30, 1]]), np.array([[2, 2, 1]]))
        prototype = build_scorer(embedder, points, config).prototype
        expected = pooled_intensity_range([stack.read_slice(1, 0)], (5.0, 95.0))  # thesis: the clicked slice
    assert prototype.source_channel_name == "Vessels"
    assert prototype.intensity_range == pytest.approx(expected)
    lineage = ({"source_file": "a.tif", "channel": 0, "positive": 2, "negative": 1, "created": "x"},)
    again = load_prototype(save_prototype(dataclasses.replace(prototype, lineage=lineage), tmp_path / "p.npz"))
    assert again.source_channel_name == "Vessels"
    assert again.intensity_range == pytest.approx(expected)
    assert again.lineage == lineage


def test_generic_channel_names_count_as_unnamed():
    assert channel_name(["Channel 0", "Vessels"], 0) == ""
    assert channel_name(["Channel 0", "Vessels"], 1) == "Vessels"
    assert channel_name(["x"], 5) == ""


def test_target_warnings_by_hand():
    base = dataclasses.replace(_minimal(), source_channel_name="Vessels", intensity_range=(100.0, 1100.0))
    assert target_warnings(base, "vessels", (150.0, 900.0)) == []  # same name, width ratio 0.8
    assert target_warnings(base, "", None) == []  # nothing known about the target
    [name] = target_warnings(base, "Ramp", (100.0, 1100.0))
    assert "'Vessels'" in name and "'Ramp'" in name
    [wide] = target_warnings(base, "Vessels", (0.0, 5000.0))  # 5x wider
    assert "far from" in wide
    [apart] = target_warnings(base, "Vessels", (2000.0, 2500.0))  # no overlap
    assert "2000-2500" in apart
    assert len(target_warnings(base, "Ramp", (2000.0, 2500.0))) == 2


def _minimal():
    from core.prototypes import Prototype

    unit = np.eye(3, dtype=np.float32)[:1]
    return Prototype(unit, unit, unit, unit, PipelineConfig.thesis(), "filterbank", "none", 3, PointSet(np.array([[0, 0, 0]])))
