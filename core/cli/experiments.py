"""CLI ``python -m core experiments EXPERIMENT [EXPERIMENT ...] STACK [STACK ...]``: the thesis's chapter-4
experiments as CSV tables, plotly figures (HTML, PNG) and a README.md + run.json per experiment folder."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from core.cli.pipeline import add_backbone_options, add_cache_options, load_backbone_from_args, open_cache
from core.config import PipelineConfig, parse_option_assignments
from core.errors import ProtoscopeError

DEFAULT_OUT = "experiments-out"


def split_experiments(items: list[str]) -> tuple[list[str], list[str]]:
    """Leading experiment names (or 'all') and the stacks after them.

    ['backbones', 'separability', 'a.tif'] -> (['backbones', 'separability'], ['a.tif']).
    """
    from core.experiments.base import EXPERIMENTS

    names: list[str] = []
    index = 0
    while index < len(items) and items[index] in (*EXPERIMENTS, "all"):
        names.append(items[index])
        index += 1
    stacks = items[index:]
    if not names:
        raise ProtoscopeError(f"name an experiment first: {', '.join(EXPERIMENTS)} or all (got {items[0]!r})")
    if not stacks:
        raise ProtoscopeError("give at least one STACK after the experiment name(s)")
    chosen = list(EXPERIMENTS) if "all" in names else [name for name in EXPERIMENTS if name in names]
    return chosen, stacks


def parse_counts(text: str) -> list[int]:
    """'1,2,5' -> [1, 2, 5]."""
    try:
        counts = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ProtoscopeError(f"--point-counts {text!r}: give whole numbers separated by commas, e.g. 1,5,25") from None
    if not counts or min(counts) < 1:
        raise ProtoscopeError(f"--point-counts {text!r}: every count must be at least 1")
    return counts


def parse_percents(text: str) -> list[float]:
    """'2:30:2' (start:stop:step, stop included) or '8,10,12' -> percentages in (0, 100]."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            values = [round(start + i * step, 6) for i in range(count)]
        else:
            values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ProtoscopeError(f"--thresholds {text!r}: use START:STOP:STEP (e.g. 2:30:2) or a list (e.g. 8,10,12)") from None
    if not values or not all(0 < v <= 100 for v in values):
        raise ProtoscopeError(f"--thresholds {text!r}: every percentage must lie in (0, 100]")
    return values


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (``python -m core experiments ...``), or, when called in-process, an equivalent one
    rebuilt from the parsed arguments."""
    if sys.argv[1:2] == ["experiments"]:
        return "python -m core " + shlex.join(sys.argv[1:])
    parts = ["experiments", *args.items, "--image-channel", str(args.image_channel)]
    if args.mask_channel is not None:
        parts += ["--mask-channel", str(args.mask_channel)]
    if args.mask_file:
        parts += ["--mask-file", *args.mask_file]
    parts += ["--backbone", *(args.backbone or ["(default)"]), "--weights", args.weights, "--mode", args.mode]
    for option in args.option or []:
        parts += ["--option", option]
    parts += ["--points", str(args.points), "--seeds", str(args.seeds), "--slices", str(args.slices),
              "--skip-ends", str(args.skip_ends), "--point-counts", args.point_counts, "--thresholds", args.thresholds,
              "--out", args.out]
    if args.margin is not None:
        parts += ["--margin", str(args.margin)]
    parts += [flag for flag, on in (("--adapt", args.adapt), ("--no-umap", args.no_umap),
                                     ("--no-projections", args.no_projections),
                                     ("--no-png", not args.png), ("--inline-js", args.inline_js)) if on]
    return "python -m core " + shlex.join(parts)


def cmd_experiments(args: argparse.Namespace) -> int:
    from core.experiments.base import RANDOM_NOTE
    from core.experiments.report import headline_table, write_index, write_report
    from core.experiments.runs import run_experiments
    from core.protocol import ADAPT, SETTINGS, EvalStack, ProtocolSettings

    names, stack_paths = split_experiments(args.items)
    if args.mask_channel is None and not args.mask_file:
        raise ProtoscopeError("give --mask-channel M (ground truth inside the stack) or --mask-file FILE ... (one per stack)")
    if args.mask_file and len(args.mask_file) != len(stack_paths):
        raise ProtoscopeError(f"got {len(stack_paths)} stacks but {len(args.mask_file)} mask files; give one mask file per stack")
    for path in [*stack_paths, *(args.mask_file or [])]:
        if not Path(path).exists():
            raise ProtoscopeError(f"{path}: no such file or folder")
    stacks = [EvalStack(Path(path), args.image_channel, mask_channel=args.mask_channel,
                        mask_path=Path(args.mask_file[i]) if args.mask_file else None)
              for i, path in enumerate(stack_paths)]
    options = parse_option_assignments(args.option)
    config = PipelineConfig.for_mode(args.mode).with_options(**options)
    threshold_config = PipelineConfig.thesis().with_options(**options)
    settings = ProtocolSettings(n_points=args.points, seeds=tuple(range(args.seeds)), n_slices=args.slices,
                                skip_ends=args.skip_ends, margin_px=args.margin,
                                **({"settings": (*SETTINGS, ADAPT)} if args.adapt else {}))
    if args.seeds < 1 or args.slices < 1 or args.points < 1:
        raise ProtoscopeError("--seeds, --slices and --points must be at least 1")
    backbones = [load_backbone_from_args(name, args) for name in (args.backbone or [None])]
    out = Path(args.out)
    command = command_line(args)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def write(experiment) -> None:
        folder = out / experiment.name
        write_report(experiment, folder, backbones=backbones, command=command, stacks=stacks, png=args.png,
                     include_plotlyjs=True if args.inline_js else "cdn", warn=log)
        write_index(out)
        log(f"{experiment.name}: wrote {folder} ({experiment.info.get('seconds', '?')} s)")
        for note in experiment.notes:
            log(f"  note: {note}")

    results = run_experiments(
        names, stacks, backbones, config, settings, threshold_config=threshold_config, cache=open_cache(args), log=log,
        counts=parse_counts(args.point_counts), percents=parse_percents(args.thresholds),
        projections=() if args.no_projections else (("pca",) if args.no_umap else ("pca", "umap")),
        max_points=args.scatter_points, umap_max_samples=args.umap_samples, on_done=write,
    )
    for name, experiment in results.items():
        print(f"## {name}\n\n{headline_table(experiment)}\n")
    if any(b.is_random for b in backbones):
        print(f"WARNING: {RANDOM_NOTE}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "experiments", help="the thesis's experiments (chapter 4) as CSV + plotly reports",
        usage="python -m core experiments {backbones,separability,points,threshold,transfer,all} [...] STACK [STACK ...] "
              "--image-channel C (--mask-channel M | --mask-file F [F ...]) [options]",
        description="Run one or more of the thesis's experiments on stacks with ground truth and write, per experiment, "
                    "a folder OUT/<experiment>/ with CSV tables, figures (HTML; PNG through kaleido) and README.md + "
                    "run.json (command, backbones, date, machine). backbones: Table 4.2 + Fig. 4.3; separability: "
                    "Table 4.1 + Figs. 4.1/4.2; points: Fig. 4.6; threshold: Fig. 4.7; transfer: Fig. 4.9 + Table B.1. "
                    "See docs/experiments.md.")
    parser.add_argument("items", nargs="+", metavar="EXPERIMENT/STACK",
                        help="experiment name(s) (backbones, separability, points, threshold, transfer or all), then "
                             "the stacks (.ims, .tif, image folder)")
    parser.add_argument("--image-channel", type=int, required=True, help="image channel (e.g. 0, or -2 for an .ims)")
    parser.add_argument("--mask-channel", type=int, default=None, help="ground-truth channel inside the stack (e.g. -1)")
    parser.add_argument("--mask-file", nargs="+", default=None,
                        help="ground-truth stacks, one per STACK in the same order (foreground = value > 0)")
    parser.add_argument("--mode", choices=("thesis", "best"), default="thesis",
                        help="pipeline of backbones/separability/points/transfer (default thesis); the threshold "
                             "sweep always uses the thesis pipeline (top-%% of the patch grid)")
    parser.add_argument("--option", action="append", metavar="NAME=VALUE",
                        help="override a pipeline setting, e.g. image_size=448 (repeatable; applies to every experiment)")
    parser.add_argument("--points", type=int, default=25, help="positive and negative points per slice (25)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, 0 .. N-1 (3)")
    parser.add_argument("--slices", type=int, default=100, help="evaluated slices per stack (100)")
    parser.add_argument("--skip-ends", type=int, default=40, help="slices skipped at each end (40; shallow stacks skip less)")
    parser.add_argument("--margin", type=int, default=None, help="boundary margin of the points in px (default: half a patch)")
    parser.add_argument("--point-counts", default="1,2,5,10,15,20,25,30,40,50", metavar="N,N,...",
                        help="points per class of the points experiment (default 1,2,5,10,15,20,25,30,40,50)")
    parser.add_argument("--thresholds", default="2:30:2", metavar="START:STOP:STEP",
                        help="top-%% thresholds of the threshold experiment (default 2:30:2, i.e. 2, 4, ..., 30)")
    parser.add_argument("--adapt", action="store_true",
                        help="transfer (and backbones when run with it) also evaluates adapt: each reference prototype "
                             "plus 3 + 3 points on one slice of every other stack (Table 4.4 gains an adapt row)")
    parser.add_argument("--scatter-points", type=int, default=2000, help="patches drawn in the PCA/UMAP scatter (2000)")
    parser.add_argument("--umap-samples", type=int, default=2000, help="patches UMAP is fitted on (2000)")
    parser.add_argument("--no-umap", action="store_true", help="PCA scatter only (UMAP costs ~1-2 min of numba compilation)")
    parser.add_argument("--no-projections", action="store_true", help="no PCA/UMAP scatter at all")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder, one subfolder per experiment (default ./{DEFAULT_OUT}); files are replaced")
    parser.add_argument("--png", action=argparse.BooleanOptionalAction, default=True,
                        help="also write PNG figures through kaleido (needs Chrome/Chromium; default on)")
    parser.add_argument("--inline-js", action="store_true",
                        help="embed plotly.js in every HTML file (viewable offline, ~4.5 MB each; default: load it from the CDN)")
    add_backbone_options(parser, multiple=True)
    add_cache_options(parser)
    parser.set_defaults(func=cmd_experiments)
