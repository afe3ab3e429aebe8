"""Looking at a stack in 3-D: orthogonal sections (XY, XZ, YZ) and a small volume of the masks.

Axis conventions: stacks and mask volumes are ``(Z, Y, X)``; points are ``(z, y, x)`` at full resolution
(level 0); sizes are in µm. The sections are

- XY: the plane at z, ``(Y, X)``;
- XZ: row y of every plane, ``(Z, X)`` (``volume[:, y, :]``);
- YZ: column x of every plane, ``(Z, Y)`` (``volume[:, :, x]``).

Read cost: XY is one plane. XZ and YZ need one row and one column of every slice, and a `Stack` only reads
whole planes, so they cost one pass over all Z planes (read grouped through `Stack.read_slices`, at most
``max_bytes`` held at a time; the stack is never loaded whole). On a chunked 3050 x 2933 ``.ims`` one grouped
plane read takes ~0.37 s, so 600 slices at full resolution take ~4 min; `choose_level` therefore picks the
coarsest Imaris resolution level that still has ``max_side`` pixels across (level 2, ~763 x 733, about 16x
cheaper, for that file), and ``level=0`` asks for full resolution. Formats without levels (TIFF, images)
always read full planes.

The mask volume for the 3-D view is reduced by block max-pooling (`downsample_volume`), so a vessel one voxel
thin still shows; `connected_components_summary` counts its 26-connected pieces.

>>> views = orthogonal_planes(stack, 1, (300, 1500, 1400))          # doctest: +SKIP
>>> views.xz.shape, views.stretch("xz")                             # doctest: +SKIP
((150, 763), 2.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from scipy import ndimage

from core.errors import OptionError
from core.io.base import Stack, VoxelSize
from core.io.preview import preview_level

__all__ = [
    "OrthoViews",
    "ComponentSummary",
    "StackPlanes",
    "choose_level",
    "read_cost",
    "side_sections",
    "mask_sections",
    "orthogonal_planes",
    "assemble_views",
    "level_point",
    "downsample_volume",
    "connected_components_summary",
    "VIEW_NAMES",
]

VIEW_NAMES = ("xy", "xz", "yz")
_SLAB_BYTES = 64 << 20  # mask bytes read at a time


@dataclass(frozen=True)
class OrthoViews:
    """Three orthogonal sections through one point, at one resolution level.

    xy : (Yl, Xl), xz : (Zl, Xl), yz : (Zl, Yl) arrays in the stack's dtype, at resolution ``level``.
    mask_xy, mask_xz, mask_yz : bool masks on the same grids, or None (no masks, or slice z not segmented).
    point_zyx : the point at level 0; level_point : the same point at ``level``; level_shape : (Zl, Yl, Xl).
    pixel_um : per view, the (row, column) size of one pixel in µm; 1.0 each when the stack has no voxel size
        (``voxel_known`` False).
    planes_read : stack planes read to build the sections (1 for XY alone, Zl with XZ / YZ).
    """

    xy: np.ndarray
    xz: np.ndarray
    yz: np.ndarray
    point_zyx: tuple[int, int, int]
    level_point: tuple[int, int, int]
    level: int
    level_shape: tuple[int, int, int]
    pixel_um: dict[str, tuple[float, float]]
    voxel_known: bool
    planes_read: int
    mask_xy: np.ndarray | None = None
    mask_xz: np.ndarray | None = None
    mask_yz: np.ndarray | None = None

    def stretch(self, view: str) -> float:
        """How much taller than wide one pixel of ``view`` ('xy', 'xz', 'yz') is in µm (row size / column size)."""
        rows, cols = self.pixel_um[view]
        return rows / cols

    def image(self, view: str) -> np.ndarray:
        return {"xy": self.xy, "xz": self.xz, "yz": self.yz}[view]

    def mask(self, view: str) -> np.ndarray | None:
        return {"xy": self.mask_xy, "xz": self.mask_xz, "yz": self.mask_yz}[view]


@dataclass(frozen=True)
class ComponentSummary:
    """The 26-connected pieces of a 3-D mask: their count, voxel sizes (largest first) and the largest's share."""

    n_components: int
    sizes: tuple[int, ...]
    total_voxels: int

    @property
    def largest_share(self) -> float:
        """Fraction (0..1) of the mask voxels in the largest piece; 0.0 for an empty mask."""
        return self.sizes[0] / self.total_voxels if self.total_voxels else 0.0

    def sentence(self, what: str = "vessels") -> str:
        if self.n_components == 0:
            return "The mask is empty."
        if self.n_components == 1:
            return f"The {what} form 1 connected piece."
        return (f"The {what} form {self.n_components} connected pieces; the largest holds "
                f"{100 * self.largest_share:.0f} % of the mask.")


