"""Clicked points, the prototypes built from them, and the prototype file (thesis §3.5.1-3.5.2).

A point is (x, y, z): x = column, y = row, z = slice, in pixels of the original stack. Each point selects the
patch that contains it; the clicked patches' embeddings are kept (``*_examples``, unit vectors) and the
scoring references are derived from them by the configured scoring method (one mean prototype per class in
thesis mode).

Prototype files are ``.npz`` archives without pickles: float32 arrays plus ``metadata_json``, a JSON text
(format version, backbone, weights id, embedding dimension, the full pipeline configuration — preprocessing,
λ, scoring, threshold —, calibrated threshold, stack-wide intensity range, source file, channel, points,
creation time). ``load_prototype`` checks the backbone and the embedding dimension against what the caller
will score with.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from core.config import PipelineConfig, Scoring
from core.errors import PrototypeError
from core.grid import check_points_inside, points_to_patches
from core.scoring import kmeans_prototypes, l2_normalize, mean_prototype

FORMAT_VERSION = 1
_ARRAY_KEYS = (
    "positive_references",
    "negative_references",
    "positive_examples",
    "negative_examples",
    "points_positive",
    "points_negative",
)


@dataclass(frozen=True)
class PointSet:
    """Positive and negative points, each (N, 3) int64 rows of (x, y, z) in original pixels."""

    positive: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    negative: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))

    def __post_init__(self) -> None:
        for name in ("positive", "negative"):
            array = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1, 3) if len(getattr(self, name)) else np.zeros((0, 3))
            if not np.all(np.isfinite(array)):
                raise PrototypeError(f"{name} points contain non-finite coordinates")
            object.__setattr__(self, name, np.round(array).astype(np.int64))

    @property
    def slices(self) -> list[int]:
        """Sorted distinct z of all points."""
        return sorted({int(z) for z in np.concatenate([self.positive[:, 2], self.negative[:, 2]])})

    def on_slice(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        """(positive_xy, negative_xy), each (N, 2), of the points on slice z."""
        return self.positive[self.positive[:, 2] == z, :2], self.negative[self.negative[:, 2] == z, :2]

    def as_dict(self) -> dict:
        return {"positive": self.positive.tolist(), "negative": self.negative.tolist()}

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "points") -> "PointSet":
        if not isinstance(data, dict) or "positive" not in data:
            raise PrototypeError(f"{source}: expected a JSON object with 'positive' (and optionally 'negative') lists of [x, y, z]")
        try:
            positive = np.asarray(data.get("positive") or [], dtype=np.float64)
            negative = np.asarray(data.get("negative") or [], dtype=np.float64)
        except (TypeError, ValueError):
            raise PrototypeError(f"{source}: points must be lists of [x, y, z] numbers") from None
        for name, array in (("positive", positive), ("negative", negative)):
            if array.size and (array.ndim != 2 or array.shape[1] != 3):
                raise PrototypeError(f"{source}: every {name} point must be [x, y, z]; got an array of shape {array.shape}")
        if positive.size == 0:
            raise PrototypeError(f"{source}: at least one positive point is needed")
        return cls(positive.reshape(-1, 3), negative.reshape(-1, 3))

    @classmethod
    def load(cls, path: str | Path) -> "PointSet":
        """Read a POINTS.json file: {"positive": [[x, y, z], ...], "negative": [[x, y, z], ...]}."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PrototypeError(f"{path}: points file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PrototypeError(f"{path}: not a readable JSON points file ({error})") from None
        return cls.from_dict(data, source=str(path))


