"""From a similarity score map to a binary mask (thesis §3.6 and docs/spec/PIPELINE.md part B).

Threshold specifications, as text in the CLI and in prototype files:

- ``top:P``       the P % highest-scoring elements (patches or pixels) form the mask (thesis: top:10).
                  The mask area is then a fixed share of the slice, whatever the slice shows.
- ``score:T``     every element with score >= T (absolute; scores are cos(p) - λ·cos(n), about -1..1).
- ``otsu``        Otsu's threshold of this slice's score histogram (skimage).
- ``calibrated``  the absolute threshold calibrated on the reference slice from the user's own points and
                  stored in the prototype, so that it transfers to other slices and stacks unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.filters import threshold_otsu

from core.errors import ThresholdError

THRESHOLD_KINDS = ("top", "score", "otsu", "calibrated")



@dataclass(frozen=True)
class ThresholdSpec:
    """kind : one of THRESHOLD_KINDS; value : percent for 'top', score for 'score', None otherwise."""

    kind: str
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in THRESHOLD_KINDS:
            raise ThresholdError(f"unknown threshold kind {self.kind!r}; use one of top:P, score:T, otsu, calibrated")
        if self.kind == "top" and (self.value is None or not 0.0 < self.value <= 100.0):
            raise ThresholdError(f"top:P needs a percentage 0 < P <= 100, got {self.value}")
        if self.kind == "score" and (self.value is None or not np.isfinite(self.value)):
            raise ThresholdError(f"score:T needs a finite number, got {self.value}")

    @classmethod
    def parse(cls, text: str) -> "ThresholdSpec":
        """'top:10', 'score:0.12', 'otsu', 'calibrated' -> ThresholdSpec."""
        cleaned = text.strip().lower()
        if cleaned in ("otsu", "calibrated"):
            return cls(cleaned)
        kind, sep, raw = cleaned.partition(":")
        if not sep or kind not in ("top", "score"):
            raise ThresholdError(f"cannot read threshold {text!r}; use top:P (e.g. top:10), score:T (e.g. score:0.1), otsu or calibrated")
        try:
            value = float(raw.rstrip("%"))
        except ValueError:
            raise ThresholdError(f"cannot read the number in threshold {text!r}") from None
        return cls(kind, value)

    def __str__(self) -> str:
        if self.kind == "top":
            return f"top:{self.value:g}"
        if self.kind == "score":
            return f"score:{self.value:g}"
        return self.kind


def top_percent_mask(scores: np.ndarray, percent: float) -> np.ndarray:
    """Exactly round(N·P/100) highest-scoring elements (ties broken by position) -> bool mask of scores' shape."""
    flat = np.asarray(scores, dtype=np.float64).ravel()
    count = int(round(flat.size * percent / 100.0))
    mask = np.zeros(flat.size, dtype=bool)
    if count > 0:
        # stable argsort on -scores keeps the earlier element among equals: deterministic.
        mask[np.argsort(-flat, kind="stable")[:count]] = True
    return mask.reshape(np.shape(scores))


def otsu_value(scores: np.ndarray) -> float:
    """Otsu's threshold of the score histogram (256 bins); a constant map returns its value."""
    data = np.asarray(scores, dtype=np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0 or finite.min() == finite.max():
        return float(finite.max()) if finite.size else 0.0
    return float(threshold_otsu(finite, nbins=256))


def calibrate_threshold(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Absolute threshold that best separates the scores at the user's positive and negative points.

    Chooses T maximising balanced accuracy of (score >= T) on the points; among the T that do, the middle of
    the widest such interval (ties: the one nearest the midpoint of the class medians). With no negative points, the lowest positive score minus a small margin.
    Returns a float score.
    """
    pos = np.sort(np.asarray(positive_scores, dtype=np.float64).ravel())
    neg = np.sort(np.asarray(negative_scores, dtype=np.float64).ravel())
    if pos.size == 0:
        raise ThresholdError("cannot calibrate a threshold without positive points")
    if neg.size == 0:
        return float(pos[0] - 1e-6)
    candidates = np.unique(np.concatenate([pos, neg]))
    # Cut points between consecutive distinct scores, plus one below and one above everything.
    cuts = np.concatenate([[candidates[0] - 1e-3], (candidates[:-1] + candidates[1:]) / 2, [candidates[-1] + 1e-3]])
    true_pos = pos.size - np.searchsorted(pos, cuts, side="left")
    true_neg = np.searchsorted(neg, cuts, side="left")
    balanced = true_pos / pos.size + true_neg / neg.size
    best = balanced.max()
    best_index = np.flatnonzero(np.isclose(balanced, best))
    # Runs of consecutive best cuts; the centre of the widest run is the most robust choice, and between
    # equally wide runs the one nearest the midpoint of the two classes' medians.
    runs = np.split(best_index, np.flatnonzero(np.diff(best_index) > 1) + 1)
    middle = (np.median(pos) + np.median(neg)) / 2
    centres = [(cuts[run[0]] + cuts[run[-1]]) / 2 for run in runs]
    widths = [cuts[run[-1]] - cuts[run[0]] for run in runs]
    chosen = max(range(len(runs)), key=lambda i: (round(widths[i], 12), -abs(centres[i] - middle)))
    return float(centres[chosen])


def threshold_value(scores: np.ndarray, spec: ThresholdSpec, calibrated: float | None = None) -> float:
    """The absolute score threshold that ``spec`` means on this score map."""
    if spec.kind == "score":
        return float(spec.value)  # type: ignore[arg-type]
    if spec.kind == "otsu":
        return otsu_value(scores)
    if spec.kind == "calibrated":
        if calibrated is None:
            raise ThresholdError("this prototype has no calibrated threshold; use top:P, score:T or otsu")
        return float(calibrated)
    flat = np.sort(np.asarray(scores, dtype=np.float64).ravel())[::-1]
    count = int(round(flat.size * spec.value / 100.0))  # type: ignore[operator]
    return float(flat[count - 1]) if count > 0 else float(np.inf)


def apply_threshold(scores: np.ndarray, spec: ThresholdSpec, calibrated: float | None = None) -> np.ndarray:
    """Binary mask of ``scores``' shape for this threshold (top:P selects exactly round(N·P/100) elements)."""
    if spec.kind == "top":
        return top_percent_mask(scores, spec.value)  # type: ignore[arg-type]
    return np.asarray(scores) >= threshold_value(scores, spec, calibrated)
