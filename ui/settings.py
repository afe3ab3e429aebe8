"""Where the app may read and write: data root, demo, uploads, outputs (environment variables, no Streamlit).

PROTOSCOPE_DATA_ROOT   folder whose stacks can be opened by path (default: the project's ``assets/``);
                       nothing outside it is opened by path.
PROTOSCOPE_DEMO_DIR    folder of the synthetic demo stack (default: ``assets/demo``, see core.demo).
PROTOSCOPE_UPLOAD_DIR  where uploaded files are stored to be opened (default: <temp>/protoscope-uploads).
PROTOSCOPE_OUTPUT_DIR  where batch results are written (default: ``protoscope-output/`` next to the stack,
                       or inside the data root when the stack's folder is not writable).
PROTOSCOPE_CACHE       embedding cache folder (read by core.features.embedding_cache).
PROTOSCOPE_WORKSPACES  where each tab's work is kept (read by core.workspace.default_root; default
                       ~/.cache/protoscope/workspaces, 'off' keeps none; see docs/workspace.md).
PROTOSCOPE_TMP         scratch files of batch runs (read by core.batch.scratch_dir; default
                       <temp>/protoscope-<user>), never in an output folder.
PROTOSCOPE_DASK_SCHEDULER  address of a running Dask scheduler (tcp://host:8786) the Batch page may run on
                       (unset: batches run in the app's process only). Only whoever runs the server sets it: a Dask
                       client exchanges pickled code and data with its scheduler, so no page lets a user type one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from core.demo import DEMO_DIR
from core.errors import ProtoscopeError
from core.io import SUPPORTED_SUFFIXES

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_FOLDER = "protoscope-output"
#: Results up to this size get a browser download button; larger ones are only written server-side.
DOWNLOAD_LIMIT_BYTES = 200 * 1024 * 1024


def data_root() -> Path:
    """The resolved folder stacks may be opened from by path."""
    text = os.environ.get("PROTOSCOPE_DATA_ROOT", "").strip()
    return Path(text).expanduser().resolve() if text else (PROJECT_ROOT / "assets").resolve()


def weights_root() -> Path:
    """The resolved folder local weights may be loaded from: ``PROTOSCOPE_WEIGHTS_DIR`` (set by whoever runs the
    server), else the data root. Nothing outside it is read or hashed on a user's request."""
    text = os.environ.get("PROTOSCOPE_WEIGHTS_DIR", "").strip()
    return Path(text).expanduser().resolve() if text else data_root()


def resolve_weights_path(text: str | Path) -> Path:
    """A weights folder or ``.pth`` typed by the user, resolved and checked to lie inside ``weights_root()``."""
    try:
        return resolve_in_root(text, weights_root())
    except ProtoscopeError as error:
        raise ProtoscopeError(f"weights: {error} (the server reads weights only from {weights_root()}; whoever runs "
                              "it can set PROTOSCOPE_WEIGHTS_DIR)") from None


def dask_scheduler() -> str | None:
    """The Dask scheduler the Batch page may run on (``PROTOSCOPE_DASK_SCHEDULER``, e.g. tcp://host:8786), or None."""
    return os.environ.get("PROTOSCOPE_DASK_SCHEDULER", "").strip() or None


def demo_dir() -> Path:
    text = os.environ.get("PROTOSCOPE_DEMO_DIR", "").strip()
    if text:
        return Path(text).expanduser().resolve()
    return DEMO_DIR


def upload_dir() -> Path:
    text = os.environ.get("PROTOSCOPE_UPLOAD_DIR", "").strip()
    folder = Path(text).expanduser() if text else Path(tempfile.gettempdir()) / "protoscope-uploads"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def resolve_in_root(text: str | Path, root: Path | None = None) -> Path:
    """An existing path typed or picked by the user, resolved and checked to lie inside the data root.

    text : absolute, or relative to the root. Symlinks are followed first, so a link that leads outside
        the root is refused too. Raises ProtoscopeError saying what to do.
    """
    root = (root or data_root()).resolve()
    raw = str(text).strip()
    if not raw:
        raise ProtoscopeError("no path given; pick a file inside the data root")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = root / path
    path = path.resolve()
    if path != root and not path.is_relative_to(root):
        raise ProtoscopeError(
            f"'{raw}' is outside the data root {root}; pick a file inside it, or restart the app with "
            "PROTOSCOPE_DATA_ROOT set to the folder that holds your stacks"
        )
    if not path.exists():
        raise ProtoscopeError(f"'{raw}' does not exist inside the data root {root}; check the name")
    return path


def is_stack_candidate(path: Path) -> bool:
    """A file the stack reader may open (by suffix), or a folder (a folder of images is a stack)."""
    return path.is_dir() or path.suffix.lower() in SUPPORTED_SUFFIXES


def list_folder(folder: Path, root: Path | None = None, limit: int = 500) -> tuple[list[Path], list[Path]]:
    """(sub-folders, stack files) directly inside ``folder`` (which must lie in the root), sorted by name.

    Hidden entries and our own output folders are skipped; at most ``limit`` of each are returned.
    """
    folder = resolve_in_root(folder, root)
    folders: list[Path] = []
    files: list[Path] = []
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name.lower())
    except OSError as error:
        raise ProtoscopeError(f"cannot list {folder}: {error.strerror}") from None
    for entry in entries:
        if entry.name.startswith(".") or entry.name == OUTPUT_FOLDER:
            continue
        if entry.is_dir() and len(folders) < limit:
            folders.append(entry)
        elif entry.is_file() and entry.suffix.lower() in SUPPORTED_SUFFIXES and len(files) < limit:
            files.append(entry)
    return folders, files


def output_dir(stack_path: Path, root: Path | None = None, *, create: bool = True) -> Path:
    """Folder for batch results of a stack: $PROTOSCOPE_OUTPUT_DIR, else ``protoscope-output/`` next to the
    stack, else (folder not writable) ``protoscope-output/`` in the data root. Created if missing, unless
    ``create`` is False (for showing where results will go before anything is written)."""
    text = os.environ.get("PROTOSCOPE_OUTPUT_DIR", "").strip()
    candidates = [Path(text).expanduser()] if text else [
        Path(stack_path).resolve().parent / OUTPUT_FOLDER,
        (root or data_root()) / OUTPUT_FOLDER,
    ]
    for folder in candidates:
        if not create:
            if os.access(folder if folder.exists() else folder.parent, os.W_OK):
                return folder
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise ProtoscopeError(
        f"no writable output folder: tried {', '.join(str(c) for c in candidates)}; "
        "set PROTOSCOPE_OUTPUT_DIR to a writable folder"
    )
