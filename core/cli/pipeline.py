"""CLI commands of the prototype pipeline: ``prototype``, ``apply``, ``embed``, ``evaluate`` and ``demo``.

Each command checks everything it can before loading a backbone or printing anything (points, prototype files,
options, thresholds, the slice selection, the channel and time point, that the slices hold finite pixels, the patch
grid and the embedding dimension), and reserves its output files (``core.io.atomic``: the temp file proves the
folder is writable), so that a mistake costs no model load and prints only its ``error:`` line. A problem found
only while working (a slice without finite pixels in the middle of a float stack) may follow progress lines.
The modules that import torch are imported inside the commands: ``python -m core info`` and ``--help`` start
without it (about 3 s).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import shlex
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Sequence

import numpy as np

from core.config import PipelineConfig, parse_option_assignments
from core.errors import OptionError, OutputError, PrototypeError, PrototypeFileError, StackError
from core.io import default_image_channel
from core.io.atomic import atomic_output, check_not_an_input, write_text

# ---- shared options -----------------------------------------------------------------------------------


def add_backbone_options(parser: argparse.ArgumentParser, *, multiple: bool = False) -> None:
    if multiple:
        parser.add_argument("--backbone", nargs="+", default=None, metavar="NAME",
                            help="one or more backbones (default: filterbank unless DINOv2 S/14 weights are cached)")
    else:
        parser.add_argument("--backbone", default=None, metavar="NAME",
                            help="feature backbone, e.g. dinov2_vits14, dinov2_vitg14_reg, filterbank "
                                 "(default: filterbank unless DINOv2 S/14 weights are cached)")
    parser.add_argument("--weights", default="hub", metavar="SPEC",
                        help="DINOv2 weights: 'hub' (Hugging Face download/cache), a local Hugging Face model folder "
                             "or Meta's dinov2_*_pretrain.pth file, or 'random' (timing only, results meaningless)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--backbone-config", default=None, metavar="JSON", help=argparse.SUPPRESS)


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="embedding cache folder (default: $PROTOSCOPE_CACHE or ~/.cache/protoscope/embeddings)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, metavar="N",
                       help="run on N worker processes started on this machine (a Dask LocalCluster)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run on the workers of a running Dask scheduler, e.g. tcp://host:8786; they must see the "
                            "stacks, outputs and cache at the same paths")
    parser.add_argument("--block-slices", type=int, default=None, metavar="N",
                        help="slices per task, a whole number of the file's z-chunks (default about 16, at least "
                             "one chunk)")


def open_cache(args: argparse.Namespace):
    from core.features.embedding_cache import EmbeddingCache

    if getattr(args, "no_cache", False):
        return None
    return EmbeddingCache(args.cache)


def load_backbone_from_args(name: str | None, args: argparse.Namespace, *, weights: str | None = None, seed: int = 0,
                            overrides: dict | None = None, announce: bool = True):
    """The backbone `name` (default: `default_backbone_name`) with the weights and device of `args`; printed on
    stderr unless ``announce=False`` (callers that still check something print it with `announce_backbone`)."""
    from core.features.backbones import default_backbone_name, load_backbone

    name = name or default_backbone_name()
    if overrides is None and args.backbone_config:
        try:
            overrides = json.loads(args.backbone_config)
        except json.JSONDecodeError as error:
            raise OptionError(f"--backbone-config is not valid JSON: {error}") from None
    backbone = load_backbone(name, weights or args.weights, device=args.device, seed=seed, config_overrides=overrides)
    if announce:
        announce_backbone(backbone)
    return backbone


def announce_backbone(backbone) -> None:
    print(f"backbone: {backbone.label()}", file=sys.stderr)
    if backbone.is_random:
        print("WARNING: RANDOM WEIGHTS — for timing and plumbing only; the masks mean nothing.", file=sys.stderr)


def check_outputs(*paths: str | Path | None, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """OutputError before any work when an output exists and ``overwrite`` is not set, is one of the command's
    ``inputs`` (never allowed, with or without --overwrite), or is named twice."""
    outputs = [Path(p) for p in paths if p is not None]
    for index, path in enumerate(outputs):
        check_not_an_input(path, [Path(p) for p in inputs])
        if any(path.resolve() == other.resolve() for other in outputs[:index]):
            raise OutputError(f"{path} is named as two outputs of this command; give each output its own name")
        if path.exists() and not overwrite:
            raise OutputError(f"{path} already exists; choose another name or add --overwrite")


def check_patch_grid(config: PipelineConfig, backbone) -> None:
    """OptionError when the model input side (option image_size) is not a whole number of the backbone's patches."""
    size, patch = config.preprocess.image_size, backbone.patch_size
    if size % patch:
        low = max(patch, size // patch * patch)
        raise OptionError(f"option image_size={size} is not a multiple of the {patch}-px patch of {backbone.spec.name}; "
                          f"use e.g. {low} or {low + patch}")


def check_timepoint(stack, timepoint: int) -> None:
    """StackError unless `timepoint` is one of the stack's time points."""
    if not 0 <= timepoint < stack.n_timepoints:
        raise StackError(f"time point {timepoint} requested but '{stack.name}' has time points 0..{stack.n_timepoints - 1}")


def check_finite_slices(stack, channel: int, timepoint: int, z_values) -> None:
    """StackError naming the stack, channel and slice when one of `z_values` of a float stack has no finite pixel
    (all NaN or infinite: nothing to normalise). Integer stacks cannot hold NaN and are not read."""
    if stack.dtype.kind != "f":
        return
    for z in dict.fromkeys(z_values):
        if not np.isfinite(stack.read_slice(z, channel, timepoint=timepoint)).any():
            raise StackError(f"'{stack.name}' channel {channel} ({stack.channel_names[channel]}) slice z={z} has no finite "
                             "pixel values (all NaN or infinite); choose another channel or other slices")


def check_embed_dim(prototype, backbone) -> None:
    """PrototypeError when the prototype's embeddings are not as long as the backbone's."""
    if prototype.embed_dim != backbone.embed_dim:
        raise PrototypeError(f"the prototype holds {prototype.embed_dim}-dimensional embeddings but {backbone.spec.name} "
                             f"gives {backbone.embed_dim}; use the backbone and weights that made it, or make it again")


MAX_PROTOCOL_POINTS = 10_000  # per class and slice: the protocol samples them from the ground truth


class StderrProgress:
    """A tqdm progress bar on stderr per phase, fed by the (phase, done, total, eta) callbacks."""

    def __init__(self, descriptions: dict[str, str]) -> None:
        self.descriptions = descriptions
        self.bars: dict = {}

    def __call__(self, phase: str, done: int, total: int, eta: float | None) -> None:
        from tqdm import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, desc=self.descriptions.get(phase, phase), unit="slice",
                                          file=sys.stderr, leave=True, dynamic_ncols=True)
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