@dataclass(frozen=True)
class Prototype:
    """Everything needed to score new slices the way the reference slice was scored.

    positive_references, negative_references : (K, D) float32 unit vectors used by the scoring method.
    positive_examples, negative_examples : (N, D) float32 unit embeddings of the clicked patches.
    pixel_positive_examples, pixel_negative_examples : (M, F) float32 standardised pixel features at and
        around the clicks (best mode's pixel branch, see core.pixels), or None.
    pixel_projection, pixel_projection_mean : (D, k), (D,) PCA basis of patch embeddings appended to the
        pixel features, or None.
    """

    positive_references: np.ndarray
    negative_references: np.ndarray
    positive_examples: np.ndarray
    negative_examples: np.ndarray
    config: PipelineConfig
    backbone: str
    weights_id: str
    embed_dim: int
    points: PointSet
    source_file: str = ""
    channel: int = 0
    timepoint: int = 0
    calibrated_threshold: float | None = None
    intensity_range: tuple[float, float] | None = None
    created: str = ""
    backbone_label: str = ""
    pixel_positive_examples: np.ndarray | None = None
    pixel_negative_examples: np.ndarray | None = None
    pixel_projection: np.ndarray | None = None
    pixel_projection_mean: np.ndarray | None = None

    def metadata(self) -> dict:
        return {
            "format": "protoscope-prototype",
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone,
            "backbone_label": self.backbone_label,
            "weights_id": self.weights_id,
            "embed_dim": self.embed_dim,
            "config": self.config.as_dict(),
            "calibrated_threshold": self.calibrated_threshold,
            "intensity_range": list(self.intensity_range) if self.intensity_range else None,
            "source_file": self.source_file,
            "channel": self.channel,
            "timepoint": self.timepoint,
            "points": self.points.as_dict(),
            "created": self.created,
        }

    def summary(self) -> str:
        return (
            f"{len(self.positive_examples)} positive / {len(self.negative_examples)} negative patches, "
            f"backbone {self.backbone} ({self.weights_id}), {self.config.describe()}"
            + (f", calibrated threshold {self.calibrated_threshold:.4f}" if self.calibrated_threshold is not None else "")
        )


