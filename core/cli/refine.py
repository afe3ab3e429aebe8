"""CLI commands of the U-Net refinement (docs/spec/PIPELINE.md A.9): ``refine train`` and ``refine apply``.

``refine train`` applies a saved prototype to slices of stacks with ground truth, trains a shallow U-Net
on (raw, heatmap, prototype mask) -> truth and saves it as one safetensors file with its provenance;
``refine apply`` runs a saved model on the slices of a stack (``core.refine.apply.refine_stack``, the loop
the app's Refine page runs too) and writes a multi-page uint8 0/255 TIFF, like ``apply``. See
docs/refine.md, section "Command line".

The modules that import torch (core.refine.*, core.protocol, core.prototypes, core.features.embedding) are
imported inside the commands, for start-up time only: ``python -m core --help`` and the other commands
should not pay the ~2 s of importing torch.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from core.cli.pipeline import (
    StderrProgress,
    add_backbone_options,
    add_cache_options,
    backbone_for_prototype,
    open_cache,
)
from core.errors import OptionError, OutputError, ProtoscopeError, RefineError
from core.io import default_image_channel, open_stack, stack_label
from core.io.atomic import check_not_an_input
from core.io.writers import TiffMaskWriter
from core.metrics import dice
from core.zspec import parse_z_spec

DEFAULT_VAL_FRACTION = 0.2


# ---- helpers ------------------------------------------------------------------------------------------


def _format_seconds(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_epoch(report) -> str:
    """One progress line per epoch (core.refine.EpochReport)."""
    return (f"epoch {report.epoch + 1:>2}/{report.max_epochs}  loss {report.train_loss:.4f}  val loss {report.val_loss:.4f}  "
            f"val Dice {report.val_dice:.3f} @ {report.val_threshold:g}  best epoch {report.best_epoch + 1}  "
            f"{_format_seconds(report.elapsed_s)} elapsed, <= {_format_seconds(report.eta_s)} left")


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise OptionError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _check_out(path: Path, overwrite: bool, inputs: Sequence[str | Path | None] = ()) -> None:
    check_not_an_input(path, [Path(p) for p in inputs if p])
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; choose another --out or add --overwrite")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {path.parent} does not exist")


def _prototype_backbone(prototype, args: argparse.Namespace):
    """The backbone (and weights) the prototype was made with; --weights overrides, like ``apply``."""
    if args.backbone and args.backbone != prototype.backbone:
        raise OptionError(
            f"--backbone {args.backbone} differs from the prototype's backbone {prototype.backbone!r}; heatmaps come "
            "from the backbone that made the prototype, so drop --backbone or build a prototype with it")
    return backbone_for_prototype(prototype, args)


class CtrlC:
    """``should_stop`` for training: the first Ctrl-C asks to stop after the current slice, a second one aborts.

    Installs a SIGINT handler inside the ``with`` block (main thread only; elsewhere it never fires).
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after the current slice and keeping the best model so far "
              "(Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


# ---- refine train -------------------------------------------------------------------------------------


def _refine_config(args: argparse.Namespace):
    from core.refine.model import RefineConfig

    return RefineConfig(
        input_set=args.inputs,
        input_size=args.input_size,
        base_channels=args.base_channels,
        max_epochs=args.epochs,
        patience=args.patience,
        lr=args.lr,
        seed=args.seed,
        augment=args.augment,
        heatmap_norm=args.heatmap_norm,
    )


def _eval_stacks(args: argparse.Namespace):
    """EvalStack per STACK (image channel resolved), after checking the ground-truth options."""
    from core.protocol import EvalStack

    if args.mask_channel is None and not args.mask_file:
        raise OptionError("give --mask-channel M (ground truth inside the stack) or --mask-file FILE ... (one per stack)")
    if args.mask_channel is not None and args.mask_file:
        raise OptionError("give either --mask-channel or --mask-file, not both")
    if args.mask_file and len(args.mask_file) != len(args.stacks):
        raise OptionError(f"got {len(args.stacks)} stacks but {len(args.mask_file)} mask files; give one mask file per stack")
    specs = []
    for i, path in enumerate(args.stacks):
        with open_stack(path) as stack:
            channel = default_image_channel(stack, args.image_channel)
        specs.append(EvalStack(Path(path), channel, mask_channel=args.mask_channel,
                               mask_path=Path(args.mask_file[i]) if args.mask_file else None, name=stack_label(path)))
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ProtoscopeError(f"two stacks have the same name ({', '.join(labels)}); give them distinct file names")
    return specs


