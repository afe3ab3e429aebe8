"""Looking at a stack in 3-D on the Segment and Batch pages: orthogonal views and a 3-D view of the masks.

- `orthogonal_panel`: XY, XZ and YZ sections through a chosen point, drawn in one picture at one µm scale (XY
  top left, YZ to its right sharing y, XZ below sharing x), with the mask outline (cyan) and the point (yellow).
- `volume_panel`: the batch mask as a 3-D surface (marching cubes of the max-pooled volume as a plotly
  Mesh3d: on a 64³ vessel mask it draws in ~0.9 s in headless Chromium against ~1.4 s for go.Isosurface,
  and sends 1.0 MB instead of 1.4 MB), with the number of connected pieces.
- `batch_views`: both, for the Batch page's last result (masks read back from the written files).

Read cost (see `core.views`): XY is one plane; XZ / YZ read every plane of the chosen resolution level once
(a 600-slice 3050 x 2933 ``.ims`` takes ~4 min at full resolution, so an Imaris level about 512 px across is
read by default, and full resolution is one choice away). Reads are cached per (stack, channel, level, y, x),
so moving z alone, or coming back to the page, reads nothing again. Above `CONFIRM_BYTES` the XZ / YZ read
waits for a click, with its size shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import streamlit as st
from PIL import Image, ImageDraw

from core.io import Stack, VoxelSize
from core.views import (
    ComponentSummary,
    OrthoViews,
    StackPlanes,
    assemble_views,
    choose_level,
    connected_components_summary,
    downsample_volume,
    level_point,
    mask_sections,
    read_cost,
    side_sections,
)
from ui import render, resources, state

#: XZ / YZ reads larger than this (bytes decoded) wait for a click.
CONFIRM_BYTES = 512 << 20
POINT_RGB = (255, 210, 0)
MIN_DEPTH_PX = 40  # a thin stack's XZ / YZ strips are drawn at least this thick (the caption says so)
MaskFn = Callable[[tuple[int, int, int], tuple[int, int, int]], tuple[Any, Any, Any] | None]


def _signature(path: str) -> str:
    status = Path(path).stat()
    return f"{status.st_size}:{status.st_mtime_ns}"


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # shared by sessions through the resource cache
    return array


@st.cache_resource(max_entries=16, show_spinner=False)
def _plane(path: str, signature: str, channel: int, level: int, z: int) -> np.ndarray:
    return _frozen(resources.open_cached_stack(path).read_slice(z, channel, level=level))


@st.cache_resource(max_entries=16, show_spinner=False)
def _sides(path: str, signature: str, channel: int, level: int, y: int, x: int) -> tuple[np.ndarray, np.ndarray]:
    xz, yz, _ = side_sections(resources.open_cached_stack(path), channel, y, x, level=level)
    return _frozen(xz), _frozen(yz)


# ------------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------------


def _normalise(image: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((np.asarray(image, np.float32) - low) / max(high - low, 1e-12), 0.0, 1.0)


def _nice_length(um: float) -> float:
    """The largest 1, 2 or 5 x 10^k µm not above ``um``."""
    if um <= 0:
        return 0.0
    power = 10.0 ** np.floor(np.log10(um))
    return float(max(m * power for m in (1, 2, 5) if m * power <= um))


def _cross(rgb: np.ndarray, row: int | None, col: int | None) -> None:
    """Blend a horizontal line at ``row`` and a vertical one at ``col`` (display pixels) in POINT_RGB."""
    color = np.asarray(POINT_RGB, np.float32)
    if row is not None:
        rgb[row] = (0.4 * rgb[row] + 0.6 * color).astype(np.uint8)
    if col is not None:
        rgb[:, col] = (0.4 * rgb[:, col] + 0.6 * color).astype(np.uint8)


def ortho_image(views: OrthoViews, max_width: int = 720, max_height: int = 640) -> tuple[np.ndarray, dict[str, float]]:
    """The three sections in one (H, W, 3) uint8 picture at a common µm scale: XY | YZ (transposed) over XZ.

    Returns the picture and {'px_per_um', 'z_exaggeration' (1.0 unless a thin stack's strips were thickened),
    'scale_um' (the scale bar's length, 0 without one)}.
    """
    n_z, n_y, n_x = views.level_shape
    (um_y, um_x), (um_z, _) = views.pixel_um["xy"], views.pixel_um["xz"]
    width_um, height_um, depth_um = n_x * um_x, n_y * um_y, n_z * um_z
    gap = 4
    scale = min((max_width - gap) / (width_um + depth_um), (max_height - gap) / (height_um + depth_um))
    exaggeration = 1.0
    if depth_um * scale < MIN_DEPTH_PX:  # thin stack: thicken the strips, then fit the width again
        exaggeration = MIN_DEPTH_PX / max(depth_um * scale, 1e-9)
        depth_um *= exaggeration
        scale = min((max_width - gap) / (width_um + depth_um), (max_height - gap) / (height_um + depth_um))
    w, h, d = (max(1, int(round(v * scale))) for v in (width_um, height_um, depth_um))
    low, high = np.percentile(np.asarray(views.xy, np.float64), [1.0, 99.5])
    if high <= low:
        low, high = float(np.min(views.xy)), float(np.max(views.xy)) + 1.0
    zl, yl, xl = views.level_point
    xy = render.compose(_normalise(views.xy, low, high), (w, h), mask=views.mask_xy)
    xz = render.compose(_normalise(views.xz, low, high), (w, d), mask=views.mask_xz)
    yz = render.compose(_normalise(views.yz.T, low, high), (d, h),
                        mask=None if views.mask_yz is None else views.mask_yz.T)
    row_y, col_x, depth_z = int((yl + 0.5) * h / n_y), int((xl + 0.5) * w / n_x), int((zl + 0.5) * d / n_z)
    _cross(xy, row_y, col_x)
    _cross(xz, depth_z, col_x)
    _cross(yz, row_y, depth_z)
    sheet = np.full((h + gap + d, w + gap + d, 3), 255, np.uint8)
    sheet[:h, :w], sheet[:h, w + gap:] = xy, yz
    sheet[h + gap:, :w] = xz
    canvas = Image.fromarray(sheet)
    draw = ImageDraw.Draw(canvas)
    for text, (x0, y0) in (("XY", (0, 0)), ("YZ", (w + gap, 0)), ("XZ", (0, h + gap))):
        draw.rectangle([x0, y0, x0 + 20, y0 + 13], fill=(0, 0, 0))
        draw.text((x0 + 3, y0 + 1), text, fill=(255, 255, 255))
    bar_um = _nice_length(width_um / 5) if views.voxel_known else 0.0
    if bar_um:
        length = int(round(bar_um * scale))
        y_bar = h - 8
        draw.rectangle([6, y_bar - 2, 6 + length, y_bar + 1], fill=(255, 255, 255))
        label = f"{bar_um:g} um"  # Pillow's built-in fonts have no µ
        draw.rectangle([6, y_bar - 17, 6 + 7 * len(label), y_bar - 4], fill=(0, 0, 0))
        draw.text((8, y_bar - 16), label, fill=(255, 255, 255))
    return np.asarray(canvas), {"px_per_um": scale, "z_exaggeration": exaggeration, "scale_um": bar_um}


# ------------------------------------------------------------------------------------------------
# orthogonal views
# ------------------------------------------------------------------------------------------------


def _level_label(stack: Stack, level: int) -> str:
    n_z, n_y, n_x = stack.level_shape(level)
    _, cost = read_cost(stack, level)
    name = "full resolution" if level == 0 else f"level {level}"
    return f"{name}: {n_x} x {n_y} x {n_z} (X x Y x Z), XZ / YZ read {cost / 1e6:,.0f} MB"


def _bounded(key: str, default: int, top: int) -> None:
    """Keep the bound setting ``key`` in 0..top (another stack may be smaller)."""
    value = state.get(key)
    if value is None or not 0 <= int(value) <= top:
        state.set_bound(key, min(max(int(default), 0), top))


def _choose_point(stack: Stack, z: int | None, point: Sequence[int] | None, key: str) -> tuple[int, int, int]:
    """x, y, z number inputs (level-0 pixels); z follows the page's slice and ``point`` follows its changes."""
    n_z, _, n_y, n_x = stack.shape
    default = tuple(point) if point is not None else (z if z is not None else n_z // 2, n_y // 2, n_x // 2)
    follow = (z, tuple(point) if point is not None else None)
    if state.get(f"{key}.follow") != follow:  # the page moved to another slice or point: the views follow
        state.put(f"{key}.follow", follow)
        for axis, value in zip("zyx", default):
            if value is not None:
                state.set_bound(f"{key}.{axis}", int(value))
    for axis, value, size in zip("zyx", default, (n_z, n_y, n_x)):
        _bounded(f"{key}.{axis}", value, size - 1)
    c1, c2, c3 = st.columns(3)
    x = c1.number_input("x (px)", 0, n_x - 1, step=1, **state.widget(f"{key}.x", n_x // 2))
    y = c2.number_input("y (px)", 0, n_y - 1, step=1, **state.widget(f"{key}.y", n_y // 2))
    zz = c3.number_input("z (slice)", 0, n_z - 1, step=1, **state.widget(f"{key}.z", n_z // 2))
    return int(zz), int(y), int(x)


def _choose_level(stack: Stack, key: str) -> int:
    if stack.n_levels == 1:
        return 0
    default = choose_level(stack)
    _bounded(f"{key}.level", default, stack.n_levels - 1)
    return int(st.selectbox("Resolution", list(range(stack.n_levels)), format_func=lambda lv: _level_label(stack, lv),
                            **state.widget(f"{key}.level", default),
                            help="A lower Imaris resolution level reads far less: XZ and YZ need every slice."))


def _draw(stack: Stack, channel: int, z: int | None, point: Sequence[int] | None, key: str,
          mask_fn: MaskFn | None) -> OrthoViews | None:
    """The widgets, reads and picture of an orthogonal panel; None when the user has not asked for it."""
    n_z = stack.shape[0]
    level = choose_level(stack)
    _, cost = read_cost(stack, level)
    if not st.toggle("Orthogonal views (XY · XZ · YZ)", **state.widget(f"{key}.show", cost <= CONFIRM_BYTES),
                     help="Sections through a point, in µm proportions: do structures stay connected across slices?"):
        return None
    point_zyx = _choose_point(stack, z, point, key)
    level = _choose_level(stack, key)
    planes, cost = read_cost(stack, level)
    path = str(stack.path)
    signature = _signature(path)
    allowed = state.get(f"{key}.confirmed") == (path, level)
    if cost > CONFIRM_BYTES and not allowed:
        st.info(f"XZ and YZ need a row and a column of all {planes} slices: {cost / 1e9:.1f} GB to read at this "
                "resolution" + (" (choose a lower level above for a fast view)." if stack.n_levels > 1 else "."))
        if st.button(f"Read all {planes} slices", key=f"{key}.confirm"):
            state.put(f"{key}.confirmed", (path, level))
            st.rerun()
        return None
    _, (zl, yl, xl) = level_point(stack, point_zyx, level)
    xy = _plane(path, signature, channel, level, zl)
    with st.spinner(f"Reading row y and column x of all {planes} slices…", show_time=True):
        xz, yz = _sides(path, signature, channel, level, yl, xl)
    masks = mask_fn(point_zyx, tuple(stack.level_shape(level))) if mask_fn is not None else None
    views = assemble_views(stack, point_zyx, level, xy, xz, yz, masks)
    picture, facts = ortho_image(views)
    st.image(picture)
    st.caption(ortho_caption(views, facts, n_z))
    if not views.voxel_known:
        st.caption(f"'{stack.name}' gives no voxel size: the sections are drawn 1:1 in pixels, not in µm.")
    return views


def ortho_caption(views: OrthoViews, facts: dict[str, float], n_slices: int) -> str:
    """One line: point, level and voxel size in µm, what was read, what the colours mean."""
    z, y, x = views.point_zyx
    n_z, n_y, n_x = views.level_shape
    where = "full resolution" if views.level == 0 else f"resolution level {views.level}"
    (um_y, um_x), (um_z, _) = views.pixel_um["xy"], views.pixel_um["xz"]
    voxel = f"voxels {um_x:.3g} x {um_y:.3g} x {um_z:.3g} µm (x, y, z)" if views.voxel_known else "pixels 1:1"
    text = (f"Point x {x}, y {y}, z {z} · {where}, {n_x} x {n_y} x {n_z}, {voxel} · XZ / YZ from {n_z} of "
            f"{n_slices} slices · yellow: the point, cyan: mask outline")
    if facts["z_exaggeration"] > 1.01:
        text += f" · z drawn {facts['z_exaggeration']:.1f}x thicker than to scale (a thin stack)"
    return text


def orthogonal_panel(ctx: resources.Context, z: int | None, point: Sequence[int] | None = None, masks: Any = None,
                     *, mask_z: Sequence[int] | None = None, slice_mask: np.ndarray | None = None,
                     stack: Stack | None = None, channel: int | None = None,
                     key: str = "segment.views") -> OrthoViews | None:
    """Orthogonal views of the page's stack through a chosen point, with the mask outline.

    z : the page's slice (the point's z follows it); point : optional (z, y, x) level-0 default point.
    masks, mask_z : a (N, Y, X) mask volume (array, memmap, `core.views.StackPlanes`) and the stack z of its
        planes (None: the planes span all of Z); read once per run.
    slice_mask : (Y, X) bool mask of slice ``z`` (the Segment page's current mask): drawn in XY, and as one row
        in XZ / YZ.
    stack, channel : another stack than the context's (Batch on another stack).
    Cost: one plane for XY; XZ / YZ read every plane of the resolution level once, cached per (y, x).
    """
    stack = ctx.stack if stack is None else stack
    channel = ctx.channel if channel is None else stack.resolve_channel(channel)
    volume, planes_z = masks, mask_z
    if volume is None and slice_mask is not None and z is not None:
        volume, planes_z = np.asarray(slice_mask)[None], [z]  # one plane: XY, and one row of XZ / YZ

    def mask_fn(point_zyx, view_shape):
        return mask_sections(volume, point_zyx, stack.level_shape(0), view_shape, planes_z)

    return _draw(stack, channel, z, point, key, mask_fn if volume is not None else None)


# ------------------------------------------------------------------------------------------------
# 3-D view
# ------------------------------------------------------------------------------------------------


def _spacing(voxel_size: VoxelSize | Sequence[float] | None) -> VoxelSize | None:
    if voxel_size is None or isinstance(voxel_size, VoxelSize):
        return voxel_size
    z, y, x = (float(v) for v in voxel_size)
    return VoxelSize(x=x, y=y, z=z)


def volume_figure(volume: np.ndarray, spacing: Sequence[float], *, unit: str = "µm"):
    """Plotly figure of a small (z, y, x) bool volume: its surface (marching cubes) as Mesh3d, the largest
    26-connected piece in red and the others in orange, axes in ``unit`` at true proportions."""
    import plotly.graph_objects as go
    from scipy import ndimage
    from skimage.measure import marching_cubes

    labels, count = ndimage.label(volume, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1 if count else 0
    traces = []
    for name, part, color in (("largest piece", labels == largest, "crimson"),
                              ("other pieces", (labels > 0) & (labels != largest), "orange")):
        if not part.any():
            continue
        # pad so surfaces at the volume's faces close; -1 puts vertices back at voxel coordinates
        verts, faces, _, _ = marching_cubes(np.pad(part, 1).astype(np.float32), 0.5, spacing=tuple(spacing))
        verts -= np.asarray(spacing)
        traces.append(go.Mesh3d(x=verts[:, 2], y=verts[:, 1], z=verts[:, 0], i=faces[:, 0], j=faces[:, 1],
                                k=faces[:, 2], color=color, name=name, showlegend=True, flatshading=True,
                                hoverinfo="skip"))
    fig = go.Figure(traces)
    fig.update_layout(height=480, margin=dict(l=0, r=0, t=10, b=0), legend=dict(x=0, y=1),
                      scene=dict(aspectmode="data", xaxis_title=f"x ({unit})", yaxis_title=f"y ({unit})",
                                 zaxis_title=f"z ({unit})"))
    return fig


def volume_panel(mask_volume: Any, voxel_size: VoxelSize | Sequence[float] | None, *, max_voxels: int = 64 ** 3,
                 key: str = "batch.volume", what: str = "structures") -> ComponentSummary:
    """A 3-D view of a (Z, Y, X) mask volume (nonzero = mask), max-pooled to at most ``max_voxels``, with the
    number of 26-connected pieces.

    voxel_size : µm of one voxel of ``mask_volume`` (a VoxelSize, or (z, y, x)); None draws in voxels.
    Cost: the volume is read once in ~64 MB slabs (a 600 x 3000 x 3000 uint8 memmap: 5.4 GB from disk); marching
    cubes of 64³ takes ~10 ms and the browser draws it in about a second.
    """
    spacing_in = _spacing(voxel_size)
    volume, spacing = downsample_volume(mask_volume, max_voxels, voxel_size=spacing_in)
    summary = connected_components_summary(volume)
    if summary.n_components == 0:
        st.info("The mask is empty: nothing to show in 3-D.")
        return summary
    st.plotly_chart(volume_figure(volume, spacing, unit="µm" if spacing_in is not None else "voxels"),
                    key=f"{key}.plot")
    size = " x ".join(f"{s:.3g}" for s in spacing[::-1])
    st.caption(f"{summary.sentence(what)} Counted with 26-connectivity on this {volume.shape[2]} x {volume.shape[1]} "
               f"x {volume.shape[0]} view (voxels {size} {'µm' if spacing_in is not None else 'px'}, x, y, z; max-"
               "pooled, so pieces closer than one voxel of it count as one).")
    return summary


# ------------------------------------------------------------------------------------------------
# the Batch page's result
# ------------------------------------------------------------------------------------------------


@st.cache_resource(max_entries=4, show_spinner=False)
def _file_volume(path: str, signature: str, channel: int, level: int, max_voxels: int
                 ) -> tuple[np.ndarray, tuple[float, float, float]]:
    stack = resources.open_cached_stack(path)
    volume, spacing = downsample_volume(StackPlanes(stack, channel, level=level), max_voxels)
    return _frozen(volume), spacing


@st.cache_resource(max_entries=16, show_spinner=False)
def _file_sections(path: str, signature: str, channel: int, level: int, mask_z: tuple[int, ...] | None,
                   point_zyx: tuple[int, int, int], full_shape: tuple[int, int, int], view_shape: tuple[int, int, int]):
    planes = StackPlanes(resources.open_cached_stack(path), channel, level=level)
    return mask_sections(planes, point_zyx, full_shape, view_shape, mask_z)


def mask_source(outputs: Any) -> tuple[str, int, tuple[int, ...] | None] | None:
    """(file, channel, stack z of its planes or None for all) of a batch result's masks, read back from the files
    it wrote: the Imaris copy (mask = last channel, all slices, with resolution levels) first, then TIFF."""
    files = getattr(outputs, "files", {}) or {}
    if "ims" in files and Path(files["ims"]).exists():
        return files["ims"], -1, None
    for key in ("tif", "ome"):
        if key in files and Path(files[key]).exists():
            return files[key], 0, tuple(int(z) for z in outputs.z_values)
    return None


def batch_views(ctx: resources.Context, outputs: Any, *, key: str = "batch.views") -> None:
    """Orthogonal views (with the mask outline) and the 3-D view of the Batch page's last result.

    outputs : ui.batch.BatchOutputs. The masks are read back from the files the run wrote (its memory-mapped
    volume is gone); the image stack is the context's when the batch ran on it, else ``outputs.stack_path`` when
    the result records it (with ``outputs.channel``).
    """
    if outputs is None or outputs.result.cancelled:
        return
    source = mask_source(outputs)
    if source is None:
        st.caption("Write the masks as TIFF, OME-TIFF or an Imaris copy to see them in 3-D here.")
        return
    path, mask_channel, mask_z = source
    mask_stack = resources.open_cached_stack(path)
    mask_channel = mask_stack.resolve_channel(mask_channel)
    signature = _signature(path)
    st.markdown("**In 3-D**")
    left, right = st.columns([3, 2], gap="medium")
    with right:
        # from an Imaris copy, the coarsest level that still has more voxels than the 3-D view needs
        level = max([lv for lv in range(mask_stack.n_levels)
                     if np.prod(mask_stack.level_shape(lv), dtype=np.int64) >= 64 ** 3] or [0])
        with st.spinner("Reading the masks for the 3-D view…", show_time=True):
            volume, factors = _file_volume(path, signature, mask_channel, level, 64 ** 3)
        voxel = mask_stack.level_voxel_size(level) or ctx.stack.voxel_size
        spacing = None
        if voxel is not None:
            z_step = voxel.z
            if mask_z is not None and len(mask_z) > 1:  # a batch over some slices: planes are that far apart
                z_step = float(np.median(np.diff(mask_z))) * (ctx.stack.voxel_size or voxel).z
            spacing = (z_step * factors[0], voxel.y * factors[1], voxel.x * factors[2])
        volume_panel(volume, spacing, key=f"{key}.volume")
    with left:
        stack_path = getattr(outputs, "stack_path", None)
        if stack_path:
            stack = resources.open_cached_stack(stack_path)
            channel = getattr(outputs, "channel", None)
            channel = stack.resolve_channel(channel) if channel is not None else 0
        elif outputs.stack_name == ctx.stack.name:
            stack, channel = ctx.stack, ctx.channel
        else:
            st.caption(f"Orthogonal views: open '{outputs.stack_name}' as the sample to see its sections.")
            return
        if mask_stack.shape[2:] != stack.shape[2:]:
            st.caption(f"Orthogonal views: the masks in '{Path(path).name}' are not the size of '{stack.name}'.")
            return
        same_levels = mask_z is None and all(mask_stack.level_shape(lv) == stack.level_shape(lv)
                                             for lv in range(min(mask_stack.n_levels, stack.n_levels)))

        def mask_fn(point_zyx, view_shape):
            # the Imaris copy has the image's levels: read the mask at the level shown, which is cheap
            lv = next((v for v in range(mask_stack.n_levels) if same_levels
                       and tuple(mask_stack.level_shape(v)) == tuple(view_shape)), 0)
            with st.spinner("Reading the mask sections…", show_time=True):
                return _file_sections(path, signature, mask_channel, lv, mask_z, tuple(point_zyx),
                                      tuple(stack.level_shape(0)), tuple(view_shape))

        _draw(stack, channel, None, None, key, mask_fn)
