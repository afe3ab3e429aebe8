"""Large point sets: best mode's pixel examples are capped per class (seeded), so 100k clicks stay fast."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from core import pipeline
from core.config import PipelineConfig
from core.demo import make_demo
from core.features.backbones import load_backbone
from core.features.embedding import SliceEmbedder
from core.io import open_stack
from core.prototypes import PointSet


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    image, _ = make_demo(shape=(2, 96, 96), seed=2)
    path = tmp_path_factory.mktemp("points") / "s.tif"
    tifffile.imwrite(path, image, imagej=True, metadata={"axes": "ZYX"})
    with open_stack(path) as stack:
        yield SliceEmbedder(stack, 0, load_backbone("filterbank"), PipelineConfig.best().preprocess)


def random_points(n: int, seed: int) -> PointSet:
    rng = np.random.default_rng(seed)
    def one() -> np.ndarray:
        return np.c_[rng.integers(0, 96, n), rng.integers(0, 96, n), np.zeros(n, int)]
    return PointSet(one(), one())


def test_examples_are_capped_per_class_and_seeded(embedder, monkeypatch):
    monkeypatch.setattr(pipeline, "MAX_PIXEL_EXAMPLES", 300)
    config = PipelineConfig.best()
    points = random_points(200, seed=1)  # 200 clicks x 13 pixels (radius 2) per class, far above 300
    first = pipeline.build_scorer(embedder, points, config, seed=4).prototype
    again = pipeline.build_scorer(embedder, points, config, seed=4).prototype
    assert first.pixel_positive_examples.shape[0] == 300
    assert first.pixel_negative_examples.shape[0] == 300
    assert np.array_equal(first.pixel_positive_examples, again.pixel_positive_examples)


def test_few_clicks_keep_every_example(embedder):
    config = PipelineConfig.best()
    points = random_points(3, seed=2)
    prototype = pipeline.build_scorer(embedder, points, config).prototype
    assert config.augment_radius == 2  # a disc of radius 2: 1 + 4 + 4 + 4 = 13 pixels per click
    assert prototype.pixel_positive_examples.shape[0] == 3 * 13
