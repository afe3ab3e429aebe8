"""Quick adapt (core.pipeline.adapt_prototype): a prototype made on one stack, a few clicks on another, one
prototype that keeps both sets of examples and records where they came from.

Stacks: two small synthetic demos (core.demo.make_demo, 3 x 128 x 128, seeds 1 and 2); stack B's intensities
are remapped (a cube, or inverted) so that a prototype from A transfers badly; the filter-bank backbone.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import tifffile
from scipy import ndimage

import core.pipeline as pipeline
from core.config import PipelineConfig
from core.demo import make_demo
from core.errors import PrototypeError
from core.features.backbones import load_backbone
from core.features.embedding import SliceEmbedder
from core.io import open_stack
from core.metrics import dice
from core.pipeline import Scorer, adapt_prototype, adapt_scorer, build_prototype, calibrate_on_points, prototype_lineage
from core.prototypes import PointSet, prototype_to_bytes

SHAPE = (3, 128, 128)
Z = 1
THESIS = PipelineConfig.thesis().with_options(image_size=252, threshold="calibrated")  # an 18 x 18 patch grid
BEST = PipelineConfig.best().with_options(image_size=252)


def contrast(image: np.ndarray, kind: str) -> np.ndarray:
    """(Z, Y, X) uint16 remapped: 'cube' (x³ of the 0..1 range: dim structures get dimmer) or 'invert'."""
    f = image.astype(np.float64)
    f = (f - f.min()) / (f.max() - f.min())
    return ((f ** 3 if kind == "cube" else 1.0 - f) * 60000).astype(np.uint16)


def write(path, image, mask):
    tifffile.imwrite(path, np.stack([image, mask.astype(np.uint16)], 1), imagej=True, metadata={"axes": "ZCYX"})
    return path


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """{'a': (path, truth), 'cube': ..., 'invert': ...}: stack A and stack B under two contrasts."""
    folder = tmp_path_factory.mktemp("adapt")
    a_image, a_truth = make_demo(SHAPE, seed=1)
    b_image, b_truth = make_demo(SHAPE, seed=2)
    out = {"a": (write(folder / "a.tif", a_image, a_truth), a_truth > 0)}
    for kind in ("cube", "invert"):
        out[kind] = (write(folder / f"b_{kind}.tif", contrast(b_image, kind), b_truth), b_truth > 0)
    return out


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("filterbank")


def embedder(path, config, backbone):
    return SliceEmbedder(open_stack(path), 0, backbone, config.preprocess)


def clicks(truth: np.ndarray, z: int = Z, n: int = 3) -> PointSet:
    """n positive points at the deepest pixel of the n largest structures of slice z, n negative points far from
    any structure (30 px apart): what a careful user clicks."""
    plane = truth[z]
    inside = ndimage.distance_transform_edt(plane)
    labels, count = ndimage.label(plane)
    sizes = ndimage.sum(plane, labels, range(1, count + 1))
    positive = []
    for label in np.argsort(sizes)[::-1][:n] + 1:
        y, x = np.unravel_index(np.argmax(np.where(labels == label, inside, 0)), plane.shape)
        positive.append([x, y, z])
    outside = ndimage.distance_transform_edt(~plane)
    outside[:10], outside[-10:], outside[:, :10], outside[:, -10:] = 0, 0, 0, 0
    negative = []
    for _ in range(n):
        y, x = np.unravel_index(np.argmax(outside), plane.shape)
        negative.append([x, y, z])
        outside[max(0, y - 30):y + 30, max(0, x - 30):x + 30] = 0
    return PointSet(np.array(positive), np.array(negative))


def mean_dice(scorer: Scorer, emb, truth: np.ndarray) -> float:
    return float(np.mean([dice(scorer.segment(emb, z).mask, truth[z]) for z in range(SHAPE[0])]))


@pytest.mark.parametrize("kind, least_gain", [("cube", 0.05), ("invert", 0.5)])
def test_three_plus_three_clicks_beat_the_plain_transfer(stacks, backbone, kind, least_gain):
    (path_a, truth_a), (path_b, truth_b) = stacks["a"], stacks[kind]
    on_a, on_b = embedder(path_a, THESIS, backbone), embedder(path_b, THESIS, backbone)
    base = build_prototype(on_a, clicks(truth_a), THESIS)
    own = mean_dice(Scorer(base), on_a, truth_a)
    transfer = mean_dice(Scorer(base), on_b, truth_b)
    adapted = adapt_scorer(base, on_b, clicks(truth_b))
    gained = mean_dice(adapted, on_b, truth_b)
    # measured: A itself 0.64; cube: transfer 0.55 -> adapted 0.64; invert (structures dark): 0.02 -> 0.66
    assert 0.55 < own < 0.75
    assert gained > transfer + least_gain and gained > 0.55
    if kind == "invert":
        assert transfer < 0.1  # A's bright-tube prototype finds the (now bright) background
    prototype = adapted.prototype
    assert (len(prototype.positive_examples), len(prototype.negative_examples)) == (3 + 3, 3 + 3)
    np.testing.assert_array_equal(prototype.positive_examples[:3], base.positive_examples)
    np.testing.assert_array_equal(prototype.points.positive, clicks(truth_b).positive)  # this stack's points only
    assert prototype.source_file == str(path_b)
    # the threshold is calibrated on the new points (on B), under the references of all six examples
    assert prototype.calibrated_threshold == pytest.approx(calibrate_on_points(on_b, prototype))


def test_lineage_names_the_base_then_this_stack_and_is_saved(stacks, backbone):
    (path_a, truth_a), (path_b, truth_b) = stacks["a"], stacks["cube"]
    on_a, on_b = embedder(path_a, THESIS, backbone), embedder(path_b, THESIS, backbone)
    base = build_prototype(on_a, clicks(truth_a), THESIS)
    assert [(e["source_file"], e["positive"], e["negative"]) for e in prototype_lineage(base)] == [(str(path_a), 3, 3)]
    once = adapt_prototype(base, on_b, clicks(truth_b))
    twice = adapt_prototype(once, on_a, clicks(truth_a, z=0, n=2))
    assert [(e["source_file"], e["positive"], e["negative"]) for e in prototype_lineage(twice)] == [
        (str(path_a), 3, 3), (str(path_b), 3, 3), (str(path_a), 2, 2)]
    assert len(twice.positive_examples) == 3 + 3 + 2
    with np.load(io.BytesIO(prototype_to_bytes(twice)), allow_pickle=False) as archive:
        metadata = json.loads(str(archive["metadata_json"]))
    assert [e["positive"] for e in metadata["lineage"]] == [3, 3, 2]
    assert metadata["lineage"][1]["source_file"] == str(path_b)


def test_a_prototype_without_recorded_lineage_counts_its_surplus_examples_as_inherited(stacks, backbone):
    path_a, truth_a = stacks["a"]
    base = build_prototype(embedder(path_a, THESIS, backbone), clicks(truth_a), THESIS)
    read_back = dataclasses.replace(base, positive_examples=np.concatenate([base.positive_examples] * 2))
    assert [(e["source_file"], e["positive"], e["negative"]) for e in prototype_lineage(read_back)] == [
        ("", 3, 0), (str(path_a), 3, 3)]


def test_best_mode_keeps_the_base_pixel_examples_and_adds_the_new_ones(stacks, backbone, monkeypatch):
    (path_a, truth_a), (path_b, truth_b) = stacks["a"], stacks["invert"]
    on_a, on_b = embedder(path_a, BEST, backbone), embedder(path_b, BEST, backbone)
    base = build_prototype(on_a, clicks(truth_a), BEST)
    fresh = build_prototype(on_b, clicks(truth_b), BEST)
    # 3 clicks x 13 pixels of a radius-2 disk per class (full resolution: 128 px < pixel_max_side)
    assert len(base.pixel_positive_examples) == len(fresh.pixel_positive_examples) == 39
    adapted = adapt_scorer(base, on_b, clicks(truth_b))
    prototype = adapted.prototype
    assert len(prototype.pixel_positive_examples) == len(prototype.pixel_negative_examples) == 39 + 39
    np.testing.assert_array_equal(prototype.pixel_positive_examples[:39], base.pixel_positive_examples)
    np.testing.assert_array_equal(prototype.pixel_positive_examples[39:], fresh.pixel_positive_examples)
    assert mean_dice(adapted, on_b, truth_b) > mean_dice(Scorer(base), on_b, truth_b) + 0.4  # measured 0.58 vs 0.0
    # beyond the cap, the new examples are all kept and the base's subsampled to what is left (at least half)
    monkeypatch.setattr(pipeline, "MAX_PIXEL_EXAMPLES", 40)
    capped = adapt_prototype(base, on_b, clicks(truth_b))
    assert len(capped.pixel_positive_examples) == 20 + 39
    np.testing.assert_array_equal(capped.pixel_positive_examples[20:], fresh.pixel_positive_examples)


def test_a_base_that_does_not_fit_is_refused_with_what_to_do(stacks, backbone):
    (path_a, truth_a), (path_b, truth_b) = stacks["a"], stacks["cube"]
    on_a, on_b = embedder(path_a, THESIS, backbone), embedder(path_b, THESIS, backbone)
    base = build_prototype(on_a, clicks(truth_a), THESIS)
    points = clicks(truth_b)
    other = dataclasses.replace(base, backbone="dinov2_vits14")
    with pytest.raises(PrototypeError, match="made with backbone 'dinov2_vits14' but 'filterbank' is selected"):
        adapt_prototype(other, on_b, points)
    wider = dataclasses.replace(base, embed_dim=384)
    with pytest.raises(PrototypeError, match="384-dimensional embeddings but 'filterbank' gives 49"):
        adapt_prototype(wider, on_b, points)
    with pytest.raises(PrototypeError, match="made in thesis mode but best mode is selected; switch to thesis mode"):
        adapt_prototype(base, embedder(path_b, BEST, backbone), points, BEST)
    with pytest.raises(PrototypeError, match="has no pixel examples"):
        adapt_prototype(base, on_b, points, THESIS.with_options(pixel_classifier="forest"))
    with pytest.raises(PrototypeError, match="at least one positive point"):
        adapt_prototype(base, on_b, PointSet(negative=points.negative))
    best_base = build_prototype(embedder(path_a, BEST, backbone), clicks(truth_a), BEST)
    with pytest.raises(PrototypeError, match="needs negative points too"):
        adapt_prototype(best_base, embedder(path_b, BEST, backbone), PointSet(points.positive))
