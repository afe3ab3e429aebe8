"""CLI commands for stacks: ``python -m core info STACK`` and ``python -m core export STACK ...``.

`register(subparsers)` adds both to the argparse parser built in core/cli/main.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from core.errors import StackError
from core.io.channels import channel_label, default_image_channel, guess_truth_channel

__all__ = ["register", "cmd_info", "cmd_export", "format_info", "export_slices"]

# ImageJ hyperstacks hold only these pixel types; anything else is written as a plain (Big)TIFF
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


def register(subparsers: Any) -> None:
    """Add the `info` and `export` subcommands to an argparse subparsers object."""
    info = subparsers.add_parser(
        "info", help="show a stack's format, shape, dtype, channels, voxel size, time points and levels",
        description="Show what a stack holds (.ims, TIFF/OME-TIFF/ImageJ TIFF, PNG/JPEG/BMP, or a folder of "
                    "images). Reads metadata only.",
    )
    info.add_argument("stack", help="stack file or image folder")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=cmd_info)

    export = subparsers.add_parser(
        "export", help="extract slices of one channel as a TIFF stack, or convert OME-Zarr masks",
        description="Extract slices of one channel as a multi-page TIFF in the stack's own pixel type "
                    "(ImageJ TIFF with voxel size; .ome.tif gives OME-TIFF). Use --z=-5: (with '=') for a "
                    "selection that starts with '-'. Given the OME-Zarr masks of 'apply', writes them whole as "
                    ".tif, .ome.tif, .h5, or an Imaris copy (.ims, with --source-ims).",
    )
    export.add_argument("stack", help="stack file, image folder, or OME-Zarr masks of 'apply'")
    export.add_argument("--channel", "-c", type=int, default=0,
                        help="channel index; negatives count from the end (-1 last, -2 penultimate). Default 0")
    export.add_argument("--z", default="all",
                        help="slices: '5', '3,7,9', '0:40' (end exclusive), '0:40:2', '-1', '0:5,9' or 'all' "
                             "(default)")
    export.add_argument("--timepoint", "-t", type=int, default=0, help="time point (default 0)")
    export.add_argument("--level", type=int, default=0, help="resolution level, 0 = full (default 0)")
    export.add_argument("--out", "-o", required=True,
                        help="output .tif/.tiff or .ome.tif (OME-Zarr masks: also .h5, .ims)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument("--source-ims", default=None, metavar="IMS",
                        help="OME-Zarr masks to --out NAME.ims: the .ims they were made from (copied, mask added)")
    export.set_defaults(func=cmd_export)


# ---- info ---------------------------------------------------------------------------------------


def format_info(desc: dict[str, Any]) -> str:
    """Readable multi-line summary of `Stack.describe()`."""
    z, c, y, x = desc["shape"]
    lines = [
        f"file:         {desc['path']}",
        f"format:       {desc['format']}",
        f"shape:        Z={z} C={c} Y={y} X={x}  (Z, C, Y, X)",
        f"dtype:        {desc['dtype']}",
    ]
    vs = desc["voxel_size"]
    lines.append("voxel size:   " + (f"x={vs['x']:.6g} µm, y={vs['y']:.6g} µm, z={vs['z']:.6g} µm"
                                     if vs else "unknown (the file does not say)"))
    lines.append(f"time points:  {desc['n_timepoints']}")
    levels = ", ".join(f"{i}: {s[0]}x{s[1]}x{s[2]}" for i, s in enumerate(desc["level_shapes"]))
    lines.append(f"levels:       {desc['n_levels']}  ({levels}; Z x Y x X)")
    lines.append("channels:")
    width = max(len(ch["name"]) for ch in desc["channels"])
    lines.append(f"  {'index':>5}  {'from end':>8}  {'name':<{width}}  colour (RGB)")
    for ch in desc["channels"]:
        color = " ".join(f"{v:.3f}" for v in ch["color"]) if ch["color"] else "-"
        lines.append(f"  {ch['index']:>5}  {ch['index'] - c:>8}  {ch['name']:<{width}}  {color}")
    names = [ch["name"] for ch in desc["channels"]]
    if "default_image_channel" in desc:
        lines.append(f"default image channel: {channel_label(names, desc['default_image_channel'])}")
        truth = desc.get("truth_channel_guess")
        lines.append("ground truth (by name): " + (channel_label(names, truth) if truth is not None else "none"))
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from core.io import open_stack

    with open_stack(args.stack) as stack:
        desc = stack.describe()
        # the defaults every command and the app would take (the rules of core.io.channels)
        desc["default_image_channel"] = default_image_channel(stack)
        desc["truth_channel_guess"] = guess_truth_channel(stack.channel_names,
                                                          image_channel=desc["default_image_channel"])
    print(json.dumps(desc, indent=2, ensure_ascii=False) if args.json else format_info(desc))
    return 0


# ---- export -------------------------------------------------------------------------------------


def _z_spacing(z_values: list[int]) -> int:
    """Step between the selected slices if evenly spaced, else 1."""
    steps = set(np.diff(z_values).tolist())
    return abs(steps.pop()) if len(steps) == 1 and 0 not in steps else 1


def export_slices(stack: Any, out: Path, z_values: list[int], *, channel: int = 0, timepoint: int = 0,
                  level: int = 0, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the planes `z_values` of one channel to a multi-page TIFF in the native dtype.

    .tif/.tiff -> ImageJ TIFF (uint8/uint16/float32; other types as a plain BigTIFF-capable TIFF) with
    the voxel size; .ome.tif/.ome.tiff -> OME-TIFF. The z spacing written is the stack's z voxel size
    times the step when the slices are evenly spaced (e.g. 0:40:2), else the stack's z voxel size.
    """
    import tifffile

    from core.io import VoxelSize
    from core.io.atomic import atomic_output

    name = out.name.lower()
    if not name.endswith((".tif", ".tiff")):
        raise StackError(f"export writes TIFF: '{out.name}' must end with .tif, .tiff, .ome.tif or .ome.tiff")
    c = stack.resolve_channel(channel)
    n_z, n_y, n_x = stack.level_shape(level)
    for z in z_values:  # validate everything before writing anything
        if not 0 <= z < n_z:
            raise StackError(f"slice z={z} requested but '{stack.name}' has z 0..{n_z - 1}")
    voxel = stack.level_voxel_size(level)
    if voxel is not None:
        voxel = VoxelSize(voxel.x, voxel.y, voxel.z * _z_spacing(z_values))
    total = len(z_values)
    every = max(1, total // 10)

    def planes() -> Iterator[np.ndarray]:
        planes_read = stack.read_slices(z_values, c, timepoint=timepoint, level=level)
        for i, (_, plane) in enumerate(planes_read, start=1):
            yield plane
            if progress and total > 5 and (i % every == 0 or i == total):
                print(f"[export] {i}/{total} slices", file=sys.stderr, flush=True)

    shape = (total, n_y, n_x)
    with atomic_output(out, overwrite=overwrite, source=stack.path) as tmp:
        kwargs: dict[str, Any] = {"shape": shape, "dtype": stack.dtype, "photometric": "minisblack"}
        if name.endswith((".ome.tif", ".ome.tiff")):
            meta: dict[str, Any] = {"axes": "ZYX", "Channel": {"Name": [stack.channel_names[c]]}}
            if voxel is not None:
                meta.update(PhysicalSizeX=voxel.x, PhysicalSizeXUnit="µm", PhysicalSizeY=voxel.y,
                            PhysicalSizeYUnit="µm", PhysicalSizeZ=voxel.z, PhysicalSizeZUnit="µm")
            tifffile.imwrite(tmp, planes(), ome=True, metadata=meta, **kwargs)
        elif stack.dtype in _IMAGEJ_DTYPES:
            meta = {"axes": "ZYX", "Labels": [stack.channel_names[c]] * total}
            if voxel is not None:
                meta.update(spacing=voxel.z, unit="um")
                kwargs["resolution"] = (1.0 / voxel.x, 1.0 / voxel.y)
            tifffile.imwrite(tmp, planes(), imagej=True, metadata=meta, **kwargs)
        else:
            tifffile.imwrite(tmp, planes(), metadata={"axes": "ZYX"}, **kwargs)
    return out


def cmd_export(args: argparse.Namespace) -> int:
    from core.io import open_stack
    from core.io.ome_zarr import is_mask_store
    from core.zspec import parse_z_spec

    if is_mask_store(args.stack):  # masks of `apply --out NAME.ome.zarr`
        from core.cli.pipeline import export_mask_store

        return export_mask_store(args)
    out = Path(args.out)
    with open_stack(args.stack) as stack:
        n_z = stack.level_shape(args.level)[0]
        z_values = parse_z_spec(args.z, n_z)
        c = stack.resolve_channel(args.channel)
        export_slices(stack, out, z_values, channel=c, timepoint=args.timepoint, level=args.level,
                      overwrite=args.overwrite)
        print(f"wrote {out}: {len(z_values)} slice(s) of channel {c} ({stack.channel_names[c]}), "
              f"{stack.level_shape(args.level)[2]}x{stack.level_shape(args.level)[1]} {stack.dtype.name}")
    return 0