# ---- prototype ----------------------------------------------------------------------------------------


def cmd_prototype(args: argparse.Namespace) -> int:
    from core.features.embedding import SliceEmbedder
    from core.io import open_stack
    from core.pipeline import build_prototype
    from core.prototypes import PointSet, check_prototype_name, prototype_to_bytes

    points = PointSet.load(args.points)
    out = Path(args.out)
    inputs = (args.stack, args.points)
    check_prototype_name(out)
    check_outputs(out, overwrite=args.overwrite, inputs=inputs)
    config = PipelineConfig.for_mode(args.mode).with_options(**parse_option_assignments(args.option))
    if config.uses_pixels and not len(points.negative):
        raise PrototypeError(f"{args.points}: the pixel classifier of {config.mode.value} mode needs negative points too; "
                             "add some background points, or use --mode thesis")
    with open_stack(args.stack) as stack, ExitStack() as outputs:
        channel = default_image_channel(stack, args.channel)
        check_timepoint(stack, args.timepoint)
        points.check_inside(stack.shape[0], (stack.shape[2], stack.shape[3]), source=str(args.points))
        check_finite_slices(stack, channel, args.timepoint, points.slices)
        temp = outputs.enter_context(atomic_output(out, overwrite=args.overwrite, sources=inputs))
        backbone = load_backbone_from_args(args.backbone, args, announce=False)
        check_patch_grid(config, backbone)
        announce_backbone(backbone)
        print(f"stack: {stack.path.name} {stack.shape} (Z, C, Y, X), channel {channel} ({stack.channel_names[channel]})",
              file=sys.stderr)
        embedder = SliceEmbedder(stack, channel, backbone, config.preprocess, cache=open_cache(args),
                                 timepoint=args.timepoint)
        prototype = build_prototype(embedder, points, config)
        temp.write_bytes(prototype_to_bytes(prototype))
    print(f"wrote {out}: {prototype.summary()}")
    return 0


# ---- apply --------------------------------------------------------------------------------------------


def weights_for_prototype(weights_id: str) -> tuple[str, int, dict | None]:
    """How to load the weights a prototype was made with: (weights spec, seed, config overrides)."""
    if weights_id.startswith("file:"):
        return weights_id[len("file:"):].rsplit("#", 1)[0], 0, None
    if weights_id.startswith("random"):
        parts = weights_id.split(":", 2)
        try:
            seed = int(parts[1].removeprefix("seed")) if len(parts) > 1 and parts[1].startswith("seed") else 0
        except ValueError:
            raise PrototypeFileError(f"the prototype's weights id {weights_id!r} has no whole-number seed "
                                     "(expected random:seedN:...); make the prototype again") from None
        overrides = None
        if len(parts) > 2 and parts[2]:
            overrides = {}
            for item in parts[2].split(","):
                key, _, value = item.partition("=")
                try:
                    overrides[key] = json.loads(value)
                except json.JSONDecodeError:
                    overrides[key] = value
        return "random", seed, overrides
    return "hub", 0, None


def backbone_for_prototype(prototype, args: argparse.Namespace, *, before_announcing=None):
    """Load the backbone and weights `prototype` was made with; an explicit --weights/--backbone-config wins.

    Checks the embedding dimension and then `before_announcing(backbone)` (more checks) before it prints the
    backbone, so that a refusal is the command's only stderr line. Warns on stderr when the weights differ,
    since embeddings from other weights do not match the prototype.
    """
    requested = getattr(args, "backbone", None)
    if requested is not None and requested != prototype.backbone:
        raise OptionError(f"--backbone {requested} disagrees with the prototype, which was made with {prototype.backbone}; "
                          "a prototype only works with its own backbone: drop --backbone, or make a new prototype")
    weights, seed, overrides = weights_for_prototype(prototype.weights_id)
    if args.weights != "hub" or args.backbone_config:
        weights, overrides = args.weights, None
    backbone = load_backbone_from_args(prototype.backbone, args, weights=weights, seed=seed, overrides=overrides,
                                       announce=False)
    check_embed_dim(prototype, backbone)
    if before_announcing is not None:
        before_announcing(backbone)
    announce_backbone(backbone)
    if backbone.weights_id != prototype.weights_id:
        print(f"WARNING: the prototype was made with weights {prototype.weights_id}, now using {backbone.weights_id}; "
              "embeddings from other weights do not match the prototype", file=sys.stderr)
    return backbone


