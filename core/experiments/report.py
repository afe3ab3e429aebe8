"""The experiments' reports: CSV tables, figures (HTML, PNG through kaleido), README.md + run.json per
experiment folder, and the index README.md of an output folder. Every file goes through ``core.io.atomic``
(a report is regenerated, so an existing file is replaced)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from core import __version__
from core.experiments.base import EXPERIMENTS, RANDOM_NOTE, Experiment, Log
from core.io.atomic import atomic_output, write_text
from core.protocol import EvalStack

if TYPE_CHECKING:  # pragma: no cover
    from core.features.backbones import Backbone

__all__ = ["FILES", "TITLES", "headline_table", "machine_info", "prepare_png_export", "write_csv", "write_figures",
           "write_index", "write_report"]

TITLES = {
    "backbones": "Backbone comparison (thesis Table 4.2, Fig. 4.3)",
    "separability": "Feature-space separability (thesis Table 4.1, Figs. 4.1/4.2)",
    "points": "Point sensitivity (thesis Fig. 4.6)",
    "threshold": "Threshold sensitivity (thesis Fig. 4.7)",
    "transfer": "Prototype transfer (thesis Fig. 4.9, Tables 4.4 and B.1)",
}
FILES = {
    "backbones": {
        "summary.csv": "Table 4.2: same-slice Dice, IoU, HD95 (px, µm) mean ± std per backbone",
        "per_stack.csv": "Fig. 4.3: mean ± std Dice per stack and backbone",
        "slices.csv": "one row per (backbone, stack, slice, seed)",
        "dice_per_stack": "Fig. 4.3: grouped bars of mean Dice per stack and backbone (error bars: std)",
    },
    "separability": {
        "summary.csv": "Table 4.1: silhouette (cosine) and kNN accuracy (k = 10) mean ± std per backbone, and the "
                       "accuracy of always answering the larger class (majority_accuracy) to compare kNN with",
        "slices.csv": "one row per (backbone, stack, slice): patch counts, silhouette, kNN accuracy",
        "projection.csv": "the 2-D PCA/UMAP coordinates drawn in the scatter plots (slice: see above)",
        "projection_<backbone>": "Figs. 4.1/4.2: PCA and UMAP of the representative slice's patch embeddings",
    },
    "points": {
        "summary.csv": "mean ± std and median Dice per backbone and number of points per class",
        "slices.csv": "one row per (points per class, backbone, stack, slice, seed)",
        "dice_vs_points": "Fig. 4.6: box plot of same-slice Dice per number of points (the line: mean)",
    },
    "threshold": {
        "summary.csv": "mean ± std Dice per backbone, stack ('all' = every slice pooled) and top-% threshold",
        "slices.csv": "one row per (backbone, stack, slice, seed, threshold), with the mask's area fraction",
        "dice_vs_threshold": "Fig. 4.7: mean Dice against the top-% threshold per stack and pooled",
    },
    "transfer": {
        "matrix.csv": "Table B.1: 'mean ± std' Dice, rows reference stack, columns target stack",
        "cells.csv": "the matrix as numbers (Dice and IoU mean ± std and counts per cell)",
        "settings.csv": "Table 4.4: same slice / same file / cross file (and adapt: 3 + 3 points on the target, "
                        "when run) Dice, IoU, HD95 mean ± std",
        "slices.csv": "one row per (reference, target slice, seed)",
        "transfer_matrix_<backbone>": "Fig. 4.9: annotated heatmap of the transfer matrix",
    },
}


def machine_info() -> dict:
    """Host, OS, CPU count, Python / torch / numpy versions."""
    import torch

    return {"host": platform.node(), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "protoscope": __version__}


def _csv_value(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return "" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, np.integer):
        return int(value)
    return "" if value is None else value


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """Rows -> CSV (columns: every key, in first-seen order; floats to 6 significant digits; nan/None empty)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(value) for key, value in row.items()})
    write_text(path, buffer.getvalue(), overwrite=True)


def prepare_png_export() -> None:
    """Point kaleido at Debian's chromium when it is there and the user has not chosen a browser."""
    if "BROWSER_PATH" not in os.environ and Path("/usr/bin/chromium").exists():
        os.environ["BROWSER_PATH"] = "/usr/bin/chromium"


