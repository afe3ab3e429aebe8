"""A user's work on one sample, kept on disk so that a reload, a dropped connection or a restart loses nothing.

A ``Workspace`` holds the sample (path, size + mtime signature, image channel, ground truth), the settings (mode,
pipeline options, backbone, the app's bound widget values), the clicked points per channel and slice, the saved
prototypes (their pickle-free ``.npz`` bytes, core.prototypes), the trained refinement models (safetensors bytes
and a little metadata) and the last batch result (the per-slice areas and the paths of the files it wrote, not
the masks), and a batch running on a Dask cluster (``BatchJob``: where its output is; its progress is read from
there). It lives in ``<root>/<id>/``::

    workspace.json              schema version and everything JSON-able
    prototypes/<sha256>.npz     one file per prototype, named by its content: written once, never rewritten
    models/<sha256>.safetensors one file per model, likewise
    lease.json                  which session has the workspace open (owner token, heartbeat time)

Every write goes through core.io.atomic, so a crash leaves the previous ``workspace.json`` in place; nothing is
pickled. Two sessions never overwrite each other: a live lease of another owner refuses ``acquire_lease`` and
``save_workspace`` with ``WorkspaceConflict``, and a save whose workspace was saved by someone else since it was
loaded (its ``revision`` moved on) is refused too. ``export_workspace`` / ``import_workspace`` move a workspace
between machines as one ``.zip``. See docs/workspace.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import socket
import threading
import time
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock between threads of one server remains
    fcntl = None

from core.batch import BatchResult
from core.errors import PrototypeError, WorkspaceConflict, WorkspaceError
from core.io.atomic import write_bytes, write_text
from core.prototypes import PointSet, Prototype, load_prototype

__all__ = [
    "SCHEMA_VERSION", "LEASE_TTL_S", "MAX_MEMBER_BYTES", "WorkspaceError", "WorkspaceConflict", "SampleRef",
    "Settings", "StoredPrototype", "StoredModel", "BatchRecord", "BatchJob", "Workspace", "WorkspaceInfo", "Lease",
    "default_root", "new_id", "check_id", "save_workspace", "load_workspace", "find_workspaces", "export_workspace",
    "import_workspace", "repoint_sample", "workspace_digest", "summarize", "read_lease", "acquire_lease",
    "release_lease", "lease_is_live",
]

FORMAT = "protoscope-workspace"
SCHEMA_VERSION = 1
#: A lease whose heartbeat is older than this (seconds) may be taken over (unless its owner is known to be alive).
LEASE_TTL_S = 30.0
#: Largest single file accepted from an imported workspace archive (bytes).
MAX_MEMBER_BYTES = 256 * 1024 * 1024
#: Most files an imported archive may hold.
MAX_MEMBERS = 4096
_ID = re.compile(r"^[a-z0-9]{8,32}$")
_JSON = "workspace.json"
_LEASE = "lease.json"
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)  # fixed member times: the same workspace exports to the same bytes


# ---- the data ----------------------------------------------------------------------------------------------


def file_signature(path: str | Path) -> tuple[int, int] | None:
    """(size in bytes, mtime in ns) of a file or folder, or None when it does not exist."""
    try:
        status = Path(path).stat()
    except OSError:
        return None
    return int(status.st_size), int(status.st_mtime_ns)


@dataclass(frozen=True)
class SampleRef:
    """The opened stack: resolved path, display name, how it was opened ('demo' | 'path' | 'upload'), its
    signature when the work was saved (size in bytes, mtime in ns), the image channel and the ground truth
    (a channel of the stack, or a mask file; both None without one)."""

    path: str
    name: str = ""
    origin: str = "path"
    size: int | None = None
    mtime_ns: int | None = None
    channel: int = 0
    truth_channel: int | None = None
    truth_path: str | None = None

    @classmethod
    def of(cls, path: str | Path, **fields: Any) -> "SampleRef":
        """A SampleRef of ``path`` with its current signature (None fields when the file is absent)."""
        signature = file_signature(path) or (None, None)
        return cls(str(path), size=signature[0], mtime_ns=signature[1], **fields)

    @property
    def status(self) -> str:
        """'ok', 'missing' (no such file here: ask for its new place) or 'changed' (another size or mtime)."""
        signature = file_signature(self.path)
        if signature is None:
            return "missing"
        if self.size is not None and (signature[0] != self.size or signature[1] != self.mtime_ns) \
                and not Path(self.path).is_dir():
            return "changed"
        return "ok"


@dataclass(frozen=True)
class Settings:
    """mode ('best' | 'thesis'), options (advanced pipeline options, JSON values), backbone (name, weights,
    seed; None for the default) and ui (the app's bound widget values, JSON values)."""

    mode: str = "best"
    options: Mapping[str, Any] = field(default_factory=dict)
    backbone: Mapping[str, Any] | None = None
    ui: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredPrototype:
    """A saved prototype: its name, the ``.npz`` file content (core.prototypes) and an opaque tag (the app's
    stack id). sha256 is filled from ``data`` when not given (pass it to skip hashing a known file)."""

    name: str
    data: bytes = field(repr=False)
    tag: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", hashlib.sha256(self.data).hexdigest())

    def prototype(self) -> Prototype:
        """The Prototype (PrototypeFileError naming this prototype when the bytes are not a prototype file)."""
        return load_prototype(self.data, name=f"prototype '{self.name}'")


@dataclass(frozen=True)
class StoredModel:
    """A trained refinement model: name, the safetensors file content and JSON metadata (summary, input set)."""

    name: str
    data: bytes = field(repr=False)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", hashlib.sha256(self.data).hexdigest())


@dataclass(frozen=True)
class BatchRecord:
    """The last batch run: core's BatchResult (areas per slice, voxel facts), the stack's name, the output
    folder, the files written (format key -> path; 'csv' for the areas) and the threshold used."""

    stack_name: str
    result: BatchResult
    folder: str = ""
    files: Mapping[str, str] = field(default_factory=dict)
    threshold: str = ""


@dataclass(frozen=True)
class BatchJob:
    """A batch submitted to a Dask cluster, which runs on without the app (core.cluster): its OME-Zarr output
    (``store``; progress and results are read from there, ``core.cluster.read_progress``), the run that writes it,
    the scheduler's address, and what finishing it needs: the stack (name, path, image channel), the prototype's
    name, the formats to export (keys of the app's formats), the threshold used, the output files' base name
    (``<folder of store>/<base_name><suffix>``), the digest of the settings that made it (``inputs``) and when it
    was submitted (epoch seconds)."""

    store: str
    run_id: str = ""
    scheduler: str = ""
    stack_name: str = ""
    stack_path: str = ""
    channel: int = 0
    prototype_name: str = ""
    formats: tuple[str, ...] = ()
    threshold: str = ""
    base_name: str = ""
    inputs: str = ""
    submitted: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(str(f) for f in self.formats))


