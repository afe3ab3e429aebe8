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
import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from core.config import PipelineConfig, Scoring
from core.errors import OptionError, PrototypeError, PrototypeFileError
from core.grid import check_points_inside, points_to_patches
from core.io.channels import same_channel_name
from core.io.atomic import atomic_output
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


MAX_COORDINATE = 2**31 - 1  # pixels or slices; beyond, int64 rounding and array indices make no sense


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
            if array.size and np.abs(array).max() > MAX_COORDINATE:
                row = array[np.abs(array).max(axis=1).argmax()]
                raise PrototypeError(f"{name} point ({row[0]:.6g}, {row[1]:.6g}, {row[2]:.6g}) is far outside any stack "
                                     f"(coordinates are pixels and slices, at most {MAX_COORDINATE:,})")
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

    def check_inside(self, n_slices: int, slice_shape: tuple[int, int], *, source: str = "points") -> None:
        """PrototypeError naming the first point that lies on no slice 0..n_slices-1 or outside the (Y, X)
        `slice_shape`: what a stack can be asked before anything is embedded."""
        for name, rows in (("positive", self.positive), ("negative", self.negative)):
            on_a_slice = (rows[:, 2] >= 0) & (rows[:, 2] < n_slices)
            if not on_a_slice.all():
                x, y, z = rows[~on_a_slice][0].tolist()
                raise PrototypeError(f"{source}: {name} point (x={x}, y={y}, z={z}) lies on slice z={z}, but the "
                                     f"stack has slices 0-{n_slices - 1}")
            inside = check_points_inside(rows[:, :2], slice_shape)
            if not inside.all():
                x, y, z = rows[~inside][0].tolist()
                raise PrototypeError(f"{source}: {name} point (x={x}, y={y}, z={z}) lies outside the {slice_shape[1]} x "
                                     f"{slice_shape[0]} slice (x = column 0-{slice_shape[1] - 1}, y = row "
                                     f"0-{slice_shape[0] - 1})")

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
        try:
            return cls(positive.reshape(-1, 3), negative.reshape(-1, 3))
        except PrototypeError as error:  # non-finite or absurd coordinates: name the file they came from
            raise PrototypeError(f"{source}: {error}") from None

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
    source_channel_name: str = ""  # the channel's name in the source stack ('' when unnamed)
    lineage: tuple[dict, ...] = ()  # quick adapt: where the examples came from, oldest first

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
            "source_channel_name": self.source_channel_name,
            "lineage": [dict(entry) for entry in self.lineage],
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


#: A target's intensity range counts as far off the prototype's when its width differs by more than this factor
#: or the two ranges do not overlap at all (percentile ranges, in the images' own units).
RANGE_FACTOR = 4.0


def target_warnings(prototype: Prototype, channel_name: str, intensity_range: tuple[float, float] | None) -> list[str]:
    """Why applying ``prototype`` to a target channel may give wrong masks, as sentences (empty when it fits).

    channel_name : the target channel's own name ('' when unnamed: no name check).
    intensity_range : the target's (low, high) intensity percentiles (the prototype's clip percentiles), or None.
    """
    warnings = []
    source = prototype.source_channel_name
    if source and channel_name and not same_channel_name(source, channel_name):
        warnings.append(f"the prototype was made on channel '{source}', this channel is '{channel_name}'; "
                        "choose the channel that shows the same structure")
    if prototype.intensity_range is not None and intensity_range is not None:
        (s_low, s_high), (t_low, t_high) = prototype.intensity_range, intensity_range
        s_width, t_width = max(s_high - s_low, 1e-12), max(t_high - t_low, 1e-12)
        apart = t_high < s_low or s_high < t_low
        if apart or not 1 / RANGE_FACTOR <= t_width / s_width <= RANGE_FACTOR:
            warnings.append(f"this channel's intensities ({t_low:.4g}-{t_high:.4g}) are far from those the prototype "
                            f"was made on ({s_low:.4g}-{s_high:.4g}); check the channel, or adapt the prototype with "
                            "a few clicks on this stack")
    return warnings


