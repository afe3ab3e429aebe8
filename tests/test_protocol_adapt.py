"""The protocol's adapt setting (core.protocol, ``settings=("adapt",)``): stack A's reference prototype plus 3 + 3
points sampled on one slice of stack B, scored on B's other slices, beside same-file and cross-file.

Stacks: two small synthetic demos (core.demo.make_demo, 4 x 96 x 96, seeds 1 and 2) with the ground truth as
channel 1; B's intensities are remapped (x³ of the 0..1 range, or inverted) so that A's prototype transfers badly:
per-stack percentile normalisation removes a linear change of scale, not these. Backbone: the filter bank.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

import core.protocol as protocol
from core.config import PipelineConfig
from core.demo import make_demo
from core.errors import ProtoscopeError
from core.features.backbones import load_backbone
from core.protocol import ADAPT, EvalStack, Method, ProtocolSettings, evaluate, protocol_points, reference_slice

SHAPE = (4, 96, 96)
BEST = PipelineConfig.best().with_options(image_size=126)  # a 9 x 9 patch grid
THESIS = PipelineConfig.thesis().with_options(image_size=126, threshold="calibrated")


def remap(image: np.ndarray, kind: str) -> np.ndarray:
    """(Z, Y, X) uint16 remapped: 'cube' (x³ of the 0..1 range: dim structures get dimmer) or 'invert'."""
    f = image.astype(np.float64)
    f = (f - f.min()) / (f.max() - f.min())
    return ((f ** 3 if kind == "cube" else 1.0 - f) * 60000).astype(np.uint16)


def write(path, image, mask):
    tifffile.imwrite(path, np.stack([image, mask.astype(np.uint16)], 1), imagej=True, metadata={"axes": "ZCYX"})
    return path


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """{'a': EvalStack, 'cube': ..., 'invert': ...}: stack A and stack B under two contrasts."""
    folder = tmp_path_factory.mktemp("protocol_adapt")
    a_image, a_truth = make_demo(SHAPE, seed=1)
    b_image, b_truth = make_demo(SHAPE, seed=2)
    out = {"a": EvalStack(write(folder / "a.tif", a_image, a_truth), 0, mask_channel=1)}
    for kind in ("cube", "invert"):
        out[kind] = EvalStack(write(folder / f"b_{kind}.tif", remap(b_image, kind), b_truth), 0, mask_channel=1)
    return out


@pytest.fixture(scope="module")
def filterbank():
    return load_backbone("filterbank")


def run(stacks, filterbank, config, seeds=(0,), settings=("same-file", "cross-file", ADAPT), **extra):
    return evaluate([stacks["a"], stacks[extra.pop("b", "invert")]], [Method("m", config)], [filterbank],
                    ProtocolSettings(n_points=10, seeds=seeds, z_values=(0, 1, 2, 3), settings=settings, **extra))


def mean_dice(result, setting: str, target: str | None = None) -> float:
    return float(np.mean([r["dice"] for r in result.rows if r["setting"] == setting
                          and (target is None or r["stack"] == target)]))


def test_adapt_samples_three_plus_three_points_on_b_and_never_scores_the_clicked_slice(stacks, filterbank,
                                                                                       monkeypatch):
    calls = []
    original = protocol.adapt_scorer

    def recording(base, embedder, points, config=None, *, seed=0):
        calls.append((embedder.stack.path.name, base.source_file, points, seed))
        return original(base, embedder, points, config, seed=seed)

    monkeypatch.setattr(protocol, "adapt_scorer", recording)
    result = run(stacks, filterbank, BEST, seeds=(0, 1), settings=(ADAPT,))
    # one adapted prototype per (reference, other stack): 2 stacks x 2 seeds, each adapted to the other stack
    assert len(calls) == 4
    for target, source, points, seed in calls:
        assert source != target and source.endswith(("a.tif", "b_invert.tif"))
        assert (len(points.positive), len(points.negative)) == (3, 3)  # exactly 3 + 3 points on B
        clicked_z = reference_slice([0, 1, 2, 3], seed)
        assert set(points.positive[:, 2]) == set(points.negative[:, 2]) == {clicked_z}  # all on one slice of B
    rows = [r for r in result.rows if r["setting"] == ADAPT]
    assert {r["setting"] for r in result.rows} == {ADAPT}  # only what was asked
    for seed in (0, 1):
        clicked_z = reference_slice([0, 1, 2, 3], seed)
        for target in ("a", "b_invert"):
            scored = sorted(r["z"] for r in rows if r["seed"] == seed and r["stack"] == target)
            assert scored == [z for z in (0, 1, 2, 3) if z != clicked_z]  # B's other slices, each once
            assert all(r["ref_stack"] != target for r in rows if r["stack"] == target)


def test_the_points_are_the_protocols_sampler_with_its_margin(stacks, filterbank, monkeypatch):
    seen = {}
    original = protocol.adapt_scorer

    def recording(base, embedder, points, config=None, *, seed=0):
        seen[embedder.stack.path.name] = points
        return original(base, embedder, points, config, seed=seed)

    monkeypatch.setattr(protocol, "adapt_scorer", recording)
    run(stacks, filterbank, BEST, seeds=(2,), settings=(ADAPT,), margin_px=3)
    truth = tifffile.imread(stacks["invert"].image_path)[:, 1] > 0
    clicked_z = reference_slice([0, 1, 2, 3], 2)
    expected = protocol_points(truth[clicked_z], clicked_z, 2, 3, 3)  # seed 2, 3 points per class, margin 3 px
    np.testing.assert_array_equal(seen["b_invert.tif"].positive, expected.positive)
    np.testing.assert_array_equal(seen["b_invert.tif"].negative, expected.negative)


def test_adapt_is_reproducible_per_seed_and_differs_between_seeds(stacks, filterbank):
    first = run(stacks, filterbank, BEST, seeds=(0,), settings=(ADAPT,))
    again = run(stacks, filterbank, BEST, seeds=(0,), settings=(ADAPT,))
    other = run(stacks, filterbank, BEST, seeds=(3,), settings=(ADAPT,))
    key = lambda r: (r["stack"], r["z"], r["ref_z"], r["dice"], r["hd95_px"])  # noqa: E731
    assert [key(r) for r in first.rows] == [key(r) for r in again.rows]
    assert [key(r) for r in first.rows] != [key(r) for r in other.rows]


@pytest.mark.parametrize("config", [BEST, THESIS], ids=["best", "thesis"])
def test_adapt_beats_cross_file_when_b_has_another_intensity_scale(stacks, filterbank, config):
    result = run(stacks, filterbank, config, seeds=(0, 1))
    cross, adapt, same = (mean_dice(result, s, "b_invert") for s in ("cross-file", ADAPT, "same-file"))
    # measured on B (2 seeds), cross-file / adapt / same-file: best 0.00 / 0.28 / 0.76; thesis 0.18 / 0.28 / 0.69
    assert cross < 0.2  # A's bright-tube prototype finds B's (now bright) background
    assert adapt > cross + 0.08
    assert adapt < same  # 6 clicks on B do not make up for 50 on B here (A's examples outnumber them 8:1)


def test_the_intensity_baseline_adapts_its_threshold_to_bs_points(stacks, filterbank):
    result = evaluate([stacks["a"], stacks["invert"]], [Method("intensity", None)], [filterbank],
                      ProtocolSettings(n_points=10, seeds=(0,), z_values=(0, 1, 2, 3),
                                       settings=("cross-file", ADAPT)))
    cross, adapt = mean_dice(result, "cross-file", "b_invert"), mean_dice(result, ADAPT, "b_invert")
    # measured: 0.56 (A's raw threshold keeps B's bright background and structure alike), 0.76 from B's 6 points
    assert adapt > cross + 0.1


def test_adapt_points_must_be_at_least_one():
    with pytest.raises(ProtoscopeError, match="at least 1 point"):
        ProtocolSettings(adapt_points=0)


def test_score_adapted_adapts_a_users_prototype_and_scores_it_beside_the_prototype_as_it_is(stacks, filterbank):
    from core.features.embedding import SliceEmbedder
    from core.io import open_stack
    from core.pipeline import adapt_scorer, build_prototype
    from core.protocol import score_adapted

    a_truth = tifffile.imread(stacks["a"].image_path)[:, 1] > 0
    with open_stack(stacks["a"].image_path) as a:
        base = build_prototype(SliceEmbedder(a, 0, filterbank, BEST.preprocess),
                               protocol_points(a_truth[1], 1, 0, 10, 4), BEST)
    settings = ProtocolSettings(seeds=(0, 1), z_values=(0, 1, 2, 3))
    result = score_adapted(base, stacks["invert"], settings, backbone=filterbank, name="mine")
    for seed in (0, 1):
        clicked_z = reference_slice([0, 1, 2, 3], seed)
        others = [z for z in (0, 1, 2, 3) if z != clicked_z]
        rows = [r for r in result.rows if r["seed"] == seed]
        assert sorted((r["setting"], r["method"], r["z"]) for r in rows) == sorted(
            [("prototype", "mine", z) for z in others] + [(ADAPT, "mine + 3+3 points", z) for z in others])
        assert {r["ref_stack"] for r in rows} == {"a"} and {r["ref_z"] for r in rows} == {clicked_z}
    # the adapt rows are the masks of core.pipeline.adapt_scorer with the protocol's 3 + 3 points
    b_truth = tifffile.imread(stacks["invert"].image_path)[:, 1] > 0
    clicked_z = reference_slice([0, 1, 2, 3], 0)
    with open_stack(stacks["invert"].image_path) as b:
        embedder = SliceEmbedder(b, 0, filterbank, BEST.preprocess)
        points = protocol_points(b_truth[clicked_z], clicked_z, 0, 3, protocol.default_margin((96, 96), BEST))
        scorer = adapt_scorer(base, embedder, points, seed=0)
        z = next(z for z in (0, 1, 2, 3) if z != clicked_z)
        expected = protocol.mask_scores(scorer.segment(embedder, z).mask, b_truth[z], b)
    (row,) = [r for r in result.rows if r["seed"] == 0 and r["setting"] == ADAPT and r["z"] == z]
    assert (row["dice"], row["hd95_px"]) == (expected["dice"], expected["hd95_px"])
    summary = {(e["setting"]): e["dice"] for e in result.summary()}
    assert summary[ADAPT] > summary["prototype"] + 0.15  # measured: 0.0 as it is, 0.28 adapted