def is_zarr_name(path: str | Path) -> bool:
    """Whether ``path`` names an OME-Zarr folder ('.zarr', by convention '.ome.zarr')."""
    return Path(path).name.lower().endswith(".zarr")


def cmd_apply(args: argparse.Namespace) -> int:
    """One stack to a TIFF in this process (as always), or stacks to OME-Zarr, here or on Dask workers."""
    cluster = args.workers is not None or args.scheduler is not None
    if len(args.stacks) == 1 and not is_zarr_name(args.out):
        if cluster:
            raise OptionError("--workers and --scheduler write OME-Zarr: give --out NAME.ome.zarr")
        args.stack = args.stacks[0]
        return _apply_tiff(args)
    return _apply_ome_zarr(args)


def _apply_tiff(args: argparse.Namespace) -> int:
    from core.batch import apply_prototype
    from core.features.embedding import SliceEmbedder
    from core.io import open_stack
    from core.io.channels import channel_name
    from core.io.writers import TiffMaskWriter
    from core.pipeline import target_intensity_range
    from core.prototypes import load_prototype, target_warnings
    from core.thresholds import ThresholdSpec
    from core.zspec import parse_z_spec

    prototype = load_prototype(args.prototype)
    out = Path(args.out)
    inputs = (args.stack, args.prototype)
    check_outputs(out, args.areas, overwrite=args.overwrite, inputs=inputs)
    config = prototype.config.with_options(**parse_option_assignments(args.option))
    threshold = ThresholdSpec.parse(args.threshold) if args.threshold else None
    requested = getattr(args, "backbone", None)
    if requested is not None and requested != prototype.backbone:
        backbone_for_prototype(prototype, args)  # refuses it, before any work
    with open_stack(args.stack) as stack, ExitStack() as outputs:
        channel = default_image_channel(stack, args.channel)
        check_timepoint(stack, args.timepoint)
        z_values = parse_z_spec(args.z, stack.shape[0])
        check_finite_slices(stack, channel, args.timepoint, z_values[:1])
        # both outputs reserved now: a folder that cannot be written is refused before any work
        writer = outputs.enter_context(TiffMaskWriter(out, voxel_size=stack.voxel_size, overwrite=args.overwrite,
                                                      sources=inputs))
        areas_temp = (outputs.enter_context(atomic_output(args.areas, overwrite=args.overwrite, sources=inputs))
                      if args.areas else None)
        backbone = backbone_for_prototype(prototype, args, before_announcing=lambda b: check_patch_grid(config, b))
        print(f"stack: {stack.path.name} {stack.shape} (Z, C, Y, X), channel {channel}, {len(z_values)} slice(s); "
              f"{config.describe()}" + (f", threshold {threshold}" if threshold else ""), file=sys.stderr)
        embedder = SliceEmbedder(stack, channel, backbone, config.preprocess, cache=open_cache(args), timepoint=args.timepoint)
        for warning in target_warnings(prototype, channel_name(stack, channel),
                                       target_intensity_range(embedder, z_values[0])):
            print(f"WARNING: {warning}", file=sys.stderr)
        progress = StderrProgress({"embed": "embed+score", "mask": "masks"})
        try:
            result = apply_prototype(embedder, prototype, z_values, lambda z, mask: writer.write(mask),
                                     config=config, threshold=threshold, voxel_size=stack.voxel_size,
                                     on_progress=progress)
        finally:
            progress.close()
        if areas_temp is not None:
            areas_temp.write_text(result.to_csv(), encoding="utf-8")
    volume = result.volume_um3
    print(f"wrote {out}: {len(result.area_px)} slice(s), {result.volume_voxels} mask voxels"
          + (f", volume {volume:.6g} µm³" if volume is not None else ""))
    return 0


def backbone_recipe(name: str, args: argparse.Namespace, weights_id: str | None = None):
    """How workers load the backbone this command uses: the prototype's weights (``weights_id``) unless --weights or
    --backbone-config say otherwise (as ``backbone_for_prototype`` decides), on --device (default: each worker's
    best)."""
    from core.cluster import BackboneRecipe

    weights, seed, overrides = weights_for_prototype(weights_id) if weights_id is not None else (args.weights, 0, None)
    if args.weights != "hub" or args.backbone_config:
        weights, overrides = args.weights, None
    if overrides is None and args.backbone_config:
        try:
            overrides = json.loads(args.backbone_config)
        except json.JSONDecodeError as error:
            raise OptionError(f"--backbone-config is not valid JSON: {error}") from None
    return BackboneRecipe(name, weights, seed, overrides, args.device)


