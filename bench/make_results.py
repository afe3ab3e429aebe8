"""Regenerate docs/RESULTS.md: thesis mode vs best mode vs baselines, and one row per option (ablation).

    .venv/bin/python bench/make_results.py              # run every evaluation, then write docs/RESULTS.md
    .venv/bin/python bench/make_results.py --render     # only re-render from the JSON in docs/results/

Every number comes from `python -m core evaluate` runs on the real stacks in ../shared/data (the commands
are printed in the report), with the offline `filterbank` backbone. The refinement table (job
`refine_vesselnn`: bench/report_refine.py, which also writes docs/results/refine.md) is included, the
thesis experiments (docs/experiments/) are linked. Takes several hours on a 2-core CPU the first time
(embeddings are cached in --cache afterwards); `--only JOB ...` reruns single jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SETTINGS = ("same-slice", "same-file", "cross-file")  # the thesis's; vesselNN adds adapt (3 + 3 points on the target)
sys.path.insert(0, str(PROJECT))

from core.io.atomic import write_text  # noqa: E402

DATA = (PROJECT / ".." / "shared" / "data").resolve()
RESULTS = PROJECT / "docs" / "results"

#: Each option of best mode alone on top of thesis mode, and best mode without it.
ABLATION_ON_THESIS = {
    "+stack normalisation": "thesis:normalization=stack",
    "+bilinear upsampling": "thesis:upsampling=bilinear",
    "+guided upsampling": "thesis:upsampling=guided",
    "+bilinear, calibrated threshold": "thesis:upsampling=bilinear,threshold=calibrated",
    "+bilinear, Otsu threshold": "thesis:upsampling=bilinear,threshold=otsu",
    "+k-means prototypes (k=3)": "thesis:scoring=multi,n_prototypes=3",
    "+kNN scoring (k=5)": "thesis:scoring=knn,knn_k=5",
    "+z smoothing (σ=1 slice)": "thesis:z_sigma=1",
    "+clean-up (holes, objects < 20 px)": "thesis:hole_size_px=20,min_size_px=20",
    "+pixel classifier (forest)": "thesis:pixel_classifier=forest,threshold=calibrated",
}
ABLATION_OFF_BEST = {
    "best − stack normalisation": "best:normalization=slice",
    "best − pixel classifier (patch scores, bilinear)": "best:pixel_classifier=none",
    "best, linear classifier": "best:pixel_classifier=linear",
    "best, Otsu threshold": "best:threshold=otsu",
    "best − click neighbourhood (radius 0)": "best:augment_radius=0",
    "best + z smoothing (σ=1)": "best:z_sigma=1",
    "best + clean-up (holes, objects < 20 px)": "best:hole_size_px=20,min_size_px=20",
}
#: Best mode without each change of issue 15 (transfer: docs/method.md), and without all of them.
ISSUE15 = {
    "best − clip at the 99th percentile (95th, as before issue 15)": "best:clip_high=95",
    "best − border examples": "best:border_rays=0",
    "best − self-training": "best:self_training=0",
    "best − transfer features and self-training": "best:transfer_clip=0,self_training=0",
    "best as before issue 15": "best:clip_high=95,border_rays=0,transfer_clip=0,self_training=0",
}
ABLATION_OFF_BEST.update(ISSUE15)
#: The issue-15 rows whose effect is on transfer alone (the own stack is scored as without them): 3 seeds, cross-file
#: and adapt only (job transfer_vesselnn).
TRANSFER_ROWS = ("best − self-training", "best − transfer features and self-training", "best as before issue 15")
#: The issue-15 rows on DSB 2018 (same-slice, where the small nuclei lost; job ablation_dsb2018).
DSB_ROWS = ("best − clip at the 99th percentile (95th, as before issue 15)", "best − border examples",
            "best as before issue 15")


def dataset_args(name: str) -> list[str] | None:
    """Arguments of `python -m core evaluate` that point at one data set (None when absent)."""
    if name == "vesselnn":
        images = sorted((DATA / "vesselnn" / "images").glob("*.tif"))
        if not images:
            return None
        labels = [DATA / "vesselnn" / "labels" / p.name for p in images]
        return [*map(str, images), "--mask-file", *map(str, labels), "--image-channel", "0", "--skip-ends", "0"]
    if name == "isbi2012":
        folder = DATA / "isbi2012"
        if not folder.is_dir():
            return None
        return [str(folder / "images"), "--mask-file", str(folder / "labels"), "--image-channel", "0", "--skip-ends", "0"]
    if name == "dsb2018":
        images = sorted((DATA / "dsb2018" / "images").glob("*.png"))[:30]
        if not images:
            return None
        labels = [DATA / "dsb2018" / "labels" / p.name for p in images]
        return [*map(str, images), "--mask-file", *map(str, labels), "--image-channel", "0", "--skip-ends", "0"]
    raise ValueError(name)


def run(name: str, extra: list[str], out: Path, cache: str) -> None:
    args = dataset_args(name)
    if args is None:
        print(f"skip {name}: {DATA} has no such data", file=sys.stderr)
        return
    command = [sys.executable, "-m", "core", "evaluate", *args, "--backbone", "filterbank", "--cache", cache,
               "--json", str(out), *extra]
    print("$ " + " ".join(_short(c) for c in command), file=sys.stderr, flush=True)
    started = time.time()
    subprocess.run(command, cwd=PROJECT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(f"  {name}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)


def _short(text: str) -> str:
    text = text.replace(str(DATA), "../shared/data").replace(str(PROJECT) + "/", "").replace(sys.executable, ".venv/bin/python")
    # The DSB run names 30 images and 30 label files: show them as the shell expression that lists them.
    for folder in ("images", "labels"):
        text = re.sub(rf"(\.\./shared/data/dsb2018/{folder}/[0-9a-f]+\.png ?){{2,}}",
                      f"$(ls ../shared/data/dsb2018/{folder}/*.png | head -30) ", text)
    # Variant specs contain spaces: quote them so that the command can be pasted into a shell.
    text = re.sub(r"--variant (.*?)(?= --|$)", lambda match: "--variant " + shlex.quote(match.group(1)), text)
    return text.replace(")  --", ") --").rstrip()


def run_all(seeds: int, cache: str, only: list[str] | None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    jobs = {
        "main_vesselnn": ("vesselnn", ["--mode", "thesis", "best", "--baseline", "otsu", "intensity", "--seeds", str(seeds),
                                       "--settings", *SETTINGS, "adapt"]),
        "main_isbi2012": ("isbi2012", ["--mode", "thesis", "best", "--baseline", "otsu", "intensity", "--seeds", str(seeds)]),
        "main_dsb2018": ("dsb2018", ["--mode", "thesis", "best", "--baseline", "otsu", "intensity", "--seeds", "1"]),
        "ablation_vesselnn": ("vesselnn", ["--mode", "thesis", "best", "--seeds", "1",
                                           *[a for label, spec in {**ABLATION_ON_THESIS, **ABLATION_OFF_BEST}.items()
                                             for a in ("--variant", f"{label}={spec}")]]),
        "transfer_vesselnn": ("vesselnn", ["--mode", "best", "--seeds", str(seeds), "--settings", "cross-file", "adapt",
                                           *[a for label in TRANSFER_ROWS for a in ("--variant", f"{label}={ISSUE15[label]}")]]),
        "ablation_dsb2018": ("dsb2018", ["--mode", "best", "--seeds", "1", "--settings", "same-slice",
                                         *[a for label in DSB_ROWS for a in ("--variant", f"{label}={ISSUE15[label]}")]]),
    }
    for key, (dataset, extra) in jobs.items():
        if only and key not in only:
            continue
        run(dataset, extra, RESULTS / f"{key}.json", cache)
    if not only or "refine_vesselnn" in only:
        command = [sys.executable, str(PROJECT / "bench" / "report_refine.py"), "--cache", cache,
                   "--json", str(RESULTS / "refine.json"), "--md", str(RESULTS / "refine.md")]
        print("$ " + " ".join(_short(c) for c in command), file=sys.stderr, flush=True)
        subprocess.run(command, cwd=PROJECT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


# ---- rendering -----------------------------------------------------------------------------------------

def _load(key: str) -> dict | None:
    path = RESULTS / f"{key}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _cell(entry: dict | None, metric: str, digits: int = 3) -> str:
    if entry is None:
        return "–"
    mean, std = entry.get(metric), entry.get(f"{metric}_std")
    if mean is None or mean != mean:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if digits else f"{mean:.1f} ± {std:.1f}"


def _lookup(payload: dict, method: str, setting: str) -> dict | None:
    for entry in payload["summary"]:
        if entry["method"] == method and entry["setting"] == setting:
            return entry
    return None


def render() -> str:
    lines = [
        "# Results",
        "",
        "Regenerate with `.venv/bin/python bench/make_results.py` (all numbers below come from "
        "`python -m core evaluate`; the exact commands are listed under each table). Backbone: the offline "
        "`filterbank` (no DINOv2 weights can be downloaded on our development machines). Protocol (thesis "
        "§3.8): points sampled from the ground truth with a margin of half a patch, 25 positive + 25 negative; "
        "same-slice = prototypes applied to the slice they came from; same-file = one reference slice per seed "
        "applied to every other slice of its stack; cross-file = applied to every slice of every other stack; "
        "adapt = the reference prototype of one stack plus 3 positive + 3 negative points sampled on one slice of "
        "another stack (that stack's same-file reference slice), applied to that stack's other slices (the intensity "
        "baseline's adapt: its threshold from those 6 points). "
        "Dice and IoU in [0, 1], HD95 in pixels (mean ± std over slices). Baselines: `otsu` = Otsu's threshold "
        "of the raw slice; `intensity` = Gaussian-smoothed intensity (σ = 2 px), prototypes = mean smoothed "
        "intensity at the positive and at the negative points, threshold halfway (transferred as that value).",
        "",
    ]
    targets = _target_rows()
    if targets:
        lines += ["## Targets", "",
                  "Best mode's targets (mean Dice and HD95 over slices, `filterbank`), measured below:", "",
                  "| target | measured (best vs other) | |", "|---|---|---|", *targets, "",
                  "Why the missed ones are missed, and what was tried: [method.md](method.md#what-did-not-work).", ""]
    for key, title in (("main_vesselnn", "vesselNN: 5 two-photon vessel stacks"),
                       ("main_isbi2012", "ISBI 2012: ssTEM membrane stack (structure = cell interior)"),
                       ("main_dsb2018", "DSB 2018: fluorescence nuclei (30 single images, 1 seed)")):
        payload = _load(key)
        lines += [f"## {title}", ""]
        if payload is None:
            lines += ["(not run: data absent)", ""]
            continue
        settings = [s for s in (*SETTINGS, "adapt") if any(e["setting"] == s for e in payload["summary"])]
        header = "| method | " + " | ".join(f"{s} Dice | {s} IoU | {s} HD95 px" for s in settings) + " |"
        lines += [header, "|---|" + "---|" * (3 * len(settings))]
        for method in ("thesis", "best", "intensity", "otsu"):
            cells = []
            for setting in settings:
                entry = _lookup(payload, method, setting)
                cells += [_cell(entry, "dice"), _cell(entry, "iou"), _cell(entry, "hd95_px", 0)]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", _targets(payload, settings), "", f"Command: `{_short(payload.get('command', ''))}`", ""]
        if payload.get("notes"):
            lines += ["Notes: " + "; ".join(payload["notes"]), ""]
        matrix = payload.get("transfer", {}).get("best|filterbank")
        if matrix and len(matrix) <= 6:
            names = list(matrix)
            lines += ["Transfer matrix, best mode (mean Dice; rows = reference stack, columns = target):", "",
                      "| reference \\ target | " + " | ".join(n[:18] for n in names) + " |",
                      "|---|" + "---|" * len(names)]
            for ref in names:
                lines.append(f"| {ref[:18]} | " + " | ".join(f"{matrix[ref][t]['mean']:.2f}" for t in names) + " |")
            lines.append("")
        adapt = payload.get("adapt", {}).get("best|filterbank")
        if adapt and matrix and len(adapt) <= 6:
            names = list(adapt)
            lines += ["Adapt, best mode (mean Dice; rows = the stack the prototype came from, columns = the stack "
                      "with 3 + 3 points; last row: same-file on that stack with 25 + 25 points):", "",
                      "| reference \\ target | " + " | ".join(n[:18] for n in names) + " |",
                      "|---|" + "---|" * len(names)]
            for ref in names:
                lines.append(f"| {ref[:18]} | " + " | ".join(
                    "" if ref == t else f"{adapt[ref][t]['mean']:.2f}" for t in names) + " |")
            lines.append("| same-file | " + " | ".join(f"{matrix[t][t]['mean']:.2f}" for t in names) + " |")
            lines.append("")
        if key == "main_dsb2018":
            lines += _dsb_class_section()
    payload = _load("ablation_vesselnn")
    lines += ["## Ablation on vesselNN (1 seed)", ""]
    if payload is None:
        lines += ["(not run)", ""]
    else:
        lines += ["Rows starting with + add one option to thesis mode; rows starting with best change one option of "
                  "best mode (the last five: the changes of issue 15, see method.md). Δ = difference to the row's base "
                  "(thesis or best) in the same run: Dice, and HD95 in pixels.", "",
                  "| variant | same-slice Dice | same-file Dice | same-file HD95 px | cross-file Dice | cross-file HD95 px "
                  "| Δ same-slice | Δ same-file | Δ cross-file | Δ HD95 same-file | Δ HD95 cross-file |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        methods = ["thesis", *ABLATION_ON_THESIS, "best", *ABLATION_OFF_BEST]
        for method in methods:
            entries = {s: _lookup(payload, method, s) for s in ("same-slice", "same-file", "cross-file")}
            if not any(entries.values()):
                continue
            base = "best" if method.startswith("best") else "thesis"
            deltas = [_delta(payload, method, base, setting, "dice") for setting in ("same-slice", "same-file", "cross-file")]
            deltas += [_delta(payload, method, base, setting, "hd95_px") for setting in ("same-file", "cross-file")]
            lines.append(f"| {method} | {_cell(entries['same-slice'], 'dice')} | {_cell(entries['same-file'], 'dice')} | "
                         f"{_cell(entries['same-file'], 'hd95_px', 0)} | {_cell(entries['cross-file'], 'dice')} | "
                         f"{_cell(entries['cross-file'], 'hd95_px', 0)} | " + " | ".join(deltas) + " |")
        lines += ["", "Options as `--variant` specs: " + "; ".join(f"`{v}`" for v in {**ABLATION_ON_THESIS, **ABLATION_OFF_BEST}.values()),
                  "", f"Command: `{_short(payload.get('command', ''))}`", ""]
    lines += _issue15_sections()
    lines += _refinement_section()
    lines += [
              "## The thesis's experiments", "",
              "Backbone comparison, feature-space separability, point-count and threshold sensitivity and the transfer "
              "matrix: [experiments/](experiments/) (regenerate with `python -m core experiments all ...`, see "
              "[experiments.md](experiments.md)).", ""]
    return "\n".join(lines)


def _delta(payload: dict, method: str, base: str, setting: str, metric: str) -> str:
    """``method``'s mean ``metric`` minus ``base``'s in one run ('' for the base itself or a missing value)."""
    entry, reference = _lookup(payload, method, setting), _lookup(payload, base, setting)
    if method == base or entry is None or reference is None:
        return ""
    value, ref = entry.get(metric), reference.get(metric)
    if value is None or ref is None or value != value or ref != ref:
        return ""
    return f"{value - ref:+.3f}" if metric == "dice" else f"{value - ref:+.1f}"


def _issue15_sections() -> list[str]:
    """The transfer rows over 3 seeds (cross-file and adapt on vesselNN) and the DSB 2018 rows (same-slice)."""
    lines: list[str] = []
    payload = _load("transfer_vesselnn")
    if payload is not None:
        seeds = len(payload.get("settings", {}).get("seeds", [])) or "?"
        lines += [f"## Transfer on vesselNN ({seeds} seeds): what the transfer features and self-training buy", "",
                  "Both change only how a prototype scores a stack other than its own (same-slice and same-file are "
                  "identical with and without them), so only cross-file and adapt are run. Δ = difference to best.", "",
                  "| variant | cross-file Dice | cross-file HD95 px | adapt Dice | adapt HD95 px | Δ cross-file | "
                  "Δ HD95 cross-file | Δ adapt | Δ HD95 adapt |", "|---|---|---|---|---|---|---|---|---|"]
        for method in ("best", *TRANSFER_ROWS):
            cross, adapt = _lookup(payload, method, "cross-file"), _lookup(payload, method, "adapt")
            if cross is None and adapt is None:
                continue
            deltas = [_delta(payload, method, "best", s, m) for s in ("cross-file", "adapt") for m in ("dice", "hd95_px")]
            lines.append(f"| {method} | {_cell(cross, 'dice')} | {_cell(cross, 'hd95_px', 0)} | {_cell(adapt, 'dice')} | "
                         f"{_cell(adapt, 'hd95_px', 0)} | " + " | ".join(deltas) + " |")
        lines += ["", f"Command: `{_short(payload.get('command', ''))}`", ""]
    payload = _load("ablation_dsb2018")
    if payload is not None:
        classes = _dsb_class_means("ablation_dsb2018")
        small = DSB_CLASSES[0][0]
        lines += ["## DSB 2018 (30 images, 1 seed): what the 99th-percentile clip and the border examples buy", "",
                  "| variant | same-slice Dice | same-slice HD95 px | " + small + " | Δ same-slice | Δ HD95 | Δ " + small
                  + " |", "|---|---|---|---|---|---|---|"]
        for method in ("best", *DSB_ROWS):
            entry = _lookup(payload, method, "same-slice")
            if entry is None:
                continue
            small_mean = classes.get(small, {}).get(method)
            small_base = classes.get(small, {}).get("best")
            small_delta = f"{small_mean[0] - small_base[0]:+.3f}" if small_mean and small_base and method != "best" else ""
            lines.append(f"| {method} | {_cell(entry, 'dice')} | {_cell(entry, 'hd95_px', 0)} | "
                         f"{f'{small_mean[0]:.3f}' if small_mean else '–'} | "
                         f"{_delta(payload, method, 'best', 'same-slice', 'dice')} | "
                         f"{_delta(payload, method, 'best', 'same-slice', 'hd95_px')} | {small_delta} |")
        lines += ["", f"Command: `{_short(payload.get('command', ''))}`", ""]
    return lines


def _refinement_section() -> list[str]:
    """docs/results/refine.md (written by bench/report_refine.py) with its headings one level down."""
    refine = RESULTS / "refine.md"
    if not refine.exists():
        return ["## U-Net refinement (thesis Table 4.3 analogue)", "", "(not run)", ""]
    body = refine.read_text(encoding="utf-8").splitlines()
    has_title = bool(body) and body[0].startswith("# ")
    title = body[0].lstrip("# ").strip() if has_title else "U-Net refinement"
    demoted = [("#" + line) if line.startswith("#") else line for line in body[1 if has_title else 0:]]
    return [f"## {title}", "", "(from [results/refine.md](results/refine.md))", *demoted, ""]


#: DSB 2018 image classes by the median nucleus diameter (px, from the instance labels): the small nuclei are where
#: best mode trailed the intensity baseline (issue #15).
DSB_CLASSES = (("small nuclei (< 16 px)", 0.0, 16.0), ("medium nuclei (16-32 px)", 16.0, 32.0),
               ("large nuclei (≥ 32 px)", 32.0, float("inf")))


def _nucleus_diameter(stack: str) -> float | None:
    """Median equivalent diameter (px) of the nuclei of DSB image ``stack`` (its instance labels), None when absent."""
    import numpy as np
    from PIL import Image

    path = DATA / "dsb2018" / "labels" / f"{stack}.png"
    if not path.exists():
        return None
    labels = np.asarray(Image.open(path))
    _, areas = np.unique(labels[labels > 0], return_counts=True)
    return float(np.median(2 * np.sqrt(areas / np.pi))) if len(areas) else None


def _dsb_class_means(key: str = "main_dsb2018") -> dict[str, dict[str, tuple[float, int]]]:
    """{class: {method: (mean same-slice Dice, images)}} from docs/results/<key>.csv ({} when absent)."""
    import csv

    path = RESULTS / f"{key}.csv"
    if not path.exists():
        return {}
    values: dict[str, dict[str, list[float]]] = {}
    diameters: dict[str, float | None] = {}
    with path.open(encoding="utf-8", newline="") as stream:
        for row in csv.DictReader(stream):
            if row["setting"] != "same-slice" or not row["dice"]:
                continue
            if row["stack"] not in diameters:
                diameters[row["stack"]] = _nucleus_diameter(row["stack"])
            diameter = diameters[row["stack"]]
            if diameter is None:
                continue
            name = next(label for label, low, high in DSB_CLASSES if low <= diameter < high)
            values.setdefault(name, {}).setdefault(row["method"], []).append(float(row["dice"]))
    return {name: {method: (sum(v) / len(v), len(v)) for method, v in methods.items()}
            for name, methods in values.items()}


def _dsb_class_section() -> list[str]:
    means = _dsb_class_means()
    if not means:
        return []
    methods = [m for m in ("thesis", "best", "intensity", "otsu") if any(m in row for row in means.values())]
    lines = ["Same-slice Dice by image class (median nucleus diameter from the labels):", "",
             "| class | images | " + " | ".join(methods) + " | best − intensity |", "|---|---|" + "---|" * (len(methods) + 1)]
    for name, _, _ in DSB_CLASSES:
        row = means.get(name)
        if not row:
            continue
        count = max(n for _, n in row.values())
        cells = [f"{row[m][0]:.3f}" if m in row else "–" for m in methods]
        gap = f"{row['best'][0] - row['intensity'][0]:+.3f}" if "best" in row and "intensity" in row else ""
        lines.append(f"| {name} | {count} | " + " | ".join(cells) + f" | {gap} |")
    return lines + [""]


def _target_rows() -> list[str]:
    """The quality targets of best mode (issues #5 and #15) against the measured means: one table row each."""
    rows = []
    vessel = _load("main_vesselnn")

    def get(payload, method, setting, metric="dice"):
        entry = _lookup(payload, method, setting) if payload else None
        value = None if entry is None else entry.get(metric)
        return None if value is None or value != value else value  # absent or NaN

    def row(target, measured, met):
        rows.append(f"| {target} | {measured} | {'met' if met else '**missed**'} |")

    if vessel is not None:
        for setting in ("same-file", "cross-file"):
            best, thesis = get(vessel, "best", setting), get(vessel, "thesis", setting)
            if best is not None and thesis is not None:
                row(f"vesselNN {setting}: best ≥ thesis + 0.10 Dice", f"{best:.3f} vs {thesis:.3f} ({best - thesis:+.3f})",
                    best - thesis >= 0.10)
            hb, ht = get(vessel, "best", setting, "hd95_px"), get(vessel, "thesis", setting, "hd95_px")
            if hb is not None and ht:
                row(f"vesselNN {setting}: HD95 halved", f"{hb:.1f} vs {ht:.1f} px (×{hb / ht:.2f})", hb <= ht / 2)
    for key, name in (("main_vesselnn", "vesselNN"), ("main_isbi2012", "ISBI 2012"), ("main_dsb2018", "DSB 2018")):
        payload = _load(key)
        if payload is None:
            continue
        for setting in ("same-slice", "same-file", "cross-file"):
            best, thesis, base = (get(payload, m, setting) for m in ("best", "thesis", "intensity"))
            if best is None:
                continue
            if thesis is not None:
                row(f"{name} {setting}: not worse than thesis", f"{best:.3f} vs {thesis:.3f}", best >= thesis)
            if base is not None:
                row(f"{name} {setting}: best ≥ intensity baseline + 0.10 Dice", f"{best:.3f} vs {base:.3f} ({best - base:+.3f})",
                    best - base >= 0.10)
    # issue #15: transfer and quick adapt
    if vessel is not None:
        cross, same = get(vessel, "best", "cross-file", "hd95_px"), get(vessel, "best", "same-file", "hd95_px")
        if cross is not None and same is not None:
            row("vesselNN cross-file HD95 ≤ same-file HD95", f"{cross:.1f} vs {same:.1f} px", cross <= same)
        adapt, same = get(vessel, "best", "adapt"), get(vessel, "best", "same-file")
        if adapt is not None and same is not None:
            row("vesselNN adapt (3 + 3 points) ≥ same-file (25 + 25) − 0.03 Dice", f"{adapt:.3f} vs {same:.3f} "
                f"({adapt - same:+.3f})", adapt >= same - 0.03)
    dsb = _load("main_dsb2018")
    if dsb is not None:
        best, otsu = get(dsb, "best", "same-slice"), get(dsb, "otsu", "same-slice")
        if best is not None and otsu is not None:
            row("DSB 2018 same-slice: best ≥ Otsu", f"{best:.3f} vs {otsu:.3f} ({best - otsu:+.3f})", best >= otsu)
        for name, means in _dsb_class_means().items():
            if "best" in means and "intensity" in means:
                best, base = means["best"][0], means["intensity"][0]
                row(f"DSB 2018 {name}: best ≥ intensity baseline − 0.05 Dice",
                    f"{best:.3f} vs {base:.3f} ({best - base:+.3f})", best >= base - 0.05)
    isbi = _load("main_isbi2012")
    if isbi is not None:
        best = get(isbi, "best", "same-file")
        if best is not None:
            row("ISBI 2012 same-file: best ≥ 0.889 (before issue #15)", f"{best:.3f}", best >= 0.889)
    return rows


def _targets(payload: dict, settings: list[str]) -> str:
    """Best vs thesis and vs the intensity baseline, per transfer setting."""
    parts = []
    for setting in settings:
        best, thesis, base = (_lookup(payload, m, setting) for m in ("best", "thesis", "intensity"))
        if best is None or thesis is None:
            continue
        text = f"{setting}: best − thesis = {best['dice'] - thesis['dice']:+.3f} Dice"
        if thesis["hd95_px"]:
            text += f", HD95 ×{best['hd95_px'] / thesis['hd95_px']:.2f}"
        if base is not None:
            text += f"; best − intensity baseline = {best['dice'] - base['dice']:+.3f}"
        parts.append(text)
    return "Differences — " + "; ".join(parts) + "." if parts else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="store_true", help="only render docs/RESULTS.md from existing JSON")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "protoscope" / "results-embeddings"))
    parser.add_argument("--only", nargs="*", help="run only these jobs (main_vesselnn, main_isbi2012, main_dsb2018, "
                        "ablation_vesselnn, transfer_vesselnn, ablation_dsb2018, refine_vesselnn)")
    args = parser.parse_args()
    if not args.render:
        if not DATA.is_dir():
            sys.exit(f"{DATA} is absent: the results need the developers' real data")
        run_all(args.seeds, args.cache, args.only)
    write_text(PROJECT / "docs" / "RESULTS.md", render(), overwrite=True)
    print("wrote docs/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
