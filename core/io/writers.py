"""Write (Z, Y, X) masks as files other tools read: ImageJ TIFF, OME-TIFF, HDF5, or an Imaris copy.

Every writer is atomic: it writes a hidden temp file in the destination folder and renames it
(``os.replace``) when complete, so a crash never leaves a half-written file under the real name.
An existing file is replaced only with ``overwrite=True``; the source `.ims` is never written to.

Masks are read slab by slab, so a ``np.memmap`` larger than RAM works. Any numeric mask is
accepted; nonzero means foreground and is stored as 255 (uint8 0/255).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np

from core.errors import StackError
from core.io.atomic import atomic_output
from core.io.base import VoxelSize
from core.io.channels import PROTOSCOPE_MASK_NAME
from core.io.ims_append import append_mask_channel
from core.io.masks import as_mask_array, mask_to_uint8

# mask_to_uint8 and as_mask_array live in core.io.masks and are re-exported here for callers
__all__ = ["write_masks", "TiffMaskWriter", "mask_to_uint8", "as_mask_array", "check_mask_suffix",
           "MASK_SUFFIXES", "TIFF_MASK_SUFFIXES"]

MASK_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".h5", ".hdf5", ".ims")
TIFF_MASK_SUFFIXES = (".tif", ".tiff")  # what TiffMaskWriter writes: ImageJ TIFF, never OME
_SLAB_BYTES = 64 << 20  # mask bytes read at a time when converting


def _slabs(masks: Any) -> Iterator[tuple[int, np.ndarray]]:
    """(z0, uint8 0/255 slab) pieces of about 64 MB along Z."""
    n_z, n_y, n_x = masks.shape
    step = max(1, _SLAB_BYTES // max(1, n_y * n_x * np.dtype(masks.dtype).itemsize))
    for z0 in range(0, n_z, step):
        yield z0, mask_to_uint8(masks[z0:z0 + step])


def _pages(masks: Any) -> Iterator[np.ndarray]:
    for _, slab in _slabs(masks):
        yield from slab


def check_mask_suffix(out_path: str | Path, supported: Sequence[str] = MASK_SUFFIXES) -> str:
    """The supported suffix `out_path` ends with (lower case, longest match: '.ome.tif' before '.tif').

    Raises StackError listing `supported` for any other name ('masks.png', 'masks', 'm.jpg'): a writer
    never puts a TIFF under another format's name.
    """
    name = Path(out_path).name.lower()
    for suffix in sorted(supported, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise StackError(f"cannot write masks as '{Path(out_path).name}': unknown extension; supported: "
                     f"{', '.join(supported)}")


def _ome_kind(path: Path) -> bool:
    return path.name.lower().endswith((".ome.tif", ".ome.tiff"))


def write_masks(
    masks: Any,
    out_path: str | Path,
    *,
    voxel_size: VoxelSize | None = None,
    source_ims: Path | None = None,
    timepoint: int = 0,
    channel_name: str = PROTOSCOPE_MASK_NAME,
    color: Sequence[float] = (1.0, 0.0, 1.0),
    overwrite: bool = False,
    description: str = "",
    progress: Callable[[float], None] | None = None,
    sources: Sequence[str | Path] = (),
) -> Path:
    """Write (Z, Y, X) masks in the format given by the extension of `out_path`.

    .tif/.tiff : multi-page ImageJ TIFF, uint8 0/255, voxel size as ImageJ resolution (pixels/µm),
        spacing (µm) and unit 'um'.
    .ome.tif/.ome.tiff : OME-TIFF, uint8 0/255, PhysicalSizeX/Y/Z in µm, channel named `channel_name`.
    .h5/.hdf5 : dataset 'mask' uint8 0/255 (gzip, one chunk per slice), attrs 'element_size_um'
        (z, y, x), 'axes' = 'ZYX', 'description'.
    .ims : a copy of `source_ims` with the mask appended as a new channel (see
        core.io.ims_append.append_mask_channel); the mask must have the source's full level-0 (Z, Y, X).
    sources : the command's other inputs; the output may not be one of them (nor `source_ims`).
    Returns out_path. Raises StackError for an unknown extension (listing the supported ones), an
    existing file without `overwrite`, an output that is an input, a bad mask, or (for .ims) a missing
    source.
    """
    out = Path(out_path).expanduser()
    suffix = check_mask_suffix(out)
    masks = as_mask_array(masks, out)
    inputs = list(sources)
    if suffix == ".ims":
        if source_ims is None:
            raise StackError(f"writing the mask as '{out.name}' needs the source .ims file (source_ims) to copy")
        return append_mask_channel(source_ims, out, masks, timepoint=timepoint, channel_name=channel_name,
                                   color=color, overwrite=overwrite, description=description, progress=progress,
                                   sources=inputs)
    if suffix in (".ome.tif", ".ome.tiff"):
        with atomic_output(out, overwrite=overwrite, source=source_ims, sources=inputs) as tmp:
            _write_ome_tiff(tmp, masks, voxel_size, channel_name, description)
        return out
    if suffix in TIFF_MASK_SUFFIXES:
        with TiffMaskWriter(out, voxel_size=voxel_size, overwrite=overwrite,
                            sources=inputs + ([Path(source_ims)] if source_ims is not None else [])) as writer:
            n_z = masks.shape[0]
            for z, page in enumerate(_pages(masks)):
                writer.write(page)
                if progress is not None:
                    progress((z + 1) / n_z)
        return out
    with atomic_output(out, overwrite=overwrite, source=source_ims, sources=inputs) as tmp:  # .h5, .hdf5
        _write_hdf5(tmp, masks, voxel_size, description, progress)
    return out


def _write_ome_tiff(path: Path, masks: Any, voxel_size: VoxelSize | None, channel_name: str,
                    description: str) -> None:
    import tifffile

    metadata: dict[str, Any] = {"axes": "ZYX", "Channel": {"Name": [channel_name]}}
    if description:
        metadata["Description"] = description
    if voxel_size is not None:
        metadata.update(PhysicalSizeX=voxel_size.x, PhysicalSizeXUnit="µm", PhysicalSizeY=voxel_size.y,
                        PhysicalSizeYUnit="µm", PhysicalSizeZ=voxel_size.z, PhysicalSizeZUnit="µm")
    n_z, n_y, n_x = masks.shape
    tifffile.imwrite(path, _pages(masks), shape=(n_z, n_y, n_x), dtype=np.uint8, ome=True,
                     photometric="minisblack", metadata=metadata)


def _write_hdf5(path: Path, masks: Any, voxel_size: VoxelSize | None, description: str,
                progress: Callable[[float], None] | None) -> None:
    n_z, n_y, n_x = masks.shape
    with h5py.File(path, "w") as f:
        data = f.create_dataset("mask", shape=(n_z, n_y, n_x), dtype=np.uint8, chunks=(1, n_y, n_x),
                                compression="gzip", compression_opts=4)
        data.attrs["axes"] = "ZYX"
        data.attrs["foreground_value"] = np.uint8(255)
        if description:
            data.attrs["description"] = description
        if voxel_size is not None:
            # the attribute ilastik and Fiji's HDF5 plugin read, in (z, y, x) µm
            data.attrs["element_size_um"] = np.array([voxel_size.z, voxel_size.y, voxel_size.x], np.float64)
        for z0, slab in _slabs(masks):
            data[z0:z0 + len(slab)] = slab
            if progress is not None:
                progress((z0 + len(slab)) / n_z)


class TiffMaskWriter:
    """Streaming multi-page ImageJ TIFF writer: one uint8 0/255 page per `write`, in the caller's order.

    >>> with TiffMaskWriter("masks.tif", voxel_size=VoxelSize(0.4, 0.4, 2.0)) as w:   # doctest: +SKIP
    ...     for z in zs:
    ...         w.write(mask_of_slice(z))                                              # (Y, X) bool

    `close` (or leaving the `with` block) finishes the file and renames it into place; on an
    exception inside the block the temp file is removed and nothing appears under `out_path`.
    sources : the command's inputs, which `out_path` may not be.
    Raises StackError when `out_path` does not end in .tif/.tiff (an ImageJ TIFF is never written under
    another name, '.ome.tif' included: use `write_masks` for OME-TIFF), when pages differ in size, when
    nothing was written, or when `out_path` exists and not `overwrite`.
    """

    def __init__(self, out_path: str | Path, *, voxel_size: VoxelSize | None = None, overwrite: bool = False,
                 sources: Sequence[str | Path] = ()) -> None:
        import tifffile

        self._done = True  # nothing to clean up until the temp file exists
        self.out_path = Path(out_path).expanduser()
        if self.out_path.name.lower().endswith((".ome.tif", ".ome.tiff")):
            raise StackError(f"cannot stream masks to '{self.out_path.name}': this writer makes ImageJ TIFF, not "
                             f"OME-TIFF; supported: {', '.join(TIFF_MASK_SUFFIXES)}")
        check_mask_suffix(self.out_path, TIFF_MASK_SUFFIXES)
        self.voxel_size = voxel_size
        self._atomic = atomic_output(self.out_path, overwrite=overwrite, sources=sources)
        self._tmp = self._atomic.__enter__()
        self._shape: tuple[int, int] | None = None
        self.n_pages = 0
        self._done = False
        try:
            self._tw = tifffile.TiffWriter(self._tmp, imagej=True)
        except Exception:
            self._abort()
            raise

    def _metadata(self) -> dict[str, Any]:
        if self.voxel_size is None:
            return {}
        return {"spacing": self.voxel_size.z, "unit": "um"}

    def write(self, mask2d: Any) -> None:
        """Append one (Y, X) bool/uint8 page (nonzero -> 255)."""
        if self._done:
            raise StackError(f"'{self.out_path.name}' is already closed; open a new TiffMaskWriter")
        page = mask_to_uint8(mask2d)
        if page.ndim != 2:
            self._abort()
            raise StackError(f"mask page for '{self.out_path.name}' has shape {page.shape}; expected (Y, X)")
        if self._shape is None:
            self._shape = page.shape
        elif page.shape != self._shape:
            self._abort()
            raise StackError(f"mask page {self.n_pages} for '{self.out_path.name}' is {page.shape} but the first "
                             f"page was {self._shape}; all pages must have one size")
        kwargs: dict[str, Any] = {"contiguous": True, "photometric": "minisblack", "metadata": self._metadata()}
        if self.voxel_size is not None:
            kwargs["resolution"] = (1.0 / self.voxel_size.x, 1.0 / self.voxel_size.y)
        try:
            self._tw.write(page, **kwargs)
        except Exception:
            self._abort()
            raise
        self.n_pages += 1

    def close(self) -> Path:
        """Finish the ImageJ header (slices = pages written), rename into place, return the path."""
        if self._done:
            return self.out_path
        if self.n_pages == 0:
            self._abort()
            raise StackError(f"no mask pages were written to '{self.out_path.name}'; nothing saved")
        import tifffile

        try:
            assert self._shape is not None
            # tifffile would label N streamed 2-D pages as channels; ImageJ needs them as z-slices
            description = tifffile.imagej_description((self.n_pages, *self._shape), axes="ZYX",
                                                      **self._metadata())
            self._tw.overwrite_description(description)
            self._tw.close()
        except Exception:
            self._abort()
            raise
        self._done = True
        self._atomic.__exit__(None, None, None)
        return self.out_path

    def _abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._tw.close()
        except Exception:  # noqa: BLE001 - the temp file is removed anyway
            pass
        try:
            self._atomic.__exit__(StackError, StackError("aborted"), None)
        except StackError:
            pass

    def __del__(self) -> None:
        # a writer dropped without close() leaves no temp file behind (and no output either)
        if not getattr(self, "_done", True):
            self._abort()

    def __enter__(self) -> "TiffMaskWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()
