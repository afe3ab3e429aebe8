"""Pipeline settings: one frozen dataclass with the thesis defaults, and the two named modes.

``thesis`` is docs/spec/PIPELINE.md part A exactly (per-slice 5-95 % clipping, 980 px, one mean prototype per class,
S = Sp - 0.8·Sn on the 70 x 70 patch grid, top 10 % of patches, nearest resize of the patch mask).
``best`` is what we recommend; it is built from the same switches, each of which can also be set alone
(CLI ``--option name=value``, the app's advanced settings), so that every improvement can be measured in
isolation (docs/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from core.errors import OptionError
from core.preprocess import PreprocessConfig
from core.thresholds import ThresholdSpec


#: Upper ends of the options whose cost grows without bound: z_sigma smooths over 2·sigma slices each side (more
#: than any stack holds), augment_radius takes every pixel of a disk around each click (a radius of 16 is 800
#: examples per click), closing_px is the radius of a disk-shaped closing (the cost grows with its area).
MAX_Z_SIGMA = 100.0
MAX_AUGMENT_RADIUS = 16
MAX_CLOSING_PX = 25
#: self_training scores this many target slices at most (each costs a forest prediction of the whole slice).
MAX_SELF_TRAINING = 32
#: border_rays looks for the edge along this many rays per positive click at most (each adds one example).
MAX_BORDER_RAYS = 64


class Mode(str, Enum):
    THESIS = "thesis"
    BEST = "best"


class Scoring(str, Enum):
    """How patches are compared with the clicked examples."""

    MEAN = "mean"  # one mean prototype per class (thesis)
    MULTI = "multi"  # k-means prototypes per class, score = best-matching prototype
    KNN = "knn"  # mean similarity to the k nearest clicked patches of each class (DINOSim-like)


class Upsampling(str, Enum):
    """How the patch-grid score map reaches the original pixel grid."""

    NEAREST = "nearest"  # threshold on the patch grid, nearest-resize the mask (thesis; 14-px blocks)
    BILINEAR = "bilinear"  # bilinear-upsample the score map, threshold per pixel
    GUIDED = "guided"  # bilinear, then an edge-preserving guided filter with the slice as guide


@dataclass(frozen=True)
class Cleanup:
    """Optional morphological clean-up of the final mask (pixels of the original slice).

    hole_size_px : fill holes up to this area (not all holes: a vessel loop must not fill the tissue it
    encloses). min_size_px : remove objects smaller than this area. closing_px : radius of a closing.
    """

    hole_size_px: int = 0
    min_size_px: int = 0
    closing_px: int = 0

    def __post_init__(self) -> None:
        for name in ("hole_size_px", "min_size_px"):
            _check_whole(name, getattr(self, name), 0, "pixels; 0 switches it off")
        _check_whole("closing_px", self.closing_px, 0, "pixels; 0 switches it off", MAX_CLOSING_PX)

    @property
    def active(self) -> bool:
        return self.hole_size_px > 0 or self.min_size_px > 0 or self.closing_px > 0


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of the prototype pipeline. Defaults are the thesis's (Table 3.3)."""

    mode: Mode = Mode.THESIS
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    negative_weight: float = 0.8
    scoring: Scoring = Scoring.MEAN
    n_prototypes: int = 1
    knn_k: int = 5
    upsampling: Upsampling = Upsampling.NEAREST
    threshold: ThresholdSpec = field(default_factory=lambda: ThresholdSpec("top", 10.0))
    z_sigma: float = 0.0
    pixel_classifier: str = "none"
    pixel_max_side: int = 1024
    pixel_standardize: str = "stack"
    augment_radius: int = 2
    patch_components: int = 0
    cleanup: Cleanup = field(default_factory=Cleanup)
    transfer_clip: float = 0.0  # core.transfer: upper percentile of the transfer features' normalisation; 0 = off
    self_training: int = 0  # core.transfer: target slices pseudo-labelled for a refit on the target; 0 = off
    border_rays: int = 0  # core.transfer: negative examples just outside the structure per positive click; 0 = off

    def __post_init__(self) -> None:
        if not 0.0 <= self.negative_weight <= 2.0:
            raise OptionError(f"option negative_weight (λ) must lie in 0..2, got {self.negative_weight!r}")
        _check_whole("n_prototypes", self.n_prototypes, 1, "prototypes per class")
        _check_whole("knn_k", self.knn_k, 1, "nearest clicked patches")
        if not 0.0 <= self.z_sigma <= MAX_Z_SIGMA:
            raise OptionError(f"option z_sigma must be a finite number >= 0 slices (0 = off) and <= {MAX_Z_SIGMA:g}, "
                              f"got {self.z_sigma!r}")
        if self.pixel_classifier not in ("none", "forest", "linear"):
            raise OptionError(f"option pixel_classifier must be none, forest or linear, got {self.pixel_classifier!r}")
        if self.pixel_standardize not in ("stack", "slice"):
            raise OptionError(f"option pixel_standardize must be stack or slice, got {self.pixel_standardize!r}")
        _check_whole("pixel_max_side", self.pixel_max_side, 64, "pixels")
        _check_whole("augment_radius", self.augment_radius, 0, "pixels", MAX_AUGMENT_RADIUS)
        _check_whole("patch_components", self.patch_components, 0, "principal components; 0 = none")
        low = self.preprocess.clip_percentiles[0]
        if isinstance(self.transfer_clip, bool) or not isinstance(self.transfer_clip, (int, float)) \
                or not (self.transfer_clip == 0 or low < self.transfer_clip <= 100):
            raise OptionError(f"option transfer_clip must be 0 (off) or a percentile above clip_low ({low:g}) and <= 100, "
                              f"got {self.transfer_clip!r}")
        _check_whole("self_training", self.self_training, 0, "target slices; 0 = off", MAX_SELF_TRAINING)
        _check_whole("border_rays", self.border_rays, 0, "rays per positive click; 0 = off", MAX_BORDER_RAYS)
        if self.self_training and not self.transfer_clip:
            raise OptionError("option self_training needs transfer_clip (the transferred classifier labels the target); "
                              "set transfer_clip=99.5, or self_training=0")

    @property
    def uses_pixels(self) -> bool:
        """True when a pixel classifier replaces patch-prototype scoring."""
        return self.pixel_classifier != "none"

    # ---- modes -------------------------------------------------------------------------------------
    @classmethod
    def thesis(cls) -> "PipelineConfig":
        return cls()

    @classmethod
    def best(cls) -> "PipelineConfig":
        return cls(
            mode=Mode.BEST,
            preprocess=PreprocessConfig(normalization="stack"),
            upsampling=Upsampling.BILINEAR,
            threshold=ThresholdSpec("calibrated"),
            pixel_classifier="forest",
            patch_components=8,
        )

    @classmethod
    def for_mode(cls, mode: str | Mode) -> "PipelineConfig":
        mode = Mode(mode)
        return cls.best() if mode is Mode.BEST else cls.thesis()

    # ---- options -----------------------------------------------------------------------------------
    def with_options(self, **options: object) -> "PipelineConfig":
        """A copy with some settings changed; accepts the flat names of OPTION_NAMES (strings are parsed)."""
        changes: dict[str, object] = {}
        preprocess = self.preprocess
        cleanup = self.cleanup
        for name, raw in options.items():
            if name not in OPTION_NAMES:
                raise OptionError(f"unknown pipeline option {name!r}; known options: {', '.join(OPTION_NAMES)}")
            value = _parse_option(name, raw)
            if name in ("normalization", "image_size", "clip_low", "clip_high"):
                if name == "clip_low":
                    preprocess = dataclasses.replace(preprocess, clip_percentiles=(value, preprocess.clip_percentiles[1]))
                elif name == "clip_high":
                    preprocess = dataclasses.replace(preprocess, clip_percentiles=(preprocess.clip_percentiles[0], value))
                else:
                    preprocess = dataclasses.replace(preprocess, **{name: value})
            elif name in ("hole_size_px", "min_size_px", "closing_px"):
                cleanup = dataclasses.replace(cleanup, **{name: value})
            else:
                changes[name] = value
        return dataclasses.replace(self, preprocess=preprocess, cleanup=cleanup, **changes)

    def as_dict(self) -> dict:
        return {
            "mode": self.mode.value,
            "preprocess": self.preprocess.as_dict(),
            "negative_weight": self.negative_weight,
            "scoring": self.scoring.value,
            "n_prototypes": self.n_prototypes,
            "knn_k": self.knn_k,
            "upsampling": self.upsampling.value,
            "threshold": str(self.threshold),
            "z_sigma": self.z_sigma,
            "pixel_classifier": self.pixel_classifier,
            "pixel_max_side": self.pixel_max_side,
            "pixel_standardize": self.pixel_standardize,
            "augment_radius": self.augment_radius,
            "patch_components": self.patch_components,
            "cleanup": dataclasses.asdict(self.cleanup),
            "transfer_clip": self.transfer_clip,
            "self_training": self.self_training,
            "border_rays": self.border_rays,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        """The inverse of `as_dict` (missing settings take their defaults).

        Raises OptionError naming the setting when ``data`` is not a dict or a setting is missing or ill-typed.
        """
        if not isinstance(data, dict):
            raise OptionError(f"the pipeline configuration must be a JSON object, got {type(data).__name__}")
        try:
            return cls(
                mode=Mode(data.get("mode", "thesis")),
                preprocess=(PreprocessConfig.from_dict(data["preprocess"]) if "preprocess" in data
                            else PreprocessConfig()),
                negative_weight=_number(data, "negative_weight", 0.8),
                scoring=Scoring(data.get("scoring", "mean")),
                n_prototypes=_whole(data, "n_prototypes", 1),
                knn_k=_whole(data, "knn_k", 5),
                upsampling=Upsampling(data.get("upsampling", "nearest")),
                threshold=ThresholdSpec.parse(_text(data, "threshold", "top:10")),
                z_sigma=_number(data, "z_sigma", 0.0),
                pixel_classifier=_text(data, "pixel_classifier", "none"),
                pixel_max_side=_whole(data, "pixel_max_side", 1024),
                pixel_standardize=_text(data, "pixel_standardize", "stack"),
                augment_radius=_whole(data, "augment_radius", 2),
                patch_components=_whole(data, "patch_components", 0),
                cleanup=_cleanup(data.get("cleanup", {})),
                transfer_clip=_number(data, "transfer_clip", 0.0),
                self_training=_whole(data, "self_training", 0),
                border_rays=_whole(data, "border_rays", 0),
            )
        except OptionError:
            raise
        except (TypeError, ValueError) as error:  # Enum(...) of an unknown value, a non-hashable value
            raise OptionError(f"pipeline configuration: {error}") from None

    def describe(self) -> str:
        """One line for logs and reports."""
        parts = [
            f"mode={self.mode.value}",
            f"norm={self.preprocess.normalization}",
            f"size={self.preprocess.image_size}",
            f"λ={self.negative_weight:g}",
            f"scoring={self.scoring.value}" + (f"(k={self.n_prototypes})" if self.scoring is Scoring.MULTI else "")
            + (f"(k={self.knn_k})" if self.scoring is Scoring.KNN else ""),
            f"upsampling={self.upsampling.value}",
            f"threshold={self.threshold}",
        ]
        if self.z_sigma:
            parts.append(f"z_sigma={self.z_sigma:g}")
        if self.uses_pixels:
            parts.append(f"pixels={self.pixel_classifier}(max_side={self.pixel_max_side},r={self.augment_radius}"
                         + (f",patch_pcs={self.patch_components}" if self.patch_components else "")
                         + (f",border_rays={self.border_rays}" if self.border_rays else "") + ")")
        if self.cleanup.active:
            parts.append("cleanup(" + ",".join(f"{name}={value}" for name, value in dataclasses.asdict(self.cleanup).items()
                                               if value) + ")")
        if self.uses_pixels and self.transfer_clip:
            parts.append(f"transfer(clip={self.transfer_clip:g}" + (f",self_training={self.self_training}"
                                                                     if self.self_training else "") + ")")
        return " ".join(parts)


#: Flat option names accepted by ``PipelineConfig.with_options`` and the CLI's ``--option name=value``.
OPTION_NAMES = (
    "normalization",
    "image_size",
    "clip_low",
    "clip_high",
    "negative_weight",
    "scoring",
    "n_prototypes",
    "knn_k",
    "upsampling",
    "threshold",
    "z_sigma",
    "pixel_classifier",
    "pixel_max_side",
    "pixel_standardize",
    "augment_radius",
    "patch_components",
    "hole_size_px",
    "min_size_px",
    "closing_px",
    "transfer_clip",
    "self_training",
    "border_rays",
)


def _check_whole(name: str, value: object, minimum: int, unit: str, maximum: int | None = None) -> None:
    """OptionError unless ``value`` is a whole number >= ``minimum`` (and <= ``maximum``; bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum \
            or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise OptionError(f"option {name} must be a whole number >= {minimum}{upper} ({unit}), got {value!r}")


def _number(data: dict, key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"pipeline configuration: {key} must be a number, got {value!r}")
    return float(value)


def _whole(data: dict, key: str, default: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise OptionError(f"pipeline configuration: {key} must be a whole number, got {value!r}")
    return int(value)


def _text(data: dict, key: str, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise OptionError(f"pipeline configuration: {key} must be text, got {value!r}")
    return value


def _cleanup(data: object) -> Cleanup:
    if not isinstance(data, dict) or set(data) - {"hole_size_px", "min_size_px", "closing_px"}:
        raise OptionError("pipeline configuration: cleanup must be an object with hole_size_px, min_size_px and "
                          f"closing_px, got {data!r}")
    return Cleanup(**{key: _whole(data, key, 0) for key in data})


def _parse_option(name: str, raw: object) -> object:
    """The value of option ``name`` from text (CLI) or an already typed value; OptionError says what is valid."""
    try:
        if name in ("normalization", "pixel_classifier", "pixel_standardize"):
            return str(raw)
        if name in ("image_size", "n_prototypes", "knn_k", "min_size_px", "hole_size_px", "closing_px", "pixel_max_side",
                    "augment_radius", "patch_components", "self_training", "border_rays"):
            return int(raw)  # type: ignore[arg-type]
        if name in ("clip_low", "clip_high", "negative_weight", "z_sigma", "transfer_clip"):
            return float(raw)  # type: ignore[arg-type]
        if name == "scoring":
            return raw if isinstance(raw, Scoring) else Scoring(str(raw))
        if name == "upsampling":
            return raw if isinstance(raw, Upsampling) else Upsampling(str(raw))
        if name == "threshold":
            return raw if isinstance(raw, ThresholdSpec) else ThresholdSpec.parse(str(raw))
    except OptionError:
        raise
    except (TypeError, ValueError):
        raise OptionError(f"bad value {raw!r} for option {name}: {_expected(name)}") from None
    raise OptionError(f"unknown pipeline option {name!r}; known options: {', '.join(OPTION_NAMES)}")


def _expected(name: str) -> str:
    if name == "scoring":
        return "use one of " + ", ".join(s.value for s in Scoring)
    if name == "upsampling":
        return "use one of " + ", ".join(u.value for u in Upsampling)
    if name in ("clip_low", "clip_high", "negative_weight", "z_sigma", "transfer_clip"):
        return "expected a number"
    return "expected a whole number"


def parse_option_assignments(items: list[str] | None) -> dict[str, str]:
    """['scoring=knn', 'z_sigma=1'] -> {'scoring': 'knn', 'z_sigma': '1'} (CLI ``--option``)."""
    options: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise OptionError(f"option {item!r} must look like name=value (known: {', '.join(OPTION_NAMES)})")
        options[name.strip()] = value.strip()
    return options