def check_prototype_name(path: str | Path) -> None:
    """PrototypeError unless `path` names an ``.npz`` file (what `save_prototype` writes)."""
    path = Path(path)
    if path.suffix != ".npz" or path.name == ".npz":
        raise PrototypeError(f"{path}: prototype files end in .npz; choose a name like 'vessels.npz'")


def save_prototype(prototype: Prototype, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``prototype`` as a pickle-free ``.npz`` (atomically); refuses to overwrite unless asked."""
    path = Path(path)
    check_prototype_name(path)
    if path.exists() and not overwrite:
        raise PrototypeError(f"{path} already exists; choose another name or allow overwriting")
    arrays = _archive_arrays(prototype)
    with atomic_output(path, overwrite=overwrite) as temp, open(temp, "wb") as stream:
        np.savez(stream, **arrays)
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


#: Appended to every complaint about a prototype file's contents: what the user can do about it.
_REMAKE = "make it again (Segment page: Save prototype, or `python -m core prototype`)"


def load_prototype(
    source: str | Path | bytes,
    *,
    backbone: str | None = None,
    embed_dim: int | None = None,
    name: str | None = None,
) -> Prototype:
    """Read a prototype file (path or bytes) and check it fits ``backbone`` / ``embed_dim`` when given.

    Raises PrototypeFileError naming the file when it is missing, unreadable, pickled, lacks a required
    metadata key, holds a metadata value of the wrong type, a non-float or non-finite array, or arrays whose
    shapes disagree with its embedding dimension; PrototypeError when it does not fit ``backbone`` /
    ``embed_dim``.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "uploaded prototype")
    arrays, optional, metadata = _read_archive(source, label)
    fields = _metadata_fields(metadata, label)
    dim = fields["embed_dim"]
    if backbone is not None and fields["backbone"] != backbone:
        raise PrototypeError(
            f"{label} was made with backbone {fields['backbone']!r} but {backbone!r} is selected; "
            f"select {fields['backbone']!r} or build new prototypes with {backbone!r}"
        )
    if embed_dim is not None and dim != embed_dim:
        raise PrototypeError(
            f"{label} holds {dim}-dimensional embeddings but the selected backbone gives {embed_dim}; "
            "use the same backbone and weights that made the prototypes"
        )
    rows = {key: _embedding_rows(arrays[key], key, dim, label) for key in _ARRAY_KEYS[:4]}
    if not len(rows["positive_references"]):
        raise PrototypeFileError(f"{label}: positive_references is empty (no positive prototype); {_REMAKE}")
    positive, negative = (_point_rows(arrays[key], key, label) for key in ("points_positive", "points_negative"))
    try:
        points = PointSet(positive, negative)
    except PrototypeError as error:
        raise PrototypeFileError(f"{label}: {error}; {_REMAKE}") from None
    return Prototype(
        **rows,
        config=fields["config"],
        backbone=fields["backbone"],
        weights_id=fields["weights_id"],
        embed_dim=dim,
        points=points,
        source_file=fields["source_file"],
        channel=fields["channel"],
        timepoint=fields["timepoint"],
        calibrated_threshold=fields["calibrated_threshold"],
        intensity_range=fields["intensity_range"],
        created=fields["created"],
        backbone_label=fields["backbone_label"],
        source_channel_name=fields["source_channel_name"],
        lineage=fields["lineage"],
        **_pixel_arrays(optional, dim, label),
    )