class StackPlanes:
    """A channel of a `Stack` seen as a read-only ``(Z, Y, X)`` array: ``planes[z0:z1]`` reads those slices.

    Lets a written mask file (or the mask channel of an ``.ims`` copy, at any resolution level) be passed
    wherever a mask volume is expected; only z-slices (and integers) are supported, read through
    `Stack.read_slices`.
    """

    def __init__(self, stack: Stack, channel: int = 0, *, level: int = 0, timepoint: int = 0) -> None:
        self.stack = stack
        self.channel = stack.resolve_channel(channel)
        self.level = int(level)
        self.timepoint = int(timepoint)
        self.shape = tuple(stack.level_shape(self.level))
        self.dtype = stack.dtype
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self.stack.read_slice(int(index), self.channel, timepoint=self.timepoint, level=self.level)
        if isinstance(index, slice) and index.step in (None, 1):
            z_values = range(*index.indices(self.shape[0]))
            planes = [p for _, p in self.stack.read_slices(z_values, self.channel, timepoint=self.timepoint,
                                                          level=self.level)]
            return np.stack(planes) if planes else np.zeros((0, *self.shape[1:]), self.dtype)
        raise TypeError("StackPlanes supports an integer z or a z-slice with step 1")


# ------------------------------------------------------------------------------------------------
# orthogonal sections
# ------------------------------------------------------------------------------------------------


def choose_level(stack: Stack, max_side: int = 512) -> int:
    """The coarsest resolution level whose planes still have ``max_side`` pixels across (0 when none has).

    More pixels than the display shows cost reads and show nothing more; fewer look blurred. The rule is
    `core.io.preview.preview_level`'s (the slice previews), so both views pick the same level.
    """
    return preview_level(stack, max_side)


def read_cost(stack: Stack, level: int) -> tuple[int, int]:
    """(planes, bytes) XZ / YZ sections read at ``level``: every plane of the level once."""
    n_z, n_y, n_x = stack.level_shape(level)
    return n_z, n_z * n_y * n_x * stack.dtype.itemsize