def _slice_chooser(args: argparse.Namespace):
    from core.protocol import select_slices

    if args.z is not None:
        return lambda n_z: parse_z_spec(args.z, n_z)
    if args.slices < 1 or args.skip_ends < 0:
        raise OptionError(f"--slices must be >= 1 and --skip-ends >= 0, got {args.slices} and {args.skip_ends}")
    return lambda n_z: select_slices(n_z, args.slices, args.skip_ends)[0]


def _truth_text(spec) -> str:
    return f"channel {spec.mask_channel}" if spec.mask_path is None else str(spec.mask_path)


def cmd_train(args: argparse.Namespace) -> int:
    from core.prototypes import load_prototype
    from core.refine.files import save_refiner
    from core.refine.model import INPUT_SETS
    from core.refine.train import train_unet
    from core.refine.samples import RAW_CLIP_PERCENTILES, split_by_fraction, split_by_stack, stack_samples

    if args.inputs not in INPUT_SETS:
        raise RefineError(f"--inputs {args.inputs!r} is not an input set; use one of {', '.join(INPUT_SETS)}")
    config = _refine_config(args)
    out = Path(args.out)
    _check_out(out, args.overwrite, [*args.stacks, *(args.mask_file or []), args.prototype])
    _set_threads(args.threads)
    if args.max_side < config.input_size:
        raise OptionError(f"--max-side {args.max_side} is smaller than --input-size {config.input_size}; "
                              "the samples would be upsampled for nothing")
    specs = _eval_stacks(args)
    if args.val_stack is not None and len(specs) < 2:
        raise OptionError("--val-stack holds out one whole stack, so it needs at least two STACKs; use --val-fraction")
    if args.val_stack is not None and not -len(specs) <= args.val_stack < len(specs):
        raise OptionError(f"--val-stack {args.val_stack} is not a stack index; give 0-{len(specs) - 1} (the order of STACK)")
    uses_prototype = config.channels != ("raw",)
    if uses_prototype and not args.prototype:
        raise OptionError(f"input set {config.input_set!r} uses the prototype heatmap; give --prototype PROTO.npz")
    prototype = load_prototype(args.prototype) if args.prototype else None
    backbone = _prototype_backbone(prototype, args) if prototype is not None else None
    if prototype is not None:
        print(f"prototype: {args.prototype}: {prototype.summary()}", file=sys.stderr)
    cache = open_cache(args) if prototype is not None else None
    choose = _slice_chooser(args)

    samples = []
    for spec in specs:
        progress = StderrProgress({"slices": f"{spec.label}: samples"})
        try:
            samples += stack_samples(spec, choose, prototype=prototype, backbone=backbone, cache=cache,
                                     max_side=args.max_side, on_slice=lambda done, total: progress("slices", done, total, None))
        finally:
            progress.close()
    if args.val_stack is not None:
        held_out = specs[args.val_stack].label
        train, val = split_by_stack(samples, held_out)
        validation = {"kind": "stack", "stack_id": held_out}
    else:
        fraction = args.val_fraction if args.val_fraction is not None else DEFAULT_VAL_FRACTION
        train, val = split_by_fraction(samples, fraction)
        validation = {"kind": "fraction", "fraction": fraction}
    print(f"training on {len(train)} slice(s), validating on {len(val)} ({validation['kind']}); input set "
          f"{config.input_set}, {config.input_size} px, at most {config.max_epochs} epochs (patience {config.patience})",
          file=sys.stderr)

    metadata = {
        "backbone": prototype.backbone if prototype else None,
        "weights": prototype.weights_id if prototype else None,
        "heatmap_mode": prototype.config.mode.value if prototype else None,
        "prototype_file": str(Path(args.prototype).resolve()) if prototype else None,
        "prototype_config": prototype.config.as_dict() if prototype else None,
        "raw_clip_percentiles": list(RAW_CLIP_PERCENTILES),
        "max_side": args.max_side,
        "stacks": [{"stack_id": s.label, "path": str(s.image_path.resolve()), "image_channel": s.image_channel,
                    "truth": _truth_text(s)} for s in specs],
        "validation": validation,
    }
    with CtrlC() as stop:
        result = train_unet(train, val, config, on_epoch=lambda r: print(format_epoch(r), file=sys.stderr, flush=True),
                            should_stop=stop, metadata=metadata, device=args.device)
    if result.cancelled and not result.history:
        print(f"interrupted before the first epoch finished: nothing saved to {out}", file=sys.stderr)
        return 130
    save_refiner(result.refiner, out, overwrite=args.overwrite)
    meta = result.refiner.metadata
    line = (f"wrote {out}: input set {config.input_set}, threshold {result.refiner.threshold:g}, "
            f"{meta['epochs_run']} epoch(s), best epoch {meta['best_epoch'] + 1}, "
            f"val Dice {result.history[meta['best_epoch']].val_dice:.3f}")
    if all(s.mask is not None for s in val):
        line += f" (prototype mask {sum(dice(s.mask, s.truth) for s in val) / len(val):.3f})"
    if result.cancelled:
        line += "; training was interrupted, this is the best model so far"
    print(line)
    return 130 if result.cancelled else 0