def _read_archive(source: str | Path | bytes, label: str) -> tuple[dict, dict, dict]:
    """(required arrays, optional arrays, metadata dict) of a prototype file, or PrototypeFileError."""
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except FileNotFoundError:
        raise PrototypeFileError(f"{label}: prototype file not found") from None
    except OSError as error:
        raise PrototypeFileError(f"{label}: cannot open ({error.strerror})") from None
    try:
        with stream:
            archive = np.load(stream, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise PrototypeFileError(f"{label}: not a Protoscope prototype file (a single array, not an .npz "
                                         "archive)")
            with archive:
                arrays, optional, metadata_text = _archive_contents(archive, label)
    except PrototypeError:
        raise
    except ValueError as error:
        raise PrototypeFileError(f"{label}: not a valid pickle-free .npz prototype file ({error})") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise PrototypeFileError(f"{label}: unreadable or truncated prototype file ({error})") from None
    if metadata_text.dtype.kind != "U" or metadata_text.ndim != 0:
        raise PrototypeFileError(f"{label}: metadata_json must be one text, got a {metadata_text.dtype} array of "
                                 f"shape {metadata_text.shape}; {_REMAKE}")
    try:
        metadata = json.loads(str(metadata_text))
    except json.JSONDecodeError as error:
        raise PrototypeFileError(f"{label}: metadata_json is not valid JSON ({error}); {_REMAKE}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != "protoscope-prototype":
        raise PrototypeFileError(f"{label}: not a Protoscope prototype file")
    return arrays, optional, metadata


def _archive_contents(archive: np.lib.npyio.NpzFile, label: str) -> tuple[dict, dict, np.ndarray]:
    """(required arrays, optional arrays, the metadata_json array) read from an open archive."""
    missing = [key for key in (*_ARRAY_KEYS, "metadata_json") if key not in archive.files]
    if missing:
        raise PrototypeFileError(f"{label}: not a Protoscope prototype file (missing {', '.join(missing)})")
    arrays = {key: archive[key] for key in _ARRAY_KEYS}
    optional = {key: archive[key] for key in _OPTIONAL_KEYS if key in archive.files}
    return arrays, optional, archive["metadata_json"]


def _metadata_fields(metadata: dict, label: str) -> dict:
    """The typed metadata of a prototype file; PrototypeFileError for a missing key or a value of the wrong type."""

    def bad(key: str, expected: str) -> PrototypeFileError:
        if key not in metadata:
            return PrototypeFileError(f"{label}: metadata lacks {key!r} ({expected}); {_REMAKE}")
        return PrototypeFileError(f"{label}: metadata {key!r} must be {expected}, got {metadata[key]!r}; {_REMAKE}")

    def whole(key: str, default: int | None = None, minimum: int = 0) -> int:
        value = metadata.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() \
                or value < minimum:
            raise bad(key, f"a whole number >= {minimum}")
        return int(value)

    def text(key: str, required: bool = False) -> str:
        value = metadata.get(key, None if required else "")
        if not isinstance(value, str) or (required and not value):
            raise bad(key, "a non-empty text" if required else "a text")
        return value

    def real(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    version = whole("format_version", 0)
    if version > FORMAT_VERSION:
        raise PrototypeFileError(
            f"{label}: written by a newer Protoscope (format {version}); this version reads format {FORMAT_VERSION}"
        )
    calibrated = metadata.get("calibrated_threshold")
    if calibrated is not None and not real(calibrated):
        raise bad("calibrated_threshold", "a finite number or null")
    intensity = metadata.get("intensity_range")
    if intensity is not None and not (isinstance(intensity, list) and len(intensity) == 2 and all(map(real, intensity))):
        raise bad("intensity_range", "two finite numbers [low, high] or null")
    if "config" not in metadata:
        raise bad("config", "the pipeline settings")
    try:
        config = PipelineConfig.from_dict(metadata["config"])
    except OptionError as error:
        raise PrototypeFileError(f"{label}: metadata 'config' is invalid: {error}; {_REMAKE}") from None
    return {
        "embed_dim": whole("embed_dim", None, 1),
        "backbone": text("backbone", required=True),
        "config": config,
        "weights_id": text("weights_id"),
        "source_file": text("source_file"),
        "channel": whole("channel", 0, -(2**31)),
        "timepoint": whole("timepoint", 0),
        "calibrated_threshold": None if calibrated is None else float(calibrated),
        "intensity_range": None if not intensity else (float(intensity[0]), float(intensity[1])),
        "created": text("created"),
        "backbone_label": text("backbone_label"),
        "source_channel_name": text("source_channel_name"),
        "lineage": _lineage(metadata.get("lineage", []), bad),
    }


def _lineage(value: object, bad: Callable[[str, str], PrototypeFileError]) -> tuple[dict, ...]:
    """The metadata's lineage entries ({source_file, channel, positive, negative, created}), checked."""
    expected = "a list of {source_file, channel, positive, negative, created} entries"
    if not isinstance(value, list):
        raise bad("lineage", expected)
    entries = []
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("source_file", ""), str) \
                or not isinstance(entry.get("created", ""), str):
            raise bad("lineage", expected)
        channel = entry.get("channel")
        counts = [entry.get("positive", 0), entry.get("negative", 0)]
        if (channel is not None and (isinstance(channel, bool) or not isinstance(channel, int))) or \
                any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
            raise bad("lineage", expected)
        entries.append({"source_file": entry.get("source_file", ""), "channel": channel, "positive": counts[0],
                        "negative": counts[1], "created": entry.get("created", "")})
    return tuple(entries)


def _float_values(array: np.ndarray, key: str, label: str) -> np.ndarray:
    """``array`` as float32 if it is a real float array without NaN or infinity, else PrototypeFileError."""
    if array.dtype.kind != "f":
        raise PrototypeFileError(f"{label}: {key} must hold real floating-point numbers, got dtype {array.dtype}; "
                                 f"{_REMAKE}")
    if not np.all(np.isfinite(array)):
        raise PrototypeFileError(f"{label}: {key} holds NaN or infinite values; {_REMAKE}")
    return array.astype(np.float32)


def _embedding_rows(array: np.ndarray, key: str, dim: int, label: str) -> np.ndarray:
    """(N, dim) float32 rows of an embedding array stored as (N, dim), (dim,) or empty."""
    values = _float_values(array, key, label)
    if values.size == 0:
        return np.zeros((0, dim), np.float32)
    if values.ndim not in (1, 2) or values.shape[-1] != dim:
        raise PrototypeFileError(f"{label}: {key} has shape {values.shape}, but its metadata says the embeddings are "
                                 f"{dim}-dimensional (expected (N, {dim})); {_REMAKE}")
    return values.reshape(-1, dim)


def _point_rows(array: np.ndarray, key: str, label: str) -> np.ndarray:
    """(N, 3) rows (x, y, z) of a points array: integers or finite floats, shape (N, 3) or empty."""
    if array.dtype.kind not in "iuf":
        raise PrototypeFileError(f"{label}: {key} must hold numbers, got dtype {array.dtype}; {_REMAKE}")
    if array.size == 0:
        return np.zeros((0, 3), np.int64)
    if array.ndim != 2 or array.shape[1] != 3:
        raise PrototypeFileError(f"{label}: {key} has shape {array.shape}, expected (N, 3) rows of x, y, z; {_REMAKE}")
    return array


def _pixel_arrays(optional: dict[str, np.ndarray], dim: int, label: str) -> dict[str, np.ndarray]:
    """The optional pixel-branch arrays, checked against each other and the embedding dimension."""
    values = {key: _float_values(array, key, label) for key, array in optional.items()}
    examples = [values[key] for key in _OPTIONAL_KEYS[:2] if key in values]
    if len(examples) == 1:
        raise PrototypeFileError(f"{label}: has only one of pixel_positive_examples and pixel_negative_examples; "
                                 f"{_REMAKE}")
    if examples and (any(e.ndim != 2 for e in examples) or examples[0].shape[1] != examples[1].shape[1]):
        raise PrototypeFileError(f"{label}: pixel examples must be (M, F) arrays with the same F, got shapes "
                                 f"{examples[0].shape} and {examples[1].shape}; {_REMAKE}")
    projection, mean = values.get("pixel_projection"), values.get("pixel_projection_mean")
    if (projection is None) != (mean is None):
        raise PrototypeFileError(f"{label}: has only one of pixel_projection and pixel_projection_mean; {_REMAKE}")
    if projection is not None and (projection.ndim != 2 or projection.shape[0] != dim or mean.shape != (dim,)):
        raise PrototypeFileError(f"{label}: pixel_projection {projection.shape} and pixel_projection_mean {mean.shape} "
                                 f"do not fit {dim}-dimensional embeddings (expected ({dim}, k) and ({dim},)); "
                                 f"{_REMAKE}")
    return values


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