Points = Mapping[int, Mapping[int, tuple[tuple[int, ...], ...]]]
"""channel -> slice z -> points in click order, each (x, y, label[, ...]) ints; label +1 positive, -1 negative."""


@dataclass(frozen=True)
class Workspace:
    """The work on one sample (see the module docstring). ``revision`` counts saves (0: never saved);
    created and modified are epoch seconds."""

    id: str
    sample: SampleRef | None = None
    settings: Settings = field(default_factory=Settings)
    points: Points = field(default_factory=dict)
    prototypes: tuple[StoredPrototype, ...] = ()
    models: tuple[StoredModel, ...] = ()
    batch: BatchRecord | None = None
    revision: int = 0
    created: float = 0.0
    modified: float = 0.0
    batch_job: BatchJob | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", normalize_points(self.points))
        object.__setattr__(self, "prototypes", tuple(self.prototypes))
        object.__setattr__(self, "models", tuple(self.models))
        for kind, items in (("prototype", self.prototypes), ("model", self.models)):
            names = [item.name for item in items]
            if len(set(names)) != len(names):
                raise WorkspaceError(f"two {kind}s of workspace {self.id} share a name; rename one of them")

    @property
    def sample_status(self) -> str:
        """'none' without a sample, else SampleRef.status: 'ok', 'missing' (re-point it) or 'changed'."""
        return "none" if self.sample is None else self.sample.status

    def point_set(self, channel: int) -> PointSet:
        """The points of one channel as a core PointSet ((N, 3) x, y, z per class)."""
        per_slice = self.points.get(int(channel), {})
        rows = [(p[0], p[1], z, p[2]) for z, pts in sorted(per_slice.items()) for p in pts]
        positive = [r[:3] for r in rows if r[3] > 0]
        negative = [r[:3] for r in rows if r[3] < 0]
        return PointSet(np.asarray(positive, np.int64).reshape(-1, 3), np.asarray(negative, np.int64).reshape(-1, 3))


class WorkspaceInfo(NamedTuple):
    """One row of ``find_workspaces``: id, modified (epoch seconds) and a one-line summary."""

    id: str
    modified: float
    summary: str