def collect_examples(
    points: PointSet,
    embeddings_for_slice: Callable[[int], np.ndarray],
    slice_shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings of the patches under the points, grouped by class.

    embeddings_for_slice : z -> (h, w, D) patch embeddings of that slice.
    slice_shape : (Y, X) of the original slices. Returns ((Np, D), (Nn, D)) float32.
    """
    positive: list[np.ndarray] = []
    negative: list[np.ndarray] = []
    for z in points.slices:
        grid = embeddings_for_slice(z)
        for xy, bucket, name in ((points.on_slice(z)[0], positive, "positive"), (points.on_slice(z)[1], negative, "negative")):
            if not len(xy):
                continue
            inside = check_points_inside(xy, slice_shape)
            if not inside.all():
                bad = xy[~inside][0]
                raise PrototypeError(
                    f"{name} point (x={bad[0]}, y={bad[1]}, z={z}) lies outside the {slice_shape[1]} x {slice_shape[0]} slice"
                )
            cells = points_to_patches(xy, slice_shape, grid.shape[:2])
            bucket.append(grid[cells[:, 0], cells[:, 1]])
    dim = 0
    if positive:
        dim = positive[0].shape[-1]
    elif negative:
        dim = negative[0].shape[-1]
    pos = l2_normalize(np.concatenate(positive)) if positive else np.zeros((0, dim), np.float32)
    neg = l2_normalize(np.concatenate(negative)) if negative else np.zeros((0, dim), np.float32)
    return pos, neg


def build_references(examples: np.ndarray, config: PipelineConfig, seed: int = 0) -> np.ndarray:
    """Scoring references of one class from its (N, D) clicked embeddings (see core.scoring)."""
    if len(examples) == 0:
        return np.zeros((0, examples.shape[-1] if examples.ndim == 2 else 0), np.float32)
    if config.scoring is Scoring.KNN:
        return l2_normalize(examples)
    if config.scoring is Scoring.MULTI:
        return kmeans_prototypes(examples, config.n_prototypes, seed=seed)
    return mean_prototype(examples)


def save_prototype(prototype: Prototype, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``prototype`` as a pickle-free ``.npz`` (atomically); refuses to overwrite unless asked."""
    path = Path(path)
    if path.suffix != ".npz":
        raise PrototypeError(f"{path}: prototype files end in .npz")
    if path.exists() and not overwrite:
        raise PrototypeError(f"{path} already exists; choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = _archive_arrays(prototype)
    handle, temp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


_OPTIONAL_KEYS = ("pixel_positive_examples", "pixel_negative_examples", "pixel_projection", "pixel_projection_mean")


def _archive_arrays(prototype: Prototype) -> dict[str, np.ndarray]:
    optional = {
        key: np.asarray(getattr(prototype, key), dtype=np.float32)
        for key in _OPTIONAL_KEYS
        if getattr(prototype, key) is not None
    }
    return {
        **optional,
        "positive_references": prototype.positive_references.astype(np.float32),
        "negative_references": prototype.negative_references.astype(np.float32),
        "positive_examples": prototype.positive_examples.astype(np.float32),
        "negative_examples": prototype.negative_examples.astype(np.float32),
        "points_positive": prototype.points.positive.astype(np.int64),
        "points_negative": prototype.points.negative.astype(np.int64),
        "metadata_json": np.array(json.dumps(prototype.metadata(), ensure_ascii=False)),
    }


def prototype_to_bytes(prototype: Prototype) -> bytes:
    """The ``.npz`` file content (for downloads)."""
    buffer = io.BytesIO()
    np.savez(buffer, **_archive_arrays(prototype))
    return buffer.getvalue()


def load_prototype(
    source: str | Path | bytes,
    *,
    backbone: str | None = None,
    embed_dim: int | None = None,
    name: str | None = None,
) -> Prototype:
    """Read a prototype file (path or bytes) and check it fits ``backbone`` / ``embed_dim`` when given."""
    label = name or (str(source) if not isinstance(source, bytes) else "uploaded prototype")
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except FileNotFoundError:
        raise PrototypeError(f"{label}: prototype file not found") from None
    except OSError as error:
        raise PrototypeError(f"{label}: cannot open ({error.strerror})") from None
    try:
        with stream, np.load(stream, allow_pickle=False) as archive:
            missing = [key for key in (*_ARRAY_KEYS, "metadata_json") if key not in archive.files]
            if missing:
                raise PrototypeError(f"{label}: not a Protoscope prototype file (missing {', '.join(missing)})")
            arrays = {key: archive[key] for key in _ARRAY_KEYS}
            optional = {key: archive[key].astype(np.float32) for key in _OPTIONAL_KEYS if key in archive.files}
            metadata = json.loads(str(archive["metadata_json"]))
    except PrototypeError:
        raise
    except ValueError as error:
        raise PrototypeError(f"{label}: not a valid pickle-free .npz prototype file ({error})") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise PrototypeError(f"{label}: unreadable or truncated prototype file ({error})") from None
    if metadata.get("format") != "protoscope-prototype":
        raise PrototypeError(f"{label}: not a Protoscope prototype file")
    if int(metadata.get("format_version", 0)) > FORMAT_VERSION:
        raise PrototypeError(
            f"{label}: written by a newer Protoscope (format {metadata.get('format_version')}); this version reads format {FORMAT_VERSION}"
        )
    dim = int(metadata["embed_dim"])
    if backbone is not None and metadata["backbone"] != backbone:
        raise PrototypeError(
            f"{label} was made with backbone {metadata['backbone']!r} but {backbone!r} is selected; "
            f"select {metadata['backbone']!r} or build new prototypes with {backbone!r}"
        )
    if embed_dim is not None and dim != embed_dim:
        raise PrototypeError(
            f"{label} holds {dim}-dimensional embeddings but the selected backbone gives {embed_dim}; "
            "use the same backbone and weights that made the prototypes"
        )
    for key in ("positive_references", "negative_references", "positive_examples", "negative_examples"):
        if arrays[key].size and arrays[key].shape[-1] != dim:
            raise PrototypeError(f"{label}: {key} has dimension {arrays[key].shape[-1]}, metadata says {dim}")
    intensity = metadata.get("intensity_range")
    return Prototype(
        positive_references=arrays["positive_references"].astype(np.float32).reshape(-1, dim),
        negative_references=arrays["negative_references"].astype(np.float32).reshape(-1, dim),
        positive_examples=arrays["positive_examples"].astype(np.float32).reshape(-1, dim),
        negative_examples=arrays["negative_examples"].astype(np.float32).reshape(-1, dim),
        config=PipelineConfig.from_dict(metadata["config"]),
        backbone=str(metadata["backbone"]),
        weights_id=str(metadata.get("weights_id", "")),
        embed_dim=dim,
        points=PointSet(arrays["points_positive"].reshape(-1, 3), arrays["points_negative"].reshape(-1, 3)),
        source_file=str(metadata.get("source_file", "")),
        channel=int(metadata.get("channel", 0)),
        timepoint=int(metadata.get("timepoint", 0)),
        calibrated_threshold=metadata.get("calibrated_threshold"),
        intensity_range=tuple(intensity) if intensity else None,  # type: ignore[arg-type]
        created=str(metadata.get("created", "")),
        backbone_label=str(metadata.get("backbone_label", "")),
        pixel_positive_examples=optional.get("pixel_positive_examples"),
        pixel_negative_examples=optional.get("pixel_negative_examples"),
        pixel_projection=optional.get("pixel_projection"),
        pixel_projection_mean=optional.get("pixel_projection_mean"),
    )


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
