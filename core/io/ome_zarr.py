"""Masks as OME-Zarr: an NGFF 0.4 image that napari (napari-ome-zarr), Fiji (MoBIE, n5-zarr), QuPath and
ome-zarr-py open as it is, written block by block by many processes, and resumable.

Layout of ``OUT.ome.zarr`` (a folder; zarr format 2 with '/' chunk keys, as NGFF 0.4 asks):

    .zattrs      multiscales (axes c, z, y, x; z, y, x in micrometer when the voxel size is known), omero (one
                 channel, named), protoscope (what made it: ``identity``, compared on every rerun, ``settings``,
                 the block plan and the format version)
    0, 1, ...    (1, Z, Y_k, X_k) uint8 0/255, level k = every 2^k-th pixel in Y and X (nearest); z is never
                 halved, so a block of slices owns its chunks at every level
    protoscope/  finished  (n_blocks,) float64  Unix time each block was finished, 0 = not yet
                 started   (n_blocks,) float64  Unix time each block was last started
                 area_px   (Z,) int64           mask pixels per slice, -1 for slices not requested
                 threshold (Z,) float64         absolute threshold used per slice, NaN if not requested
                 blob_*    (N,) uint8           files the run needs (the prototype's ``.npz``)
                 .zattrs   ``run``: the current run (its id, state, start time, a cancel request)
                 failures/ one text file per block that raised, until that block finishes

A block is ``block_slices`` consecutive slices (a whole number of image chunks along z, ``chunk_slices``); its
slices' masks, areas and thresholds live in chunks no other block writes, so any number of processes can write
blocks at once. ``finished[b]`` is set after everything else of block b: a block whose writer died midway is
simply not finished and is written again. zarr writes each chunk file through a temp file and a rename, so a
killed writer leaves at most a stray ``*.partial`` file (``remove_partial_files`` deletes them). The store is
created in a temp folder and renamed into place (``core.io.atomic``'s names), so a half-made store never appears
under the real name; attributes are written only by the process that submits a run, never by block writers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.errors import OutputError, StackError
from core.io.atomic import TEMP_PATTERN, _host_tag, _pid_alive, check_not_an_input, temp_path_for, write_text
from core.io.base import VoxelSize
from core.io.masks import mask_to_uint8
from core.io.writers import write_masks

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MaskStore",
    "StoreLayout",
    "identity_differences",
    "is_mask_store",
    "pyramid_shapes",
    "export_masks",
]

FORMAT = "protoscope-masks"
FORMAT_VERSION = 1
NGFF_VERSION = "0.4"
#: Y/X side of an image chunk (px): whole tiles for napari, ~2 MB per chunk at 8 slices.
TILE = 512
#: Largest z depth of an image chunk (slices): a block writer holds this many slices before writing them.
MAX_CHUNK_SLICES = 8
#: The pyramid stops at the first level whose longer side is at most this (px).
SMALLEST_SIDE = 128
MASK_COLOR = "FF00FF"


def pyramid_shapes(shape_yx: tuple[int, int], smallest_side: int = SMALLEST_SIDE,
                   max_levels: int = 8) -> list[tuple[int, int]]:
    """(Y, X) of every pyramid level: level k takes every 2^k-th pixel, until the longer side is <= ``smallest_side``.

    >>> pyramid_shapes((2048, 1725))
    [(2048, 1725), (1024, 863), (512, 432), (256, 216), (128, 108)]
    """
    height, width = (int(v) for v in shape_yx)
    shapes = [(height, width)]
    while max(shapes[-1]) > smallest_side and len(shapes) < max_levels:
        factor = 2 ** len(shapes)
        shapes.append((math.ceil(height / factor), math.ceil(width / factor)))
    return shapes


def chunk_slices_for(block_slices: int) -> int:
    """Image chunk depth (slices) for blocks of ``block_slices``: the largest divisor of it up to MAX_CHUNK_SLICES,
    so that every block is whole chunks (``chunk_slices_for(32) == 8``, ``chunk_slices_for(10) == 5``)."""
    return max(d for d in range(1, min(MAX_CHUNK_SLICES, block_slices) + 1) if block_slices % d == 0)


@dataclass(frozen=True)
class StoreLayout:
    """The shape of a mask store: (Z, Y, X) at level 0, slices per block, slices per image chunk, pyramid shapes."""

    shape_zyx: tuple[int, int, int]
    block_slices: int
    chunk_slices: int
    level_shapes_yx: tuple[tuple[int, int], ...]

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.shape_zyx[0] / self.block_slices)

    @property
    def n_levels(self) -> int:
        return len(self.level_shapes_yx)

    def block_range(self, block: int) -> tuple[int, int]:
        """[z0, z1) of block ``block``."""
        if not 0 <= block < self.n_blocks:
            raise IndexError(f"block {block} outside 0..{self.n_blocks - 1}")
        z0 = block * self.block_slices
        return z0, min(z0 + self.block_slices, self.shape_zyx[0])

    def block_of(self, z: int) -> int:
        return int(z) // self.block_slices


def _to_json(value: Any) -> Any:
    """``value`` as it reads back from JSON attributes (tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def identity_differences(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    """What differs between two run identities, one readable item per differing entry (nested dicts by key).

    >>> identity_differences({"channel": 1, "settings": {"z_sigma": 0}}, {"channel": 1, "settings": {"z_sigma": 1}})
    ['settings z_sigma is 0 there, 1 in this run']
    """
    stored, wanted = _to_json(stored), _to_json(wanted)
    differences = []
    for key in list(dict.fromkeys([*wanted, *stored])):
        old, new = stored.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += identity_differences(old, new, f"{prefix}{key} ")
        elif old != new:
            differences.append(f"{prefix}{key} is {_short(old)} there, {_short(new)} in this run")
    return differences


def is_mask_store(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a Protoscope OME-Zarr mask store (looks at its attributes only)."""
    attrs = Path(path) / ".zattrs"
    if not attrs.is_file():
        return False
    try:
        data = json.loads(attrs.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("protoscope"), dict) \
        and data["protoscope"].get("format") == FORMAT


def _compressor():
    import numcodecs

    # bit-shuffled zstd: a 0/255 mask chunk of 8 x 512 x 512 shrinks to a few kB
    return numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)


class MaskVolumeView:
    """(Z, Y, X) uint8 view of one pyramid level, read lazily slab by slab (what ``core.io.writers`` takes)."""

    def __init__(self, array: Any) -> None:
        self._array = array
        self.shape = tuple(int(v) for v in array.shape[1:])
        self.dtype = np.dtype(array.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        return np.asarray(self._array[(0, *key)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = np.asarray(self._array[0])
        return data if dtype is None else data.astype(dtype)


class MaskStore:
    """An OME-Zarr mask output (see the module docstring). Make one with ``create`` (after ``resume`` found none to
    continue), read one with ``open``. Block writers call ``write_slices``, ``write_block_results`` and
    ``mark_finished``."""

    def __init__(self, path: Path, attrs: dict) -> None:
        self.path = Path(path)
        meta = attrs["protoscope"]
        self.identity: dict = meta.get("identity", {})
        self.settings: dict = meta.get("settings", {})
        self.layout = StoreLayout(
            shape_zyx=tuple(int(v) for v in meta["shape_zyx"]),  # type: ignore[arg-type]
            block_slices=int(meta["block_slices"]),
            chunk_slices=int(meta["chunk_slices"]),
            level_shapes_yx=tuple(tuple(int(v) for v in s) for s in meta["level_shapes_yx"]),  # type: ignore[misc]
        )
        voxel = meta.get("voxel_size_um")
        self.voxel_size = VoxelSize(*(float(voxel[k]) for k in "xyz")) if voxel else None
        self.channel_name: str = meta.get("channel_name", "")
        self.created: str = meta.get("created", "")
        self.uid: str = meta.get("uid", "")  # new for every store made, so a replaced store is never taken for the old

    # ---- making and opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> "MaskStore":
        """Open an existing store. Raises StackError naming the folder when it is not one of ours or is damaged."""
        path = Path(path).expanduser()
        if not path.exists():
            raise StackError(f"'{path}' does not exist (check the path)")
        if not is_mask_store(path):
            raise StackError(f"'{path}' is not a Protoscope OME-Zarr mask output (no 'protoscope' entry of format "
                             f"{FORMAT} in its .zattrs)")
        attrs = json.loads((path / ".zattrs").read_text(encoding="utf-8"))
        version = attrs["protoscope"].get("version")
        if version != FORMAT_VERSION:
            raise StackError(f"'{path}' is a Protoscope mask output of format version {version}; this Protoscope "
                             f"reads version {FORMAT_VERSION}")
        try:
            return cls(path, attrs)
        except (KeyError, TypeError, ValueError) as error:
            raise StackError(f"'{path}' has damaged Protoscope attributes ({type(error).__name__}: {error})") from None

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        shape_zyx: Sequence[int],
        block_slices: int,
        identity: dict,
        settings: dict | None = None,
        voxel_size: VoxelSize | None = None,
        channel_name: str = "Protoscope mask",
        name: str = "",
        blobs: dict[str, bytes] | None = None,
        overwrite: bool = False,
        sources: Sequence[str | Path] = (),
    ) -> "MaskStore":
        """Make a new, empty store at ``path`` (a folder; '.ome.zarr' by convention).

        shape_zyx : (Z, Y, X) of the stack. block_slices : slices per block (a whole number of z-chunks).
        identity : JSON-able facts a rerun must share to resume (see ``resume``).
        settings : JSON-able facts the block writers read (not compared).
        blobs : named byte strings kept in the store (``read_blob``), e.g. the prototype file.
        overwrite : replace an existing store of ours (never any other folder).
        sources : the command's inputs; the output may be none of them.
        Raises OutputError when ``path`` exists (and is not ours, or ``overwrite`` is not set) or is an input.
        """
        out = Path(path).expanduser()
        check_not_an_input(out, [Path(p).expanduser() for p in sources])
        n_z, n_y, n_x = (int(v) for v in shape_zyx)
        if min(n_z, n_y, n_x) < 1 or block_slices < 1:
            raise OutputError(f"cannot make '{out}': shape {tuple(shape_zyx)} and block of {block_slices} slices")
        if out.exists():
            if not is_mask_store(out):
                raise OutputError(f"'{out}' exists and is not a Protoscope mask output; choose another name "
                                  "(it is never replaced)")
            if not overwrite:
                raise OutputError(f"'{out}' already exists; choose another name or allow overwriting "
                                  "(overwrite=True, CLI: --overwrite)")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create the output folder '{out.parent}' ({error.strerror or error})") from None
        _remove_stale_temp_folders(out)
        temp = temp_path_for(out)
        try:
            _write_new_store(temp, n_z, n_y, n_x, block_slices, identity, settings or {}, voxel_size, channel_name,
                             name or out.name, blobs or {})
            if out.exists():  # overwrite: only ours reaches here
                shutil.rmtree(out)
            os.rename(temp, out)
        except OSError as error:
            shutil.rmtree(temp, ignore_errors=True)
            raise OutputError(f"cannot write '{out}' ({error.strerror or error}); choose a folder you can write to") \
                from None
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return cls.open(out)

    @classmethod
    def resume(cls, path: str | Path, *, identity: dict, shape_zyx: Sequence[int], overwrite: bool = False,
               sources: Sequence[str | Path] = ()) -> "MaskStore | None":
        """The existing store at ``path`` when a run with ``identity`` may resume it, None when there is none
        to resume (nothing there, or ``overwrite``: ``create`` then makes a new one).

        Raises OutputError naming the output and every difference when it holds another run's masks (another
        stack, prototype, channel, slices, settings, threshold or backbone) and ``overwrite`` is not set, or when
        ``path`` is one of ``sources`` or a folder that is not a mask store.
        """
        out = Path(path).expanduser()
        check_not_an_input(out, [Path(p).expanduser() for p in sources])
        if not out.exists() or overwrite:
            return None
        if not is_mask_store(out):
            raise OutputError(f"'{out}' exists and is not a Protoscope mask output; choose another name "
                              "(it is never replaced)")
        store = cls.open(out)
        differences = identity_differences(store.identity, identity)
        shape = [int(v) for v in shape_zyx]
        if shape != list(store.layout.shape_zyx):
            differences.insert(0, f"shape (Z, Y, X) is {list(store.layout.shape_zyx)} there, {shape} in this run")
        if differences:
            raise OutputError(f"'{out}' holds the masks of another run ({'; '.join(differences)}); choose another "
                              "output, or overwrite it (CLI: --overwrite) to start again")
        store.remove_partial_files()
        return store

    # ---- arrays -------------------------------------------------------------------------------------

    def _array(self, name: str, mode: str = "r+"):
        import zarr

        return zarr.open_array(str(self.path / name), mode=mode, zarr_format=2)

    def level(self, level: int = 0) -> MaskVolumeView:
        """(Z, Y_k, X_k) uint8 0/255 view of pyramid ``level`` (0 = full resolution), read lazily."""
        if not 0 <= level < self.layout.n_levels:
            raise StackError(f"'{self.path.name}' has pyramid levels 0..{self.layout.n_levels - 1}, not {level}")
        return MaskVolumeView(self._array(str(level), "r"))

    def write_slices(self, z0: int, masks: np.ndarray) -> None:
        """Write (n, Y, X) masks (nonzero = foreground) as slices z0..z0+n-1 at every pyramid level.

        z0 and z0 + n must be chunk boundaries (or the end of the stack) so that no other block's chunks are touched.
        """
        slab = mask_to_uint8(masks)
        n_z = self.layout.shape_zyx[0]
        z1 = z0 + slab.shape[0]
        if z0 % self.layout.chunk_slices or not (z1 % self.layout.chunk_slices == 0 or z1 == n_z) or z1 > n_z:
            raise ValueError(f"slices {z0}..{z1 - 1} are not whole chunks of {self.layout.chunk_slices} slices")
        if tuple(slab.shape[1:]) != self.layout.level_shapes_yx[0]:
            raise ValueError(f"masks of {slab.shape[1:]} px for a store of {self.layout.level_shapes_yx[0]} px")
        for level in range(self.layout.n_levels):
            step = 2 ** level
            self._array(str(level))[0, z0:z1] = slab[:, ::step, ::step]

    def write_block_results(self, block: int, area_px: np.ndarray, thresholds: np.ndarray) -> None:
        """Per-slice mask areas (px; -1 = not requested) and thresholds (NaN = not requested) of ``block``."""
        z0, z1 = self.layout.block_range(block)
        self._array("protoscope/area_px")[z0:z1] = np.asarray(area_px, np.int64)
        self._array("protoscope/threshold")[z0:z1] = np.asarray(thresholds, np.float64)

    def mark_started(self, block: int, when: float | None = None) -> None:
        self._array("protoscope/started")[block] = time.time() if when is None else when

    def mark_finished(self, block: int, when: float | None = None) -> None:
        """Record ``block`` as complete (after its masks and results are written) and forget its failure."""
        self._array("protoscope/finished")[block] = time.time() if when is None else when
        (self.path / "protoscope" / "failures" / f"{block}.txt").unlink(missing_ok=True)

    def block_times(self) -> tuple[np.ndarray, np.ndarray]:
        """(started, finished) (n_blocks,) float64 Unix times; 0 = never."""
        return self._array("protoscope/started", "r")[:], self._array("protoscope/finished", "r")[:]

    def finished_blocks(self) -> set[int]:
        return {int(b) for b in np.flatnonzero(self._array("protoscope/finished", "r")[:] > 0)}

    def areas(self) -> tuple[np.ndarray, np.ndarray]:
        """(area_px (Z,) int64 with -1 where not written, threshold (Z,) float64 with NaN where not written)."""
        return self._array("protoscope/area_px", "r")[:], self._array("protoscope/threshold", "r")[:]

    def read_blob(self, name: str) -> bytes:
        return self._array(f"protoscope/blob_{name}", "r")[:].tobytes()

    # ---- failures -----------------------------------------------------------------------------------

    def record_failure(self, block: int, message: str) -> None:
        """Keep why ``block`` failed (shown by progress readers) until it finishes."""
        write_text(self.path / "protoscope" / "failures" / f"{block}.txt", message, overwrite=True)

    def failures(self) -> dict[int, str]:
        folder = self.path / "protoscope" / "failures"
        found = {}
        for path in sorted(folder.glob("*.txt")) if folder.is_dir() else []:
            if path.stem.isdigit():
                try:
                    found[int(path.stem)] = path.read_text(encoding="utf-8")
                except OSError:
                    continue
        return found

    # ---- the current run (written only by the submitting process) -----------------------------------

    def _run_attrs_path(self) -> Path:
        return self.path / "protoscope" / ".zattrs"

    def run_state(self) -> dict:
        """The current run's record (``run_id``, ``state``, ``started``, ``cancel``, ...); {} before the first run."""
        try:
            data = json.loads(self._run_attrs_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        run = data.get("run") if isinstance(data, dict) else None
        return run if isinstance(run, dict) else {}

    def set_run_state(self, **fields: Any) -> dict:
        """Update the current run's record with ``fields`` (None removes a field); returns the new record."""
        import zarr

        group = zarr.open_group(str(self.path / "protoscope"), mode="r+", zarr_format=2)
        run = {**self.run_state(), **_to_json(fields)}
        run = {key: value for key, value in run.items() if value is not None}
        group.attrs["run"] = run
        return run

    def remove_partial_files(self) -> list[Path]:
        """Delete the temp files (``*.partial``) of chunk writes a killed process left; returns them."""
        removed = []
        for path in self.path.rglob("*.partial"):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                continue
        return removed


def _write_new_store(folder: Path, n_z: int, n_y: int, n_x: int, block_slices: int, identity: dict, settings: dict,
                     voxel_size: VoxelSize | None, channel_name: str, name: str, blobs: dict[str, bytes]) -> None:
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata

    chunk_slices = chunk_slices_for(block_slices)
    shapes = pyramid_shapes((n_y, n_x))
    group = zarr.open_group(str(folder), mode="w", zarr_format=2)
    separator = {"name": "v2", "separator": "/"}
    for level, (height, width) in enumerate(shapes):
        group.create_array(str(level), shape=(1, n_z, height, width), dtype="uint8", fill_value=0,
                           chunks=(1, chunk_slices, min(TILE, height), min(TILE, width)),
                           compressors=_compressor(), chunk_key_encoding=separator)
    n_blocks = math.ceil(n_z / block_slices)
    extra = group.create_group("protoscope")
    for array_name in ("finished", "started"):
        extra.create_array(array_name, shape=(n_blocks,), chunks=(1,), dtype="float64", fill_value=0.0,
                           compressors=None, chunk_key_encoding=separator)
    extra.create_array("area_px", shape=(n_z,), chunks=(block_slices,), dtype="int64", fill_value=-1,
                       compressors=None, chunk_key_encoding=separator)
    extra.create_array("threshold", shape=(n_z,), chunks=(block_slices,), dtype="float64", fill_value=float("nan"),
                       compressors=None, chunk_key_encoding=separator)
    for blob_name, data in blobs.items():
        blob = extra.create_array(f"blob_{blob_name}", shape=(max(1, len(data)),), chunks=(max(1, len(data)),),
                                  dtype="uint8", fill_value=0, compressors=_compressor(), chunk_key_encoding=separator)
        blob[:] = np.frombuffer(data, np.uint8) if data else np.zeros(1, np.uint8)
    extra.attrs["run"] = {}
    unit = "micrometer" if voxel_size is not None else None
    axes: list[dict] = [{"name": "c", "type": "channel"}]
    axes += [{"name": axis, "type": "space", **({"unit": unit} if unit else {})} for axis in "zyx"]
    datasets = []
    for level in range(len(shapes)):
        step = 2 ** level
        if voxel_size is not None:
            scale = [1.0, float(voxel_size.z), float(voxel_size.y) * step, float(voxel_size.x) * step]
        else:
            scale = [1.0, 1.0, float(step), float(step)]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    omero = {"channels": [{"label": channel_name, "color": MASK_COLOR, "active": True,
                           "window": {"start": 0, "end": 255, "min": 0, "max": 255}}],
             "rdefs": {"model": "color"}}
    write_multiscales_metadata(group, datasets, fmt=FormatV04(), axes=axes, name=name,
                               metadata={"omero": omero, "method": "every 2^k-th pixel in y and x (nearest)",
                                         "description": "Protoscope masks, uint8 0/255"})
    group.attrs["protoscope"] = _to_json({
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "uid": uuid.uuid4().hex,
        "shape_zyx": [n_z, n_y, n_x],
        "block_slices": block_slices,
        "chunk_slices": chunk_slices,
        "level_shapes_yx": [list(s) for s in shapes],
        "voxel_size_um": voxel_size.as_dict() if voxel_size is not None else None,
        "channel_name": channel_name,
        "identity": identity,
        "settings": settings,
    })


def _remove_stale_temp_folders(out: Path) -> None:
    """Remove temp folders of ``out`` that a process of this machine, now dead, left while creating it."""
    host = _host_tag()
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return
    for entry in entries:
        match = TEMP_PATTERN.match(entry.name)
        if (match is None or match.group("host") != host or match.group("name") != out.name
                or not entry.is_dir(follow_symlinks=False) or _pid_alive(int(match.group("pid")))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)


def export_masks(store_path: str | Path, out_path: str | Path, *, source_ims: str | Path | None = None,
                 overwrite: bool = False, progress: Any = None) -> Path:
    """Write a mask store's full-resolution masks in the format of ``out_path``'s extension (``core.io.writers``):
    multi-page ImageJ TIFF, OME-TIFF, HDF5, or (with ``source_ims``, the stack the masks were made from) an Imaris
    copy with the mask as a new channel. Voxel size and channel name come from the store.

    Raises StackError for an unknown extension or a store that is not ours; OutputError for an existing output.
    """
    store = MaskStore.open(store_path)
    inputs = [Path(store_path)]
    return write_masks(store.level(0), out_path, voxel_size=store.voxel_size,
                       source_ims=Path(source_ims) if source_ims is not None else None,
                       channel_name=store.channel_name or "Protoscope mask", overwrite=overwrite,
                       description=f"Protoscope masks exported from {Path(store_path).name}", progress=progress,
                       sources=inputs)