# ---- refine apply -------------------------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.features.embedding import SliceEmbedder
    from core.prototypes import load_prototype
    from core.refine.apply import heatmap_mode_note, refine_stack
    from core.refine.files import load_refiner, read_refiner_metadata

    out = Path(args.out)
    inputs = [args.stack, args.model, args.prototype]
    _check_out(out, args.overwrite, inputs)
    _set_threads(args.threads)
    meta = read_refiner_metadata(args.model)  # ModelFileError for a missing or damaged model, before anything runs
    uses_prototype = meta["channels"] != ["raw"]
    if uses_prototype and not args.prototype:
        raise OptionError(f"{args.model} was trained on input set {meta['input_set']!r}, which needs the heatmap "
                          "of a prototype; give --prototype PROTO.npz")
    prototype = load_prototype(args.prototype) if args.prototype and uses_prototype else None
    refiner = load_refiner(args.model, expected_backbone=prototype.backbone if prototype else None, device=args.device)
    note = heatmap_mode_note(refiner, prototype)
    if note is not None:
        print(f"WARNING: {args.model}: {note}", file=sys.stderr)
    backbone = _prototype_backbone(prototype, args) if prototype is not None else None

    with open_stack(args.stack) as stack:
        channel = default_image_channel(stack, args.channel)
        z_values = parse_z_spec(args.z, stack.shape[0])
        print(f"stack: {stack.path.name} {stack.shape} (Z, C, Y, X), channel {channel}, {len(z_values)} slice(s); "
              f"refiner {refiner.config.input_set} at {refiner.config.input_size} px, threshold {refiner.threshold:g}",
              file=sys.stderr)
        embedder = None
        if prototype is not None:
            embedder = SliceEmbedder(stack, channel, backbone, prototype.config.preprocess, cache=open_cache(args))
        with TiffMaskWriter(out, voxel_size=stack.voxel_size, overwrite=args.overwrite,
                            sources=[p for p in inputs if p]) as writer, \
                tqdm(total=len(z_values), desc="refine", unit="slice", file=sys.stderr, dynamic_ncols=True) as bar:
            run = refine_stack(refiner, stack, channel, z_values, lambda refined: writer.write(refined.mask),
                               prototype=prototype, embedder=embedder,
                               on_progress=lambda done, total, eta: bar.update(1))
    print(f"wrote {out}: {len(run.z_values)} slice(s), {run.volume_voxels} mask voxels ({run.seconds:.1f} s)")
    return 0


# ---- registration -------------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice; 1 is often fastest for small inputs on a busy CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_backbone_options(parser)
    add_cache_options(parser)


