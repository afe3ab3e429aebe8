"""Values at the edge: huge point coordinates and images without finite pixels give clear errors (issue #12)."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import PrototypeError, StackError
from core.preprocess import intensity_range, pooled_intensity_range, rescale
from core.prototypes import PointSet


def test_a_huge_coordinate_is_named_not_wrapped():
    with pytest.raises(PrototypeError, match=r"\(1e\+308, 5, 0\)"):
        PointSet(np.array([[1e308, 5, 0]]), np.zeros((0, 3)))
    assert PointSet(np.array([[2.6, 5, 0]])).positive.tolist() == [[3, 5, 0]]


def test_nan_pixels_are_left_out_of_the_range_and_become_background():
    image = np.array([[np.nan, 1.0], [2.0, 3.0]], np.float32)
    assert intensity_range(image, (0, 100)) == (1.0, 3.0)
    assert rescale(image, 1.0, 3.0).tolist() == [[0.0, 0.0], [0.5, 1.0]]
    assert pooled_intensity_range([image, np.array([[5.0]], np.float32)], (0, 100)) == (1.0, 5.0)


def test_an_image_without_finite_pixels_is_refused():
    with pytest.raises(StackError, match="no finite pixel values"):
        intensity_range(np.full((4, 4), np.nan, np.float32))
    with pytest.raises(StackError, match="no finite pixel values"):
        pooled_intensity_range([np.full((2, 2), np.inf, np.float32)])