def apply_outputs(stacks: Sequence[str], out: Path, areas: str | None) -> list[tuple[Path, Path, Path | None]]:
    """(stack, OME-Zarr output, areas CSV or None) per stack: one stack writes ``out`` (and ``areas``); several write
    ``out/<stack>.ome.zarr`` and ``out/<stack>.areas.csv`` each. OptionError for names that cannot work."""
    from core.io import stack_label

    if len(stacks) == 1:
        return [(Path(stacks[0]), out, Path(areas) if areas else None)]
    if is_zarr_name(out) or out.suffix.lower() in (".tif", ".tiff"):
        raise OptionError(f"{len(stacks)} stacks write one OME-Zarr each: give --out a folder (it receives "
                          f"<stack>.ome.zarr and <stack>.areas.csv per stack), not '{out.name}'")
    if areas:
        raise OptionError("with several stacks each one's areas go beside its masks (<stack>.areas.csv in --out); "
                          "drop --areas")
    seen: dict[str, str] = {}
    rows = []
    for stack in stacks:
        label = stack_label(stack)
        if label in seen:
            raise OptionError(f"'{stack}' and '{seen[label]}' would both write {label}.ome.zarr in {out}; run them "
                              "into separate folders")
        seen[label] = stack
        rows.append((Path(stack), out / f"{label}.ome.zarr", out / f"{label}.areas.csv"))
    return rows


class SliceBar:
    """One tqdm bar on stderr counting slices (tqdm shows the rate and the ETA)."""

    def __init__(self, total: int, description: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=description, unit="slice", file=sys.stderr, leave=True, dynamic_ncols=True)

    def update(self, count: int = 1) -> None:
        self.bar.update(count)

    def close(self) -> None:
        self.bar.close()


def uses_cluster(args: argparse.Namespace) -> bool:
    return args.workers is not None or args.scheduler is not None


def check_block_slices(args: argparse.Namespace) -> None:
    if args.block_slices is not None and not 1 <= args.block_slices <= 4096:
        raise OptionError(f"--block-slices must be 1-4096 slices, got {args.block_slices}")


def _cluster_from_args(args: argparse.Namespace):
    from core.cluster import Cluster

    cluster = Cluster(workers=args.workers, scheduler=args.scheduler)
    print(f"cluster: {cluster.address}, {cluster.n_workers} worker(s)"
          + (" (started here)" if args.workers is not None else ""), file=sys.stderr)
    return cluster


def _apply_ome_zarr(args: argparse.Namespace) -> int:
    from core.cluster import prepare_apply, read_result, request_cancel, run_apply_here, submit_apply
    from core.features.embedding import SliceEmbedder
    from core.io import open_stack
    from core.io.channels import channel_name
    from core.pipeline import target_intensity_range
    from core.prototypes import load_prototype, target_warnings
    from core.thresholds import ThresholdSpec
    from core.zspec import parse_z_spec

    check_block_slices(args)
    prototype = load_prototype(args.prototype)
    rows = apply_outputs(args.stacks, Path(args.out), args.areas)
    inputs = (*args.stacks, args.prototype)
    for _, zarr_path, areas_path in rows:
        # an existing output of the same run is resumed, and its areas table rewritten from it
        check_outputs(zarr_path, areas_path, overwrite=True, inputs=inputs)
        resumed = zarr_path.exists() and not args.overwrite
        if areas_path is not None and areas_path.exists() and not (args.overwrite or resumed or len(rows) > 1):
            raise OutputError(f"{areas_path} already exists; choose another name or add --overwrite")
    config = prototype.config.with_options(**parse_option_assignments(args.option))
    threshold = ThresholdSpec.parse(args.threshold) if args.threshold else None
    requested = getattr(args, "backbone", None)
    if requested is not None and requested != prototype.backbone:
        backbone_for_prototype(prototype, args)  # refuses it, before any work
    recipe = backbone_recipe(prototype.backbone, args, prototype.weights_id)
    with ExitStack() as scope:
        checked = []
        for stack_path, zarr_path, areas_path in rows:
            stack = scope.enter_context(open_stack(stack_path))
            channel = default_image_channel(stack, args.channel)
            check_timepoint(stack, args.timepoint)
            z_values = parse_z_spec(args.z, stack.shape[0])
            check_finite_slices(stack, channel, args.timepoint, z_values[:1])
            checked.append((stack, channel, z_values, zarr_path, areas_path))
        cluster = scope.enter_context(_cluster_from_args(args)) if uses_cluster(args) else None
        backbone = backbone_for_prototype(prototype, args, before_announcing=lambda b: check_patch_grid(config, b))
        cache = open_cache(args)
        targets = []
        for stack, channel, z_values, zarr_path, areas_path in checked:
            print(f"stack: {stack.path.name} {stack.shape} (Z, C, Y, X), channel {channel}, {len(z_values)} slice(s); "
                  f"{config.describe()}" + (f", threshold {threshold}" if threshold else ""), file=sys.stderr)
            embedder = SliceEmbedder(stack, channel, backbone, config.preprocess, cache=cache, timepoint=args.timepoint)
            for warning in target_warnings(prototype, channel_name(stack, channel),
                                           target_intensity_range(embedder, z_values[0])):
                print(f"WARNING: {warning}", file=sys.stderr)
            target = prepare_apply(embedder, prototype, zarr_path, z_values=z_values, backbone=recipe, config=config,
                                   threshold=threshold, block_slices=args.block_slices, overwrite=args.overwrite,
                                   sources=inputs)
            done = len(target.store.finished_blocks() & {b.index for b in target.blocks()})
            if done:
                print(f"resuming {zarr_path}: {done} of {len(target.blocks())} blocks are already finished",
                      file=sys.stderr)
            targets.append((target, areas_path))
        cache_dir = str(cache.directory.resolve()) if cache is not None else None
        stores = [target for target, _ in targets]
        todo = sum(len(b.z_values) for t in stores for b in t.blocks() if b.index not in t.store.finished_blocks())
        bar = SliceBar(todo, "masks")
        try:
            if cluster is not None:
                run = submit_apply(stores, cluster, cache_dir=cache_dir, device=args.device)
                try:
                    run.wait(on_block=lambda outcome: bar.update(outcome.slices))
                except KeyboardInterrupt:
                    run.cancel()
                    raise
            else:
                run = run_apply_here(stores, cache_dir=cache_dir, device=args.device, backbone=backbone,
                                     on_slice=bar.update)
        except KeyboardInterrupt:
            for target in stores:
                request_cancel(target.store.path)
            bar.close()
            print("stopped: the finished blocks are kept; run the same command again to resume", file=sys.stderr)
            raise
        finally:
            bar.close()
    skipped = sum(1 for o in run.outcomes if o.status == "skipped")
    print(f"{len(run.computed)} block(s) computed" + (f", {skipped} were already finished" if skipped else ""),
          file=sys.stderr)
    for target, areas_path in targets:
        result = read_result(target.store.path)
        if areas_path is not None:
            write_text(areas_path, result.to_csv(), overwrite=True)
        volume = result.volume_um3
        state = "" if not result.cancelled else " (unfinished: run the same command again to resume)"
        print(f"wrote {target.store.path}: {len(result.area_px)} slice(s), {result.volume_voxels} mask voxels"
              + (f", volume {volume:.6g} µm³" if volume is not None else "") + state)
    return 0


