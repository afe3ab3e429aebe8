"""Tests of core.projection: PCA geometry and consistency of extra points; UMAP separation (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from core.projection import Projection, pca_2d, umap_2d


def test_pca_of_points_on_a_line_has_no_second_axis():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=64)
    direction /= np.linalg.norm(direction)
    t = rng.normal(size=(300, 1)) * 5.0
    x = 3.0 + t * direction  # a line in 64-D, offset from the origin
    proj = pca_2d(x)
    assert isinstance(proj, Projection) and proj.method == "pca"
    assert proj.coords.shape == (300, 2) and proj.coords.dtype == np.float32
    assert proj.coords[:, 1].var() < 1e-6 * proj.coords[:, 0].var()
    # the first coordinate is the position along the line (up to sign)
    assert abs(np.corrcoef(proj.coords[:, 0], t[:, 0])[0, 1]) > 0.9999
    assert proj.explained_variance[0] == pytest.approx(1.0, abs=1e-5)
    assert proj.explained_variance[1] == pytest.approx(0.0, abs=1e-5)
    assert proj.extra_coords.shape == (0, 2)


def test_pca_explained_variance_and_extra_points_are_consistent():
    rng = np.random.default_rng(1)
    # anisotropic Gaussian: variances 16, 4, then 1s -> ratios 16/(16+4+30) and 4/50
    scales = np.array([4.0, 2.0] + [1.0] * 30)
    x = rng.normal(size=(4000, 32)) * scales
    proj = pca_2d(x, extra=np.vstack([x.mean(axis=0), x[:5]]))
    ev = proj.explained_variance
    assert ev[0] >= ev[1] > 0 and sum(ev) <= 1.0
    assert ev[0] == pytest.approx(16 / 50, abs=0.02) and ev[1] == pytest.approx(4 / 50, abs=0.01)
    # the data mean projects to the origin; data rows given as extra land where the fit put them
    np.testing.assert_allclose(proj.extra_coords[0], [0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(proj.extra_coords[1:], proj.coords[:5], rtol=1e-5, atol=1e-4)
    # axes are the two largest-variance input axes, and coords are centred
    assert abs(np.corrcoef(proj.coords[:, 0], x[:, 0])[0, 1]) > 0.99
    assert abs(np.corrcoef(proj.coords[:, 1], x[:, 1])[0, 1]) > 0.95
    np.testing.assert_allclose(proj.coords.mean(axis=0), [0.0, 0.0], atol=1e-3)


def test_pca_is_deterministic_accepts_float16_and_a_single_extra_vector():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 48)).astype(np.float16)
    a, b = pca_2d(x, x[0]), pca_2d(x, x[0])
    np.testing.assert_array_equal(a.coords, b.coords)
    assert a.extra_coords.shape == (1, 2)
    np.testing.assert_allclose(a.extra_coords[0], a.coords[0], atol=1e-3)


def test_pca_small_and_degenerate_inputs():
    proj = pca_2d(np.array([[0.0], [1.0], [3.0]]))  # D = 1: second axis is zero
    assert proj.coords.shape == (3, 2) and (proj.coords[:, 1] == 0).all()
    assert proj.explained_variance == (pytest.approx(1.0), 0.0)
    same = pca_2d(np.ones((4, 3)))  # no variance at all
    assert np.allclose(same.coords, 0) and same.explained_variance == (0.0, 0.0)
    with pytest.raises(ValueError, match="N >= 2"):
        pca_2d(np.ones((1, 5)))
    with pytest.raises(ValueError, match="extra"):
        pca_2d(np.ones((4, 3)), extra=np.ones((2, 4)))


@pytest.mark.slow
def test_umap_keeps_two_clusters_apart_and_places_extra_points_near_theirs():
    # Pays numba's JIT (~1-2 min on a cold 2-core machine).
    rng = np.random.default_rng(0)
    d = 32
    centre_a, centre_b = np.zeros(d), np.zeros(d)
    centre_a[0], centre_b[1] = 1.0, 1.0  # orthogonal directions: cosine distance 1 between centres
    a = centre_a + 0.1 * rng.normal(size=(300, d))
    b = centre_b + 0.1 * rng.normal(size=(300, d))
    x = np.vstack([a, b]).astype(np.float32)
    extra = np.vstack([centre_a, centre_b])
    proj = umap_2d(x, extra, seed=0, max_samples=400)  # also exercises fit-on-subsample + transform
    assert proj.method == "umap" and proj.explained_variance is None
    assert proj.coords.shape == (600, 2) and proj.extra_coords.shape == (2, 2)
    ca, cb = proj.coords[:300], proj.coords[300:]
    mid_a, mid_b = np.median(ca, axis=0), np.median(cb, axis=0)
    gap = np.linalg.norm(mid_a - mid_b)
    spread = max(np.linalg.norm(ca - mid_a, axis=1).max(), np.linalg.norm(cb - mid_b, axis=1).max())
    assert gap > 2 * spread  # every point of a cluster is nearer its own centre than halfway across
    # each extra point lands near its own cluster's centre, far from the other
    assert np.linalg.norm(proj.extra_coords[0] - mid_a) < np.linalg.norm(proj.extra_coords[0] - mid_b) / 3
    assert np.linalg.norm(proj.extra_coords[1] - mid_b) < np.linalg.norm(proj.extra_coords[1] - mid_a) / 3
    # seeded: the same call gives the same map
    again = umap_2d(x, extra, seed=0, max_samples=400)
    np.testing.assert_array_equal(proj.coords, again.coords)
