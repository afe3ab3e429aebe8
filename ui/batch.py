"""The Batch page's work: apply a prototype to a z-range, write the masks server-side, summarise the result.

Masks go into a memory-mapped volume (``core.batch.MaskVolume``, its scratch file in Protoscope's own temp
folder, never the output folder), so results larger than RAM work; the files are written only after the last
slice, so a cancelled run leaves no half-written output. Output names end in a short random tail, so two
sessions batching one stack in the same second never collide. Embeddings go through the on-disk cache: a
cancelled run resumes where it stopped. A run on a Dask cluster (ui.cluster) ends in the same ``BatchOutputs``.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from core.batch import BatchPlan, BatchResult, MaskVolume, apply_prototype
from core.features.embedding import SliceEmbedder
from core.errors import ProtoscopeError
from core.io import Stack, stack_label
from core.io.channels import channel_label, matching_channel
from core.io.atomic import atomic_output
from core.io.writers import write_masks
from core.pipeline import target_intensity_range
from core.prototypes import Prototype, target_warnings
from core.thresholds import ThresholdSpec
from ui import render, settings

FORMATS = {
    "tif": ("Multi-page TIFF (ImageJ)", ".tif"),
    "ome": ("OME-TIFF", ".ome.tif"),
    "h5": ("HDF5", ".h5"),
    "ims": ("Imaris copy with the mask as a new channel", ".ims"),
}


@dataclass
class BatchOutputs:
    """A finished (or cancelled) run, kept in the session for display and downloads: core's BatchResult (areas,
    volume, timing) and what the app made of it (files written, montage), with the stack and image channel it
    ran on (``stack_path`` is '' for a result restored from a workspace, which does not record it)."""

    stack_name: str
    result: BatchResult
    folder: str = ""
    files: dict[str, str] = field(default_factory=dict)  # format key -> path ('csv' for the areas)
    montage_png: bytes = b""
    threshold: str = ""
    inputs: str = ""  # run_signature of the settings that made it (the page marks it stale when they change)
    stack_path: str = ""
    channel: int | None = None

    @property
    def z_values(self) -> list[int]:
        return self.result.z_values

    @property
    def area_px(self) -> list[int]:
        return self.result.area_px


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "masks"


def base_name(stack_path: Path, prototype_name: str, tail: str | None = None) -> str:
    """'<stack>_<prototype>_<YYYYmmdd-HHMMSS>-<tail>' for the output files; ``tail`` is 4 random hex digits unless
    given, so two sessions that batch one stack with the same prototype name in the same second write apart."""
    tail = secrets.token_hex(2) if tail is None else tail
    return (f"{safe_name(stack_label(stack_path))}_{safe_name(prototype_name)}_{time.strftime('%Y%m%d-%H%M%S')}"
            f"-{safe_name(tail)}")


def montage_slices(z_values: list[int], count: int = 12) -> list[int]:
    """Up to ``count`` evenly spaced entries of ``z_values`` (first and last included)."""
    if len(z_values) <= count:
        return list(z_values)
    picks = np.unique(np.linspace(0, len(z_values) - 1, count).round().astype(int))
    return [z_values[i] for i in picks]


def available_formats(stack: Stack) -> list[str]:
    """Keys of FORMATS that fit the stack: the Imaris copy needs an .ims source."""
    return [k for k in FORMATS if k != "ims" or stack.format == "ims"]


def plan_caption(plan: BatchPlan, stack_name: str) -> str:
    """What the run will do (core.batch.plan_batch), in a sentence."""
    if plan.embeds:
        done = f"{plan.cached} already embedded (cached, skipped)"
    else:
        done = "no patch embeddings needed (best mode's pixel classifier reads filter features of the slices)"
    return f"{len(plan.z_values)} slice(s) of {stack_name}; {done}; the per-slice areas are always written as CSV"


def run_signature(prototype: Prototype, name: str, stack_path: str | Path, channel: int, z_values: list[int],
                  threshold: ThresholdSpec | None, formats: list[str]) -> str:
    """A digest of everything that makes a batch result: the prototype (its references, examples, points and
    threshold), the target stack and channel, the slices, the threshold override and the formats."""
    digest = hashlib.sha1()
    for array in (prototype.positive_references, prototype.negative_references, prototype.positive_examples,
                  prototype.negative_examples):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps([name, str(prototype.config.threshold), prototype.points.as_dict(), str(stack_path),
                              int(channel), [int(z) for z in z_values], str(threshold or ""), sorted(formats)],
                             default=str).encode())
    return digest.hexdigest()[:16]


def source_channel_name(prototype: Prototype) -> str | None:
    """The name of the channel the prototype was made on, when its file records it (newer prototypes)."""
    name = getattr(prototype, "source_channel_name", None)
    return str(name) if name else None


def target_channel_default(stack: Stack, prototype: Prototype, fallback: int) -> int:
    """The channel of ``stack`` to apply the prototype to: the one named like its source channel, else
    ``fallback`` (the name rules' default image channel)."""
    found = matching_channel(stack, source_channel_name(prototype))
    return found if found is not None else fallback


def channel_warning(stack: Stack, channel: int, prototype: Prototype) -> str | None:
    """A warning when the prototype's source channel has another name than the chosen channel, else None."""
    source = source_channel_name(prototype)
    if source is None or matching_channel([stack.channel_names[channel]], source) is not None:
        return None
    found = matching_channel(stack, source)
    where = (f"channel {channel_label(stack, found)} has that name" if found is not None
             else f"'{stack.name}' has no channel of that name")
    return (f"This prototype was made on the channel '{source}', but channel {channel_label(stack, channel)} is "
            f"selected; {where}. A prototype applied to another kind of channel usually marks the wrong structures.")


def channel_warnings(stack: Stack, channel: int, prototype: Prototype, embedder: SliceEmbedder) -> list[str]:
    """Every reason the chosen target channel may not fit the prototype: its name (``channel_warning``) and its
    intensities far from the source's (``core.prototypes.target_warnings``)."""
    warnings = [w for w in [channel_warning(stack, channel, prototype)] if w]
    warnings += target_warnings(prototype, "", target_intensity_range(embedder))  # the name is checked above
    return warnings


def run(
    embedder: SliceEmbedder,
    prototype: Prototype,
    z_values: list[int],
    formats: list[str],
    *,
    prototype_name: str,
    threshold: ThresholdSpec | None = None,
    on_progress: Callable[[str, int, int, float | None], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> BatchOutputs:
    """Segment ``z_values`` of the embedder's stack and write the masks in ``formats`` (keys of FORMATS) + CSV.

    ``should_stop`` is polled before each slice (the page passes its session's watch, ui.jobs): a stopped run
    returns a cancelled result and writes no file."""
    stack = embedder.stack
    if "ims" in formats and stack.format != "ims":
        raise ProtoscopeError("the Imaris copy needs an .ims source stack; choose TIFF, OME-TIFF or HDF5 for "
                              f"'{stack.name}'")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ProtoscopeError(f"unknown output format(s) {unknown}; choose from {list(FORMATS)}")
    folder = settings.output_dir(stack.path)
    base = base_name(stack.path, prototype_name)
    volume = MaskVolume(z_values, embedder.slice_shape)
    try:
        result = apply_prototype(embedder, prototype, z_values, volume, threshold=threshold,
                                 voxel_size=stack.voxel_size, on_progress=on_progress, should_stop=should_stop)
        outputs = BatchOutputs(stack.name, result, str(folder), threshold=str(threshold or prototype.config.threshold),
                               stack_path=str(stack.path), channel=int(embedder.channel))
        if result.cancelled:
            return outputs
        # core.io.ims writes Imaris's Latin-1 strings itself ('λ' becomes '?' there; OME-TIFF and HDF5 keep it)
        description = f"Protoscope masks of {stack.name} ({prototype.summary()[:300]})"
        for key in formats:
            path = folder / f"{base}{FORMATS[key][1]}"
            if key == "ims":
                write_masks(volume.full_stack(stack.shape[0]), path, source_ims=stack.path, description=description)
            else:
                write_masks(volume.array, path, voxel_size=stack.voxel_size, description=description)
            outputs.files[key] = str(path)
        csv_path = folder / f"{base}_areas.csv"
        with atomic_output(csv_path) as temp:
            temp.write_text(result.to_csv(), encoding="utf-8")
        outputs.files["csv"] = str(csv_path)
        picks = montage_slices(list(z_values))
        outputs.montage_png = render.to_png(render.montage(
            [embedder.normalized(z) for z in picks], [volume.array[volume.index_of[z]] > 0 for z in picks],
            [f"z {z}" for z in picks]))
        return outputs
    finally:
        volume.close()


def area_series(outputs: BatchOutputs) -> tuple[list[float], str]:
    """Per-slice areas for the plot: µm² when the voxel size is known, else pixels; with the axis label."""
    areas = outputs.result.area_um2
    if areas is not None:
        return list(areas), "mask area (µm²)"
    return [float(a) for a in outputs.result.area_px], "mask area (pixels)"


def area_figure(outputs: BatchOutputs):
    """Plotly line of the area per slice (µm² when the voxel size is known)."""
    import plotly.graph_objects as go

    values, label = area_series(outputs)
    fig = go.Figure(go.Scatter(x=outputs.z_values, y=values, mode="lines+markers", name=label))
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=30, b=10), xaxis_title="slice z", yaxis_title=label,
                      title=f"Area per slice (threshold {outputs.threshold})")
    return fig


@dataclass(frozen=True)
class OutputFile:
    """One written file: its title, path, size (bytes) and whether it is small enough for a browser download."""

    key: str
    title: str
    path: Path
    size: int
    downloadable: bool


#: Key of a cluster run's OME-Zarr output (a folder; ui.cluster) in BatchOutputs.files.
ZARR = "zarr"
#: Titles of the outputs that are not mask formats of FORMATS: the areas, and a cluster run's OME-Zarr.
OTHER_OUTPUTS = {"csv": "Per-slice areas (CSV)", ZARR: "OME-Zarr masks"}


def output_files(outputs: BatchOutputs) -> list[OutputFile]:
    """The files a run wrote, in its order; a folder (the OME-Zarr) is never offered as a download."""
    files = []
    for key, path_text in outputs.files.items():
        path = Path(path_text)
        size = path.stat().st_size if path.is_file() else 0
        title = OTHER_OUTPUTS.get(key) or FORMATS[key][0]
        files.append(OutputFile(key, title, path, size, path.is_file() and size <= settings.DOWNLOAD_LIMIT_BYTES))
    return files


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "estimating…"
    if seconds < 90:
        return f"{seconds:.0f} s left"
    return f"{seconds / 60:.1f} min left"