def write_figures(figures: dict[str, Any], folder: Path, *, png: bool = True, include_plotlyjs: str | bool = "cdn",
                  warn: Log | None = None) -> list[Path]:
    """Each figure as ``<stem>.html`` (always) and ``<stem>.png`` (kaleido; a failure warns and keeps the HTML).

    include_plotlyjs : 'cdn' (small files, the browser fetches plotly.js) or True (self-contained, ~4.5 MB each).
    """
    warn = warn or (lambda message: print(message, file=sys.stderr))
    written = []
    for stem, fig in figures.items():
        path = folder / f"{stem}.html"
        write_text(path, fig.to_html(include_plotlyjs=include_plotlyjs, full_html=True), overwrite=True)
        written.append(path)
    if png and figures:
        import plotly.io as pio

        prepare_png_export()
        pngs = [folder / f"{stem}.png" for stem in figures]
        try:
            # kaleido writes all figures in one browser session; each into its atomic temp (suffix .png kept)
            with contextlib.ExitStack() as outputs:
                temps = [outputs.enter_context(atomic_output(path, overwrite=True)) for path in pngs]
                # kaleido's default is 700 x 500 px whatever the layout says
                pio.write_images(list(figures.values()), temps,
                                 width=[f.layout.width or 1000 for f in figures.values()],
                                 height=[f.layout.height or 600 for f in figures.values()])
            written += pngs
        except Exception as error:  # kaleido needs a Chrome/Chromium; without one the HTML must still stand
            reason = " ".join(str(error).split())  # kaleido's messages span many lines
            warn(f"warning: PNG export failed ({type(error).__name__}: {reason}); the HTML figures are written. "
                 "Set BROWSER_PATH to a Chrome/Chromium executable or use --no-png.")
    return written


def _markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(row: dict, column: str) -> str:
        if column.endswith("±"):
            name = column[:-1].strip()
            mean, std = row.get(name), row.get(f"{name}_std")
            return "" if mean is None or (isinstance(mean, float) and math.isnan(mean)) else f"{mean:.3f} ± {std:.3f}"
        value = row.get(column, "")
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    head = "| " + " | ".join(f"{c[:-1].strip()} (mean ± std)" if c.endswith("±") else c for c in columns) + " |"
    rule = "|" + "---|" * len(columns)
    return "\n".join([head, rule] + ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows])


def headline_table(experiment: Experiment) -> str:
    """The experiment's main result as a markdown table (for README.md)."""
    tables = experiment.tables
    if experiment.name == "backbones":
        return _markdown_table(tables["summary"], ["backbone", "n", "dice ±", "iou ±", "hd95_px ±"])
    if experiment.name == "separability":
        return _markdown_table(tables["summary"], ["backbone", "n", "silhouette ±", "knn_accuracy ±", "majority_accuracy ±"])
    if experiment.name == "points":
        return _markdown_table(tables["summary"], ["backbone", "n_points", "n", "dice ±", "dice_median", "iou ±"])
    if experiment.name == "threshold":
        pooled = [r for r in tables["summary"] if r["stack"] == "all"]
        return _markdown_table(pooled, ["backbone", "top_percent", "n", "dice ±", "iou ±", "mask_fraction"])
    if experiment.name == "transfer":
        parts = [_markdown_table(tables["settings"], ["backbone", "setting", "n", "dice ±", "iou ±", "hd95_px ±"])]
        targets = [k for k in tables["matrix"][0] if k not in ("backbone", "reference")] if tables["matrix"] else []
        parts.append("Dice, rows reference, columns target:\n\n" + _markdown_table(tables["matrix"], ["backbone", "reference", *targets]))
        return "\n\n".join(parts)
    return ""


