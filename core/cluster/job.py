"""What a cluster run does, written down before it starts: the backbone recipe, the identity of an apply run (what
a rerun must share to resume its output) and the settings every block writer reads back from the output.

The submitting process (the CLI, the app) calls ``prepare_apply``: it decides the slices and blocks, computes
the per-stack statistics once (the stack-wide intensity range, best mode's pixel-feature statistics) and stores
them with the prototype in the OME-Zarr output, so every worker, and every later rerun, uses the very same
numbers; a rerun finds the output through ``MaskStore.resume`` and keeps its statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from core.cluster.plan import Block, block_slices_for, plan_blocks, z_chunk_depth
from core.config import PipelineConfig
from core.errors import OptionError
from core.features.backbones import Backbone, get_backbone
from core.io.channels import channel_name
from core.io.ome_zarr import MaskStore
from core.prototypes import Prototype, load_prototype, prototype_to_bytes
from core.thresholds import ThresholdSpec

if TYPE_CHECKING:  # pragma: no cover
    from core.features.embedding import SliceEmbedder

__all__ = [
    "BackboneRecipe",
    "ApplySettings",
    "ApplyTarget",
    "EmbedJob",
    "apply_identity",
    "prepare_apply",
    "prototype_digest",
    "slices_text",
    "stack_fingerprint",
]

_HEAD_BYTES = 4 << 20


@dataclass(frozen=True)
class BackboneRecipe:
    """How a worker loads the backbone (``core.features.backbones.get_backbone``: once per worker process).

    weights : 'hub', 'random' or a path (which every worker must see at the same place).
    device : None picks each worker's best device (a GPU where there is one).
    """

    name: str
    weights: str = "hub"
    seed: int = 0
    overrides: dict | None = None
    device: str | None = None

    def load(self) -> Backbone:
        return get_backbone(self.name, self.weights, device=self.device, seed=self.seed,
                            config_overrides=self.overrides)

    def as_dict(self) -> dict:
        """What identifies the weights (the device is left out: it is each run's own choice)."""
        return {"name": self.name, "weights": self.weights, "seed": self.seed, "overrides": self.overrides}

    @classmethod
    def from_dict(cls, data: dict, device: str | None = None) -> "BackboneRecipe":
        return cls(str(data["name"]), str(data.get("weights", "hub")), int(data.get("seed", 0)),
                   data.get("overrides"), device)


def stack_fingerprint(path: str | Path) -> str:
    """The identity of a stack's file by content, not by place: its name, size and the SHA-256 of its first 4 MiB
    (a folder of images: its entries' names and sizes). The same file copied or mounted elsewhere keeps it."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        entries = sorted(entry for entry in path.iterdir() if entry.is_file())
        for entry in entries:
            digest.update(f"{entry.name}:{entry.stat().st_size};".encode())
        return f"{path.name} (folder of {len(entries)} files, sha256 {digest.hexdigest()[:16]})"
    with open(path, "rb") as stream:
        digest.update(stream.read(_HEAD_BYTES))
    return f"{path.name} ({path.stat().st_size} bytes, sha256 of the first 4 MiB {digest.hexdigest()[:16]})"


def prototype_digest(prototype: Prototype) -> str:
    """SHA-256 (first 16 hex digits) of a prototype's metadata and arrays: equal for equal prototypes, whichever file
    or session they came from (the ``.npz`` bytes themselves hold zip timestamps)."""
    digest = hashlib.sha256(json.dumps(prototype.metadata(), sort_keys=True, default=str).encode())
    for key in ("positive_references", "negative_references", "positive_examples", "negative_examples",
                "pixel_positive_examples", "pixel_negative_examples", "pixel_projection", "pixel_projection_mean"):
        value = getattr(prototype, key)
        if value is not None:
            array = np.ascontiguousarray(value, dtype=np.float32)
            digest.update(f"{key}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def slices_text(z_values: Sequence[int]) -> str:
    """A slice selection as sorted ranges, e.g. '0-9,20,22-30' (what an output's identity records).

    >>> slices_text([3, 0, 1, 2, 9])
    '0-3,9'
    """
    values = sorted(set(int(z) for z in z_values))
    parts: list[str] = []
    start = previous = None
    for z in values + [None]:
        if start is not None and (z is None or z != previous + 1):
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if z is not None and start is None:
            start = z
        previous = z
    return ",".join(parts)


def apply_identity(stack_path: str | Path, channel: int, channel_label: str, timepoint: int, z_values: Sequence[int],
                   prototype: Prototype, config: PipelineConfig, threshold: ThresholdSpec | None,
                   backbone: BackboneRecipe) -> dict:
    """What an apply run's output records and a rerun must share to resume it (JSON-able, readable in messages)."""
    return {
        "stack": stack_fingerprint(stack_path),
        "channel": f"{channel} ({channel_label})",
        "timepoint": int(timepoint),
        "slices": slices_text(z_values),
        "prototype": f"{prototype_digest(prototype)} ({prototype.backbone}, {len(prototype.positive_examples)} + "
                     f"{len(prototype.negative_examples)} examples)",
        "settings": config.as_dict(),
        "threshold": str(threshold) if threshold is not None else "the prototype's",
        "backbone": backbone.as_dict(),
    }


@dataclass(frozen=True)
class ApplySettings:
    """What every block writer of one output reads back from it (``MaskStore.settings``), plus the prototype
    (the store's blob 'prototype').

    pixel_statistics : (max_side, mean (F,) float32, std (F,) float32) of best mode's pixel features, or None.
    """

    channel: int
    timepoint: int
    z_values: tuple[int, ...]
    config: PipelineConfig
    threshold: ThresholdSpec | None
    backbone: BackboneRecipe
    stack_range: tuple[float, float] | None = None
    pixel_statistics: tuple[int, np.ndarray, np.ndarray] | None = field(default=None, compare=False)
    stack_name: str = ""

    def as_dict(self) -> dict:
        stats = None
        if self.pixel_statistics is not None:
            max_side, mean, std = self.pixel_statistics
            stats = {"max_side": int(max_side), "mean": np.asarray(mean, np.float64).tolist(),
                     "std": np.asarray(std, np.float64).tolist()}
        return {
            "channel": self.channel,
            "timepoint": self.timepoint,
            "z_values": list(self.z_values),
            "config": self.config.as_dict(),
            "threshold": str(self.threshold) if self.threshold is not None else None,
            "backbone": self.backbone.as_dict(),
            "stack_range": list(self.stack_range) if self.stack_range is not None else None,
            "pixel_statistics": stats,
            "stack_name": self.stack_name,
        }

    @classmethod
    def from_dict(cls, data: dict, device: str | None = None) -> "ApplySettings":
        stats = data.get("pixel_statistics")
        return cls(
            channel=int(data["channel"]),
            timepoint=int(data["timepoint"]),
            z_values=tuple(int(z) for z in data["z_values"]),
            config=PipelineConfig.from_dict(data["config"]),
            threshold=ThresholdSpec.parse(data["threshold"]) if data.get("threshold") else None,
            backbone=BackboneRecipe.from_dict(data["backbone"], device),
            stack_range=(float(data["stack_range"][0]), float(data["stack_range"][1])) if data.get("stack_range")
            else None,
            pixel_statistics=(int(stats["max_side"]), np.asarray(stats["mean"], np.float32),
                              np.asarray(stats["std"], np.float32)) if stats else None,
            stack_name=str(data.get("stack_name", "")),
        )


@dataclass(frozen=True)
class ApplyTarget:
    """One stack of an apply run: its output (the store) and where the stack file is for this run's workers."""

    store: MaskStore
    stack_path: Path

    @property
    def settings(self) -> ApplySettings:
        return ApplySettings.from_dict(self.store.settings)

    def blocks(self) -> list[Block]:
        """The blocks holding requested slices, in z order (finished ones included)."""
        layout = self.store.layout
        return plan_blocks(layout.shape_zyx[0], layout.block_slices, self.settings.z_values)

    def prototype(self) -> Prototype:
        return load_prototype(self.store.read_blob("prototype"), name=f"the prototype kept in {self.store.path.name}")


def prepare_apply(
    embedder: "SliceEmbedder",
    prototype: Prototype,
    out: str | Path,
    *,
    z_values: Sequence[int],
    backbone: BackboneRecipe,
    config: PipelineConfig | None = None,
    threshold: ThresholdSpec | None = None,
    block_slices: int | None = None,
    overwrite: bool = False,
    sources: Sequence[str | Path] = (),
) -> ApplyTarget:
    """The OME-Zarr output of applying ``prototype`` to slices ``z_values`` of the embedder's stack: the existing one
    when a rerun may resume it (same stack, channel, time point, slices, prototype, settings, threshold, backbone),
    else a new, empty one holding everything its block writers need.

    block_slices : slices per block (rounded to whole z-chunks of the file; default
        ``core.cluster.plan.DEFAULT_BLOCK_SLICES``); a resumed output keeps its own.
    Raises OutputError when ``out`` holds another run's masks (naming what differs) and not ``overwrite``, or is
    an input; OptionError for a slice outside the stack.
    """
    config = config or prototype.config
    stack = embedder.stack
    n_slices = embedder.n_slices
    outside = [int(z) for z in z_values if not 0 <= int(z) < n_slices]
    if outside or not len(z_values):
        raise OptionError(f"slice z={outside[0]} is outside the stack (0-{n_slices - 1})" if outside
                          else "no slices to segment")
    label = channel_name(stack, embedder.channel)
    identity = apply_identity(stack.path, embedder.channel, label, embedder.timepoint, z_values, prototype, config,
                              threshold, backbone)
    shape_zyx = (n_slices, *embedder.slice_shape)
    inputs = [stack.path, *sources]
    store = MaskStore.resume(out, identity=identity, shape_zyx=shape_zyx, overwrite=overwrite, sources=inputs)
    if store is None:
        stats = None
        if config.uses_pixels and config.pixel_standardize == "stack":
            mean, std = embedder.pixel_statistics(config.pixel_max_side)
            stats = (config.pixel_max_side, mean, std)
        settings = ApplySettings(channel=embedder.channel, timepoint=embedder.timepoint,
                                 z_values=tuple(sorted(set(int(z) for z in z_values))), config=config,
                                 threshold=threshold, backbone=backbone, stack_range=embedder.stack_range,
                                 pixel_statistics=stats, stack_name=stack.name)
        depth = block_slices_for(z_chunk_depth(stack, embedder.channel, embedder.timepoint), n_slices, block_slices)
        store = MaskStore.create(out, shape_zyx=shape_zyx, block_slices=depth, identity=identity,
                                 settings=settings.as_dict(), voxel_size=stack.voxel_size,
                                 channel_name=f"Protoscope mask of {label}", name=stack.name,
                                 blobs={"prototype": prototype_to_bytes(prototype)}, overwrite=overwrite,
                                 sources=inputs)
    return ApplyTarget(store, Path(os.path.abspath(stack.path)))


@dataclass(frozen=True)
class EmbedJob:
    """One stack whose slices a run embeds into the embedding cache (``python -m core embed``)."""

    stack_path: str
    channel: int
    timepoint: int
    backbone: BackboneRecipe
    preprocess: dict
    stack_range: tuple[float, float] | None
    cache_dir: str
    block_slices: int
    z_values: tuple[int, ...]

    def blocks(self, n_slices: int) -> list[Block]:
        return plan_blocks(n_slices, self.block_slices, self.z_values)