def level_point(stack: Stack, point_zyx: Sequence[int], level: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(level-0 point, the same point at ``level``): (z, y, x) -> (z * Zl // Z, ...).

    Raises OptionError naming the stack when the point lies outside it, StackError for a level it lacks.
    """
    if len(point_zyx) != 3:
        raise OptionError(f"a point is (z, y, x); got {tuple(point_zyx)}")
    full = stack.level_shape(0)
    point = tuple(int(v) for v in point_zyx)
    for axis, value, size in zip("zyx", point, full):
        if not 0 <= value < size:
            raise OptionError(f"point {axis}={value} lies outside '{stack.name}', whose {axis} runs 0..{size - 1}")
    shape = stack.level_shape(level)
    return point, tuple(p * s // f for p, s, f in zip(point, shape, full))  # type: ignore[return-value]


def side_sections(stack: Stack, channel: int, y: int, x: int, *, level: int = 0, timepoint: int = 0,
                  z: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """XZ at row ``y`` and YZ at column ``x`` (level-``level`` coordinates) in one pass over the level's planes.

    Returns (xz (Zl, Xl), yz (Zl, Yl), xy (Yl, Xl) of plane ``z`` or None when ``z`` is None), native dtype.
    Cost: every plane of the level is read once, grouped (`Stack.read_slices`); see the module docstring.
    """
    n_z, n_y, n_x = stack.level_shape(level)
    xz = np.empty((n_z, n_x), stack.dtype)
    yz = np.empty((n_z, n_y), stack.dtype)
    xy = None
    for k, plane in stack.read_slices(range(n_z), channel, timepoint=timepoint, level=level):
        xz[k] = plane[y]
        yz[k] = plane[:, x]
        if k == z:
            xy = plane.copy()
    return xz, yz, xy


def _resample_any(values: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Bool ``values`` to ``n_out`` along ``axis``: OR over each output's input block when shrinking (a thin
    structure survives), nearest neighbour when enlarging."""
    n_in = values.shape[axis]
    if n_in == n_out:
        return values
    if n_in > n_out:
        edges = np.arange(n_out) * n_in // n_out
        return np.logical_or.reduceat(values, edges, axis=axis)
    return np.take(values, np.arange(n_out) * n_in // n_out, axis=axis)


def _resample_plane(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return _resample_any(_resample_any(np.asarray(values) > 0, shape[0], 0), shape[1], 1)


def _slabs(volume: Any, step: int) -> Iterator[tuple[int, np.ndarray]]:
    for z0 in range(0, volume.shape[0], step):
        yield z0, np.asarray(volume[z0:z0 + step])


def mask_sections(masks: Any, point_zyx: Sequence[int], full_shape: Sequence[int], view_shape: Sequence[int],
                  mask_z: Sequence[int] | None = None) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Sections of a mask volume through a point, on the grid of the image sections.

    masks : (N, Ym, Xm) array-like (numpy array, memmap, h5py dataset, `StackPlanes`), nonzero = mask, covering
        the stack's field of view at any resolution (full, or an Imaris level).
    point_zyx : (z, y, x) at level 0; full_shape : level-0 (Z, Y, X); view_shape : (Zl, Yl, Xl) of the sections.
    mask_z : level-0 z of each mask plane (a batch over some slices); None when the N planes span all of Z.
    Returns (xy (Yl, Xl) or None when slice z has no mask plane, xz (Zl, Xl), yz (Zl, Yl)) bool; slices
    without a mask plane are empty in XZ / YZ. Reads the masks once, in slabs of ~64 MB.
    Raises OptionError when the shapes do not fit.
    """
    z0, y0, x0 = (int(v) for v in point_zyx)
    n_z0, n_y0, n_x0 = (int(v) for v in full_shape)
    n_zl, n_yl, n_xl = (int(v) for v in view_shape)
    if len(getattr(masks, "shape", ())) != 3:
        raise OptionError(f"the masks must be a (Z, Y, X) volume; got shape {getattr(masks, 'shape', None)}")
    n_m, n_ym, n_xm = (int(v) for v in masks.shape)
    if mask_z is None:
        plane_z = np.arange(n_m) * n_z0 // n_m  # planes evenly spanning Z (full or a coarser level)
        xy_index = z0 * n_m // n_z0
    else:
        plane_z = np.asarray(list(mask_z), dtype=np.int64)
        if len(plane_z) != n_m:
            raise OptionError(f"{len(plane_z)} slice numbers given for {n_m} mask planes; give one z per plane")
        if plane_z.size and (plane_z.min() < 0 or plane_z.max() >= n_z0):
            raise OptionError(f"mask slice numbers {plane_z.min()}..{plane_z.max()} lie outside the stack's "
                              f"z 0..{n_z0 - 1}")
        hits = np.flatnonzero(plane_z == z0)
        xy_index = int(hits[0]) if hits.size else None
    ym, xm = y0 * n_ym // n_y0, x0 * n_xm // n_x0
    rows = np.zeros((n_m, n_xm), bool)
    cols = np.zeros((n_m, n_ym), bool)
    xy = None
    step = max(1, _SLAB_BYTES // max(1, n_ym * n_xm * np.dtype(masks.dtype).itemsize))
    for start, slab in _slabs(masks, step):
        rows[start:start + len(slab)] = slab[:, ym, :] > 0
        cols[start:start + len(slab)] = slab[:, :, xm] > 0
        if xy_index is not None and start <= xy_index < start + len(slab):
            xy = _resample_plane(slab[xy_index - start], (n_yl, n_xl))
    view_rows = plane_z * n_zl // n_z0  # the section row each mask plane falls in
    xz = np.zeros((n_zl, n_xl), bool)
    yz = np.zeros((n_zl, n_yl), bool)
    np.logical_or.at(xz, view_rows, _resample_any(rows, n_xl, 1))
    np.logical_or.at(yz, view_rows, _resample_any(cols, n_yl, 1))
    return xy, xz, yz


def _pixel_um(voxel: VoxelSize | None) -> tuple[dict[str, tuple[float, float]], bool]:
    if voxel is None or not all(np.isfinite(v) and v > 0 for v in (voxel.x, voxel.y, voxel.z)):
        return {name: (1.0, 1.0) for name in VIEW_NAMES}, False
    return {"xy": (voxel.y, voxel.x), "xz": (voxel.z, voxel.x), "yz": (voxel.z, voxel.y)}, True


def orthogonal_planes(stack: Stack, channel: int, point_zyx: Sequence[int], *, max_side: int = 512,
                      level: int | None = None, masks: Any = None, mask_z: Sequence[int] | None = None,
                      timepoint: int = 0) -> OrthoViews:
    """XY, XZ and YZ sections of ``channel`` through ``point_zyx`` (level-0 z, y, x), with their µm pixel sizes.

    level : resolution level to read; None picks `choose_level(stack, max_side)` (the coarsest with
        ``max_side`` pixels across; 0 for stacks without levels), 0 asks for full resolution.
    masks, mask_z : optional mask volume and the level-0 z of its planes (see `mask_sections`); their
        sections come back as ``mask_xy``, ``mask_xz``, ``mask_yz`` on the same grids.
    Cost: one pass over the level's Z planes (see the module docstring), plus one pass over the masks.
    Raises OptionError for a point outside the stack, StackError for a bad channel, level or unreadable data.
    """
    channel = stack.resolve_channel(channel)
    level = choose_level(stack, max_side) if level is None else int(level)
    _, (zl, yl, xl) = level_point(stack, point_zyx, level)
    xz, yz, xy = side_sections(stack, channel, yl, xl, level=level, timepoint=timepoint, z=zl)
    assert xy is not None
    sections = None
    if masks is not None:
        sections = mask_sections(masks, point_zyx, stack.level_shape(0), stack.level_shape(level), mask_z)
    return assemble_views(stack, point_zyx, level, xy, xz, yz, sections)


def assemble_views(stack: Stack, point_zyx: Sequence[int], level: int, xy: np.ndarray, xz: np.ndarray,
                   yz: np.ndarray, masks: tuple[np.ndarray | None, np.ndarray, np.ndarray] | None = None,
                   ) -> OrthoViews:
    """`OrthoViews` from sections read separately (e.g. cached by the app: XY per z, XZ / YZ per (y, x)).

    xy (Yl, Xl), xz (Zl, Xl), yz (Zl, Yl) at ``level``; masks : (xy or None, xz, yz) from `mask_sections`.
    Raises OptionError when a section does not have the level's shape.
    """
    point, lpoint = level_point(stack, point_zyx, level)
    shape = tuple(stack.level_shape(level))
    n_z, n_y, n_x = shape
    expected = {"xy": (n_y, n_x), "xz": (n_z, n_x), "yz": (n_z, n_y)}
    for name, array in zip(VIEW_NAMES, (xy, xz, yz)):
        if np.shape(array) != expected[name]:
            raise OptionError(f"the {name.upper()} section is {np.shape(array)} but level {level} of "
                              f"'{stack.name}' needs {expected[name]}")
    pixel_um, known = _pixel_um(stack.level_voxel_size(level))
    mask_xy, mask_xz, mask_yz = masks if masks is not None else (None, None, None)
    return OrthoViews(xy=xy, xz=xz, yz=yz, point_zyx=point, level_point=lpoint, level=level,
                      level_shape=shape, pixel_um=pixel_um, voxel_known=known,  # type: ignore[arg-type]
                      planes_read=n_z, mask_xy=mask_xy, mask_xz=mask_xz, mask_yz=mask_yz)


# ------------------------------------------------------------------------------------------------
# the 3-D view
# ------------------------------------------------------------------------------------------------


def _pool_factors(shape: Sequence[int], max_voxels: int) -> tuple[int, int, int]:
    """Integer (fz, fy, fx): the longest output axis is shortened first until the output fits ``max_voxels``."""
    factors = [1, 1, 1]
    sizes = [int(s) for s in shape]

    def out() -> list[int]:
        return [-(-n // f) for n, f in zip(sizes, factors)]

    while int(np.prod(out(), dtype=np.int64)) > max_voxels:
        current = out()
        axis = max(range(3), key=lambda a: (current[a], a))  # ties shorten x, then y, before z
        factors[axis] = -(-sizes[axis] // (current[axis] - 1)) if current[axis] > 1 else factors[axis]
    return tuple(factors)  # type: ignore[return-value]


def downsample_volume(mask: Any, max_voxels: int = 64 ** 3, *, voxel_size: VoxelSize | None = None
                      ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A (Z, Y, X) mask reduced to at most ``max_voxels`` voxels by block max-pooling, with its voxel spacing.

    mask : (Z, Y, X) array-like, nonzero = mask (numpy array, memmap, h5py dataset, `StackPlanes`); read in
        slabs of ~64 MB, so a memmap larger than RAM works.
    voxel_size : µm of one input voxel; None gives spacings in input voxels.
    Returns (volume (z, y, x) bool, spacing (z, y, x) µm of one output voxel). An output voxel is True when any
    input voxel of its block is, so a one-voxel-thin vessel survives (and pieces closer than a block merge).
    Integer factors per axis; the longest axis is reduced first, so a thin stack keeps its slices.
    """
    if len(getattr(mask, "shape", ())) != 3:
        raise OptionError(f"the mask volume must be (Z, Y, X); got shape {getattr(mask, 'shape', None)}")
    if max_voxels < 1:
        raise OptionError(f"max_voxels must be at least 1, got {max_voxels}")
    n_z, n_y, n_x = (int(v) for v in mask.shape)
    fz, fy, fx = _pool_factors((n_z, n_y, n_x), max_voxels)
    out = np.zeros((-(-n_z // fz), -(-n_y // fy), -(-n_x // fx)), bool)
    plane_bytes = max(1, n_y * n_x * np.dtype(mask.dtype).itemsize)
    step = fz * max(1, _SLAB_BYTES // (plane_bytes * fz))  # whole blocks of fz planes per slab
    edges_y, edges_x = np.arange(0, n_y, fy), np.arange(0, n_x, fx)
    for z0, slab in _slabs(mask, step):
        if slab.dtype.kind not in "bu":  # max keeps "nonzero" only for bool and unsigned values
            slab = slab != 0
        z_edges = np.arange(0, len(slab), fz)
        pooled = np.maximum.reduceat(slab, z_edges, axis=0)  # z first: the slab shrinks fz-fold before y, x
        pooled = np.maximum.reduceat(np.maximum.reduceat(pooled, edges_y, axis=1), edges_x, axis=2)
        out[z0 // fz:z0 // fz + len(z_edges)] = pooled > 0
    if voxel_size is None:
        spacing = (float(fz), float(fy), float(fx))
    else:
        spacing = (voxel_size.z * fz, voxel_size.y * fy, voxel_size.x * fx)
    return out, spacing


def connected_components_summary(mask: np.ndarray) -> ComponentSummary:
    """26-connected pieces of a (Z, Y, X) mask (nonzero = mask): count, sizes largest first, total voxels.

    Meant for the small volume of `downsample_volume` (labelling a full 600 x 3000 x 3000 stack takes minutes
    and GBs); there, pieces closer than one block count as one.
    """
    volume = np.asarray(mask) > 0
    if volume.ndim != 3:
        raise OptionError(f"the mask volume must be (Z, Y, X); got shape {volume.shape}")
    labels, count = ndimage.label(volume, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())[1:] if count else np.zeros(0, np.int64)
    return ComponentSummary(int(count), tuple(int(s) for s in sorted(sizes, reverse=True)), int(volume.sum()))