# ---- embed --------------------------------------------------------------------------------------------


def cmd_embed(args: argparse.Namespace) -> int:
    from core.cluster import EmbedJob, block_slices_for, plan_blocks, run_embed, z_chunk_depth
    from core.features.embedding import SliceEmbedder
    from core.io import open_stack
    from core.prototypes import load_prototype
    from core.zspec import parse_z_spec

    check_block_slices(args)
    prototype = load_prototype(args.prototype) if args.prototype else None
    if prototype is not None:
        if args.backbone is not None and args.backbone != prototype.backbone:
            raise OptionError(f"--backbone {args.backbone} disagrees with the prototype, which was made with "
                              f"{prototype.backbone}; drop one of them")
        config = prototype.config.with_options(**parse_option_assignments(args.option))
    else:
        config = PipelineConfig.for_mode(args.mode).with_options(**parse_option_assignments(args.option))
    cache = open_cache(args)
    with ExitStack() as scope:
        checked = []
        for path in args.stacks:
            stack = scope.enter_context(open_stack(path))
            channel = default_image_channel(stack, args.channel)
            check_timepoint(stack, args.timepoint)
            z_values = parse_z_spec(args.z, stack.shape[0])
            check_finite_slices(stack, channel, args.timepoint, z_values[:1])
            checked.append((stack, channel, z_values))
        cluster = scope.enter_context(_cluster_from_args(args)) if uses_cluster(args) else None
        if prototype is not None:
            backbone = backbone_for_prototype(prototype, args, before_announcing=lambda b: check_patch_grid(config, b))
            recipe = backbone_recipe(prototype.backbone, args, prototype.weights_id)
        else:
            backbone = load_backbone_from_args(args.backbone, args, announce=False)
            check_patch_grid(config, backbone)
            announce_backbone(backbone)
            recipe = backbone_recipe(backbone.spec.name, args)
        jobs, todo, cached_count = [], 0, 0
        for stack, channel, z_values in checked:
            embedder = SliceEmbedder(stack, channel, backbone, config.preprocess, cache=cache, timepoint=args.timepoint)
            cached = embedder.cached_slices()
            missing = [z for z in z_values if z not in cached]
            cached_count += len(z_values) - len(missing)
            todo += len(missing)
            depth = block_slices_for(z_chunk_depth(stack, channel, args.timepoint), stack.shape[0], args.block_slices)
            job = EmbedJob(str(Path(stack.path).resolve()), channel, args.timepoint, recipe,
                           config.preprocess.as_dict(), embedder.stack_range, str(cache.directory.resolve()), depth,
                           tuple(z_values))
            jobs.append((job, plan_blocks(stack.shape[0], depth, missing)))
            print(f"stack: {stack.path.name}, channel {channel}: {len(missing)} of {len(z_values)} slice(s) to embed",
                  file=sys.stderr)
        bar = SliceBar(todo, "embed")
        try:
            run_embed(jobs, cluster, backbone=backbone, on_block=lambda outcome: bar.update(outcome.slices))
        finally:
            bar.close()
    print(f"embedded {todo} slice(s) of {len(jobs)} stack(s) into {cache.directory}"
          + (f" ({cached_count} were cached already)" if cached_count else ""))
    return 0


# ---- export of OME-Zarr masks (called by `export` in core/cli/io.py) ---------------------------------


def export_mask_store(args: argparse.Namespace) -> int:
    """``python -m core export MASKS.ome.zarr --out masks.tif | .ome.tif | .h5 | copy.ims --source-ims STACK.ims``."""
    from core.io.ome_zarr import MaskStore, export_masks

    if args.z != "all" or args.level != 0 or args.timepoint != 0 or args.channel != 0:
        raise OptionError(f"'{Path(args.stack).name}' is an OME-Zarr of masks: it is exported whole; drop --z, "
                          "--level, --timepoint and --channel")
    source = getattr(args, "source_ims", None)
    if Path(args.out).suffix.lower() == ".ims" and source is None:
        raise OptionError("an Imaris copy needs the stack the masks were made from: add --source-ims STACK.ims")
    store = MaskStore.open(args.stack)
    written = export_masks(args.stack, args.out, source_ims=source, overwrite=args.overwrite)
    n_z, n_y, n_x = store.layout.shape_zyx
    print(f"wrote {written}: {n_z} slice(s) of {n_x}x{n_y} masks (uint8 0/255)")
    return 0


