"""Single images (PNG / JPEG / BMP through Pillow) and folders of images, one z-slice per file.

RGB, RGBA and palette images are reduced to grey with `rgb_to_grey`; 1-bit images read as uint8 0/255.
A folder holds one kind of image, one size and one pixel type, in natural sort order ('img2' before
'img10'); single-plane TIFFs in a folder are read through `TiffStack`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import StackError
from core.io.base import (
    IMAGE_SUFFIXES,
    MAX_PLANE_PIXELS,
    TIFF_SUFFIXES,
    Stack,
    bool_to_uint8,
    check_plane_pixels,
    natural_sort_key,
    rgb_to_grey,
)
from core.io.tiff import TiffStack

__all__ = ["ImageStack", "ImageFolderStack"]

_PIL_MODE_DTYPES = {
    "1": np.uint8, "L": np.uint8, "LA": np.uint8, "P": np.uint8, "PA": np.uint8,
    "RGB": np.uint8, "RGBA": np.uint8, "RGBX": np.uint8, "CMYK": np.uint8, "YCbCr": np.uint8,
    "LAB": np.uint8, "HSV": np.uint8, "La": np.uint8, "RGBa": np.uint8,
    "I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16, "I;16N": np.uint16,
    "I": np.int32, "F": np.float32,
}


@dataclass(frozen=True)
class _ImageInfo:
    """What one image file holds without decoding it: (Y, X) size and the dtype we will return."""

    height: int
    width: int
    dtype: np.dtype


def _image_info(path: Path, verify: bool = False) -> _ImageInfo:
    """Header of a single image (PNG/JPEG/BMP via Pillow, TIFF via tifffile).

    verify : also check the file's structure without decoding it (Pillow's ``verify``: PNG chunk CRCs
        and a truncated end), so a damaged single image is refused when opened, not when read.
    """
    if path.suffix.lower() in TIFF_SUFFIXES:
        with TiffStack(path) as st:
            if st.shape[0] * st.shape[1] * st.n_timepoints != 1:
                raise StackError(f"'{path.name}' holds {st.shape[0]} slices x {st.shape[1]} channels; a folder "
                                 "stack needs one plane per file")
            return _ImageInfo(st.shape[2], st.shape[3], st.dtype)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode, (width, height) = im.mode, im.size
            if verify:
                try:
                    im.verify()
                except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
                    raise StackError(f"'{path.name}' is a truncated or corrupt image ({exc})") from None
    except UnidentifiedImageError:
        raise StackError(f"'{path.name}' is not a readable {path.suffix} image (unknown or damaged "
                         "content)") from None
    except Image.DecompressionBombError as exc:
        raise StackError(f"'{path.name}' is too large to decode: {exc} Protoscope reads planes of at most "
                         f"{MAX_PLANE_PIXELS:,} pixels; crop or downsample the image first") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:  # Pillow's damage signals
        raise StackError(f"'{path.name}' cannot be read: {exc}") from None
    if mode not in _PIL_MODE_DTYPES:
        raise StackError(f"'{path.name}' has unsupported image mode {mode!r}; supported: grey, RGB(A), "
                         "palette, 16-bit grey, 32-bit integer or float")
    check_plane_pixels(path.name, height, width, "an image")
    return _ImageInfo(height, width, np.dtype(_PIL_MODE_DTYPES[mode]))


def _read_image(path: Path) -> np.ndarray:
    """Decode one image to (Y, X): RGB and palette to luminance, 1-bit to 0/255, alpha dropped."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        with TiffStack(path) as st:
            return st.read_slice(0)
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("L", "I", "F") or mode.startswith("I;16"):
                arr = np.asarray(im)
            elif mode == "1":
                arr = bool_to_uint8(np.asarray(im))
            elif mode in ("LA", "La"):
                arr = np.asarray(im.getchannel(0))
            else:
                arr = rgb_to_grey(np.asarray(im.convert("RGB")))
    except Image.DecompressionBombError as exc:
        raise StackError(f"'{path.name}' is too large to decode: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:  # Pillow's damage signals
        raise StackError(f"'{path.name}' is a truncated or corrupt image ({exc})") from None
    return arr.astype(_PIL_MODE_DTYPES.get(mode, arr.dtype), copy=False)


class ImageStack(Stack):
    """One PNG / JPEG / BMP image: shape (1, 1, Y, X); RGB is reduced to grey."""

    def __init__(self, path: Path) -> None:
        info = _image_info(path, verify=True)
        super().__init__(path, format="image", shape=(1, 1, info.height, info.width), dtype=info.dtype)

    def _read_plane(self, z: int, c: int, t: int, level: int) -> np.ndarray:
        arr = _read_image(self.path)
        if arr.shape != self.shape[2:]:
            raise StackError(f"'{self.name}' decoded to {arr.shape} but its header said {self.shape[2:]} (Y, X); "
                             "the file changed since it was opened or is damaged; open it again")
        return arr


def _suffix_family(suffix: str) -> str:
    s = suffix.lower()
    return {".jpeg": ".jpg", ".tiff": ".tif"}.get(s, s)


class ImageFolderStack(Stack):
    """A folder of single-plane images, one z-slice per file, in natural sort order."""

    def __init__(self, path: Path) -> None:
        files = [p for p in path.iterdir()
                 if p.is_file() and not p.name.startswith(".")
                 and p.suffix.lower() in IMAGE_SUFFIXES + TIFF_SUFFIXES]
        if not files:
            raise StackError(f"folder '{path}' contains no images ({', '.join(IMAGE_SUFFIXES + TIFF_SUFFIXES)})")
        families: dict[str, int] = {}
        for p in files:
            families[_suffix_family(p.suffix)] = families.get(_suffix_family(p.suffix), 0) + 1
        if len(families) > 1:
            listing = ", ".join(f"{n} {fam}" for fam, n in sorted(families.items()))
            raise StackError(f"folder '{path.name}' mixes image types ({listing}); keep one kind of image "
                             "per stack folder")
        files.sort(key=lambda p: natural_sort_key(p.name))
        first = _image_info(files[0])
        for p in files[1:]:
            info = _image_info(p)
            if (info.height, info.width) != (first.height, first.width):
                raise StackError(
                    f"'{p.name}' in folder '{path.name}' is {info.width}x{info.height} pixels but "
                    f"'{files[0].name}' is {first.width}x{first.height}; all slices must have one size"
                )
            if info.dtype != first.dtype:
                raise StackError(
                    f"'{p.name}' in folder '{path.name}' is {info.dtype.name} but '{files[0].name}' is "
                    f"{first.dtype.name}; all slices must have one pixel type"
                )
        self.files = files
        super().__init__(path, format="image-folder", shape=(len(files), 1, first.height, first.width),
                         dtype=first.dtype)

    def _read_plane(self, z: int, c: int, t: int, level: int) -> np.ndarray:
        arr = _read_image(self.files[z])
        if arr.shape != self.shape[2:]:
            raise StackError(f"'{self.files[z].name}' in folder '{self.name}' changed size since the folder "
                             "was opened; open it again")
        return arr