def write_report(experiment: Experiment, folder: str | Path, *, backbones: Sequence["Backbone"], command: str | None = None,
                 stacks: Sequence[EvalStack] = (), png: bool = True, include_plotlyjs: str | bool = "cdn",
                 warn: Log | None = None) -> list[Path]:
    """Write CSV tables, figures (HTML, PNG), README.md and run.json of one experiment into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in experiment.tables.items():
        write_csv(rows, folder / f"{name}.csv")
        written.append(folder / f"{name}.csv")
    written += write_figures(experiment.figures, folder, png=png, include_plotlyjs=include_plotlyjs, warn=warn)
    random = [b for b in backbones if b.is_random]
    info = {
        "experiment": experiment.name,
        "title": TITLES.get(experiment.name, experiment.name),
        "command": command or "(Python API: core.experiments)",
        "date": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "backbones": [{"name": b.spec.name, "label": b.label(), "random_weights": b.is_random} for b in backbones],
        "random_weights": bool(random),
        "stacks": [{"name": s.label, "image": str(s.image_path), "image_channel": s.image_channel,
                    "mask_channel": s.mask_channel, "mask_file": str(s.mask_path) if s.mask_path else None} for s in stacks],
        "notes": experiment.notes,
        **experiment.info,
        "files": sorted(p.name for p in written),
    }
    if random:
        info["warning"] = RANDOM_NOTE
    write_text(folder / "run.json", json.dumps(info, indent=1, ensure_ascii=False, default=_json_default),
               overwrite=True)
    write_text(folder / "README.md", _readme(experiment, info), overwrite=True)
    return written + [folder / "run.json", folder / "README.md"]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _readme(experiment: Experiment, info: dict) -> str:
    lines = [f"# {info['title']}", ""]
    if info["random_weights"]:
        lines += [f"> **{RANDOM_NOTE}.** At least one backbone below has random weights: its numbers and figures "
                  "only show that the code runs end to end; they say nothing about the method.", ""]
    machine = info["machine"]
    settings = info.get("settings", {})
    lines += [
        "```",
        info["command"],
        "```",
        "",
        f"- date: {info['date']}",
        f"- machine: {machine['host']} · {machine['platform']} · {machine['cpus']} CPUs · torch {machine['torch']} · "
        f"protoscope {machine['protoscope']}",
        f"- run time: {info.get('seconds', '?')} s" + (
            f"; the protocol evaluation ({', '.join(info['evaluated_settings'])}) took {info['evaluation_seconds']} s "
            "(one evaluation is shared by backbones and transfer when both run)" if "evaluation_seconds" in info else ""),
        "- backbones:",
    ]
    lines += [f"  - `{b['name']}`: {b['label']}" + ("  **← RANDOM WEIGHTS**" if b["random_weights"] else "")
              for b in info["backbones"]]
    lines += [
        f"- pipeline: `{info.get('config_text', '')}`",
        f"- protocol: {settings.get('n_points')} positive + {settings.get('n_points')} negative points per slice "
        f"(ground truth, margin {settings.get('margin_px') if settings.get('margin_px') is not None else 'half a patch'}), "
        f"seeds {list(settings.get('seeds', []))}, up to {settings.get('n_slices')} slices per stack skipping "
        f"{settings.get('skip_ends')} at each end",
        "- stacks (evaluated slices):",
    ]
    for name, z_values in info.get("slices", {}).items():
        lines.append(f"  - {name}: {len(z_values)} slices, z = {', '.join(map(str, z_values))}")
    if experiment.name == "separability" and info.get("representative"):
        rep = info["representative"]
        lines.append(f"- representative slice (median silhouette): {rep['stack']} z={rep['z']}")
    if experiment.name == "threshold":
        lines.append(f"- thresholds (top %): {', '.join(f'{p:g}' for p in info.get('percents', []))}")
    if experiment.name == "points":
        lines.append(f"- points per class: {', '.join(map(str, info.get('counts', [])))}")
    if info["notes"]:
        lines += ["- notes:"] + [f"  - {note}" for note in info["notes"]]
    lines += ["", "## Result", "", headline_table(experiment), "", "## Files", ""]
    described = FILES.get(experiment.name, {})
    for name in info["files"]:
        stem = name.rsplit(".", 1)[0]
        text = described.get(name) or described.get(stem) or next(
            (t for key, t in described.items() if "<backbone>" in key and stem.startswith(key.split("<")[0])), "")
        lines.append(f"- `{name}`" + (f": {text}" if text else ""))
    lines += ["- `run.json`: everything above, machine readable", ""]
    return "\n".join(lines)


def write_index(folder: str | Path) -> Path:
    """README.md of an output folder listing the experiment subfolders that hold a run.json."""
    folder = Path(folder)
    lines = ["# Protoscope experiments", "", "Each folder holds one experiment: CSV tables, figures (HTML, PNG), README.md "
             "and run.json (command, backbones, date, machine).", ""]
    any_random = False
    for name in EXPERIMENTS:
        run = folder / name / "run.json"
        if not run.exists():
            continue
        info = json.loads(run.read_text(encoding="utf-8"))
        any_random |= bool(info.get("random_weights"))
        backbones = ", ".join(b["label"] for b in info.get("backbones", []))
        lines.append(f"- [{name}]({name}/README.md): {info.get('title', name)} — {backbones} — {info.get('date', '')}")
    if any_random:
        lines[1:1] = ["", f"> **{RANDOM_NOTE}** (see the folders marked so)."]
    path = folder / "README.md"
    write_text(path, "\n".join(lines) + "\n", overwrite=True)
    return path
