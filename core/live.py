"""Best mode's live step: a click's pixel mask in tens of milliseconds, then the forest's as its refinement.

Best mode's random forest (``core.pixels.PixelClassifier``) takes 1-2 s per click at 1024² on 2 cores, most
of it in scikit-learn's per-pixel tree traversal. The live step answers a click first with a linear classifier
(logistic regression, class-balanced, as best mode's ``linear`` option) fitted on the same pixel examples:
its prediction is one matrix-vector product over the slice's standardised pixel features, which the
embedder keeps (``SliceEmbedder.pixel_feature_map``), and its threshold is calibrated on the points as the
forest's is. The forest's result (``refine_click``: ``build_scorer`` + ``Scorer.segment``, exact) then
replaces it. On vesselNN slices the two masks agree with a mean Dice of 0.86 (lowest 0.67, 20 cases), and
against the ground truth the live mask scores as the forest's (Dice 0.73 each); tests/test_live.py holds the
stated tolerance (Dice >= 0.8 on its fixed cases), bench/bench_click.py the times.

Timing one click (what bench/bench_click.py and bench/bench_live.py do)::

    from core.live import live_click, prepare_slice, refine_click

    prepare_slice(embedder, z, config)                # once per slice: its features, memoised on the embedder
    live = live_click(embedder, points, config, z)    # live.mask (Y, X) bool, live.timings (ms per step)
    forest = refine_click(embedder, points, config, z)  # forest.mask, forest.scorer, forest.timings

``live.timings`` holds ``basis`` (the stack's PCA basis of patch embeddings, ViT backbones; fitted once),
``examples`` (features at the clicks; a slice not seen before computes its features here), ``fit``,
``score`` (the working-resolution map), ``mask`` (upsampling to the slice, threshold) and ``total``, in ms
of server time. Both steps use the PCA basis fitted once per stack (``stack_basis=True``, as the app); pass
``stack_basis=False`` for the basis of the points' slices, as ``build_scorer`` fits it by default.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from sklearn.linear_model import LogisticRegression

from core.config import PipelineConfig
from core.features.filterbank import FilterBankConfig
from core.pipeline import (
    PatchBasis,
    Scorer,
    SliceSegmentation,
    _check_points,
    _uses_patch_components,
    build_scorer,
    pixel_examples,
    pixel_feature_map,
    segment_pixel_map,
)
from core.pixels import working_shape
from core.prototypes import PointSet
from core.thresholds import ThresholdSpec, calibrate_threshold

if TYPE_CHECKING:  # pragma: no cover
    from core.features.embedding import SliceEmbedder

#: Pixel examples per class the live classifier is fitted on (a seeded subsample beyond): Newton's method on
#: 2 x 2000 rows of ~57 features takes ~20 ms; the forest still gets all of them (up to MAX_PIXEL_EXAMPLES).
LIVE_MAX_EXAMPLES = 2_000
#: The live classifier's name, as captions show it.
LIVE_CLASSIFIER = "linear"
#: Rows from which the live classifier's product runs on a GPU when there is one.
GPU_MIN_ROWS = 1 << 16


@dataclass(frozen=True)
class LinearPixelModel:
    """A linear classifier of standardised pixel features: score = 2·p - 1 = tanh((f·w + b) / 2), in [-1, 1].

    weights : (F,) float32. bias : float.
    """

    weights: np.ndarray
    bias: float

    @classmethod
    def fit(cls, positive: np.ndarray, negative: np.ndarray, *, seed: int = 0,
            max_per_class: int = LIVE_MAX_EXAMPLES) -> "LinearPixelModel":
        """Logistic regression (L2, C = 1, classes weighted to balance) on (N, F) positive and (M, F) negative
        feature rows, at most ``max_per_class`` of each (a subsample seeded by ``seed`` beyond).

        Raises ValueError when a class has no row.
        """
        if len(positive) == 0 or len(negative) == 0:
            raise ValueError("the live classifier needs positive and negative examples")
        rng = np.random.default_rng(seed)
        positive, negative = (rows if len(rows) <= max_per_class else rows[np.sort(rng.choice(len(rows), max_per_class,
                                                                                              replace=False))]
                              for rows in (positive, negative))
        features = np.concatenate([positive, negative]).astype(np.float64)
        labels = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))]).astype(np.int64)
        # Newton-Cholesky: a handful of exact steps on few features, ~10x faster here than lbfgs' hundreds.
        model = LogisticRegression(C=1.0, class_weight="balanced", solver="newton-cholesky", max_iter=100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # separable clicks stop at max_iter: the direction is what counts
            model.fit(features, labels)
        return cls(model.coef_[0].astype(np.float32), float(model.intercept_[0]))

    def score(self, features: np.ndarray, *, device: str | None = None) -> np.ndarray:
        """(..., F) standardised features -> (...) float32 scores in [-1, 1].

        device : None (a GPU when torch sees CUDA or MPS, else numpy), 'numpy', or a torch device ('cpu',
            'cuda', 'mps'); the same numbers within float32 rounding.
        """
        flat = features.reshape(-1, features.shape[-1])
        if device is None:  # a GPU pays only for whole slices; a few clicked pixels stay in numpy
            device = _accelerator() if flat.shape[0] >= GPU_MIN_ROWS else "numpy"
        if device == "numpy":
            logits = flat @ self.weights
            logits += np.float32(self.bias)
            logits *= np.float32(0.5)
            out = np.tanh(logits, out=logits)
        else:
            out = _torch_scores(flat, self.weights, self.bias, device)
        return out.reshape(features.shape[:-1])


@functools.cache
def _accelerator() -> str:
    """'cuda' or 'mps' when torch has one (the matrix-vector product runs there), else 'numpy'."""
    import torch  # lazily: only a GPU check; numpy does the CPU work

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "numpy"


_DEVICE_FEATURES: list[tuple[np.ndarray, object]] = []  # (features, their copy on the device), latest last
_DEVICE_LOCK = threading.Lock()


def _torch_scores(flat: np.ndarray, weights: np.ndarray, bias: float, device: str) -> np.ndarray:
    """tanh((flat @ weights + bias) / 2) on a torch device; the last two feature arrays stay on it, so a click
    on the same slice copies no features."""
    import torch

    with _DEVICE_LOCK:
        on_device = next((copy for array, copy in _DEVICE_FEATURES
                          if (array is flat.base or array is flat) and tuple(copy.shape) == flat.shape), None)
        if on_device is None:
            on_device = torch.from_numpy(np.ascontiguousarray(flat)).to(device)
            _DEVICE_FEATURES.append((flat.base if flat.base is not None else flat, on_device))
            del _DEVICE_FEATURES[:-2]
    logits = on_device @ torch.from_numpy(weights).to(device) + bias
    return torch.tanh(0.5 * logits).cpu().numpy().astype(np.float32, copy=False)


@dataclass(frozen=True)
class LiveResult:
    """The live step's answer to a click on slice z.

    segmentation : the live classifier's working-resolution score map (``score_map``, 2·p - 1), its
        upsampling to the slice (``scores``), the (Y, X) bool ``mask`` and the absolute ``threshold``.
    model : the fitted linear classifier. calibrated : its threshold calibrated on the points.
    timings : ms per step (see the module docstring).
    """

    z: int
    segmentation: SliceSegmentation
    model: LinearPixelModel
    calibrated: float
    timings: dict[str, float] = field(default_factory=dict)
    classifier: str = LIVE_CLASSIFIER

    @property
    def mask(self) -> np.ndarray:
        return self.segmentation.mask


@dataclass(frozen=True)
class RefinedResult:
    """The forest's answer to the same click: the fitted ``scorer`` (its ``.prototype`` calibrated), slice z's
    ``segmentation`` (exactly ``build_scorer`` + ``Scorer.segment``), ``timings`` in ms (fit, score, mask, total)."""

    z: int
    scorer: Scorer
    segmentation: SliceSegmentation
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        return self.segmentation.mask

    @property
    def classifier(self) -> str:
        return self.scorer.config.pixel_classifier


def _slice_of(points: PointSet, z: int | None) -> int:
    if z is not None:
        return int(z)
    slices = points.slices
    if len(slices) != 1:
        raise ValueError(f"the points lie on slices {slices}; say which slice to segment (z)")
    return slices[0]


def _check_pixels(config: PipelineConfig) -> None:
    if not config.uses_pixels:
        raise ValueError("the live step belongs to best mode's pixel classifier; this configuration has none "
                         "(pixel_classifier=none)")


def stack_basis_of(embedder: "SliceEmbedder", config: PipelineConfig, z_values: list[int], *,
                   stack_basis: bool = True) -> PatchBasis | None:
    """The PCA basis of patch embeddings best mode's pixel features use on this embedder (None for the filter bank
    or patch_components=0): the stack's (fitted once, on ``z_values`` the first time), or these slices'."""
    if not _uses_patch_components(embedder, config):
        return None
    return embedder.patch_basis(config.patch_components, z_values, per_stack=stack_basis)


def feature_bytes(embedder: "SliceEmbedder", config: PipelineConfig) -> int:
    """Bytes of one slice's standardised pixel features in memory: rows x cols x (F + k) x 4 at the working
    resolution (1024 x 1024 x 57 x 4 = 239 MB for a ViT with 8 patch components)."""
    rows, cols = working_shape(embedder.slice_shape, config.pixel_max_side)
    components = config.patch_components if _uses_patch_components(embedder, config) else 0
    return rows * cols * (FilterBankConfig().n_features + components) * 4


def fits_in_memo(embedder: "SliceEmbedder", config: PipelineConfig, slices: list[int]) -> bool:
    """Whether the features of ``slices`` fit in the embedder's memo together (else a click would compute some of
    them again, and the live step would cost as much as the forest)."""
    return len(set(slices)) * feature_bytes(embedder, config) <= embedder.pixel_feature_memo_bytes


def prepare_slice(embedder: "SliceEmbedder", z: int, config: PipelineConfig, *, stack_basis: bool = True) -> None:
    """Compute and memoise slice z's standardised pixel features (and the stack's PCA basis, ViT backbones), so that
    the first click on it costs only the classifier. The per-stack statistics are computed first if needed."""
    _check_pixels(config)
    basis = stack_basis_of(embedder, config, [int(z)], stack_basis=stack_basis)
    pixel_feature_map(embedder, int(z), config, None, basis=basis)


def live_click(
    embedder: "SliceEmbedder",
    points: PointSet,
    config: PipelineConfig,
    z: int | None = None,
    *,
    threshold: ThresholdSpec | None = None,
    seed: int = 0,
    stack_basis: bool = True,
) -> LiveResult:
    """The live step: the linear classifier of ``points``' pixel examples, slice z's mask (see the module docstring).

    points : positive and negative points (best mode needs both). z : the slice to segment (default: the points'
        slice when they lie on one). threshold : as ``Scorer.segment`` takes it (default: ``config.threshold``;
        ``calibrated`` is the live classifier's own threshold calibrated on the points).
    Raises PrototypeError for points that cannot make a prototype (as ``build_scorer``), ValueError for a
    configuration without pixel classifier.
    """
    _check_pixels(config)
    start = time.perf_counter()
    _check_points(embedder, points, config)
    z = _slice_of(points, z)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = (now - since) * 1e3
        return now

    basis = stack_basis_of(embedder, config, points.slices, stack_basis=stack_basis)
    mark = lap("basis", start)
    positive, negative, at_points = pixel_examples(embedder, points, config, basis, seed=seed)
    features = pixel_feature_map(embedder, z, config, None, basis=basis)
    mark = lap("examples", mark)
    model = LinearPixelModel.fit(positive, negative, seed=seed)
    calibrated = calibrate_threshold(np.concatenate([model.score(rows) for rows, _ in at_points.values()]),
                                     np.concatenate([model.score(rows) for _, rows in at_points.values()]))
    mark = lap("fit", mark)
    score_map = model.score(features)
    mark = lap("score", mark)
    segmentation = segment_pixel_map(score_map, embedder.slice_shape, config, calibrated=calibrated, threshold=threshold)
    lap("mask", mark)
    timings["total"] = (time.perf_counter() - start) * 1e3
    return LiveResult(z, segmentation, model, calibrated, timings)


def refine_click(
    embedder: "SliceEmbedder",
    points: PointSet,
    config: PipelineConfig,
    z: int | None = None,
    *,
    threshold: ThresholdSpec | None = None,
    seed: int = 0,
    stack_basis: bool = True,
) -> RefinedResult:
    """The refinement of the same click: ``build_scorer`` (the forest, calibrated) and ``Scorer.segment`` of slice z,
    reading the features the live step memoised. Same arguments as ``live_click``."""
    start = time.perf_counter()
    z = _slice_of(points, z)
    scorer = build_scorer(embedder, points, config, seed=seed, stack_basis=stack_basis)
    fitted = time.perf_counter()
    score_map = scorer.score_map(embedder, z)
    scored = time.perf_counter()
    segmentation = scorer.segment(embedder, z, score_map, threshold=threshold)
    done = time.perf_counter()
    timings = {"fit": (fitted - start) * 1e3, "score": (scored - fitted) * 1e3, "mask": (done - scored) * 1e3,
               "total": (done - start) * 1e3}
    return RefinedResult(z, scorer, segmentation, timings)


# ---- background preparation (the app) ----------------------------------------------------------------------

_WARM_UPS: "weakref.WeakKeyDictionary[SliceEmbedder, _WarmUp]" = weakref.WeakKeyDictionary()
_WARM_UP_LOCK = threading.Lock()


@dataclass
class _WarmUp:
    """One embedder's background preparation: a thread and the slice it is to prepare next (the latest asked)."""

    thread: threading.Thread | None = None
    next: tuple[int, PipelineConfig, bool] | None = None


def warm_up_slice(embedder: "SliceEmbedder", z: int, config: PipelineConfig, *, stack_basis: bool = True) -> bool:
    """Run ``prepare_slice`` for slice z in a background thread, so that the first click on it is live.

    One thread per embedder: a slice asked for while it works on another is prepared next, and only the latest
    one asked for (moving through slices prepares the one the user stops at, not every one passed). A click
    that needs a slice meanwhile waits for it (the embedder computes a slice's features once). Returns True
    when the slice was queued, False when it is prepared already or the configuration has no pixel classifier.
    """
    if not config.uses_pixels or int(z) in embedder.pixel_feature_slices(config.pixel_max_side):
        return False
    with _WARM_UP_LOCK:
        warm = _WARM_UPS.setdefault(embedder, _WarmUp())
        warm.next = (int(z), config, stack_basis)
        if warm.thread is None or not warm.thread.is_alive():
            warm.thread = threading.Thread(target=_warm_up_loop, args=(weakref.ref(embedder),),
                                           name="protoscope-live-warm-up", daemon=True)
            warm.thread.start()
    return True


def _warm_up_loop(embedder_ref: "weakref.ref[SliceEmbedder]") -> None:
    while True:
        embedder = embedder_ref()
        if embedder is None:
            return
        with _WARM_UP_LOCK:
            warm = _WARM_UPS.get(embedder)
            job, warm.next = (warm.next, None) if warm is not None else (None, None)
            if job is None:
                if warm is not None:
                    warm.thread = None
                return
        z, config, stack_basis = job
        try:
            prepare_slice(embedder, z, config, stack_basis=stack_basis)
        except Exception:  # noqa: BLE001 - a head start only: the click itself recomputes and reports any problem
            pass
        del embedder  # no strong reference while waiting for the next job
