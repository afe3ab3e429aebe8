"""Filter-bank features: shapes, the maths on images whose answers are known in closed form, and
agreement with scikit-image / scipy on a generic image."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.feature import hessian_matrix, hessian_matrix_eigvals, multiscale_basic_features

from core.features.filterbank import (
    DEFAULT_SIGMAS,
    FilterBankConfig,
    feature_statistics,
    patch_features,
    pixel_features,
    standardize,
    symmetric_2x2_eigenvalues,
)


def _feature(features: np.ndarray, config: FilterBankConfig, name: str) -> np.ndarray:
    return features[..., config.feature_names().index(name)]


def _smooth_random_image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A generic test image in [0, 1]: uniform noise lightly smoothed (structure at every scale)."""
    image = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), 1.0)
    image = (image - image.min()) / (image.max() - image.min())
    return image.astype(np.float32)


# --- configuration --------------------------------------------------------------------------------


def test_default_config_names_count_and_signature():
    config = FilterBankConfig()
    names = config.feature_names()
    assert config.sigmas == DEFAULT_SIGMAS == (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
    assert config.n_features == len(names) == 1 + 8 * 6 == 49
    assert len(set(names)) == len(names)
    assert names[:10] == [
        "intensity",
        "gaussian_s0.7", "log_s0.7", "gradmag_s0.7", "dog_s0.7",
        "st_eig1_s0.7", "st_eig2_s0.7", "hess_eig1_s0.7", "hess_eig2_s0.7",
        "gaussian_s1.0",
    ]
    assert names[-1] == "hess_eig2_s10.0"
    assert config.signature() == "filterbank-v1:s0.7,1,1.6,3.5,5,10:i1"


def test_config_without_intensity_and_custom_sigmas():
    config = FilterBankConfig(sigmas=[2, 0.5], include_intensity=False)
    assert config.sigmas == (2.0, 0.5)  # a list is accepted and stored as a tuple of floats, order kept
    assert config.n_features == len(config.feature_names()) == 16
    assert config.feature_names()[0] == "gaussian_s2.0"
    assert config.signature() == "filterbank-v1:s2,0.5:i0"
    assert FilterBankConfig(sigmas=(1.0, 2.0)).signature() != FilterBankConfig(sigmas=(2.0, 1.0)).signature()


@pytest.mark.parametrize("sigmas", [(0.0,), (-1.0,), (float("nan"),), (1.0, 1.0)])
def test_config_rejects_bad_sigmas(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        FilterBankConfig(sigmas=sigmas)


def test_config_rejects_empty_selection():
    with pytest.raises(ValueError, match="no feature"):
        FilterBankConfig(sigmas=(), include_intensity=False)
    assert FilterBankConfig(sigmas=()).n_features == 1  # intensity alone is allowed


# --- shapes ---------------------------------------------------------------------------------------


def test_pixel_and_patch_shapes_and_dtype():
    config = FilterBankConfig()
    image = _smooth_random_image((28, 42))
    before = image.copy()
    pixels = pixel_features(image, config)
    assert pixels.shape == (28, 42, config.n_features) and pixels.dtype == np.float32
    assert pixels.flags.c_contiguous
    np.testing.assert_array_equal(image, before)  # the input is not modified
    patches = patch_features(image, 14, config)
    assert patches.shape == (2, 3, config.n_features) and patches.dtype == np.float32
    # intensity feature is the image itself; integer input is accepted
    np.testing.assert_array_equal(pixels[..., 0], image)
    from_uint8 = pixel_features((image * 255).astype(np.uint8), FilterBankConfig(sigmas=(1.0,)))
    assert from_uint8.dtype == np.float32 and from_uint8.shape == (28, 42, 9)


def test_patch_features_is_block_mean_of_pixel_features():
    config = FilterBankConfig(sigmas=(0.7, 1.6, 5.0))
    image = _smooth_random_image((42, 56), seed=3)
    pixels = pixel_features(image, config)
    for p in (14, 7):
        expected = pixels.reshape(42 // p, p, 56 // p, p, -1).mean(axis=(1, 3), dtype=np.float64)
        np.testing.assert_allclose(patch_features(image, p, config), expected, rtol=1e-5, atol=1e-6)


def test_patch_features_rejects_sizes_that_are_not_multiples():
    image = np.zeros((50, 42), np.float32)
    with pytest.raises(ValueError, match="not a multiple of patch_size=14"):
        patch_features(image, 14)
    with pytest.raises(ValueError, match="positive integer"):
        patch_features(np.zeros((42, 42), np.float32), 0)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((8, 8, 3), np.float32), "2-D"),
        (np.zeros((0, 8), np.float32), "non-empty"),
        (np.array([[0.0, np.nan], [0.0, 0.0]], np.float32), "NaN"),
    ],
)
def test_bad_images_are_rejected(image, message):
    with pytest.raises(ValueError, match=message):
        pixel_features(image)


