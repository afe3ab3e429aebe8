"""Score maps of one stack under one fitted scorer, smoothed along z over neighbouring slices.

Every place that segments slices of a stack (batch apply, the evaluation protocol, the threshold
experiment, the refinement's training samples) goes through one ``ScoreWindow``: it computes each raw
score map once, keeps only the maps the z window of the current slice needs, and averages them with
Gaussian weights (``config.z_sigma`` in slices; 0 = no smoothing). Walking the slices in increasing z
computes every map exactly once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np

from core.pipeline import Scorer, SliceSegmentation

if TYPE_CHECKING:  # pragma: no cover
    from core.features.embedding import SliceEmbedder
    from core.thresholds import ThresholdSpec

__all__ = ["ScoreWindow", "neighbourhood", "z_smoothed"]


def neighbourhood(z: int, sigma: float, n_slices: int) -> list[int]:
    """Slices within 2·sigma of z (inclusive), clipped to the stack.

    >>> neighbourhood(0, 1.0, 10)
    [0, 1, 2]
    """
    if sigma <= 0:
        return [z]
    radius = int(math.ceil(2 * sigma))
    return list(range(max(0, z - radius), min(n_slices, z + radius + 1)))


def z_smoothed(maps: dict[int, np.ndarray], z: int, sigma: float, n_slices: int) -> np.ndarray:
    """Gaussian-weighted mean of the score maps around z (weights renormalised at the stack ends)."""
    if sigma <= 0:
        return maps[z]
    zs = neighbourhood(z, sigma, n_slices)
    weights = np.exp(-0.5 * ((np.asarray(zs) - z) / sigma) ** 2)
    stacked = np.stack([maps[k] for k in zs])
    return (np.tensordot(weights, stacked, axes=1) / weights.sum()).astype(np.float32)


class ScoreWindow:
    """The z-smoothed score maps and masks of one stack (``embedder``) under one fitted ``scorer``.

    before_map : called with k just before the raw map of slice k is computed (batch runs use it to
        have the slice's pixels read in groups).
    """

    def __init__(self, scorer: Scorer, embedder: "SliceEmbedder",
                 before_map: Callable[[int], None] | None = None) -> None:
        self.scorer = scorer
        self.embedder = embedder
        self.before_map = before_map
        self.sigma = float(scorer.config.z_sigma)
        self._maps: dict[int, np.ndarray] = {}

    def neighbours(self, z: int) -> list[int]:
        """The slices whose raw maps slice z's smoothed map needs."""
        return neighbourhood(z, self.sigma, self.embedder.n_slices)

    def score_map(self, z: int) -> np.ndarray:
        """Slice z's z-smoothed score map (patch grid or working-resolution pixels); maps outside its window
        are dropped."""
        window = self.neighbours(z)
        for k in window:
            if k not in self._maps:
                if self.before_map is not None:
                    self.before_map(k)
                self._maps[k] = self.scorer.score_map(self.embedder, k)
        for k in [k for k in self._maps if k not in window]:
            del self._maps[k]
        return z_smoothed(self._maps, z, self.sigma, self.embedder.n_slices)

    def segment(self, z: int, *, threshold: "ThresholdSpec | None" = None) -> SliceSegmentation:
        """Slice z's segmentation from its smoothed map (``threshold`` overrides the prototype's)."""
        return self.scorer.segment(self.embedder, z, self.score_map(z), threshold=threshold)
