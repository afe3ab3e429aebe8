"""Atomic writes: every file Protoscope writes goes through here.

A temp file is written beside the destination (same folder, so the final ``os.replace`` is atomic) and
renamed when complete; a crash never leaves a half-written file under the real name. An existing file is
replaced only when asked, and never when it is one of the command's inputs.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import StackError

__all__ = ["atomic_output", "write_bytes", "write_text"]


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


@contextmanager
def atomic_output(out_path: str | Path, *, overwrite: bool = False, source: Path | None = None) -> Iterator[Path]:
    """Yield a temp path beside `out_path`; on success rename it to `out_path`, on error delete it.

    Raises StackError if `out_path` exists and not `overwrite`, or if it is the file `source`.
    Missing parent folders are created.
    """
    out = Path(out_path).expanduser()
    if source is not None and _same_file(out, Path(source)):
        raise StackError(f"'{out}' is the source file itself; choose another output name (the original is "
                         "never modified)")
    if out.is_dir():
        raise StackError(f"'{out}' is a folder; give a file name for the output")
    if out.exists() and not overwrite:
        raise StackError(f"'{out}' already exists; choose another name or allow overwriting "
                         "(overwrite=True, CLI: --overwrite)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StackError(f"cannot create the folder for '{out}': {exc}") from None
    # the temp keeps the real name at its end, so suffix-based writers (tifffile's .ome.tif) behave
    tmp = out.with_name(f".~{uuid.uuid4().hex[:8]}.{out.name}")
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(out_path: str | Path, data: bytes, *, overwrite: bool = False, source: Path | None = None) -> Path:
    """Write ``data`` to ``out_path`` atomically (see `atomic_output` for the refusals); returns the path."""
    with atomic_output(out_path, overwrite=overwrite, source=source) as tmp:
        tmp.write_bytes(data)
    return Path(out_path).expanduser()


def write_text(out_path: str | Path, text: str, *, overwrite: bool = False, source: Path | None = None) -> Path:
    """Write UTF-8 ``text`` to ``out_path`` atomically; returns the path."""
    return write_bytes(out_path, text.encode("utf-8"), overwrite=overwrite, source=source)