def test_result_is_deterministic_and_independent_of_threads():
    image = _smooth_random_image((40, 36), seed=5)
    one = pixel_features(image, workers=1)
    np.testing.assert_array_equal(one, pixel_features(image, workers=2))
    np.testing.assert_array_equal(one, pixel_features(image, workers=1))
    np.testing.assert_array_equal(patch_features(image[:28, :28], 14, workers=1), patch_features(image[:28, :28], 14))


def test_eigenvalues_are_ordered_and_structure_tensor_is_semidefinite():
    config = FilterBankConfig()
    features = pixel_features(_smooth_random_image((64, 64), seed=4), config)
    for sigma in config.sigmas:
        st1, st2, he1, he2 = (_feature(features, config, f"{kind}_s{sigma}") for kind in
                              ("st_eig1", "st_eig2", "hess_eig1", "hess_eig2"))
        assert np.all(st1 >= st2) and np.all(st2 >= 0) and np.all(he1 >= he2)


# --- maths on images with closed-form answers -------------------------------------------------------


def test_constant_image_gives_constant_smoothing_and_zero_derivatives():
    config = FilterBankConfig()
    features = pixel_features(np.full((32, 40), 0.37, np.float32), config)
    for k, name in enumerate(config.feature_names()):
        expected = 0.37 if name == "intensity" or name.startswith("gaussian") else 0.0
        np.testing.assert_allclose(features[..., k], expected, atol=1e-6, err_msg=name)


def test_closed_form_eigenvalues_equal_eigvalsh():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(3, 1000)) * rng.choice([1e-3, 1.0, 1e3], size=(3, 1000))
    larger, smaller = symmetric_2x2_eigenvalues(a, b, c)
    matrices = np.stack([np.stack([a, b], -1), np.stack([b, c], -1)], -2)  # (1000, 2, 2)
    ascending = np.linalg.eigvalsh(matrices)
    scale = np.abs(ascending).max(axis=1)
    np.testing.assert_allclose(larger, ascending[:, 1], rtol=0, atol=1e-12 * scale.max())
    np.testing.assert_allclose(smaller, ascending[:, 0], rtol=0, atol=1e-12 * scale.max())
    assert np.all(larger >= smaller)
    # hand-checked: [[2, 1], [1, 2]] has eigenvalues 3 and 1; a diagonal matrix its diagonal, sorted
    l1, l2 = symmetric_2x2_eigenvalues(np.float32([2, -1]), np.float32([1, 0]), np.float32([2, 4]))
    assert l1.dtype == np.float32
    np.testing.assert_allclose(l1, [3, 4])
    np.testing.assert_allclose(l2, [1, -1])