# ---- evaluate -----------------------------------------------------------------------------------------


def parse_variant(text: str) -> tuple[str, str, dict[str, str]]:
    """'name=base:opt=v,opt=v' or 'base:opt=v' -> (name, base mode, options)."""
    head, _, options_text = text.partition(":")
    name, _, base = head.rpartition("=")  # the name may itself contain '='; the base never does
    if not name:
        name = text
    if base not in ("thesis", "best"):
        raise OptionError(f"variant {text!r}: the base must be thesis or best (e.g. 'knn=best:scoring=knn')")
    options = parse_option_assignments([item for item in options_text.split(",") if item]) if options_text else {}
    return name, base, options


def cmd_evaluate(args: argparse.Namespace) -> int:
    from core.config import Mode
    from core.protocol import BASELINES, EvalStack, Method, ProtocolSettings, evaluate, open_eval_stacks

    if args.mask_channel is None and not args.mask_file:
        raise OptionError("give --mask-channel M (ground truth inside the stack) or --mask-file FILE ... (one per stack)")
    if args.mask_file and len(args.mask_file) != len(args.stacks):
        raise OptionError(f"got {len(args.stacks)} stacks but {len(args.mask_file)} mask files; give one mask file per stack")
    for option, value, low, high in (("--points", args.points, 1, MAX_PROTOCOL_POINTS),
                                     ("--adapt-points", args.adapt_points, 1, MAX_PROTOCOL_POINTS), ("--seeds", args.seeds, 1, 1000),
                                     ("--slices", args.slices, 1, 100_000), ("--skip-ends", args.skip_ends, 0, 100_000),
                                     ("--margin", args.margin, 0, 10_000)):
        if value is not None and not low <= value <= high:
            raise OptionError(f"{option} {value} is outside {low}-{high}")
    csv_out = Path(args.csv) if args.csv else (Path(args.json).with_suffix(".csv") if args.json else None)
    inputs = [*args.stacks, *(args.mask_file or [])]
    check_outputs(csv_out, args.json, overwrite=True, inputs=inputs)
    stacks = [
        EvalStack(Path(path), args.image_channel, mask_channel=args.mask_channel,
                  mask_path=Path(args.mask_file[i]) if args.mask_file else None)
        for i, path in enumerate(args.stacks)
    ]
    methods: list[Method] = []
    for mode in dict.fromkeys(args.mode):  # a repeated name would be one row of the report anyway
        methods.append(Method(mode, PipelineConfig.for_mode(mode).with_options(**parse_option_assignments(args.option))))
    for text in args.variant or []:
        name, base, options = parse_variant(text)
        if name in (*(m.value for m in Mode), *BASELINES) or name in [m.name for m in methods]:
            raise OptionError(f"variant {text!r}: the name {name!r} is already taken (by a mode, a baseline or "
                                  "another variant); results are reported by name, so choose another")
        methods.append(Method(name, PipelineConfig.for_mode(base).with_options(**options)))
    for baseline in dict.fromkeys(args.baseline or []):
        methods.append(Method(baseline, None))
    pipeline_methods = [m for m in methods if m.config is not None]
    if not methods:
        raise OptionError("nothing to evaluate: give --mode, --variant or --baseline")
    settings = ProtocolSettings(
        n_points=args.points, seeds=tuple(range(args.seeds)), n_slices=args.slices, skip_ends=args.skip_ends,
        margin_px=args.margin, settings=tuple(args.settings), adapt_points=args.adapt_points,
    )
    # every stack, channel, ground truth and slice choice is checked before any model loads (evaluate opens them again)
    with open_eval_stacks(stacks, settings) as opened:
        for entry in opened:
            check_finite_slices(entry.image, entry.channel, 0, entry.z_values[:1])
    with ExitStack() as outputs:
        # evaluate has no --overwrite and always replaced its reports: a rerun refreshes them
        csv_temp = outputs.enter_context(atomic_output(csv_out, overwrite=True, sources=inputs)) if csv_out else None
        json_temp = outputs.enter_context(atomic_output(args.json, overwrite=True, sources=inputs)) if args.json else None
        backbones = ([load_backbone_from_args(name, args, announce=False) for name in (args.backbone or [None])]
                     if pipeline_methods else [])
        for backbone in backbones:
            for method in pipeline_methods:
                check_patch_grid(method.config, backbone)
        for backbone in backbones:
            announce_backbone(backbone)
        result = evaluate(stacks, methods, backbones, settings, cache=open_cache(args),
                          log=lambda message: print(message, file=sys.stderr))
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        print(format_summary(result))
        if csv_temp is not None:
            csv_temp.write_text(rows_csv_text(result.rows), encoding="utf-8")
        if json_temp is not None:
            payload = {
                "command": "python -m core " + shlex.join(sys.argv[1:]),
                "stacks": result.stacks,
                "slices": result.slices,
                "notes": result.notes,
                "settings": dataclasses.asdict(settings),
                "methods": {m.name: (m.config.as_dict() if m.config else "baseline") for m in methods},
                "backbones": [b.label() for b in backbones],
                "summary": result.summary(),
                "transfer": {
                    f"{m.name}|{b.spec.name if b else '-'}": _matrix_json(result.transfer_matrix(m.name, b.spec.name if b else "-"))
                    for m in methods if not m.is_otsu_baseline for b in (backbones if m.config else [None])
                },
                **({"adapt": {  # mean Dice of the adapted references by (source, target) stack
                    f"{m.name}|{b.spec.name if b else '-'}": _matrix_json(
                        result.transfer_matrix(m.name, b.spec.name if b else "-", settings=("adapt",)))
                    for m in methods if not m.is_otsu_baseline for b in (backbones if m.config else [None])
                }} if "adapt" in args.settings else {}),
                "seconds": result.seconds,
            }
            json_temp.write_text(json.dumps(payload, indent=1, default=_json_default), encoding="utf-8")
    if csv_out is not None:
        print(f"per-slice results: {csv_out}", file=sys.stderr)
    if args.json:
        print(f"summary: {args.json}", file=sys.stderr)
    return 0


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def _matrix_json(matrix: dict) -> dict:
    return {ref: {target: {"mean": mean, "std": std} for target, (mean, std) in row.items()} for ref, row in matrix.items()}


