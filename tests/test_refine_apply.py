"""core.refine.apply.refine_stack: the probabilities are resized back to the slice and then thresholded; progress,
cancel and the refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.errors import RefineError, ZSpecError
from core.io import open_stack
from core.refine.apply import RefinedSlice, refine_stack, sample_settings
from core.refine.model import RefineConfig, Refiner, ShallowUNet


class RampRefiner(Refiner):
    """A refiner whose probability rises left to right across the sample: column j of W is j / (W - 1)."""

    def predict_proba(self, sample):
        height, width = sample.shape
        return np.tile(np.arange(width, dtype=np.float32) / (width - 1), (height, 1))


def ramp_refiner(threshold: float, input_set: str = "raw", max_side: int = 20) -> Refiner:
    config = RefineConfig(input_set=input_set, input_size=8, base_channels=2)
    return RampRefiner(ShallowUNet(len(config.channels), 2), config, threshold, {"source": {"max_side": max_side}})


@pytest.fixture(scope="module")
def stack_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("refine_apply") / "s.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 4000, (3, 40, 40), dtype=np.uint16), photometric="minisblack")
    return path


def test_probabilities_are_resized_back_before_the_threshold(stack_path):
    # The 40 x 40 slices become 20 x 20 samples (max_side 20): p[j] = j / 19. Bilinear 2x up (half-pixel
    # centres): column i of the slice reads x = i/2 - 1/4, so p = (i/2 - 1/4) / 19 >= 0.52 from i = 21 on.
    # Thresholding first (j >= 10) and then resizing would start the mask at column 20.
    refined: list[RefinedSlice] = []
    progress = []
    with open_stack(stack_path) as stack:
        run = refine_stack(ramp_refiner(0.52), stack, 0, [2, 0], refined.append,
                           on_progress=lambda done, total, eta: progress.append((done, total, eta)))
    assert [r.z for r in refined] == run.z_values == [2, 0] and not run.cancelled
    for r in refined:
        assert r.mask.shape == (40, 40) and r.mask.dtype == bool and r.prototype_mask is None
        assert not r.mask[:, :21].any() and r.mask[:, 21:].all()
    assert run.area_px == [40 * 19, 40 * 19] and run.volume_voxels == 2 * 40 * 19
    assert [p[:2] for p in progress] == [(1, 2), (2, 2)] and progress[-1][2] == 0.0


def test_slices_at_their_own_size_are_not_resized(stack_path):
    # max_side 64 keeps the 40 x 40 slice: p[j] = j / 39 >= 0.5 from j = 20 on.
    refined: list[RefinedSlice] = []
    with open_stack(stack_path) as stack:
        refine_stack(ramp_refiner(0.5, max_side=64), stack, 0, [1], refined.append)
    assert not refined[0].mask[:, :20].any() and refined[0].mask[:, 20:].all()


def test_should_stop_ends_the_run(stack_path):
    refined: list[RefinedSlice] = []
    with open_stack(stack_path) as stack:
        run = refine_stack(ramp_refiner(0.5), stack, 0, [0, 1, 2], refined.append,
                           should_stop=lambda: len(refined) >= 1)
    assert run.cancelled and run.z_values == [0] and len(refined) == 1


def test_refusals(stack_path):
    with open_stack(stack_path) as stack:
        with pytest.raises(ZSpecError, match="slice z=3 is outside the stack \\(0-2\\)"):
            refine_stack(ramp_refiner(0.5), stack, 0, [0, 3], lambda r: None)
        with pytest.raises(RefineError, match="reads the prototype heatmap"):
            refine_stack(ramp_refiner(0.5, input_set="raw+heatmap"), stack, 0, [0], lambda r: None)


def test_sample_settings_come_from_the_model():
    refiner = ramp_refiner(0.5, max_side=48)
    refiner.metadata["source"]["raw_clip_percentiles"] = [1, 99]
    assert sample_settings(refiner) == ((1.0, 99.0), 48)
    refiner.metadata.clear()
    assert sample_settings(refiner) == ((5.0, 95.0), 1024)