def test_bright_gaussian_blob():
    """Blob exp(-r^2 / 2w^2) smoothed at s is (w^2/(w^2+s^2)) exp(-r^2 / 2(w^2+s^2)): at its centre
    L_xx = L_yy = -w^2/(w^2+s^2)^2, so with w = s = 3 the scale-normalised Hessian eigenvalues are
    both s^2 * -9/324 = -0.25, LoG -0.5, Gaussian 0.5, DoG 0.5 - 9/(9 + (3/1.6)^2) = -0.21910."""
    config = FilterBankConfig(sigmas=(3.0,))
    y, x = np.mgrid[:65, :65] - 32.0
    blob = np.exp(-(x**2 + y**2) / (2 * 3.0**2)).astype(np.float32)
    centre = pixel_features(blob, config)[32, 32]
    get = dict(zip(config.feature_names(), centre))
    assert get["hess_eig1_s3.0"] < 0 and get["hess_eig2_s3.0"] < 0
    np.testing.assert_allclose([get["hess_eig1_s3.0"], get["hess_eig2_s3.0"]], [-0.25, -0.25], atol=2e-4)
    np.testing.assert_allclose(get["log_s3.0"], -0.5, atol=2e-4)
    np.testing.assert_allclose(get["gaussian_s3.0"], 0.5, atol=2e-4)
    np.testing.assert_allclose(get["dog_s3.0"], 0.5 - 9 / (9 + (3 / 1.6) ** 2), atol=2e-4)
    np.testing.assert_allclose(get["gradmag_s3.0"], 0.0, atol=1e-6)  # the centre is a maximum
    # an isotropic blob has an isotropic structure tensor at its centre (gradients in every direction)
    assert get["st_eig1_s3.0"] > 1e-3
    np.testing.assert_allclose(get["st_eig2_s3.0"], get["st_eig1_s3.0"], rtol=1e-4)


def test_bright_horizontal_line():
    """Line exp(-y^2 / 2w^2) smoothed at s has peak w/sqrt(w^2+s^2) and L_yy = -w/(w^2+s^2)^(3/2) on
    the line: with w = s = 2, the eigenvalue across the line is s^2 * -2/8^1.5 = -0.35355, along it 0."""
    config = FilterBankConfig(sigmas=(2.0,))
    y = np.arange(65)[:, None] - 32.0
    line = np.broadcast_to(np.exp(-(y**2) / (2 * 2.0**2)), (65, 48)).astype(np.float32)
    features = pixel_features(line, config)
    along, across = _feature(features, config, "hess_eig1_s2.0"), _feature(features, config, "hess_eig2_s2.0")
    np.testing.assert_allclose(along[32], 0.0, atol=1e-6)  # every column: the line crosses the image
    np.testing.assert_allclose(across[32], -2 * 4 / 8**1.5, rtol=2e-4)
    np.testing.assert_allclose(_feature(features, config, "gaussian_s2.0")[32], 2 / 8**0.5, rtol=2e-4)
    # the gradient is across the line too: one-dimensional structure, st_eig2 = 0
    np.testing.assert_allclose(_feature(features, config, "st_eig2_s2.0"), 0.0, atol=1e-7)


def test_linear_ramp():
    """I = 0.01 x + 0.2: every scale-normalised gradient magnitude is s * 0.01, the structure tensor
    [[(s * 0.01)^2, 0], [0, 0]], and every second-derivative feature 0 (away from the left/right
    borders by more than the widest chain of kernels, 4 * (6.25 + 7.74 + 5) + 5 ~ 81 px at s = 10)."""
    config = FilterBankConfig()
    ramp = np.broadcast_to(0.01 * np.arange(256.0) + 0.2, (24, 256)).astype(np.float32)
    features = pixel_features(ramp, config)[:, 90:166]
    for sigma in DEFAULT_SIGMAS:
        get = lambda kind: _feature(features, config, f"{kind}_s{sigma}")  # noqa: E731
        np.testing.assert_allclose(get("gradmag"), sigma * 0.01, rtol=1e-4)
        np.testing.assert_allclose(get("st_eig1"), (sigma * 0.01) ** 2, rtol=1e-3)
        np.testing.assert_allclose(get("gaussian"), ramp[:, 90:166], rtol=1e-5)
        for kind in ("st_eig2", "log", "dog", "hess_eig1", "hess_eig2"):
            np.testing.assert_allclose(get(kind), 0.0, atol=2e-5, err_msg=f"{kind}_s{sigma}")


