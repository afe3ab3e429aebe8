"""core.transfer: best mode's pixel classifier on other stacks (transfer_clip, self_training).

Stacks (hand-made, 4 x 96 x 96 uint16, background 100 with Gaussian noise sigma 20, structure 1000):
- ``bars``: thick horizontal bars, 30 % of every slice (the 95th intensity percentile lies in the structure);
- ``spots``: small bright squares, 2 % of every slice (its 95th percentile lies in the background noise, so
  clipping at it stretches the noise over [0, 1]: the failure of vesselNN's capillary stack).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

import core.transfer as transfer
from core.config import PipelineConfig
from core.errors import OptionError
from core.features.backbones import load_backbone
from core.features.embedding import SliceEmbedder
from core.io import open_stack
from core.metrics import dice
from core.pipeline import Scorer, adapt_scorer, build_scorer
from core.prototypes import PointSet
from core.protocol import EvalStack, Method, ProtocolSettings, evaluate

SHAPE = (4, 96, 96)
BEST = PipelineConfig.best().with_options(image_size=126)
TRANSFER = BEST.with_options(transfer_clip=99.5)
SELF_TRAINING = BEST.with_options(transfer_clip=99.5, self_training=2)


def bars_truth() -> np.ndarray:
    truth = np.zeros(SHAPE, bool)
    for top in (8, 40, 72):
        truth[:, top:top + 10, 6:90] = True  # 3 bars of 10 x 84 px: 27 % of the slice
    return truth


def spots_truth() -> np.ndarray:
    truth = np.zeros(SHAPE, bool)
    rng = np.random.default_rng(7)
    for z in range(SHAPE[0]):
        for _ in range(8):  # 8 squares of 6 x 6 px: ~3 % of the slice
            y, x = rng.integers(4, 86, size=2)
            truth[z, y:y + 6, x:x + 6] = True
    return truth


def image_of(truth: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 20, truth.shape)
    return np.clip(np.where(truth, 1000, 100) + noise, 0, 65535).astype(np.uint16)


def write(path: Path, truth: np.ndarray, seed: int) -> Path:
    tifffile.imwrite(path, np.stack([image_of(truth, seed), truth.astype(np.uint16)], 1), imagej=True,
                     metadata={"axes": "ZCYX"})
    return path


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    folder = tmp_path_factory.mktemp("transfer")
    return {"bars": (write(folder / "bars.tif", bars_truth(), 1), bars_truth()),
            "spots": (write(folder / "spots.tif", spots_truth(), 2), spots_truth())}


@pytest.fixture(scope="module")
def filterbank():
    return load_backbone("filterbank")


def clicks(truth: np.ndarray, z: int = 1, n: int = 5) -> PointSet:
    """n positive points on the structure's pixels and n negative ones on the background, spread evenly."""
    pos = np.argwhere(truth[z])[:: max(1, int(truth[z].sum()) // n)][:n]
    neg = np.argwhere(~truth[z])[:: max(1, int((~truth[z]).sum()) // n)][:n]
    return PointSet(np.column_stack([pos[:, 1], pos[:, 0], np.full(n, z)]),
                    np.column_stack([neg[:, 1], neg[:, 0], np.full(n, z)]))


def mean_dice(scorer: Scorer, embedder: SliceEmbedder, truth: np.ndarray) -> float:
    return float(np.mean([dice(scorer.segment(embedder, z).mask, truth[z]) for z in range(SHAPE[0])]))


def test_the_transfer_block_width_is_the_filter_banks_and_off_by_default():
    assert transfer.transfer_block_width(BEST) == 0
    assert transfer.transfer_block_width(TRANSFER) == 49  # intensity + 6 scales x 8 features
    assert transfer.transfer_block_width(PipelineConfig.thesis().with_options(transfer_clip=99.5)) == 0  # no pixels
    assert PipelineConfig.best().transfer_clip == 0 and PipelineConfig.best().self_training == 0


def test_options_are_checked_and_round_trip():
    config = PipelineConfig.best().with_options(transfer_clip="99.5", self_training="3")
    assert (config.transfer_clip, config.self_training) == (99.5, 3)
    assert PipelineConfig.from_dict(config.as_dict()) == config
    assert PipelineConfig.from_dict({"mode": "best"}).transfer_clip == 0  # files from before: off
    assert "transfer(clip=99.5,self_training=3)" in config.describe()
    with pytest.raises(OptionError, match="transfer_clip must be 0"):
        PipelineConfig.best().with_options(transfer_clip=4)  # not above clip_low (5)
    with pytest.raises(OptionError, match="self_training needs transfer_clip"):
        PipelineConfig.best().with_options(self_training=2)
    with pytest.raises(OptionError, match="self_training must be a whole number"):
        PipelineConfig.best().with_options(transfer_clip=99, self_training=-1)


def test_the_transfer_range_keeps_background_dark_where_the_95th_percentile_is_noise(stacks, filterbank):
    with open_stack(stacks["spots"][0]) as stack:
        embedder = SliceEmbedder(stack, 0, filterbank, TRANSFER.preprocess)
        low95, high95 = embedder.stack_range  # best mode's own normalisation: 5th-95th percentile
        low, high = transfer.transfer_range(embedder, TRANSFER)
        # the 5th percentile is the noise's (100 - 1.645 sigma); so is the 95th (3 % of the pixels are spots: the
        # noise's 98th percentile, 100 + 2.05 sigma = 141); the 99.5th lies in the 1000-bright spots
        assert low == low95 == pytest.approx(100 - 1.645 * 20, abs=4)
        assert high95 == pytest.approx(100 + 2.05 * 20, abs=6)
        assert high == pytest.approx(1000, abs=60)
        features = transfer.transfer_features(embedder, 1, TRANSFER)
        assert features.shape == (96, 96, 49)
        intensity = features[..., 0]  # feature 0: the normalised intensity itself
        truth = stacks["spots"][1][1]
        assert np.median(intensity[~truth]) < 0.1 and np.median(intensity[truth]) > 0.9


def test_a_prototype_scores_its_own_stack_exactly_as_without_the_option(stacks, filterbank):
    path, truth = stacks["bars"]
    with open_stack(path) as stack:
        embedder = SliceEmbedder(stack, 0, filterbank, BEST.preprocess)
        plain = build_scorer(embedder, clicks(truth), BEST)
        with_block = build_scorer(embedder, clicks(truth), TRANSFER)
        assert with_block.prototype.pixel_positive_examples.shape[1] == plain.prototype.pixel_positive_examples.shape[1] + 49
        np.testing.assert_array_equal(with_block.prototype.pixel_positive_examples[:, :-49],
                                      plain.prototype.pixel_positive_examples)
        assert not with_block.transfer.applies(embedder)
        assert with_block.prototype.calibrated_threshold == plain.prototype.calibrated_threshold
        for z in range(SHAPE[0]):
            np.testing.assert_array_equal(with_block.segment(embedder, z).mask, plain.segment(embedder, z).mask)


def test_transfer_clip_recovers_the_structure_of_a_stack_with_little_foreground(stacks, filterbank):
    (bars, bars_truth_), (spots, spots_truth_) = stacks["bars"], stacks["spots"]
    results = {}
    for name, config in (("best", BEST), ("transfer", TRANSFER), ("self-training", SELF_TRAINING)):
        with open_stack(bars) as a, open_stack(spots) as b:
            scorer = build_scorer(SliceEmbedder(a, 0, filterbank, config.preprocess), clicks(bars_truth_), config)
            on_b = SliceEmbedder(b, 0, filterbank, config.preprocess)
            assert scorer.transfer.applies(on_b) == (name != "best")
            off = Scorer(scorer.prototype, config.with_options(transfer_clip=0, self_training=0))
            assert not off.transfer.applies(on_b)  # switched off when scoring: the local classifier, as before
            results[name] = mean_dice(scorer, on_b, spots_truth_)
    # measured: best 0.24 (a quarter of the slice, mostly noise, is "structure"), transfer 0.59 (the spots with a
    # halo: the bars taught wide structure), self-training 0.65 (refitted on the spots' own features)
    assert results["best"] < 0.3
    assert results["transfer"] > results["best"] + 0.3
    assert results["self-training"] > results["transfer"] + 0.03


def test_self_training_fits_one_classifier_on_the_targets_own_features(stacks, filterbank, monkeypatch):
    (bars, bars_truth_), (spots, spots_truth_) = stacks["bars"], stacks["spots"]
    fits = []
    original = transfer.PixelClassifier.__init__

    def counting(self, kind, positive, negative, **kwargs):
        fits.append((len(positive), len(negative), positive.shape[1]))
        original(self, kind, positive, negative, **kwargs)

    with open_stack(bars) as a, open_stack(spots) as b:
        scorer = build_scorer(SliceEmbedder(a, 0, filterbank, SELF_TRAINING.preprocess), clicks(bars_truth_),
                              SELF_TRAINING)
        on_b = SliceEmbedder(b, 0, filterbank, SELF_TRAINING.preprocess)
        monkeypatch.setattr(transfer.PixelClassifier, "__init__", counting)
        maps = [scorer.score_map(on_b, z) for z in range(SHAPE[0])]
        model, local = scorer.transfer.model(on_b)
    # one transfer classifier on the 49-column block, one self-trained classifier on the local 49 columns (the
    # filter bank has no patch components), fitted once for the 4 slices
    assert [f[2] for f in fits] == [49, 49] and local
    positive, negative, _ = fits[1]
    assert 20 <= positive <= 2 * transfer.SELF_TRAINING_PIXELS and negative == 2 * transfer.SELF_TRAINING_PIXELS
    assert all(m.shape == (96, 96) and -1 <= m.min() <= m.max() <= 1 for m in maps)


def test_pseudo_labels_take_the_confident_pixels_only_and_at_most_the_limit():
    scores = np.array([[0.9, 0.5, 0.49], [-0.5, -0.49, -1.0]], np.float32)
    features = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    positive, negative = transfer.pseudo_labels(scores, features, np.random.default_rng(0))
    np.testing.assert_array_equal(positive, [[0, 1], [2, 3]])  # scores 0.9 and 0.5 (p >= 0.75)
    np.testing.assert_array_equal(negative, [[6, 7], [10, 11]])  # -0.5 and -1.0 (p <= 0.25)
    one, _ = transfer.pseudo_labels(scores, features, np.random.default_rng(0), limit=1)
    assert len(one) == 1 and one[0].tolist() in ([0, 1], [2, 3])


def test_an_adapted_prototype_is_scored_by_the_transfer_classifier_on_its_new_stack(stacks, filterbank):
    (bars, bars_truth_), (spots, spots_truth_) = stacks["bars"], stacks["spots"]
    results = {}
    for name, config in (("best", BEST), ("transfer", TRANSFER), ("self-training", SELF_TRAINING)):
        with open_stack(bars) as a, open_stack(spots) as b:
            base = build_scorer(SliceEmbedder(a, 0, filterbank, config.preprocess), clicks(bars_truth_), config)
            on_b = SliceEmbedder(b, 0, filterbank, config.preprocess)
            adapted = adapt_scorer(base.prototype, on_b, clicks(spots_truth_, n=3))
            assert not transfer.own_stack(adapted.prototype, on_b)  # examples from two stacks
            assert adapted.transfer.applies(on_b) == (name != "best")
            if name == "self-training":  # its clicks on B label B: no pseudo-labels
                assert adapted.transfer.model(on_b) == (adapted.transfer.transfer_classifier(), False)
            results[name] = mean_dice(adapted, on_b, spots_truth_)
    # measured: 0.33 (the bars' examples in their own normalisation outvote 3 + 3 clicks), 0.58 with the transfer
    # block (all examples comparable), the same with self-training (not used for adapted prototypes)
    assert results["transfer"] > results["best"] + 0.2
    assert results["self-training"] == results["transfer"]


def test_the_protocol_reports_the_gain_across_files(stacks, filterbank):
    specs = [EvalStack(stacks[name][0], 0, mask_channel=1) for name in ("bars", "spots")]
    result = evaluate(specs, [Method("best", BEST), Method("transfer", TRANSFER)], [filterbank],
                      ProtocolSettings(n_points=10, seeds=(0,), z_values=(0, 1, 2, 3),
                                       settings=("same-file", "cross-file")))
    summary = {(e["method"], e["setting"]): e["dice"] for e in result.summary()}
    assert summary[("transfer", "same-file")] == summary[("best", "same-file")]  # the own stack: unchanged
    assert summary[("transfer", "cross-file")] > summary[("best", "cross-file")] + 0.2


def test_border_cells_lie_one_pixel_beyond_the_edge_of_bright_and_of_dark_structure():
    image = np.full((41, 41), 0.2)
    image[10:31, 10:31] = 0.9  # a 21 x 21 bright square: edges at rows/cols 10 and 30
    click, background = np.array([[20, 20]]), np.array([[2, 2], [38, 38]])
    cells = transfer.border_cells(image, click, background, 8, sigma_px=0.1)
    # 8 rays from the centre: the first background pixel is 11 px away straight (row/col 31 or 9), 15 px diagonally
    # (the ray passes (31, 31) / (9, 9) after rounding); one pixel beyond: 12 and 16 steps
    assert sorted(map(tuple, cells.tolist())) == sorted(
        [(20, 32), (32, 20), (20, 8), (8, 20), (31, 31), (31, 9), (9, 9), (9, 31)])
    assert all(image[r, c] == 0.2 for r, c in cells)  # all on the background
    dark = 1.1 - image  # the same square dark on a bright background: the same cells
    np.testing.assert_array_equal(transfer.border_cells(dark, click, background, 8, sigma_px=0.1), cells)
    assert transfer.border_cells(image, click, np.zeros((0, 2), np.int64), 8).shape == (0, 2)  # no background level
    assert transfer.border_cells(image, click, background, 8, max_px=5).shape == (0, 2)  # edge beyond reach


def test_border_examples_remove_the_halo_around_small_spots(stacks, filterbank):
    path, truth = stacks["spots"]
    results, negatives = {}, {}
    for rays in (0, 8):
        config = BEST.with_options(border_rays=rays)
        with open_stack(path) as stack:
            embedder = SliceEmbedder(stack, 0, filterbank, config.preprocess)
            scorer = build_scorer(embedder, clicks(truth), config)
            negatives[rays] = len(scorer.prototype.pixel_negative_examples)
            results[rays] = mean_dice(scorer, embedder, truth)
    # 5 negative clicks x 13 pixels (radius 2), and with 8 rays from each of the 5 positive clicks 40 more at most
    assert negatives[0] == 65 and 65 < negatives[8] <= 65 + 40
    # measured: 0.57 (every spot grows a halo: the far background clicks never showed an edge) -> 0.88
    assert results[8] > results[0] + 0.2
