"""On-disk cache of patch embeddings, so that a stack is embedded once per backbone and setting.

Layout: one HDF5 file per cache key in the cache directory, ``<digest>.h5``, holding one float16 dataset
per slice (``slices/<z>``, a single chunk each) and the full key as JSON in the root attribute ``key``.
The key combines the file identity (resolved path, size, modification time and a SHA-256 of the first
4 MiB), the channel, the time point, the backbone signature (name, weights id, precision, interpolation)
and the preprocessing signature. A file whose stored key differs from the expected key (a stale or
colliding entry), or that cannot be read, is never used: it is treated as a miss and replaced.

Several processes may share a directory: writes hold an exclusive ``flock`` on ``<digest>.lock`` and
reads a shared one, and every access opens and closes the HDF5 file.

Beside the embeddings, the same directory keeps best mode's per-stack pixel-feature statistics, one JSON file
per `StatisticsKey` (``<digest>.stats.json``: the key and the (F,) mean and std as numbers; written atomically,
so readers see the old file or the new one, never half of one), and best mode's stack-wide intensity range, one
JSON file per `RangeKey` (``<digest>.range.json``: the key and the (low, high) range), written the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from core.errors import CacheError, OutputError
from core.io.atomic import write_text

_HEAD_BYTES = 4 * 1024 * 1024
CACHE_FORMAT = "protoscope-embedding-cache-v1"
STATS_FORMAT = "protoscope-pixel-statistics-v1"
RANGE_FORMAT = "protoscope-intensity-range-v1"


def default_cache_dir() -> Path:
    """$PROTOSCOPE_CACHE, else ~/.cache/protoscope/embeddings."""
    env = os.environ.get("PROTOSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return base / "protoscope" / "embeddings"


def file_signature(path: str | Path) -> str:
    """Identity of a data file: resolved path, size, mtime (ns) and SHA-256 of its first 4 MiB.

    A folder (image-folder stacks) hashes the sorted names, sizes and mtimes of its entries instead.
    """
    path = Path(path).resolve()
    status = path.stat()
    digest = hashlib.sha256()
    if path.is_dir():
        for entry in sorted(path.iterdir()):
            if entry.is_file():
                entry_status = entry.stat()
                digest.update(f"{entry.name}:{entry_status.st_size}:{entry_status.st_mtime_ns};".encode())
    else:
        with open(path, "rb") as stream:
            digest.update(stream.read(_HEAD_BYTES))
    return f"{path}|{status.st_size}|{status.st_mtime_ns}|{digest.hexdigest()[:32]}"


@dataclass(frozen=True)
class CacheKey:
    """What an embedding depends on."""

    file_signature: str
    channel: int
    timepoint: int
    backbone: str
    preprocess: str

    def as_json(self) -> str:
        return json.dumps({"format": CACHE_FORMAT, **asdict(self)}, sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.as_json().encode()).hexdigest()[:32]


@dataclass(frozen=True)
class StatisticsKey:
    """What a stack's pixel-feature statistics depend on (best mode's standardisation).

    file_signature : the stack's identity (`file_signature`). preprocess : the preprocessing signature,
    stack-wide intensity range included. max_side : working resolution (px). filters : the filter bank's
    signature. method : how the statistics were sampled (exact or a subsample, with its parameters).
    """

    file_signature: str
    channel: int
    timepoint: int
    preprocess: str
    max_side: int
    filters: str
    method: str

    def as_json(self) -> str:
        return json.dumps({"format": STATS_FORMAT, **asdict(self)}, sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.as_json().encode()).hexdigest()[:32]


@dataclass(frozen=True)
class RangeKey:
    """What a stack's stack-wide intensity range depends on (best mode's normalisation).

    file_signature : the stack's identity (`file_signature`). percentiles : (low, high) clip percentiles in %.
    method : how the range was sampled (whole slices or windows, with the parameters; see
    `core.features.embedding.range_method`).
    """

    file_signature: str
    channel: int
    timepoint: int
    percentiles: tuple[float, float]
    method: str

    def as_json(self) -> str:
        record = {"format": RANGE_FORMAT, **asdict(self)}
        record["percentiles"] = [float(p) for p in self.percentiles]
        return json.dumps(record, sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.as_json().encode()).hexdigest()[:32]


class EmbeddingCache:
    """Directory of cached slice embeddings. ``get`` returns (h, w, D) float32 or None; ``put`` stores one."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CacheError(f"cannot create the embedding cache folder {self.directory}: {error.strerror}") from None
        if not os.access(self.directory, os.W_OK):
            raise CacheError(f"the embedding cache folder {self.directory} is not writable; choose another with --cache DIR")

    def _paths(self, key: CacheKey) -> tuple[Path, Path]:
        digest = key.digest()
        return self.directory / f"{digest}.h5", self.directory / f"{digest}.lock"

    @contextlib.contextmanager
    def _locked(self, key: CacheKey, exclusive: bool) -> Iterator[Path]:
        data_path, lock_path = self._paths(key)
        with open(lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield data_path
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _key_matches(handle: h5py.File, key: CacheKey) -> bool:
        stored = handle.attrs.get("key")
        if isinstance(stored, bytes):
            stored = stored.decode()
        return stored == key.as_json()

    def get(self, key: CacheKey, z: int) -> np.ndarray | None:
        """Cached (h, w, D) float32 embedding of slice z, or None (missing, stale or unreadable)."""
        with self._locked(key, exclusive=False) as data_path:
            if not data_path.exists():
                return None
            try:
                with h5py.File(data_path, "r", locking=False) as handle:
                    if not self._key_matches(handle, key):
                        return None
                    name = f"slices/{int(z)}"
                    if name not in handle:
                        return None
                    return handle[name][()].astype(np.float32)
            except (OSError, KeyError, ValueError):
                return None

    def cached_slices(self, key: CacheKey) -> set[int]:
        """The z indices already cached under ``key``."""
        with self._locked(key, exclusive=False) as data_path:
            if not data_path.exists():
                return set()
            try:
                with h5py.File(data_path, "r", locking=False) as handle:
                    if not self._key_matches(handle, key) or "slices" not in handle:
                        return set()
                    return {int(name) for name in handle["slices"]}
            except (OSError, ValueError):
                return set()

    def put(self, key: CacheKey, z: int, embedding: np.ndarray) -> None:
        """Store slice z's (h, w, D) embedding as float16 (replacing a stale or broken file)."""
        array = np.asarray(embedding, dtype=np.float16)
        if array.ndim != 3:
            raise ValueError(f"expected an (h, w, D) embedding, got shape {array.shape}")
        with self._locked(key, exclusive=True) as data_path:
            handle = self._open_for_write(data_path, key)
            with handle:
                name = f"slices/{int(z)}"
                if name in handle:
                    del handle[name]
                handle.create_dataset(name, data=array, chunks=array.shape)

    def _open_for_write(self, data_path: Path, key: CacheKey) -> h5py.File:
        if data_path.exists():
            try:
                handle = h5py.File(data_path, "a", locking=False)
                if self._key_matches(handle, key):
                    return handle
                handle.close()
            except (OSError, ValueError):
                pass
            data_path.unlink(missing_ok=True)
        try:
            handle = h5py.File(data_path, "w", locking=False, libver="latest")
        except OSError as error:
            raise CacheError(f"cannot write the embedding cache file {data_path}: {error}") from None
        handle.attrs["key"] = key.as_json()
        return handle

    # ---- per-stack pixel statistics ---------------------------------------------------------------------

    def _statistics_path(self, key: StatisticsKey) -> Path:
        return self.directory / f"{key.digest()}.stats.json"

    def get_statistics(self, key: StatisticsKey) -> tuple[np.ndarray, np.ndarray] | None:
        """Stored (mean, std), each (F,) float32, or None (missing, stale, unreadable or malformed)."""
        try:
            record = json.loads(self._statistics_path(key).read_text(encoding="utf-8"))
            if record.get("key") != json.loads(key.as_json()):
                return None
            mean = np.asarray(record["mean"], dtype=np.float32)
            std = np.asarray(record["std"], dtype=np.float32)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        if mean.ndim != 1 or mean.shape != std.shape or not (np.isfinite(mean).all() and np.isfinite(std).all()):
            return None
        return mean, std

    def put_statistics(self, key: StatisticsKey, mean: np.ndarray, std: np.ndarray) -> None:
        """Store (F,) mean and std; float32 values survive the JSON round trip exactly."""
        mean32, std32 = np.asarray(mean, np.float32).ravel(), np.asarray(std, np.float32).ravel()
        if mean32.shape != std32.shape:
            raise ValueError(f"mean and std differ in length: {mean32.shape} vs {std32.shape}")
        record = {"key": json.loads(key.as_json()), "mean": [float(v) for v in mean32],
                  "std": [float(v) for v in std32]}
        try:
            write_text(self._statistics_path(key), json.dumps(record), overwrite=True)
        except (OutputError, OSError) as error:
            raise CacheError(f"cannot write the statistics cache file {self._statistics_path(key)}: {error}") from None

    # ---- per-stack intensity range ----------------------------------------------------------------------

    def _range_path(self, key: RangeKey) -> Path:
        return self.directory / f"{key.digest()}.range.json"

    def get_range(self, key: RangeKey) -> tuple[float, float] | None:
        """Stored (low, high) intensities, or None (missing, stale, unreadable or malformed)."""
        try:
            record = json.loads(self._range_path(key).read_text(encoding="utf-8"))
            if record.get("key") != json.loads(key.as_json()):
                return None
            low, high = record["low"], record["high"]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in (low, high)):
            return None
        return float(low), float(high)

    def put_range(self, key: RangeKey, low: float, high: float) -> None:
        """Store (low, high); Python floats survive the JSON round trip exactly."""
        record = {"key": json.loads(key.as_json()), "low": float(low), "high": float(high)}
        try:
            write_text(self._range_path(key), json.dumps(record), overwrite=True)
        except (OutputError, OSError) as error:
            raise CacheError(f"cannot write the intensity-range cache file {self._range_path(key)}: {error}") from None

    def clear(self) -> int:
        """Delete every cache file in the directory; returns how many were removed."""
        removed = 0
        for path in [*self.directory.glob("*.h5"), *self.directory.glob("*.stats.json"),
                     *self.directory.glob("*.range.json")]:
            path.unlink(missing_ok=True)
            removed += 1
        for path in self.directory.glob("*.lock"):
            path.unlink(missing_ok=True)
        return removed

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for pattern in ("*.h5", "*.stats.json", "*.range.json")
                   for path in self.directory.glob(pattern))