def register(subparsers) -> None:
    refine = subparsers.add_parser(
        "refine", help="U-Net refinement of prototype masks: train on slices with ground truth, apply to stacks",
        description="A shallow U-Net (thesis §3.7) that reads the raw slice, the prototype heatmap and/or the "
                    "prototype mask and returns a better mask. See docs/refine.md.")
    commands = refine.add_subparsers(dest="refine_command", metavar="{train,apply}")
    commands.required = True

    train = commands.add_parser(
        "train", help="train a refiner on stacks with ground truth and save it (.safetensors)",
        description="Apply --prototype to the chosen slices of every STACK (heatmap and mask, with the prototype's own "
                    "settings), train a shallow U-Net to predict the ground truth, early-stop and choose the output "
                    "threshold on validation slices, and save the model with its provenance. Validation: by default "
                    f"{DEFAULT_VAL_FRACTION:g} of each stack's slices, evenly spaced in z (--val-fraction); "
                    "--val-stack I holds out the I-th STACK instead (the thesis's choice, which measures transfer to a "
                    "new stack). Ctrl-C stops training and saves the best model so far under --out (exit status 130).")
    train.add_argument("stacks", nargs="+", metavar="STACK", help="stacks with ground truth (.ims, .tif, ...)")
    train.add_argument("--image-channel", type=int, default=None,
                       help="image channel (negative counts from the end; default: penultimate channel of an .ims, else 0)")
    train.add_argument("--mask-channel", type=int, default=None, help="ground-truth channel in the stacks (e.g. -1)")
    train.add_argument("--mask-file", nargs="+", default=None, metavar="F",
                       help="ground-truth stacks, one per STACK in the same order (foreground = value > 0)")
    train.add_argument("--inputs", default="raw+heatmap", metavar="SET",
                       help="network inputs: raw | heatmap | raw+heatmap | raw+heatmap+mask (default raw+heatmap)")
    train.add_argument("--prototype", default=None, metavar="PROTO.npz",
                       help="prototype file whose heatmap and mask are the inputs (not needed for --inputs raw)")
    train.add_argument("--out", required=True, metavar="MODEL.safetensors", help="output model file")
    train.add_argument("--z", default=None, metavar="SPEC",
                       help="slices of every stack: 5 | 3,7,9 | 0:40 | all (default: --slices evenly spaced)")
    train.add_argument("--slices", type=int, default=25, help="evenly spaced slices per stack (default 25, the thesis)")
    train.add_argument("--skip-ends", type=int, default=40,
                       help="slices skipped at each end before spacing (default 40; shrinks for shallow stacks)")
    val = train.add_mutually_exclusive_group()
    val.add_argument("--val-stack", type=int, default=None, metavar="INDEX",
                     help="hold out the INDEX-th STACK (0-based) for validation")
    val.add_argument("--val-fraction", type=float, default=None, metavar="F",
                     help=f"hold out this fraction of each stack's slices, evenly spaced (default {DEFAULT_VAL_FRACTION:g})")
    train.add_argument("--input-size", type=int, default=256,
                       help="network input side in px, a multiple of 4 (default 256; thesis 980, for a GPU)")
    train.add_argument("--max-side", type=int, default=1024, metavar="PX",
                       help="slices larger than this (longer side, px) are shrunk to it before training, which bounds "
                            "the memory the samples take (default 1024; the model records it and apply uses it)")
    train.add_argument("--base-channels", type=int, default=16, help="width of the first U-Net block (default 16)")
    train.add_argument("--epochs", type=int, default=15, help="maximum epochs (default 15)")
    train.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs (default 5)")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    train.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling and augmentation (default 0)")
    train.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                       help="random flips and 90° rotations of training slices (default on)")
    train.add_argument("--heatmap-norm", choices=("percentile", "fixed"), default="percentile",
                       help="per-slice heatmap scaling (default percentile; see docs/refine.md)")
    _add_common(train)
    train.set_defaults(func=cmd_train)

    apply = commands.add_parser(
        "apply", help="refine the prototype masks of a stack with a trained model (multi-page TIFF)",
        description="Compute the prototype heatmap and mask of each requested slice (as 'apply' does), run the "
                    "refiner and write a multi-page uint8 TIFF (0/255), one page per slice in the order given. The "
                    "model must have been trained on heatmaps of the prototype's backbone.")
    apply.add_argument("stack")
    apply.add_argument("--model", required=True, metavar="MODEL.safetensors", help="model from 'refine train'")
    apply.add_argument("--prototype", default=None, metavar="PROTO.npz",
                       help="prototype file for the heatmap and mask (required unless the model uses the raw slice only)")
    apply.add_argument("--out", required=True, metavar="MASKS.tif", help="output TIFF (.tif)")
    apply.add_argument("--channel", type=int, default=None,
                       help="image channel (default: penultimate channel of an .ims, else 0)")
    apply.add_argument("--z", default="all", metavar="SPEC", help="slices: 5 | 3,7,9 | 0:40 | all (default all)")
    _add_common(apply)
    apply.set_defaults(func=cmd_apply)