def normalize_points(points: Mapping) -> dict[int, dict[int, tuple[tuple[int, ...], ...]]]:
    """Points as {channel: {z: ((x, y, label, ...), ...)}} of ints (keys may be int-like strings); empty slices
    dropped. WorkspaceError for anything else."""
    out: dict[int, dict[int, tuple[tuple[int, ...], ...]]] = {}
    try:
        for channel, per_slice in points.items():
            slices = {}
            for z, pts in per_slice.items():
                rows = tuple(tuple(_whole(v) for v in p) for p in pts)
                if any(len(r) < 3 for r in rows):
                    raise ValueError(f"a point of slice {z} is not [x, y, label]")
                if rows:
                    slices[_whole(z)] = rows
            if slices:
                out[_whole(channel)] = slices
    except (AttributeError, TypeError, ValueError) as error:
        raise WorkspaceError(f"points must map channel -> slice -> [[x, y, label], ...] of whole numbers ({error})") \
            from None
    return out


def _whole(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a whole number")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{value!r} is not a whole number")


def summarize(ws: Workspace) -> str:
    """'sample.tif · 12 points on 3 slices · 2 prototypes · 1 model · batch of 40 slices'."""
    name = (ws.sample.name or Path(ws.sample.path).name) if ws.sample is not None else "no sample"
    return _summary(name, ws.points, len(ws.prototypes), len(ws.models),
                    len(ws.batch.result.z_values) if ws.batch is not None else None)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


def _summary(name: str, points: Points, n_prototypes: int, n_models: int, batch_slices: int | None) -> str:
    n_points = sum(len(pts) for per_slice in points.values() for pts in per_slice.values())
    n_slices = sum(len(per_slice) for per_slice in points.values())
    parts = [name, f"{_plural(n_points, 'point')} on {_plural(n_slices, 'slice')}", _plural(n_prototypes, "prototype")]
    if n_models:
        parts.append(_plural(n_models, "model"))
    if batch_slices is not None:
        parts.append(f"batch of {_plural(batch_slices, 'slice')}")
    return " · ".join(parts)


# ---- where ------------------------------------------------------------------------------------------------


def default_root() -> Path | None:
    """$PROTOSCOPE_WORKSPACES, else $XDG_CACHE_HOME or ~/.cache, /protoscope/workspaces; None when the variable
    is 'off' (no workspaces are kept)."""
    text = os.environ.get("PROTOSCOPE_WORKSPACES", "").strip()
    if text.lower() in ("off", "none", "0", "false"):
        return None
    if text:
        return Path(text).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return base / "protoscope" / "workspaces"


def new_id() -> str:
    """A fresh workspace id: 16 lower-case hex digits."""
    return uuid.uuid4().hex[:16]


def check_id(workspace_id: str) -> str:
    """``workspace_id`` if it is 8-32 lower-case letters and digits (it names a folder), else WorkspaceError."""
    if not isinstance(workspace_id, str) or not _ID.match(workspace_id):
        raise WorkspaceError(f"{workspace_id!r} is not a workspace id (8-32 lower-case letters and digits); "
                             "open the app without ?ws= to start a new workspace")
    return workspace_id


def _folder(root: str | Path, workspace_id: str) -> Path:
    return Path(root).expanduser() / check_id(workspace_id)


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive access to a workspace folder: a lock per folder between threads of this process (Streamlit
    sessions), ``flock`` on the folder between processes. The folder is created if missing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WorkspaceError(f"cannot create the workspace folder '{folder}' ({error.strerror}); set "
                             "PROTOSCOPE_WORKSPACES to a folder you can write to") from None
    with _THREAD_LOCKS_GUARD:
        lock = _THREAD_LOCKS.setdefault(str(folder.resolve()), threading.Lock())
    with lock:
        if fcntl is None:
            yield
            return
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


# ---- leases -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """Who has a workspace open: owner token, heartbeat and since (epoch seconds), host and process id."""

    owner: str
    heartbeat: float
    since: float
    host: str = ""
    pid: int = 0

    def describe(self) -> str:
        return f"since {time.strftime('%H:%M', time.localtime(self.since))}"


AliveProbe = Callable[[Lease], "bool | None"]
"""Whether a lease's owner is alive: True (alive, whatever its heartbeat), False (gone), None (unknown)."""


