"""The offline ``filterbank`` backbone: ilastik-style multi-scale features, per pixel or per patch.

No weights, no download, CPU only. For every scale sigma (pixels) of ``FilterBankConfig.sigmas`` eight
features are computed from Gaussian derivatives of the (H, W) image I, plus optionally the raw intensity
(sigma 0, as ilastik offers). The maths, with L = G_s * I and L_x = d/dx (G_s * I) etc.:

- ``intensity``      I itself.
- ``gaussian_s``     G_s * I.
- ``log_s``          s^2 (L_xx + L_yy): Laplacian of Gaussian, scale-normalised (Lindeberg, gamma = 1).
- ``gradmag_s``      s sqrt(L_x^2 + L_y^2): gradient magnitude of Gaussian, scale-normalised.
- ``dog_s``          G_s * I - G_{s/1.6} * I: difference of Gaussians (scale-normalised by construction,
                     roughly 0.3 x log_s; a bright blob of size ~s gives a negative value).
- ``st_eig1/2_s``    eigenvalues (descending, >= 0) of the structure tensor
                     J = G_{s/2} * [[(s L_x)^2, s^2 L_x L_y], [s^2 L_x L_y, (s L_y)^2]]:
                     inner (derivative) scale s, outer (integration) scale 0.5 s, as ilastik.
- ``hess_eig1/2_s``  eigenvalues (descending) of the scale-normalised Hessian s^2 [[L_xx, L_xy], [L_xy, L_yy]].
                     Bright blob: both negative; bright line: eig1 ~ 0 along it, eig2 strongly negative across.

Choices, and why:
- Every derivative feature is scale-normalised (first derivatives times s, second times s^2) so that
  magnitudes are comparable across scales without standardisation (ilastik does not normalise; after
  ``standardize`` the two conventions give identical features). Divide by s or s^2 to compare with
  skimage/scipy (the tests do).
- DoG uses G(s) - G(s/1.6), not G(1.6 s) - G(s): no kernel wider than the scale's own is needed.
- Eigenvalues of the symmetric 2x2 tensors in closed form, (a + c)/2 +- sqrt(((a - c)/2)^2 + b^2).
- Borders: mode 'reflect' (half-sample symmetric, d c b a | a b c d), as skimage's filters.
- Kernels are sampled Gaussians normalised to sum 1, radius int(4 s + 0.5) (scipy's ``truncate=4``).
  Derivative kernels are "moment-normalised": the first-derivative kernel has zero sum and unit first
  moment, the second-derivative one zero sum and second moment 2, so derivatives are exact on
  polynomials up to degree 2 (a constant gives exactly 0, a ramp its slope). scipy's
  ``gaussian_filter(order=...)`` is off by up to 0.3 % on a ramp and gives a second derivative of a
  constant of -0.5 % of it at s = 0.7; otherwise the two agree.
- Scales above ~1.2 px use the semigroup property G_s = G_1 * G_p, p = sqrt(s^2 - 1): the image is
  pre-smoothed at p (itself reached from the DoG's G_{s/1.6} image) and the six derivative filters use
  the small s = 1 kernels (radius 5). Same maths, half the arithmetic of direct filtering at s = 10, and
  more accurate: against exact Gaussian derivatives of a band-limited image the error is ~1e-4 of the
  feature's range for 1 <= s <= 5 and 3e-4 at s = 10 (direct 4 s-truncated second-derivative kernels:
  ~5e-3). Below 1.2 px the kernels are applied directly; at s = 0.7 any sampled Gaussian derivative is
  coarse (~2 % on LoG), and dog_s0.7, whose inner Gaussian is 0.44 px, is a sampled-kernel feature
  ~30 % away from the continuous DoG (2 % at s = 1).
- float32 storage (scipy.ndimage accumulates each 1-D pass in float64); separable passes, each
  pre-smoothed image filtered along rows once per derivative order and reused for the six outputs.
  Scales run in parallel threads (scipy.ndimage and numpy release the GIL), each in a reused scratch
  of 19 (H, W) planes; the result does not depend on the number of threads (each feature map is made
  by one thread, no cross-thread sums).

Bump ``SIGNATURE_VERSION`` whenever the maths changes, so that cached features are recomputed.

Example::

    >>> cfg = FilterBankConfig(sigmas=(1.0, 3.5))
    >>> cfg.feature_names()[:3]
    ['intensity', 'gaussian_s1.0', 'log_s1.0']
    >>> pixel_features(np.zeros((28, 28), np.float32), cfg).shape
    (28, 28, 17)
"""

