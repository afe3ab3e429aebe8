"""The score window (core.window): z-smoothed maps computed once each, and one classifier fit per (slice, seed)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import tifffile

from core import pixels
from core.config import PipelineConfig
from core.demo import make_demo
from core.features.backbones import load_backbone
from core.features.embedding import SliceEmbedder
from core.io import open_stack
from core.pipeline import Scorer, build_scorer
from core.protocol import EvalStack, Method, ProtocolSettings, evaluate
from core.prototypes import PointSet
from core.window import ScoreWindow, neighbourhood, z_smoothed


@pytest.fixture(scope="module")
def stack_path(tmp_path_factory):
    """A 6-slice 64 x 64 synthetic vessel stack: channel 0 image, channel 1 truth (ZCYX TIFF)."""
    image, mask = make_demo(shape=(6, 64, 64), seed=5)
    path = tmp_path_factory.mktemp("window") / "small.tif"
    tifffile.imwrite(path, np.stack([image, mask.astype(np.uint16)], axis=1), imagej=True, metadata={"axes": "ZCYX"})
    return path


def test_neighbourhood_and_weights_by_hand():
    assert neighbourhood(0, 1.0, 10) == [0, 1, 2]
    assert neighbourhood(5, 0.5, 10) == [4, 5, 6]
    assert neighbourhood(9, 0.0, 10) == [9]
    maps = {k: np.full((1, 1), float(k), np.float32) for k in range(3)}
    # weights exp(-1/2) at z = 0 and 2 around z = 1: symmetric, so the mean is 1
    assert z_smoothed(maps, 1, 1.0, 3)[0, 0] == pytest.approx(1.0)
    # at the stack end only z = 0, 1, 2 exist: (0·1 + 1·e^-0.5 + 2·e^-2) / (1 + e^-0.5 + e^-2)
    expected = (np.exp(-0.5) + 2 * np.exp(-2)) / (1 + np.exp(-0.5) + np.exp(-2))
    assert z_smoothed(maps, 0, 1.0, 3)[0, 0] == pytest.approx(expected, rel=1e-6)


class CountingScorer(Scorer):
    """A scorer that counts how often each slice's raw map is computed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.computed: Counter[int] = Counter()

    def score_map(self, embedder, z):
        self.computed[z] += 1
        return super().score_map(embedder, z)


def test_window_computes_each_map_once_walking_up(stack_path):
    config = PipelineConfig.thesis().with_options(z_sigma=1.0, image_size=126)
    with open_stack(stack_path) as stack:
        embedder = SliceEmbedder(stack, 0, load_backbone("filterbank"), config.preprocess)
        points = PointSet(np.array([[30, 30, 2]]), np.array([[2, 2, 2]]))
        prototype = build_scorer(embedder, points, config).prototype
        scorer = CountingScorer(prototype, config)
        seen = []
        window = ScoreWindow(scorer, embedder, before_map=seen.append)
        masks = [window.segment(z).mask for z in range(6)]
        assert dict(scorer.computed) == {z: 1 for z in range(6)}
        assert seen == list(range(6))
        # the window equals smoothing the maps computed one by one
        direct = {k: Scorer(prototype, config).score_map(embedder, k) for k in range(6)}
        expected = Scorer(prototype, config).segment(embedder, 3, z_smoothed(direct, 3, 1.0, 6)).mask
        assert np.array_equal(masks[3], expected)


def test_evaluate_fits_one_classifier_per_slice_and_seed(stack_path, monkeypatch):
    fits = Counter()
    original = pixels.PixelClassifier.__init__

    def counting_init(self, kind, positive, negative, **kwargs):
        fits[(len(positive), len(negative), float(positive.sum()))] += 1
        original(self, kind, positive, negative, **kwargs)

    monkeypatch.setattr(pixels.PixelClassifier, "__init__", counting_init)
    config = PipelineConfig.best().with_options(image_size=126)
    settings = ProtocolSettings(n_points=4, seeds=(0, 1), z_values=(1, 3, 4), settings=("same-slice", "same-file"))
    result = evaluate([EvalStack(stack_path, 0, mask_channel=1)], [Method("best", config)], [load_backbone("filterbank")],
                      settings)
    same_slice = [row for row in result.rows if row["setting"] == "same-slice"]
    assert len(same_slice) == 3 * 2
    assert len([row for row in result.rows if row["setting"] == "same-file"]) == 2 * 2  # 1 reference per seed
    # one fit per (slice, seed): 3 slices x 2 seeds, and no example set fitted twice
    assert sum(fits.values()) == 6
    assert max(fits.values()) == 1