def rows_csv_text(rows: list[dict]) -> str:
    """``rows`` (dicts with the same keys) as CSV text with a header; no rows -> ''."""
    stream = io.StringIO(newline="")
    if rows:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    return stream.getvalue()


def write_rows_csv(rows: list[dict], path: Path, *, overwrite: bool = True) -> None:
    """Write ``rows`` as CSV with a header (`rows_csv_text`), atomically; no rows -> an empty file."""
    write_text(path, rows_csv_text(rows), overwrite=overwrite)


def format_summary(result) -> str:
    lines = [f"{'method':<16} {'backbone':<18} {'setting':<11} {'n':>5}  {'Dice':>13}  {'IoU':>13}  {'HD95 px':>15}"]
    for entry in result.summary():
        lines.append(
            f"{entry['method']:<16} {entry['backbone']:<18} {entry['setting']:<11} {entry['n']:>5}  "
            f"{entry['dice']:.3f} ± {entry['dice_std']:.3f}  {entry['iou']:.3f} ± {entry['iou_std']:.3f}  "
            f"{entry['hd95_px']:7.1f} ± {entry['hd95_px_std']:5.1f}"
        )
    return "\n".join(lines)


# ---- demo ---------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from core.demo import DEMO_DIR, ensure_demo, write_demo

    if args.ensure:
        path = ensure_demo(Path(args.out) if args.out else DEMO_DIR)
    else:
        path = write_demo(Path(args.out) if args.out else DEMO_DIR, overwrite=args.overwrite)
    print(f"demo stack: {path}", file=sys.stderr)
    return 0


# ---- registration -------------------------------------------------------------------------------------