# --- agreement with the field's libraries -------------------------------------------------------------


def test_hessian_eigenvalues_match_skimage():
    """skimage's Gaussian-derivative Hessian (not scale-normalised) at sigma 3.5, in the interior."""
    sigma = 3.5
    image = _smooth_random_image((128, 128))
    config = FilterBankConfig(sigmas=(sigma,))
    ours = pixel_features(image, config)
    hessian = hessian_matrix(image, sigma=sigma, mode="reflect", use_gaussian_derivatives=True)
    expected = hessian_matrix_eigvals(hessian)  # (2, H, W), largest first
    inner = (slice(30, -30), slice(30, -30))
    scale = np.abs(expected[0][inner]).max()
    for k, name in enumerate(("hess_eig1_s3.5", "hess_eig2_s3.5")):
        np.testing.assert_allclose(
            _feature(ours, config, name)[inner] / sigma**2, expected[k][inner], rtol=0, atol=1e-3 * scale
        )


def test_gaussian_and_gradient_match_skimage_and_scipy():
    image = _smooth_random_image((96, 96), seed=1)
    config = FilterBankConfig(sigmas=(1.0, 3.5))
    ours = pixel_features(image, config)
    inner = (slice(25, -25), slice(25, -25))
    # multiscale_basic_features' intensity feature at sigma 1 is the Gaussian-smoothed image
    skimage_gauss = multiscale_basic_features(
        image, intensity=True, edges=False, texture=False, sigma_min=1, sigma_max=1, num_sigma=1
    )[..., 0]
    np.testing.assert_allclose(_feature(ours, config, "gaussian_s1.0")[inner], skimage_gauss[inner], atol=1e-5)
    # scipy's Gaussian gradient magnitude, times sigma for the scale normalisation
    scipy_gradmag = ndi.gaussian_gradient_magnitude(image.astype(np.float64), 3.5, mode="reflect") * 3.5
    scale = scipy_gradmag[inner].max()
    np.testing.assert_allclose(_feature(ours, config, "gradmag_s3.5")[inner], scipy_gradmag[inner], atol=2e-3 * scale)


# --- statistics -------------------------------------------------------------------------------------


def test_standardize_gives_zero_mean_unit_std_on_training_features():
    features = pixel_features(_smooth_random_image((48, 48), seed=2), FilterBankConfig(sigmas=(1.0, 3.5)))
    mean, std = feature_statistics(features)
    assert mean.shape == std.shape == (features.shape[-1],)
    assert mean.dtype == std.dtype == np.float32
    standard = standardize(features, mean, std)
    assert standard.shape == features.shape and standard.dtype == np.float32
    np.testing.assert_allclose(standard.reshape(-1, features.shape[-1]).mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(standard.reshape(-1, features.shape[-1]).std(axis=0), 1.0, rtol=1e-4)


def test_statistics_of_a_constant_feature_are_safe():
    features = np.stack([np.arange(6.0), np.full(6, 2.0)], axis=-1).reshape(2, 3, 2)  # (2, 3, F=2)
    mean, std = feature_statistics(features)
    np.testing.assert_allclose(mean, [2.5, 2.0])
    np.testing.assert_allclose(std[0], np.std(np.arange(6.0)), rtol=1e-6)
    assert 0 < std[1] <= 1e-6  # floored, not zero
    standard = standardize(features, mean, std)
    assert np.all(np.isfinite(standard)) and np.all(standard[..., 1] == 0)
    with pytest.raises(ValueError, match="F=2"):
        standardize(features, mean[:1], std[:1])