from __future__ import annotations

import math
import os
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "DEFAULT_SIGMAS",
    "FEATURES_PER_SIGMA",
    "FilterBankConfig",
    "feature_statistics",
    "patch_features",
    "pixel_features",
    "standardize",
    "symmetric_2x2_eigenvalues",
]

DEFAULT_SIGMAS: tuple[float, ...] = (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
FEATURES_PER_SIGMA: tuple[str, ...] = (
    "gaussian", "log", "gradmag", "dog", "st_eig1", "st_eig2", "hess_eig1", "hess_eig2",
)
SIGNATURE_VERSION = "filterbank-v1"
TRUNCATE = 4.0  # smoothing kernel radius in sigmas (scipy's default)
DERIV_TRUNCATE = 5.0  # derivative kernels: at 4 sigmas their cut tails cost ~3e-4 relative error, at 5 ~1e-5
DOG_RATIO = 1.6  # dog_s = G(s) - G(s / DOG_RATIO)
ST_OUTER_RATIO = 0.5  # structure tensor integration scale = ST_OUTER_RATIO * s
BORDER_MODE = "reflect"
DERIV_SIGMA = 1.0  # derivatives of scales above ~1.2 px: kernels of this sigma on a pre-smoothed image
MIN_STEP_SIGMA = 0.9  # narrowest Gaussian used as a step of a cascade (at 0.75: 10x the error)
STD_FLOOR = 1e-6  # smallest std used by ``standardize``: a constant feature maps to 0, not to inf


def _sigma_text(sigma: float) -> str:
    """Shortest exact text of a sigma for cache keys: 1.0 -> '1', 0.7 -> '0.7' (repr round-trips)."""
    text = repr(float(sigma))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class FilterBankConfig:
    """Which filter-bank features to compute.

    sigmas : Gaussian scales in pixels, each > 0, no repeats; features are ordered by this tuple.
    include_intensity : prepend the raw intensity (sigma 0) as feature 0.
    """

    sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    include_intensity: bool = True

    def __post_init__(self) -> None:
        sigmas = tuple(float(s) for s in self.sigmas)
        bad = [s for s in sigmas if not (math.isfinite(s) and s > 0)]
        if bad:
            raise ValueError(f"FilterBankConfig.sigmas must be finite and > 0 pixels, got {bad}")
        if len(set(sigmas)) != len(sigmas):
            raise ValueError(f"FilterBankConfig.sigmas has repeated values: {sigmas}")
        if not sigmas and not self.include_intensity:
            raise ValueError("FilterBankConfig selects no feature: give at least one sigma or include_intensity=True")
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "include_intensity", bool(self.include_intensity))

    def feature_names(self) -> list[str]:
        """Names of the F features in output order, e.g. ['intensity', 'gaussian_s0.7', ..., 'hess_eig2_s10.0']."""
        names = ["intensity"] if self.include_intensity else []
        for sigma in self.sigmas:
            names.extend(f"{kind}_s{sigma}" for kind in FEATURES_PER_SIGMA)
        return names

    @property
    def n_features(self) -> int:
        """F = len(feature_names())."""
        return int(self.include_intensity) + len(FEATURES_PER_SIGMA) * len(self.sigmas)

    def signature(self) -> str:
        """Stable short text for cache keys, e.g. 'filterbank-v1:s0.7,1,1.6,3.5,5,10:i1'."""
        sigmas = ",".join(_sigma_text(s) for s in self.sigmas)
        return f"{SIGNATURE_VERSION}:s{sigmas}:i{int(self.include_intensity)}"