def _pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists (another user's process), or no safe probe
    return True


def lease_is_live(lease: Lease, now: float | None = None, ttl_s: float = LEASE_TTL_S,
                  is_alive: AliveProbe | None = None) -> bool:
    """Whether ``lease`` still holds: its owner is alive by ``is_alive``, or (probe unknown) its process on this
    host runs and its heartbeat is at most ``ttl_s`` seconds old."""
    verdict = is_alive(lease) if is_alive is not None else None
    if verdict is not None:
        return bool(verdict)
    if lease.host == socket.gethostname() and not _pid_running(lease.pid):
        return False  # the server that held it is gone (a restart)
    now = time.time() if now is None else now
    return now - lease.heartbeat <= ttl_s


def _read_lease_file(folder: Path) -> Lease | None:
    try:
        data = json.loads((folder / _LEASE).read_text(encoding="utf-8"))
        return Lease(str(data["owner"]), float(data["heartbeat"]), float(data["since"]), str(data.get("host", "")),
                     int(data.get("pid", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or damaged: nobody holds it


def read_lease(root: str | Path, workspace_id: str) -> Lease | None:
    """The lease of a workspace, or None when nobody holds it (no or unreadable lease.json)."""
    return _read_lease_file(_folder(root, workspace_id))


def _take(folder: Path, workspace_id: str, owner: str, now: float, ttl_s: float, take_over: bool,
          is_alive: AliveProbe | None) -> Lease:
    """acquire_lease inside the folder lock."""
    held = _read_lease_file(folder)
    if held is not None and held.owner != owner and not take_over and lease_is_live(held, now, ttl_s, is_alive):
        raise WorkspaceConflict(
            f"workspace {workspace_id} is open in another tab or session {held.describe()}; open it read-only, "
            "take it over, or start a new workspace", held)
    since = held.since if held is not None and held.owner == owner else now
    lease = Lease(owner, now, since, socket.gethostname(), os.getpid())
    write_text(folder / _LEASE, json.dumps(dataclasses.asdict(lease)), overwrite=True)
    return lease


def acquire_lease(root: str | Path, workspace_id: str, owner: str, now: float | None = None,
                  ttl_s: float = LEASE_TTL_S, *, take_over: bool = False, is_alive: AliveProbe | None = None) -> Lease:
    """Hold (or renew) the lease of a workspace for ``owner`` (a session token); returns the new Lease.

    A lease of another owner that is live (``lease_is_live``: heartbeat at most ``ttl_s`` seconds old, or its
    owner alive by ``is_alive``) raises WorkspaceConflict, unless ``take_over``; a stale one is taken over.
    """
    now = time.time() if now is None else float(now)
    folder = _folder(root, workspace_id)
    with _locked(folder):
        return _take(folder, workspace_id, owner, now, ttl_s, take_over, is_alive)


def release_lease(root: str | Path, workspace_id: str, owner: str) -> bool:
    """Give the lease up if ``owner`` holds it (the workspace becomes free at once); whether it was released."""
    folder = _folder(root, workspace_id)
    if not folder.is_dir():
        return False
    with _locked(folder):
        held = _read_lease_file(folder)
        if held is None or held.owner != owner:
            return False
        (folder / _LEASE).unlink(missing_ok=True)
        return True


# ---- JSON document ----------------------------------------------------------------------------------------


def _prototype_file(item: StoredPrototype) -> str:
    return f"prototypes/{item.sha256}.npz"


def _model_file(item: StoredModel) -> str:
    return f"models/{item.sha256}.safetensors"


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _batch_document(record: BatchRecord) -> dict:
    result = record.result
    return {
        "stack_name": record.stack_name, "folder": record.folder, "files": dict(record.files),
        "threshold": record.threshold, "z_values": [int(z) for z in result.z_values],
        "area_px": [int(a) for a in result.area_px], "thresholds": [_finite_or_none(t) for t in result.thresholds],
        "pixel_area_um2": result.pixel_area_um2, "z_step_um": result.z_step_um, "cancelled": bool(result.cancelled),
        "seconds": float(result.seconds),
    }


def _job_document(job: BatchJob) -> dict:
    document = dataclasses.asdict(job)
    document["formats"] = list(job.formats)
    return document


def _document(ws: Workspace) -> dict:
    sample = dataclasses.asdict(ws.sample) if ws.sample is not None else None
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "id": ws.id,
        "revision": ws.revision,
        "created": ws.created,
        "modified": ws.modified,
        "sample": sample,
        "settings": {"mode": ws.settings.mode, "options": dict(ws.settings.options),
                     "backbone": dict(ws.settings.backbone) if ws.settings.backbone is not None else None,
                     "ui": dict(ws.settings.ui)},
        "points": {str(c): {str(z): [list(p) for p in pts] for z, pts in sorted(per_slice.items())}
                   for c, per_slice in sorted(ws.points.items())},
        "prototypes": [{"name": p.name, "tag": p.tag, "sha256": p.sha256, "file": _prototype_file(p)}
                       for p in ws.prototypes],
        "models": [{"name": m.name, "metadata": dict(m.metadata), "sha256": m.sha256, "file": _model_file(m)}
                   for m in ws.models],
        "batch": _batch_document(ws.batch) if ws.batch is not None else None,
        "batch_job": _job_document(ws.batch_job) if ws.batch_job is not None else None,
    }


def _dumps(document: dict, where: str) -> str:
    try:
        return json.dumps(document, ensure_ascii=False, indent=1, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise WorkspaceError(f"{where}: the work holds a value JSON cannot store ({error}); this is a bug, please "
                             "report it") from None


def workspace_digest(ws: Workspace) -> str:
    """A cheap fingerprint of the work (not of id, revision or times): equal digests, nothing to save."""
    document = _document(ws)
    for key in ("id", "revision", "created", "modified"):
        document.pop(key)
    return hashlib.sha1(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


def _check_header(document: Any, where: str) -> dict:
    """The parsed workspace.json, checked to be ours and of a schema this version reads."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise WorkspaceError(f"{where} is not a Protoscope workspace (no \"format\": \"{FORMAT}\"); choose a "
                             "workspace file exported by Protoscope")
    version = document.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise WorkspaceError(f"{where}: schema_version {version!r} is not a positive whole number; the file is damaged")
    if version > SCHEMA_VERSION:
        raise WorkspaceError(f"{where} was written by a newer Protoscope (workspace schema {version}; this version "
                             f"reads {SCHEMA_VERSION}); update Protoscope to open it")
    return document


def _sample_from(data: Any) -> SampleRef | None:
    if data is None:
        return None
    fields = {f.name for f in dataclasses.fields(SampleRef)}
    if not isinstance(data, dict) or not isinstance(data.get("path"), str):
        raise ValueError("'sample' needs a 'path'")
    return SampleRef(**{k: v for k, v in data.items() if k in fields})


def _batch_from(data: Any) -> BatchRecord | None:
    if data is None:
        return None
    thresholds = [float("nan") if t is None else float(t) for t in data.get("thresholds", [])]
    result = BatchResult([int(z) for z in data["z_values"]], [int(a) for a in data.get("area_px", [])], thresholds,
                         data.get("pixel_area_um2"), data.get("z_step_um"), bool(data.get("cancelled", False)),
                         float(data.get("seconds", 0.0)))
    files = data.get("files") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ValueError("batch 'files' must map format keys to paths")
    return BatchRecord(str(data.get("stack_name", "")), result, str(data.get("folder", "")), dict(files),
                       str(data.get("threshold", "")))


def _job_from(data: Any) -> BatchJob | None:
    """A BatchJob from its document (None when absent: workspaces saved before cluster jobs existed)."""
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("store"), str):
        raise ValueError("'batch_job' needs the path of its output ('store')")
    formats = data.get("formats") or []
    if not isinstance(formats, list) or not all(isinstance(f, str) for f in formats):
        raise ValueError("batch_job 'formats' must be a list of format keys")
    return BatchJob(data["store"], str(data.get("run_id", "")), str(data.get("scheduler", "")),
                    str(data.get("stack_name", "")), str(data.get("stack_path", "")), int(data.get("channel", 0)),
                    str(data.get("prototype_name", "")), tuple(formats), str(data.get("threshold", "")),
                    str(data.get("base_name", "")), str(data.get("inputs", "")), float(data.get("submitted", 0.0)))


def _check_prototype_bytes(data: bytes, where: str) -> None:
    """WorkspaceError unless ``data`` is a pickle-free prototype .npz (object arrays are refused unread)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as stream:
                    version = np.lib.format.read_magic(stream)
                    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)(stream)
                if header[2].hasobject:
                    raise WorkspaceError(f"{where}: array '{info.filename}' holds Python objects (a pickle); "
                                         "workspaces never load pickles, so this file is refused")
    except WorkspaceError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise WorkspaceError(f"{where} is not a readable prototype .npz ({error})") from None
    try:
        load_prototype(data, name=where)
    except PrototypeError as error:
        raise WorkspaceError(f"{error}") from None


def _check_safetensors(data: bytes, where: str) -> None:
    """WorkspaceError unless ``data`` is a well-formed safetensors file (header JSON, tensors inside the file)."""
    if len(data) < 8:
        raise WorkspaceError(f"{where} is not a safetensors model file (only {len(data)} bytes)")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise WorkspaceError(f"{where} is not a safetensors model file (its header announces {length} bytes, the "
                             f"file has {len(data)})")
    try:
        header = json.loads(data[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WorkspaceError(f"{where} is not a safetensors model file (header: {error})") from None
    body = len(data) - 8 - length
    if not isinstance(header, dict):
        raise WorkspaceError(f"{where} is not a safetensors model file (header is not an object)")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= body):
            raise WorkspaceError(f"{where}: tensor {name!r} lies outside the file; the model file is damaged")


def _from_document(document: dict, where: str, read: Callable[[str], bytes], *, verify: bool) -> Workspace:
    """A Workspace from its checked JSON document; ``read(relative path)`` gives the prototype and model files.

    verify : check every file's SHA-256 and format (files from an archive); files of our own folder are checked by
    their SHA-256 only.
    """
    try:
        settings = document.get("settings") or {}
        prototypes, models = [], []
        for entry in document.get("prototypes") or []:
            data = read(entry["file"])
            item = StoredPrototype(str(entry["name"]), data, str(entry.get("tag", "")))
            _check_digest(item.sha256, entry, where)
            if verify:
                _check_prototype_bytes(data, f"{where}: {entry['file']} (prototype '{entry['name']}')")
            prototypes.append(item)
        for entry in document.get("models") or []:
            data = read(entry["file"])
            metadata = entry.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise ValueError(f"model '{entry['name']}' metadata is not an object")
            item = StoredModel(str(entry["name"]), data, metadata)
            _check_digest(item.sha256, entry, where)
            if verify:
                _check_safetensors(data, f"{where}: {entry['file']} (model '{entry['name']}')")
            models.append(item)
        options, ui = settings.get("options") or {}, settings.get("ui") or {}
        backbone = settings.get("backbone")
        if not isinstance(options, dict) or not isinstance(ui, dict) or not isinstance(backbone, (dict, type(None))):
            raise ValueError("'settings' holds options, backbone and ui as objects")
        return Workspace(
            id=check_id(str(document["id"])),
            sample=_sample_from(document.get("sample")),
            settings=Settings(str(settings.get("mode", "best")), options, backbone, ui),
            points=document.get("points") or {},
            prototypes=tuple(prototypes),
            models=tuple(models),
            batch=_batch_from(document.get("batch")),
            revision=int(document.get("revision", 0)),
            created=float(document.get("created", 0.0)),
            modified=float(document.get("modified", 0.0)),
            batch_job=_job_from(document.get("batch_job")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        if isinstance(error, WorkspaceError):
            raise
        detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise WorkspaceError(f"{where} is damaged ({detail}); start a new workspace, or import an exported copy") \
            from None


def _check_digest(actual: str, entry: dict, where: str) -> None:
    if entry.get("sha256") and entry["sha256"] != actual:
        raise WorkspaceError(f"{where}: {entry['file']} does not match its recorded SHA-256 (the file was changed or "
                             "damaged); start a new workspace, or import an exported copy")


# ---- save and load ----------------------------------------------------------------------------------------


def _read_document(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkspaceError(f"workspace {path.parent.name} does not exist in {path.parent.parent} (no {path.name})") \
            from None
    except (OSError, UnicodeDecodeError) as error:
        raise WorkspaceError(f"{path} cannot be read ({error}); check its permissions") from None
    try:
        return _check_header(json.loads(text), str(path))
    except json.JSONDecodeError as error:
        raise WorkspaceError(f"{path} is not valid JSON ({error}); the workspace is damaged: start a new workspace, "
                             "or import an exported copy") from None


def _write_once(path: Path, data: bytes) -> None:
    """Write a content-named file unless it is already there complete (files are never rewritten)."""
    if path.is_file() and path.stat().st_size == len(data):
        return
    write_bytes(path, data, overwrite=True)


def _prune(folder: Path, keep: set[str]) -> None:
    """Remove prototype and model files no entry refers to any more (deleted or renamed work)."""
    for sub in ("prototypes", "models"):
        for path in (folder / sub).glob("*") if (folder / sub).is_dir() else ():
            if f"{sub}/{path.name}" not in keep and path.is_file() and not path.name.startswith("."):
                path.unlink(missing_ok=True)


def save_workspace(ws: Workspace, root: str | Path, *, owner: str | None = None, now: float | None = None,
                   ttl_s: float = LEASE_TTL_S, is_alive: AliveProbe | None = None) -> Workspace:
    """Write ``ws`` under ``root/<id>/`` and return it with its new revision and modified time.

    Only what changed is written: workspace.json always (atomically), a prototype or model file only when it is
    not there yet (files are named by their SHA-256). With ``owner``, the save first holds the lease
    (``acquire_lease``): another live owner raises WorkspaceConflict. A workspace saved by someone else since
    ``ws`` was loaded or last saved (the folder's revision is not ``ws.revision``) raises WorkspaceConflict too,
    as does a folder whose workspace.json is unreadable or of a newer schema (it is left as it is).
    """
    now = time.time() if now is None else float(now)
    folder = _folder(root, ws.id)
    with _locked(folder):
        if owner is not None:
            _take(folder, ws.id, owner, now, ttl_s, False, is_alive)
        path = folder / _JSON
        if path.exists():
            on_disk = _read_document(path)
            revision = on_disk.get("revision")
            if revision != ws.revision:
                raise WorkspaceConflict(
                    f"workspace {ws.id} was saved by another tab or session since this one loaded it (revision "
                    f"{revision}, this session has {ws.revision}); it was not overwritten: reload it, or start a new "
                    "workspace with this session's work")
            created = float(on_disk.get("created") or now)
        else:
            created = ws.created or now
        for item in ws.prototypes:
            _write_once(folder / _prototype_file(item), item.data)
        for item in ws.models:
            _write_once(folder / _model_file(item), item.data)
        saved = dataclasses.replace(ws, revision=ws.revision + 1, created=created, modified=now)
        write_text(path, _dumps(_document(saved), str(path)), overwrite=True)
        _prune(folder, {_prototype_file(p) for p in saved.prototypes} | {_model_file(m) for m in saved.models})
        return saved


def load_workspace(root: str | Path, workspace_id: str) -> Workspace:
    """The workspace ``root/<id>/``; WorkspaceError naming the file when it is missing, damaged, not a workspace
    or of a newer schema."""
    folder = _folder(root, workspace_id)
    path = folder / _JSON
    document = _read_document(path)
    if document.get("id") != workspace_id:
        raise WorkspaceError(f"{path} belongs to workspace {document.get('id')!r}, not {workspace_id!r}; it was "
                             "copied by hand: import it through Export / import instead")

    def read(relative: str) -> bytes:
        target = folder / _safe_member(relative, str(path))
        try:
            return target.read_bytes()
        except OSError as error:
            raise WorkspaceError(f"{target} cannot be read ({error.strerror}); the workspace is damaged: start a new "
                                 "workspace, or import an exported copy") from None

    return _from_document(document, str(path), read, verify=False)


def find_workspaces(root: str | Path, sample_path: str | Path) -> list[WorkspaceInfo]:
    """The workspaces of the sample at ``sample_path`` (same resolved path), newest first; unreadable ones are
    skipped."""
    root = Path(root).expanduser()
    wanted = str(Path(sample_path).expanduser().resolve())
    found = []
    for folder in root.iterdir() if root.is_dir() else ():
        if not _ID.match(folder.name) or not (folder / _JSON).is_file():
            continue
        try:
            document = _read_document(folder / _JSON)
            sample = _sample_from(document.get("sample"))
            if sample is None or str(Path(sample.path).expanduser().resolve()) != wanted:
                continue
            batch = document.get("batch")
            summary = _summary(sample.name or Path(sample.path).name, normalize_points(document.get("points") or {}),
                               len(document.get("prototypes") or []), len(document.get("models") or []),
                               len(batch["z_values"]) if isinstance(batch, dict) else None)
            found.append(WorkspaceInfo(folder.name, float(document.get("modified") or 0.0), summary))
        except (WorkspaceError, ValueError, TypeError, KeyError):
            continue
    return sorted(found, key=lambda info: info.modified, reverse=True)


# ---- export and import ------------------------------------------------------------------------------------


def export_workspace(ws: Workspace) -> bytes:
    """The workspace as one .zip: workspace.json, prototypes/*.npz, models/*.safetensors (no lease, no pickle)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        def add(name: str, data: bytes) -> None:
            archive.writestr(zipfile.ZipInfo(name, _ZIP_TIME), data, compress_type=zipfile.ZIP_DEFLATED)

        add(_JSON, _dumps(_document(ws), _JSON).encode("utf-8"))
        for item in ws.prototypes:
            add(_prototype_file(item), item.data)
        for item in ws.models:
            add(_model_file(item), item.data)
    return buffer.getvalue()


def _safe_member(name: str, where: str) -> str:
    """``name`` if it is a plain relative path inside the archive (no '..', no absolute or drive path)."""
    path = PurePosixPath(name)
    if (not name or "\\" in name or ":" in name or path.is_absolute()
            or any(part in ("..", ".", "") for part in name.split("/"))):
        raise WorkspaceError(f"{where}: member {name!r} points outside the workspace; this file is refused (it was "
                             "not made by Protoscope's Export workspace)")
    return name


def import_workspace(data: bytes, root: str | Path, *, name: str = "the workspace file",
                     max_member_bytes: int = MAX_MEMBER_BYTES) -> Workspace:
    """Read an exported workspace (.zip bytes), save it under a new id in ``root`` and return it.

    Refused with WorkspaceError (naming ``name`` and the member): a file that is not a zip, a member path outside
    the archive (absolute, '..', a link), a member larger than ``max_member_bytes``, a member the workspace does not
    refer to, a missing workspace.json or one of another format or a newer schema, a prototype holding pickled
    objects or not a prototype, a damaged model file, a file whose SHA-256 differs from the recorded one.
    The returned workspace's ``sample_status`` is 'missing' when its sample is not at the same path here: ask the
    user where it is and call ``repoint_sample``.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(bytes(data)))
    except zipfile.BadZipFile:
        raise WorkspaceError(f"{name} is not a workspace file (not a .zip); choose a file made by Export workspace") \
            from None
    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        if len(infos) > MAX_MEMBERS:
            raise WorkspaceError(f"{name} holds {len(infos)} files (at most {MAX_MEMBERS}); this file is refused")
        members = {}
        for info in infos:
            _safe_member(info.filename, name)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise WorkspaceError(f"{name}: member {info.filename!r} is a symbolic link; this file is refused")
            if info.file_size > max_member_bytes:
                raise WorkspaceError(f"{name}: member {info.filename!r} is {info.file_size / 1e6:.1f} MB, over the "
                                     f"{max_member_bytes / 1e6:.1f} MB limit for one file of a workspace; this file "
                                     "is refused")
            members[info.filename] = info

        def read(member: str) -> bytes:
            if member not in members:
                raise WorkspaceError(f"{name}: workspace.json refers to {member!r}, which the file lacks; export the "
                                     "workspace again")
            try:
                with archive.open(members[member]) as stream:
                    content = stream.read(max_member_bytes + 1)
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                raise WorkspaceError(f"{name}: member {member!r} cannot be read ({error}); export the workspace "
                                     "again") from None
            if len(content) > max_member_bytes:
                raise WorkspaceError(f"{name}: member {member!r} is over the {max_member_bytes / 1e6:.1f} MB limit "
                                     "for one file of a workspace; this file is refused")
            return content

        if _JSON not in members:
            raise WorkspaceError(f"{name} is not a workspace file (no {_JSON} inside); choose a file made by Export "
                                 "workspace")
        try:
            document = _check_header(json.loads(read(_JSON).decode("utf-8")), f"{name}: {_JSON}")
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise WorkspaceError(f"{name}: {_JSON} is not valid JSON ({error}); export the workspace again") from None
        referenced = {_JSON} | {str(e.get("file")) for kind in ("prototypes", "models")
                                for e in document.get(kind) or [] if isinstance(e, dict)}
        unknown = sorted(set(members) - referenced)
        if unknown:
            raise WorkspaceError(f"{name}: unexpected member {unknown[0]!r} (not part of a workspace); this file is "
                                 "refused")
        document = {**document, "id": new_id()}
        ws = _from_document(document, f"{name}: {_JSON}", lambda member: read(_safe_member(member, name)), verify=True)
    fresh = dataclasses.replace(ws, revision=0, created=0.0, modified=0.0)
    return save_workspace(fresh, root)


def repoint_sample(ws: Workspace, path: str | Path) -> Workspace:
    """``ws`` with its sample at ``path`` (its signature taken now); a ground-truth mask file that does not exist
    here is dropped (choose it again)."""
    if ws.sample is None:
        raise WorkspaceError(f"workspace {ws.id} has no sample to re-point")
    if file_signature(path) is None:
        raise WorkspaceError(f"'{path}' does not exist; choose the stack file of this workspace")
    truth_path = ws.sample.truth_path if ws.sample.truth_path and Path(ws.sample.truth_path).exists() else None
    sample = SampleRef.of(Path(path).resolve(), name=ws.sample.name or Path(path).name, origin=ws.sample.origin,
                          channel=ws.sample.channel, truth_channel=ws.sample.truth_channel, truth_path=truth_path)
    return dataclasses.replace(ws, sample=sample)
