"""Atomic writes: every file Protoscope writes goes through here.

A temp file is written beside the destination (same folder, so the final ``os.replace`` is atomic) and
renamed when complete; a crash never leaves a half-written file under the real name. An existing file is
replaced only when asked, and never when it is one of the command's inputs.

Temp files are named ``.~protoscope-<pid>-<host>-<random>.<name>`` (``<host>``: 6 hex digits of a hash
of the machine's name). A process killed mid-write (``kill -9``, a power cut) cannot remove its temp, so
before each write `atomic_output` removes, in the destination folder only, the temps of this machine
whose process is no longer running (`remove_stale_temps`). Temps of live processes, of other machines
sharing the folder, and files that merely look similar are left alone.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from core.errors import OutputError

__all__ = [
    "atomic_output",
    "check_not_an_input",
    "write_bytes",
    "write_text",
    "temp_path_for",
    "output_name_of",
    "remove_stale_temps",
    "TEMP_PATTERN",
]

#: A temp file of ours: pid, host tag, random token, then the final file name.
TEMP_PATTERN = re.compile(r"^\.~protoscope-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-(?P<token>[0-9a-f]{8})\.(?P<name>.+)$")

# errors of the output's disk rather than of the command's inputs
_DISK_ERRNOS = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS") if hasattr(errno, name)}


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def temp_path_for(out: Path, pid: int | None = None) -> Path:
    """``out``'s folder / ``.~protoscope-<pid>-<host>-<random>.<out.name>`` (pid: this process by default).

    The temp keeps the real name at its end, so suffix-based writers (tifffile's ``.ome.tif``) behave.
    """
    pid = os.getpid() if pid is None else int(pid)
    return out.with_name(f".~protoscope-{pid}-{_host_tag()}-{uuid.uuid4().hex[:8]}.{out.name}")


def output_name_of(name: str) -> str:
    """The final file name a temp file of ours stands for ('.~protoscope-12-ab12cd-0011aabb.m.tif' -> 'm.tif');
    any other name is returned unchanged. For messages that must name the output, not its temp."""
    match = TEMP_PATTERN.match(name)
    return match.group("name") if match else name


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a zombie, killed but not yet reaped, counts as dead)."""
    if pid <= 0:
        return False
    if os.name != "posix":
        return True  # no safe probe here (os.kill(pid, 0) would signal on Windows): never remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[-1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete this machine's temp files in `folder` whose writing process is no longer alive.

    Only names matching `TEMP_PATTERN` with this machine's host tag are considered, only regular files,
    and only `folder` itself (not sub-folders). Returns the paths removed; failures are ignored (the
    next write tries again).
    """
    host = _host_tag()
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_PATTERN.match(entry.name)
        if match is None or match.group("host") != host:
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or _pid_alive(int(match.group("pid"))):
                continue
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_not_an_input(out: Path, inputs: Sequence[Path]) -> None:
    """OutputError when `out` is one of `inputs` (any spelling, symlink or hard link) or lies inside an
    input folder (a folder of images is a stack: the output would become one of its slices)."""
    for src in inputs:
        if _same_file(out, src):
            raise OutputError(f"'{out}' is the source file itself ('{src}' is an input of this command); choose "
                             "another output name (inputs are never modified)")
        if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
            raise OutputError(f"'{out}' lies inside the input folder '{src}', where it would become part of that "
                             "stack; choose an output outside it")


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _prepare_folder(folder: Path, out: Path) -> list[Path]:
    """Create `folder` if missing; OutputError naming the folder when that fails. Returns the folders this
    call created, innermost first (removed again when the write fails, so a failed write leaves nothing)."""
    created = []
    missing = folder
    while not missing.exists() and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot write '{out.name}': '{folder}' exists but is not a folder") from None
    except OSError as exc:
        raise OutputError(f"cannot create the output folder '{folder}' ({_reason(exc)}); choose a folder you can "
                         "write to") from None
    return created


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders a failed write created (innermost first), where they are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _reserve(tmp: Path, out: Path) -> None:
    """Create the empty temp file, which proves the folder is writable before any work is done."""
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except OSError as exc:
        raise OutputError(f"cannot write in the output folder '{tmp.parent}' ({_reason(exc)}); choose a folder "
                         f"you can write to for '{out.name}'") from None
    os.close(fd)


def _is_output_error(exc: OSError, tmp: Path, out: Path) -> bool:
    """An OSError about the temp or the output (permissions, full disk), not about one of the inputs."""
    names = {str(tmp), str(out)}
    return exc.errno in _DISK_ERRNOS or str(exc.filename) in names or str(exc.filename2) in names


@contextmanager
def atomic_output(out_path: str | Path, *, overwrite: bool = False, source: Path | None = None,
                  sources: Sequence[str | Path] = ()) -> Iterator[Path]:
    """Yield a temp path beside `out_path`; on success rename it to `out_path`, on error delete it.

    source, sources : the command's inputs (one, or several); `out_path` may be none of them, even with
        `overwrite`, nor lie inside an input folder.
    Raises OutputError (naming the file or folder) if `out_path` is an input, is a folder, exists and not
    `overwrite`, or if its folder cannot be created or written; an OSError of the temp or output file
    while writing (full disk, permissions) becomes a OutputError naming `out_path`. Missing parent folders
    are created, and removed again when the write fails. The yielded temp file exists (empty); writers may
    open it for writing or replace it.
    """
    out = Path(out_path).expanduser()
    inputs = [Path(p).expanduser() for p in ([source] if source is not None else []) + list(sources)]
    check_not_an_input(out, inputs)
    if out.is_dir():
        raise OutputError(f"'{out}' is a folder; give a file name for the output")
    if out.exists() and not overwrite:
        raise OutputError(f"'{out}' already exists; choose another name or allow overwriting "
                         "(overwrite=True, CLI: --overwrite)")
    created = _prepare_folder(out.parent, out)
    remove_stale_temps(out.parent)
    tmp = temp_path_for(out)
    try:
        _reserve(tmp, out)
    except OutputError:
        _remove_empty(created)
        raise
    try:
        yield tmp
        try:
            os.replace(tmp, out)
        except OSError as exc:
            raise OutputError(f"cannot move the finished file into place as '{out}' ({_reason(exc)})") from None
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        if _is_output_error(exc, tmp, out):
            hint = "; free some space or choose another folder" if exc.errno in _DISK_ERRNOS else ""
            raise OutputError(f"cannot write '{out}' ({_reason(exc)}){hint}") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise


def write_bytes(out_path: str | Path, data: bytes, *, overwrite: bool = False, source: Path | None = None,
                sources: Sequence[str | Path] = ()) -> Path:
    """Write ``data`` to ``out_path`` atomically (see `atomic_output` for the refusals); returns the path."""
    with atomic_output(out_path, overwrite=overwrite, source=source, sources=sources) as tmp:
        tmp.write_bytes(data)
    return Path(out_path).expanduser()


def write_text(out_path: str | Path, text: str, *, overwrite: bool = False, source: Path | None = None,
               sources: Sequence[str | Path] = ()) -> Path:
    """Write UTF-8 ``text`` to ``out_path`` atomically; returns the path."""
    return write_bytes(out_path, text.encode("utf-8"), overwrite=overwrite, source=source, sources=sources)
