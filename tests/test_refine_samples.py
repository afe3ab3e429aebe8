"""core.refine.samples: refine samples fit each prototype's pixel classifier once (one per (slice, seed) for
same-slice prototypes, one per stack for a saved prototype), and give the same maps as the score window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

import core.pixels
from core.config import PipelineConfig
from core.demo import make_demo
from core.features.backbones import load_backbone
from core.features.embedding import SliceEmbedder
from core.io import open_stack
from core.pipeline import build_prototype
from core.protocol import EvalStack, protocol_points
from core.refine.samples import PrototypeMaps, same_slice_samples, stack_samples
from core.window import ScoreWindow
from core.pipeline import Scorer

BEST = PipelineConfig.best().with_options(image_size=112)


@pytest.fixture(scope="module")
def stack_path(tmp_path_factory) -> Path:
    """A 5-slice 64 x 64 stack: channel 0 image, channel 1 truth."""
    image, mask = make_demo(shape=(5, 64, 64), seed=3)
    path = tmp_path_factory.mktemp("samples") / "s.tif"
    tifffile.imwrite(path, np.stack([image, mask.astype(np.uint16)], axis=1), imagej=True, metadata={"axes": "ZCYX"})
    return path


@pytest.fixture
def fits(monkeypatch) -> list[int]:
    """Counts PixelClassifier fits (one per construction: the constructor fits)."""
    calls: list[int] = []
    original = core.pixels.PixelClassifier.__init__

    def counting(self, *args, **kwargs):
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(core.pixels.PixelClassifier, "__init__", counting)
    return calls


def test_same_slice_samples_fit_one_classifier_per_slice_and_seed(stack_path, fits):
    assert BEST.uses_pixels
    spec = EvalStack(stack_path, 0, mask_channel=1)
    backbone = load_backbone("filterbank")
    samples = same_slice_samples(spec, [1, 3], backbone, BEST, n_points=6, seed=0)
    assert [s.z for s in samples] == [1, 3]
    assert len(fits) == 2  # build_prototype + Scorer(prototype) made it 4
    samples = same_slice_samples(spec, [2], backbone, BEST, n_points=6, seed=1)
    assert len(fits) == 3
    assert samples[0].heatmap.shape == samples[0].raw.shape == (64, 64)


def test_stack_samples_fit_a_saved_prototype_once(stack_path, fits):
    backbone = load_backbone("filterbank")
    with open_stack(stack_path) as stack:
        embedder = SliceEmbedder(stack, 0, backbone, BEST.preprocess)
        truth = np.asarray(stack.read_slice(2, 1)) > 0
        prototype = build_prototype(embedder, protocol_points(truth, 2, 0, 6, 4), BEST)
    fits.clear()
    samples = stack_samples(EvalStack(stack_path, 0, mask_channel=1), [0, 2, 4], prototype=prototype, backbone=backbone)
    assert len(samples) == 3 and len(fits) == 1


def test_prototype_maps_are_the_score_window_segmentation(stack_path):
    config = PipelineConfig.thesis().with_options(image_size=112, z_sigma=1.0)
    backbone = load_backbone("filterbank")
    with open_stack(stack_path) as stack:
        embedder = SliceEmbedder(stack, 0, backbone, config.preprocess)
        truth = np.asarray(stack.read_slice(2, 1)) > 0
        prototype = build_prototype(embedder, protocol_points(truth, 2, 0, 6, 4), config)
        maps = PrototypeMaps(embedder, prototype)
        window = ScoreWindow(Scorer(prototype), embedder)
        for z in (0, 1, 2):
            heatmap, mask = maps(z)
            expected = window.segment(z)
            assert heatmap.dtype == np.float32 and heatmap.shape == (64, 64)
            np.testing.assert_array_equal(heatmap, expected.scores.astype(np.float32))
            np.testing.assert_array_equal(mask, expected.mask)
        # an already fitted scorer is used as it is
        scorer = Scorer(prototype)
        assert PrototypeMaps(embedder, scorer).scorer is scorer
