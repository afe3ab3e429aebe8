"""`open_stack`: the one entry point that picks a reader by what the path is.

Every reader module is imported here at top level; the readers import only `core.io.base`, so there is
no cycle. Callers use ``from core.io import open_stack``.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import StackError
from core.io.base import IMS_SUFFIXES, SUPPORTED_SUFFIXES, TIFF_SUFFIXES, Stack
from core.io.images import ImageFolderStack, ImageStack
from core.io.ims import ImsStack
from core.io.tiff import TiffStack

__all__ = ["open_stack"]


def open_stack(path: str | Path) -> Stack:
    """Open an image stack lazily (only metadata is read).

    path : an Imaris `.ims` file, a TIFF / OME-TIFF / ImageJ TIFF, a PNG / JPEG / BMP image, or a
        folder of such images (one slice per file, natural sort order: 'img2' before 'img10').
    Returns a Stack (context manager). Raises StackError naming the file and the problem.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise StackError(f"'{p}' does not exist (check the path)")
    if p.is_dir():
        return ImageFolderStack(p)
    if not p.is_file():
        raise StackError(f"'{p}' is not a regular file")
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise StackError(
            f"'{p.name}' has an unknown format ({suffix or 'no extension'}); supported: "
            f"{', '.join(SUPPORTED_SUFFIXES)} files, .ome.tif/.ome.tiff, or a folder of images"
        )
    if p.stat().st_size == 0:
        raise StackError(f"'{p.name}' is empty (0 bytes); the file is truncated or was not written")
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise StackError(f"'{p.name}' cannot be read ({exc.strerror or exc}); check its permissions") from None
    if suffix in IMS_SUFFIXES:
        return ImsStack(p)
    if suffix in TIFF_SUFFIXES:
        return TiffStack(p)
    return ImageStack(p)
