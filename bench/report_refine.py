"""Table 4.3 of the thesis on the vesselNN stacks: the U-Net refiner on four input sets, leave one stack out.

For every stack: evenly spaced slices whose ground truth has structure and background; on each, a
prototype from 25 positive + 25 negative points sampled on that slice's ground truth (seeded, half a
patch from the boundary; the points of ``python -m core evaluate``'s same-slice runs), applied to that
slice (the same-slice heatmap and prototype mask, as in the thesis). Then, for each input set (raw,
heatmap, raw+heatmap, raw+heatmap+mask) and seed: train on four stacks, validate (early stopping,
threshold) on the fifth and score the refined masks on it (``core.refine.loo.leave_one_out``), next to
the prototype mask on the same slices (the thesis's "DINOv2 S/14" row becomes "prototype mask
(filterbank, thesis mode)").

Run from the repository root (defaults fit ~1 h of one CPU core on a shared 2-core VM):

    .venv/bin/python bench/report_refine.py
    .venv/bin/python bench/report_refine.py --modes thesis best --input-size 980 --slices 25 --seeds 3 --threads 0   # a GPU machine (thesis settings)

Writes docs/results/refine.json (every run, every slice) and docs/results/refine.md (the table, the
command, the settings, the machine and the time); both are rewritten after every input set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.features.backbones import load_backbone  # noqa: E402
from core.config import PipelineConfig  # noqa: E402
from core.features.embedding_cache import EmbeddingCache  # noqa: E402
from core.io import open_stack  # noqa: E402
from core.io.atomic import atomic_output  # noqa: E402
from core.metrics import dice, hd95  # noqa: E402
from core.protocol import EvalStack, select_slices  # noqa: E402
from core.refine.loo import leave_one_out  # noqa: E402
from core.refine.model import INPUT_SETS, RefineConfig, ShallowUNet  # noqa: E402
from core.refine.samples import same_slice_samples  # noqa: E402
from core.refine.train import combo_loss  # noqa: E402

DEFAULT_DATA = (ROOT / ".." / "shared" / "data" / "vesselnn").resolve()
RESULTS_JSON = ROOT / "docs" / "results" / "refine.json"
RESULTS_MD = ROOT / "docs" / "results" / "refine.md"

#: What a GPU machine should run (thesis Table 3.5 / §3.8.3).
THESIS_SETTINGS = {"input_size": 980, "slices": 25, "seeds": 3, "epochs": 15, "patience": 5, "base_channels": 16,
                   "points": 25}

#: Thesis Table 4.3 (DINOv2 S/14 heatmaps, private bone data): Dice, HD95 (px).
THESIS_TABLE = {
    "prototype mask": (0.664, 180.4),
    "raw": (0.602, 213.5),
    "heatmap": (0.757, 143.3),
    "raw+heatmap": (0.772, 154.6),
    "raw+heatmap+mask": (0.752, 156.4),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="vesselNN folder (images/, labels/)")
    parser.add_argument("--backbone", default="filterbank", help="heatmap backbone (default filterbank)")
    parser.add_argument("--weights", default="hub", help="DINOv2 weights spec (ignored for filterbank)")
    parser.add_argument("--modes", nargs="+", choices=("thesis", "best"), default=["thesis", "best"],
                        help="pipeline modes whose heatmaps are refined (default both; the raw runs are shared)")
    parser.add_argument("--input-sets", nargs="+", choices=tuple(INPUT_SETS), default=list(INPUT_SETS))
    parser.add_argument("--input-size", type=int, default=128, help="U-Net input side in px (default 128; thesis 980)")
    parser.add_argument("--slices", type=int, default=10, help="evenly spaced slices per stack (default 10; thesis 25)")
    parser.add_argument("--skip-ends", type=int, default=0, help="slices skipped at each stack end (default 0; the stacks have 14-25)")
    parser.add_argument("--seeds", type=int, default=2, help="U-Net seeds 0..N-1 per fold (default 2; thesis 3)")
    parser.add_argument("--epochs", type=int, default=15, help="maximum epochs (default 15 = thesis)")
    parser.add_argument("--patience", type=int, default=5, help="early-stopping patience (default 5 = thesis)")
    parser.add_argument("--base-channels", type=int, default=16, help="U-Net width (default 16)")
    parser.add_argument("--points", type=int, default=25, help="positive and negative points per slice (default 25 = thesis)")
    parser.add_argument("--point-seed", type=int, default=0, help="seed of the sampled points (default 0)")
    parser.add_argument("--margin", type=int, default=None, help="point margin in px (default: half a patch)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: fastest for this small net on the shared 2-core VM; 0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device for the U-Net (default cpu)")
    parser.add_argument("--cache", default=None, help="embedding cache folder (default: the user cache)")
    parser.add_argument("--json", type=Path, default=RESULTS_JSON)
    parser.add_argument("--md", type=Path, default=RESULTS_MD)
    parser.add_argument("--markdown-only", action="store_true", help="only rewrite --md from an existing --json")
    return parser.parse_args(argv)


def vessel_stacks(folder: Path) -> list[EvalStack]:
    images = sorted((folder / "images").glob("*.tif"))
    if not images:
        raise SystemExit(f"no stacks in {folder / 'images'}; give --data DIR with images/<key>.tif and labels/<key>.tif")
    return [EvalStack(path, 0, mask_path=folder / "labels" / path.name, name=path.stem) for path in images]


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_start": list(os.getloadavg())}


def thread_timing(input_size: int, base_channels: int, repeats: int = 3, steps: int = 5) -> dict[str, float]:
    """Median ms per U-Net training step (2 input channels, batch 1) with 1 and with 2 torch threads.

    Interleaved, so that both see the same load of the shared machine; the thread count in use is restored.
    """
    before = torch.get_num_threads()
    x = torch.rand(1, 2, input_size, input_size)
    y = (torch.rand(1, 1, input_size, input_size) > 0.5).float()
    times: dict[int, list[float]] = {1: [], 2: []}
    try:
        for _ in range(repeats):
            for threads in times:
                torch.set_num_threads(threads)
                model = ShallowUNet(2, base_channels)
                optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
                for step in range(steps + 1):
                    if step == 1:  # the first step warms up allocations
                        start = time.perf_counter()
                    optimiser.zero_grad()
                    combo_loss(model(x), y).backward()
                    optimiser.step()
                times[threads].append((time.perf_counter() - start) / steps * 1000)
    finally:
        torch.set_num_threads(before)
    return {str(k): float(np.median(v)) for k, v in times.items()}


def mean_std(values) -> tuple[float, float]:
    arr = np.asarray(list(values), dtype=float)
    arr = arr[np.isfinite(arr)]
    return (float(arr.mean()), float(arr.std())) if arr.size else (float("nan"), float("nan"))


def prototype_row(samples) -> dict:
    d = [dice(s.mask, s.truth) for s in samples]
    h = [hd95(s.mask, s.truth) for s in samples]
    (dm, ds), (hm, hs) = mean_std(d), mean_std(h)
    return {"dice_mean": dm, "dice_std": ds, "hd95_mean": hm, "hd95_std": hs, "n_slices": len(samples),
            "per_stack_dice": {k: mean_std(v for s, v in zip(samples, d) if s.stack_id == k)[0]
                               for k in dict.fromkeys(s.stack_id for s in samples)}}


def run_json(result) -> dict:
    rows = [dataclasses.asdict(r) | {"dice": r.dice, "hd95": r.hd95, "proto_dice": r.proto_dice} for r in result.rows]
    per_stack = {}
    for r in result.rows:
        per_stack.setdefault(r.held_out, []).extend(r.slice_dice)
    return {"summary": result.summary, "per_stack_dice": {k: mean_std(v)[0] for k, v in per_stack.items()}, "rows": rows,
            "cancelled": result.cancelled}


def write_markdown(report: dict, path: Path) -> None:
    s = report["settings"]
    lines = [
        "# U-Net refinement on vesselNN (thesis Table 4.3 analogue)",
        "",
        f"Generated by `bench/report_refine.py` on {report['finished'] or report['started']}"
        + ("." if report["complete"] else " (**partial: the run was still going or was interrupted**)."),
        "",
        f"Heatmaps: `{s['backbone']}` backbone, prototypes built on each slice from {s['points']} + {s['points']} points "
        "sampled on its own ground truth (the thesis's same-slice heatmaps). U-Net: leave one stack out over the "
        f"{len(report['stacks'])} vesselNN stacks (train on 4, validate = early stopping and output threshold, and "
        f"report on the 5th), seeds {s['seeds']}, input {s['input_size']} px. Per-slice means ± population std over "
        "every held-out slice of every fold and seed. HD95 in pixels of the 512 x 512 slices (the slice diagonal, "
        "724 px, when a mask is empty and the truth is not). The last column is the thesis (DINOv2 S/14 heatmaps, "
        "980 px, private bone data, 3 seeds): a different data set, shown for the direction of the effects only.",
        "",
        "As in the thesis, the held-out stack also chooses the epoch and the output threshold, so the U-Net rows are "
        "somewhat optimistic; and the heatmaps come from points sampled on each slice's own ground truth, which a "
        "user's clicks on one reference slice would not match (same-slice, not transfer).",
        "",
    ]
    for mode, block in report["modes"].items():
        proto = block.get("prototype_mask")
        if proto is None:
            continue
        lines += [f"## Heatmaps in {mode} mode", "", f"Pipeline: `{block['pipeline']}`.", "",
                  "| input | Dice | HD95 (px) | Dice gain over the prototype mask | HD95 change (px) | thesis Dice / HD95 |",
                  "|---|---|---|---|---|---|",
                  f"| prototype mask ({s['backbone']}, {mode} mode) | {proto['dice_mean']:.3f} ± {proto['dice_std']:.3f} | "
                  f"{proto['hd95_mean']:.1f} ± {proto['hd95_std']:.1f} | — | — | "
                  f"{THESIS_TABLE['prototype mask'][0]:.3f} / {THESIS_TABLE['prototype mask'][1]:.1f} (DINOv2 S/14) |"]
        for name, run in block["input_sets"].items():
            m = run["summary"]
            gain = m["dice_mean"] - proto["dice_mean"]
            t = THESIS_TABLE[name]
            lines.append(f"| U-Net: {name} | {m['dice_mean']:.3f} ± {m['dice_std']:.3f} | {m['hd95_mean']:.1f} ± "
                         f"{m['hd95_std']:.1f} | {gain:+.3f} | {m['hd95_mean'] - proto['hd95_mean']:+.1f} | {t[0]:.3f} / {t[1]:.1f} |")
        stacks = list(report["stacks"])
        lines += ["", "Mean Dice per held-out stack:", "",
                  "| input | " + " | ".join(stacks) + " |", "|---|" + "---|" * len(stacks),
                  "| prototype mask | " + " | ".join(f"{proto['per_stack_dice'].get(k, float('nan')):.3f}" for k in stacks) + " |"]
        for name, run in block["input_sets"].items():
            lines.append(f"| {name} | " + " | ".join(f"{run['per_stack_dice'].get(k, float('nan')):.3f}" for k in stacks) + " |")
        epochs = [r["epochs_run"] for run in block["input_sets"].values() for r in run["rows"]]
        thresholds = [r["threshold"] for run in block["input_sets"].values() for r in run["rows"]]
        if epochs:
            lines += ["", f"Epochs run per training: {min(epochs)}-{max(epochs)} (median {int(np.median(epochs))}); "
                          f"chosen output thresholds: {', '.join(f'{t:g}: {thresholds.count(t)}' for t in sorted(set(thresholds)))}."]
        lines.append("")
    slices = report["stacks"]
    mach = report["machine"]
    secs = report["seconds"]
    lines += [
        "## How it was run",
        "",
        "```",
        report["command"],
        "```",
        "",
        "| setting | this run | thesis (what a GPU machine should use) |",
        "|---|---|---|",
        f"| U-Net input size (px) | {s['input_size']} | {THESIS_SETTINGS['input_size']} |",
        f"| slices per stack | {s['slices']} (skip {s['skip_ends']} at each end) | {THESIS_SETTINGS['slices']} |",
        f"| seeds | {len(s['seeds'])} | {THESIS_SETTINGS['seeds']} |",
        f"| max epochs / patience | {s['epochs']} / {s['patience']} | {THESIS_SETTINGS['epochs']} / {THESIS_SETTINGS['patience']} |",
        f"| U-Net base width | {s['base_channels']} | not stated (16 here) |",
        f"| points per class | {s['points']} (seed {s['point_seed']}, margin {s['margin'] or 'half a patch'}) | 25 |",
        "| loss, optimiser, batch | 0.5·BCE + 0.5·Dice, Adam 1e-3, batch 1, flips/rot90 augmentation | same |",
        "| heatmap normalisation | per slice, 1st-99th percentile to [0, 1] | not stated |",
        "",
        "Slices used (z, with structure and background): "
        + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in slices.items()) + ".",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores (shared with other jobs; load average at the start "
        f"{', '.join(f'{x:.1f}' for x in mach['load_average_start'])}), {mach['platform']}, Python {mach['python']}, "
        f"torch {mach['torch']} with {mach['torch_threads']} thread(s). One training step at {s['input_size']} px, "
        "measured at the start (median of 3, interleaved): "
        + ", ".join(f"{v:.0f} ms with {k} thread(s)" for k, v in mach["ms_per_training_step_by_threads"].items()) + ".",
        "",
        f"Time: {secs.get('total', 0) / 60:.1f} min wall, {secs.get('cpu', 0) / 60:.1f} min CPU "
        f"(heatmaps {secs.get('heatmaps', 0) / 60:.1f} min, U-Net training and scoring {secs.get('training', 0) / 60:.1f} min). "
        "Heatmap time counts embedding only for slices not already in the embedding cache.",
        "",
    ]
    with atomic_output(path, overwrite=True) as temp:
        temp.write_text("\n".join(lines), encoding="utf-8")


def write_json(report: dict, path: Path) -> None:
    with atomic_output(path, overwrite=True) as temp:
        temp.write_text(json.dumps(report, indent=1, default=float), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown_only:
        write_markdown(json.loads(args.json.read_text(encoding="utf-8")), args.md)
        print(f"wrote {args.md} from {args.json}")
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    specs = vessel_stacks(args.data)
    backbone = load_backbone(args.backbone, args.weights)
    cache = EmbeddingCache(args.cache)
    seeds = tuple(range(args.seeds))
    report = {
        "command": (".venv/bin/python bench/report_refine.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished": None,
        "complete": False,
        "data": str(args.data),
        "settings": {"backbone": backbone.spec.name, "weights_id": backbone.weights_id, "modes": args.modes,
                     "input_sets": args.input_sets, "input_size": args.input_size, "slices": args.slices,
                     "skip_ends": args.skip_ends, "seeds": list(seeds), "epochs": args.epochs, "patience": args.patience,
                     "base_channels": args.base_channels, "points": args.points, "point_seed": args.point_seed,
                     "margin": args.margin, "device": args.device},
        "thesis_settings": THESIS_SETTINGS,
        "thesis_table_4_3": THESIS_TABLE,
        "machine": machine() | {"ms_per_training_step_by_threads": thread_timing(args.input_size, args.base_channels)},
        "stacks": {},
        "modes": {},
        "seconds": {"heatmaps": 0.0, "training": 0.0},
    }

    def save() -> None:
        report["seconds"]["total"] = time.perf_counter() - started_wall
        report["seconds"]["cpu"] = time.process_time() - started_cpu
        write_json(report, args.json)
        write_markdown(report, args.md)

    samples_by_mode = {}
    for mode in args.modes:
        config = PipelineConfig.for_mode(mode)
        t0 = time.perf_counter()
        samples = []
        for spec in specs:
            with open_stack(spec.image_path) as stack:
                z_values, _ = select_slices(stack.shape[0], args.slices, args.skip_ends)
            made = same_slice_samples(spec, z_values, backbone, config, n_points=args.points, seed=args.point_seed,
                                      margin_px=args.margin, cache=cache)
            report["stacks"][spec.label] = [s.z for s in made]
            samples += made
            print(f"[{mode}] {spec.label}: {len(made)} slices, prototype Dice "
                  f"{np.mean([dice(s.mask, s.truth) for s in made]):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        report["seconds"]["heatmaps"] += time.perf_counter() - t0
        samples_by_mode[mode] = samples
        report["modes"][mode] = {"pipeline": config.describe(), "prototype_mask": prototype_row(samples), "input_sets": {}}
        save()

    raw_result = None
    for mode in args.modes:
        samples = samples_by_mode[mode]
        for input_set in args.input_sets:
            if input_set == "raw" and raw_result is not None:
                # The raw input set never sees the heatmaps: the same runs serve every mode.
                report["modes"][mode]["input_sets"][input_set] = raw_result | {"shared_with_mode": args.modes[0]}
                continue
            config = RefineConfig(input_set=input_set, input_size=args.input_size, base_channels=args.base_channels,
                                  max_epochs=args.epochs, patience=args.patience)
            t0 = time.perf_counter()

            def progress(p, mode=mode, input_set=input_set, t0=t0):
                e = p.epoch
                print(f"[{mode} {input_set}] fold {p.fold + 1}/{p.n_folds} ({p.held_out}) seed {p.seed} epoch "
                      f"{e.epoch + 1}/{e.max_epochs}: loss {e.train_loss:.4f} val {e.val_loss:.4f} Dice {e.val_dice:.3f}"
                      f" @ {e.val_threshold:g}  [{time.perf_counter() - t0:.0f} s]", flush=True)

            result = leave_one_out(samples, config, seeds, on_progress=progress, device=args.device)
            report["seconds"]["training"] += time.perf_counter() - t0
            run = run_json(result) | {"config": config.to_json()}
            if input_set == "raw":
                raw_result = run
            report["modes"][mode]["input_sets"][input_set] = run
            m = result.summary
            print(f"[{mode} {input_set}] Dice {m['dice_mean']:.3f} ± {m['dice_std']:.3f}, HD95 {m['hd95_mean']:.1f} ± "
                  f"{m['hd95_std']:.1f} (prototype mask {m['proto_dice_mean']:.3f}) in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            save()
    report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["complete"] = True
    report["machine"]["load_average_end"] = list(os.getloadavg())
    save()
    print(f"wrote {args.json} and {args.md} ({report['seconds']['total'] / 60:.1f} min wall, "
          f"{report['seconds']['cpu'] / 60:.1f} min CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