def register(subparsers) -> None:
    prototype = subparsers.add_parser(
        "prototype", help="build prototypes from clicked points and save them (.npz)",
        description="Build prototypes from POINTS.json ({\"positive\": [[x, y, z], ...], \"negative\": [...]}, "
                    "x = column, y = row, z = slice, original pixels) and save them with their settings.")
    prototype.add_argument("stack", help="the stack the points were clicked on (.ims, .tif, image or folder)")
    prototype.add_argument("--points", required=True, help="POINTS.json")
    prototype.add_argument("--out", required=True, help="output prototype file (.npz)")
    prototype.add_argument("--channel", type=int, default=None,
                           help="image channel (negative counts from the end; default: penultimate channel of an .ims, else 0)")
    prototype.add_argument("--timepoint", type=int, default=0, help="time point (default 0)")
    prototype.add_argument("--mode", choices=("thesis", "best"), default="best",
                           help="thesis: the thesis pipeline exactly; best: our recommended settings (default)")
    prototype.add_argument("--option", action="append", metavar="NAME=VALUE",
                           help="override one pipeline setting, e.g. scoring=knn, threshold=otsu, z_sigma=1 (repeatable)")
    prototype.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_backbone_options(prototype)
    add_cache_options(prototype)
    prototype.set_defaults(func=cmd_prototype)

    apply = subparsers.add_parser(
        "apply", help="segment slices of stacks with saved prototypes (TIFF or OME-Zarr masks; Dask workers)",
        description="Apply a prototype file to slices of stacks. --out NAME.tif: a multi-page uint8 TIFF (0/255), one "
                    "page per requested slice in the order given, at the original slice size (one stack, this "
                    "process). --out NAME.ome.zarr: an OME-Zarr image of the whole stack (unrequested slices 0) with "
                    "voxel sizes and a pyramid, written in blocks of slices; a rerun resumes it. Several stacks: --out "
                    "FOLDER receives <stack>.ome.zarr and <stack>.areas.csv each. --workers/--scheduler run the blocks "
                    "on Dask workers (docs/scaling.md).")
    apply.add_argument("stacks", nargs="+", metavar="STACK")
    apply.add_argument("--prototype", required=True, help="prototype file from 'prototype' or the app (.npz)")
    apply.add_argument("--out", required=True, help="output: NAME.tif, NAME.ome.zarr, or a folder for several stacks")
    apply.add_argument("--channel", type=int, default=None,
                       help="image channel (default: penultimate channel of an .ims, else 0)")
    apply.add_argument("--timepoint", type=int, default=0)
    apply.add_argument("--z", default="all", metavar="SPEC", help="slices: 5 | 3,7,9 | 0:40 | all (default all)")
    apply.add_argument("--threshold", default=None, metavar="SPEC",
                       help="top:P | score:T | otsu | calibrated (default: the prototype's own)")
    apply.add_argument("--option", action="append", metavar="NAME=VALUE", help="override a pipeline setting (repeatable)")
    apply.add_argument("--areas", default=None, metavar="CSV", help="also write per-slice areas (px, µm²) to this CSV")
    apply.add_argument("--overwrite", action="store_true",
                       help="replace --out and --areas if they exist (an OME-Zarr of the same run is resumed without)")
    add_cluster_options(apply)
    add_backbone_options(apply)
    add_cache_options(apply)
    apply.set_defaults(func=cmd_apply)

    embed = subparsers.add_parser(
        "embed", help="fill the embedding cache for stacks (here or on Dask workers)",
        description="Embed slices of stacks into the embedding cache, so that later prototype, apply and evaluate "
                    "runs (and the app) read them instead of running the backbone. Slices already cached are "
                    "skipped. The backbone and preprocessing come from --prototype, else from --backbone, --mode "
                    "and --option.")
    embed.add_argument("stacks", nargs="+", metavar="STACK")
    embed.add_argument("--prototype", default=None,
                       help="take the backbone, weights and preprocessing of this prototype")
    embed.add_argument("--mode", choices=("thesis", "best"), default="best",
                       help="preprocessing of this mode when there is no --prototype (default best)")
    embed.add_argument("--option", action="append", metavar="NAME=VALUE",
                       help="override a preprocessing setting, e.g. image_size=644 (repeatable)")
    embed.add_argument("--channel", type=int, default=None,
                       help="image channel (default: penultimate channel of an .ims, else 0)")
    embed.add_argument("--timepoint", type=int, default=0)
    embed.add_argument("--z", default="all", metavar="SPEC", help="slices: 5 | 3,7,9 | 0:40 | all (default all)")
    add_cluster_options(embed)
    add_backbone_options(embed)
    embed.add_argument("--cache", default=None, metavar="DIR",
                       help="the embedding cache to fill (default: $PROTOSCOPE_CACHE or ~/.cache/protoscope/embeddings)")
    embed.set_defaults(func=cmd_embed, no_cache=False)

    evaluate_parser = subparsers.add_parser(
        "evaluate", help="the thesis's evaluation protocol on stacks with ground truth",
        description="Sample points from the ground truth (seeded, with a boundary margin), build prototypes per slice and "
                    "report Dice/IoU/HD95 for same-slice, same-file and cross-file transfer.")
    evaluate_parser.add_argument("stacks", nargs="+", metavar="STACK")
    evaluate_parser.add_argument("--image-channel", type=int, required=True, help="image channel (e.g. -2)")
    evaluate_parser.add_argument("--mask-channel", type=int, default=None, help="ground-truth channel (e.g. -1)")
    evaluate_parser.add_argument("--mask-file", nargs="+", default=None,
                                 help="ground-truth stacks, one per STACK in the same order (foreground = value > 0)")
    evaluate_parser.add_argument("--mode", nargs="+", choices=("thesis", "best"), default=["thesis", "best"])
    evaluate_parser.add_argument("--variant", action="append", metavar="NAME=BASE:OPT=V,...",
                                 help="an extra pipeline variant, e.g. 'knn=best:scoring=knn' (repeatable)")
    evaluate_parser.add_argument("--baseline", nargs="*", choices=("otsu", "intensity"), default=None,
                                 help="also run these baselines")
    evaluate_parser.add_argument("--option", action="append", metavar="NAME=VALUE", help="override a setting of --mode runs")
    evaluate_parser.add_argument("--points", type=int, default=25, help="positive and negative points per slice (25)")
    evaluate_parser.add_argument("--seeds", type=int, default=3, help="number of seeds (3)")
    evaluate_parser.add_argument("--slices", type=int, default=100, help="evaluated slices per stack (100)")
    evaluate_parser.add_argument("--skip-ends", type=int, default=40, help="slices skipped at each end (40)")
    evaluate_parser.add_argument("--margin", type=int, default=None, help="boundary margin in px (default: half a patch)")
    evaluate_parser.add_argument("--settings", nargs="+", default=["same-slice", "same-file", "cross-file"],
                                 choices=("same-slice", "same-file", "cross-file", "adapt"),
                                 help="adapt (not run by default): each stack's reference prototype plus --adapt-points "
                                      "positive and negative points on one slice of every other stack, scored on that "
                                      "stack's other slices")
    evaluate_parser.add_argument("--adapt-points", type=int, default=3,
                                 help="points per class sampled on the target in the adapt setting (3)")
    evaluate_parser.add_argument("--json", default=None, help="write the summary JSON here (and per-slice CSV beside it)")
    evaluate_parser.add_argument("--csv", default=None, help="write per-slice rows here")
    add_backbone_options(evaluate_parser, multiple=True)
    add_cache_options(evaluate_parser)
    evaluate_parser.set_defaults(func=cmd_evaluate)

    demo = subparsers.add_parser("demo", help="write the synthetic demo stack (assets/demo)")
    demo.add_argument("--out", default=None, help="folder (default assets/demo)")
    demo.add_argument("--ensure", action="store_true", help="only if missing")
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(func=cmd_demo)