def symmetric_2x2_eigenvalues(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues of the symmetric 2x2 matrices [[a, b], [b, c]], element-wise, in closed form.

    a, b, c : arrays of one shape (any float dtype; computed in that dtype).
    out : optional (larger, smaller) arrays to write into (not aliasing a, b or c).
    Returns (l1, l2) with l1 >= l2: (a + c)/2 + r and (a + c)/2 - r, r = sqrt(((a - c)/2)^2 + b^2).
    (Plain squares rather than hypot: 3x faster in float32, and filter responses are far from overflow.)

    >>> [float(v[0]) for v in symmetric_2x2_eigenvalues(np.array([2.0]), np.array([1.0]), np.array([2.0]))]
    [3.0, 1.0]
    """
    a, b, c = np.broadcast_arrays(*(np.asarray(v) for v in (a, b, c)))
    dtype = np.result_type(a, b, c, np.float32)
    larger, smaller = out if out is not None else (np.empty(a.shape, dtype), np.empty(a.shape, dtype))
    _eigenvalues_into(a, b, c, larger, smaller, np.empty(a.shape, dtype), np.empty(a.shape, dtype))
    return larger, smaller


def _eigenvalues_into(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    larger: np.ndarray,
    smaller: np.ndarray,
    work1: np.ndarray,
    work2: np.ndarray,
) -> None:
    """symmetric_2x2_eigenvalues without allocations: work1, work2 are scratch of a's shape."""
    np.add(a, c, out=work1)
    work1 *= 0.5  # half trace
    np.subtract(a, c, out=work2)
    work2 *= 0.5
    work2 *= work2
    np.multiply(b, b, out=larger)  # larger is free until the end: use it as scratch for b^2
    work2 += larger
    np.sqrt(work2, out=work2)  # radius
    np.add(work1, work2, out=larger)
    np.subtract(work1, work2, out=smaller)


@lru_cache(maxsize=128)
def _kernels(
    sigma: float, scale: float = 1.0, truncate: float = TRUNCATE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correlation weights (k0, scale*k1, scale^2*k2) on [-r, r], r = int(truncate * sigma + 0.5).

    Moment conditions (x = integer offsets): sum k0 = 1; sum k1 = 0, sum x k1 = 1;
    sum k2 = 0, sum x k2 = 0, sum x^2 k2 = 2 (so k1, k2 are exact derivatives of polynomials of
    degree <= 2). ``scale`` folds the scale normalisation (s, s^2) into the weights.
    """
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 * (x / sigma) ** 2)  # exactly symmetric: scipy.ndimage takes its symmetric fast path
    phi /= phi.sum()
    m2 = float(np.sum(x**2 * phi))
    m4 = float(np.sum(x**4 * phi))
    k1 = scale * x * phi / m2
    k2 = scale**2 * 2.0 * (x**2 - m2) * phi / (m4 - m2**2)
    for k in (phi, k1, k2):
        k.flags.writeable = False
    return phi, k1, k2


def _filter(image: np.ndarray, weights: np.ndarray, axis: int, out: np.ndarray) -> np.ndarray:
    """One 1-D correlation pass along ``axis`` with reflect borders, into out (float32)."""
    ndi.correlate1d(image, weights, axis=axis, output=out, mode=BORDER_MODE)
    return out


def _smooth(image: np.ndarray, sigma: float, out: np.ndarray, work: np.ndarray) -> np.ndarray:
    """G_sigma * image (sampled Gaussian, separable) into out; work is scratch of the same shape."""
    k0 = _kernels(sigma)[0]
    return _filter(_filter(image, k0, 0, work), k0, 1, out)


def _scale_plan(sigma: float) -> tuple[float, float, float]:
    """(dog inner sigma, increment from it to the pre-smoothing, derivative sigma) for one scale.

    Derivatives at scale s are taken with kernels of sigma d = DERIV_SIGMA on the image pre-smoothed at
    p = sqrt(s^2 - d^2) (semigroup: G_s = G_d * G_p), and p is reached from the DoG's inner image
    G_{s/1.6} * I by a further sqrt(p^2 - (s/1.6)^2). Increments below MIN_STEP_SIGMA are not used
    (a sampled Gaussian that narrow no longer has variance sigma^2): then the step is skipped
    (increment 0 = start from the raw image) or, for small s, d = s with no pre-smoothing.
    """
    inner = sigma / DOG_RATIO
    pre = math.sqrt(max(sigma**2 - DERIV_SIGMA**2, 0.0))
    if pre < MIN_STEP_SIGMA:
        return inner, 0.0, sigma
    step = math.sqrt(max(pre**2 - inner**2, 0.0))
    return inner, (step if step >= MIN_STEP_SIGMA else 0.0), DERIV_SIGMA


_N_WORK_PLANES = 11


def _workspace(shape: tuple[int, int]) -> np.ndarray:
    """(11 + 8, H, W) float32 scratch for one worker: reused across scales, because every fresh
    multi-megabyte array costs page faults (~0.6 s per GB here)."""
    return np.empty((_N_WORK_PLANES + len(FEATURES_PER_SIGMA),) + shape, np.float32)


def _scale_features(image: np.ndarray, sigma: float, workspace: np.ndarray) -> np.ndarray:
    """The eight features of one scale. Returns a (8, H, W) view of workspace, FEATURES_PER_SIGMA order.

    image : (H, W) float32 C-contiguous. workspace : from _workspace(image.shape).
    """
    t1, t2, base, rows0, rows1, rows2, lx, ly, lxx, lxy, lyy = workspace[:_N_WORK_PLANES]
    result = workspace[_N_WORK_PLANES:]
    gauss, log, gradmag, dog, st1, st2, he1, he2 = result
    inner_sigma, step, deriv_sigma = _scale_plan(sigma)
    inner = _smooth(image, inner_sigma, dog, t1)  # G_{s/1.6} * I, kept in the dog plane until used
    if deriv_sigma == sigma:
        base = image
    elif step > 0:
        _smooth(inner, step, base, t1)
    else:
        _smooth(image, math.sqrt(sigma**2 - deriv_sigma**2), base, t1)
    k0, k1, k2 = _kernels(deriv_sigma, sigma, DERIV_TRUNCATE)
    # Separable derivatives: filter along rows (y, axis 0) once per order, then along columns (x, axis 1):
    # six outputs from nine 1-D passes.
    for k, rows in zip((k0, k1, k2), (rows0, rows1, rows2)):
        _filter(base, k, 0, rows)
    _filter(rows0, k0, 1, gauss)
    _filter(rows0, k1, 1, lx)
    _filter(rows0, k2, 1, lxx)
    _filter(rows1, k0, 1, ly)
    _filter(rows1, k1, 1, lxy)
    _filter(rows2, k0, 1, lyy)

    np.subtract(gauss, inner, out=dog)
    np.add(lxx, lyy, out=log)
    _eigenvalues_into(lxx, lxy, lyy, he1, he2, t1, t2)
    np.multiply(lx, lx, out=rows0)
    np.multiply(lx, ly, out=rows1)
    np.multiply(ly, ly, out=rows2)
    np.add(rows0, rows2, out=gradmag)
    np.sqrt(gradmag, out=gradmag)

    # Structure tensor: products of the scale-normalised gradient, integrated at the outer scale.
    outer = ST_OUTER_RATIO * sigma
    _smooth(rows0, outer, lxx, t1)
    _smooth(rows1, outer, lxy, t1)
    _smooth(rows2, outer, lyy, t1)
    _eigenvalues_into(lxx, lxy, lyy, st1, st2, t1, t2)
    np.maximum(st2, 0.0, out=st2)  # J is positive semi-definite; only rounding makes st2 < 0
    return result


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check_image(image01: np.ndarray) -> np.ndarray:
    """Validate a (H, W) image and return it as C-contiguous float32."""
    image = np.asarray(image01)
    if image.ndim != 2:
        raise ValueError(
            f"filter-bank features need one 2-D (H, W) grey image, got an array of shape {image.shape}; "
            "pass a single channel of a single z-slice"
        )
    if image.size == 0:
        raise ValueError(f"filter-bank features need a non-empty image, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise ValueError(f"filter-bank features need a real-valued image, got dtype {image.dtype}")
    image = np.ascontiguousarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        raise ValueError("the image holds NaN or infinite values; replace them (e.g. np.nan_to_num) first")
    return image


def _run_scales(
    image: np.ndarray,
    config: FilterBankConfig,
    finish: Callable[[int, np.ndarray], None],
    workers: int | None,
) -> None:
    """Compute each scale's (8, H, W) features and hand them to finish(scale index, block), in threads.

    finish runs in the worker thread and must copy what it keeps: the block is that worker's scratch.
    """
    # Largest sigma first: its kernels cost the most, so the threads finish together.
    order = sorted(range(len(config.sigmas)), key=lambda i: -config.sigmas[i])
    n_workers = max(1, min(workers or _default_workers(), len(order)))
    free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
    for _ in range(n_workers):
        free.put(_workspace(image.shape))

    def one(index: int) -> None:
        workspace = free.get()
        try:
            finish(index, _scale_features(image, config.sigmas[index], workspace))
        finally:
            free.put(workspace)

    if n_workers == 1:
        for index in order:
            one(index)
        return
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        list(pool.map(one, order))  # list() re-raises a worker's exception here


def pixel_features(
    image01: np.ndarray, config: FilterBankConfig = FilterBankConfig(), *, workers: int | None = None
) -> np.ndarray:
    """Filter-bank features of every pixel.

    image01 : (H, W) float image, typically in [0, 1] (any real dtype is converted to float32).
    config : which sigmas and whether to include the raw intensity.
    workers : threads (None = all available cores); the result does not depend on it.
    Returns (H, W, F) float32, C-contiguous, F = config.n_features, in config.feature_names() order.
    Peak memory: the result plus 19 (H, W) float32 planes per worker (3000 x 3000, 2 workers: 1.8 + 1.4 GB).
    Raises ValueError for a non-2-D, empty or non-finite image.

    >>> f = pixel_features(np.full((8, 8), 0.5, np.float32), FilterBankConfig(sigmas=(1.0,)))
    >>> f.shape, (f[4, 4, :4].round(6) + 0.0).tolist()  # intensity, gaussian, log, gradmag of a constant
    ((8, 8, 9), [0.5, 0.5, 0.0, 0.0])
    """
    image = _check_image(image01)
    features = np.empty(image.shape + (config.n_features,), np.float32)
    first = int(config.include_intensity)
    if config.include_intensity:
        features[..., 0] = image
    per = len(FEATURES_PER_SIGMA)

    def finish(index: int, block: np.ndarray) -> None:
        # One transposing copy per scale: 4x cheaper than writing each plane with a stride of F floats.
        start = first + per * index
        features[..., start : start + per] = block.transpose(1, 2, 0)

    _run_scales(image, config, finish, workers)
    return features


def _block_mean(planes: np.ndarray, patch_size: int) -> np.ndarray:
    """(C, H, W) -> (H/p, W/p, C) float32 mean over p x p blocks (accumulated in float64)."""
    channels, height, width = planes.shape
    blocks = planes.reshape(channels, height // patch_size, patch_size, width // patch_size, patch_size)
    return blocks.mean(axis=(2, 4), dtype=np.float64).astype(np.float32).transpose(1, 2, 0)


def patch_features(
    image01: np.ndarray,
    patch_size: int = 14,
    config: FilterBankConfig = FilterBankConfig(),
    *,
    workers: int | None = None,
) -> np.ndarray:
    """Filter-bank features of every p x p patch: the mean of the pixel features over the patch.

    image01 : (H, W) float image with H and W multiples of patch_size (e.g. 980 x 980 for p = 14).
    Returns (H/p, W/p, F) float32, F = config.n_features; equal to the block mean of pixel_features,
    without ever holding the (H, W, F) pixel features.
    Raises ValueError when H or W is not a multiple of patch_size, or for a bad image.
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer number of pixels, got {patch_size!r}")
    patch_size = int(patch_size)
    image = _check_image(image01)
    height, width = image.shape
    if height % patch_size or width % patch_size:
        fit = f"{height // patch_size * patch_size} x {width // patch_size * patch_size}"
        raise ValueError(
            f"image is {height} x {width} pixels, not a multiple of patch_size={patch_size}; "
            f"crop or resize it first (e.g. to {fit})"
        )
    grid = np.empty((height // patch_size, width // patch_size, config.n_features), np.float32)
    first = int(config.include_intensity)
    if config.include_intensity:
        grid[..., :1] = _block_mean(image[None], patch_size)
    per = len(FEATURES_PER_SIGMA)

    def finish(index: int, block: np.ndarray) -> None:
        start = first + per * index
        grid[..., start : start + per] = _block_mean(block, patch_size)

    _run_scales(image, config, finish, workers)
    return grid


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over every leading axis.

    features : (..., F) float, at least one sample.
    Returns (mean, std), each (F,) float32; std is floored at STD_FLOOR so that dividing by it is safe.
    """
    values = np.asarray(features)
    if values.ndim < 1 or values.shape[-1] == 0 or values.size == 0:
        raise ValueError(f"feature_statistics needs a non-empty (..., F) array, got shape {values.shape}")
    flat = values.reshape(-1, values.shape[-1])
    mean = flat.mean(axis=0, dtype=np.float64)
    std = flat.std(axis=0, dtype=np.float64)
    return mean.astype(np.float32), np.maximum(std, STD_FLOOR).astype(np.float32)


def standardize(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(features - mean) / std per feature.

    features : (..., F); mean, std : (F,) as from feature_statistics (std > 0).
    Returns (..., F) float32.
    """
    values = np.asarray(features, dtype=np.float32)
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    n_features = values.shape[-1] if values.ndim else None
    if mean.shape != (n_features,) or std.shape != (n_features,):
        raise ValueError(
            f"standardize: features have F={n_features} (shape {values.shape}) but mean and std have shapes "
            f"{mean.shape} and {std.shape}; use the statistics of features from the same FilterBankConfig"
        )
    if not np.all(std > 0):
        raise ValueError("standardize: std must be > 0 everywhere; take it from feature_statistics")
    out = values - mean
    out /= std
    return out
