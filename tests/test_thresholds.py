import numpy as np
import pytest

from core.thresholds import (
    ThresholdError,
    ThresholdSpec,
    apply_threshold,
    calibrate_threshold,
    otsu_value,
    threshold_value,
    top_percent_mask,
)


def test_parse_and_format_round_trip():
    assert ThresholdSpec.parse("top:10") == ThresholdSpec("top", 10.0)
    assert ThresholdSpec.parse(" TOP:12.5% ") == ThresholdSpec("top", 12.5)
    assert ThresholdSpec.parse("score:-0.05") == ThresholdSpec("score", -0.05)
    assert ThresholdSpec.parse("otsu").kind == "otsu"
    assert str(ThresholdSpec.parse("top:10")) == "top:10"
    assert str(ThresholdSpec.parse("score:0.25")) == "score:0.25"


@pytest.mark.parametrize("text", ["top", "top:0", "top:150", "score:abc", "median", "score:"])
def test_parse_rejects_bad_specs(text):
    with pytest.raises(ThresholdError):
        ThresholdSpec.parse(text)


def test_top_percent_selects_exact_count():
    scores = np.arange(100, dtype=np.float32).reshape(10, 10)
    mask = top_percent_mask(scores, 10)
    assert mask.sum() == 10
    assert mask[9].all() and not mask[:9].any()  # the ten largest values are the last row


def test_top_percent_on_70x70_grid_is_490_patches():
    rng = np.random.default_rng(0)
    mask = apply_threshold(rng.normal(size=(70, 70)), ThresholdSpec("top", 10))
    assert mask.sum() == 490


def test_top_percent_ties_are_deterministic():
    scores = np.ones((4, 5))
    first = top_percent_mask(scores, 50)
    assert first.sum() == 10
    assert np.array_equal(first, top_percent_mask(scores, 50))


def test_score_threshold_is_inclusive():
    scores = np.array([[0.1, 0.2], [0.3, 0.4]])
    mask = apply_threshold(scores, ThresholdSpec("score", 0.3))
    assert mask.tolist() == [[False, False], [True, True]]


def test_otsu_splits_two_populations():
    scores = np.concatenate([np.full(500, -0.2), np.full(500, 0.4)])
    value = otsu_value(scores)
    assert -0.2 <= value < 0.4
    assert apply_threshold(scores, ThresholdSpec("otsu")).sum() == 500


def test_otsu_of_constant_map_is_its_value():
    assert otsu_value(np.full((3, 3), 0.7)) == pytest.approx(0.7)


def test_calibrated_threshold_sits_in_the_middle_of_the_gap():
    # positives 0.5..0.7, negatives -0.1..0.1: best separation anywhere in (0.1, 0.5); centre 0.3.
    value = calibrate_threshold(np.array([0.5, 0.6, 0.7]), np.array([-0.1, 0.0, 0.1]))
    assert value == pytest.approx(0.3)


def test_calibrated_threshold_with_overlap_maximises_balanced_accuracy():
    positives = np.array([0.2, 0.5, 0.6, 0.7])
    negatives = np.array([-0.2, 0.0, 0.1, 0.3])
    value = calibrate_threshold(positives, negatives)
    accuracy = ((positives >= value).mean() + (negatives < value).mean()) / 2
    # Best balanced accuracy is 7/8, reached at 0.15 (one negative above) and at 0.4 (one positive below);
    # the tie goes to the cut nearest the midpoint of the medians (0.55 + 0.05) / 2 = 0.3, i.e. 0.4.
    assert accuracy == pytest.approx(0.875)
    assert value == pytest.approx(0.4)


def test_calibrated_without_negatives_keeps_every_positive():
    value = calibrate_threshold(np.array([0.4, 0.6]), np.array([]))
    assert value < 0.4


def test_calibrated_needs_value():
    with pytest.raises(ThresholdError, match="no calibrated threshold"):
        threshold_value(np.zeros((2, 2)), ThresholdSpec("calibrated"), None)
