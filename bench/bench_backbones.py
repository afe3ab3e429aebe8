"""Time the feature backbones per slice against the FLOP limit of this machine and of an H100/A100.

Run from the repository root:
    .venv/bin/python bench/bench_backbones.py [--backbones dinov2_vits14 dinov2_vitb14 filterbank]
        [--size 980] [--repeats 2] [--precisions fp32 bf16-autocast] [--weights random]
Prints a table and writes bench/results/backbones.json.

Per backbone (each in its own child process, so that peak RSS is that backbone's alone): build time
(``load_backbone``, transformers already imported), one warm-up run, then ``--repeats`` timed runs of
``embed`` on one (size x size) slice per precision (default: the device's default precision only;
bf16 autocast on a CPU without bf16 matmul support is 20-400x slower than fp32). Analytic GFLOP per
slice (multiply-adds x 2): patch embedding + per block the q/k/v/o and MLP matmuls and the attention
QK^T and AV products, N = tokens including CLS and registers. The machine's matmul rate is one large
``torch.mm`` per dtype (the bf16 size shrinks when bf16 is slow); "of peak" = achieved GFLOP/s over that
rate; the FLOP-limited times assume dense bf16 peaks of 990 TFLOP/s (H100 SXM) and 312 (A100).
This VM's speed drifts up to 2x between runs and other jobs share its 2 cores: read the figures as
+-30 %, and compare variants within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.errors import BackboneError  # noqa: E402
from core.features.registry import BACKBONES, get_spec  # noqa: E402  (no torch: the parent stays light)
from core.io.atomic import write_text  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "backbones.json"
PEAK_TFLOPS = {"H100": 990.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def vit_gflops(*, hidden: int, layers: int, mlp_width: int, swiglu: bool, size: int, patch: int = 14,
               registers: int = 0) -> dict[str, float]:
    """Analytic GFLOP (2 per multiply-add) of one DINOv2 forward on a (size x size) image.

    Returns {'total', 'attention', 'patch_embed'} in GFLOP; 'attention' = QK^T + AV over all blocks.
    """
    patches = (size // patch) ** 2
    tokens = patches + 1 + registers
    patch_embed = 2 * patches * (3 * patch * patch) * hidden
    qkvo = 2 * tokens * hidden * 4 * hidden
    mlp = 2 * tokens * hidden * mlp_width * (3 if swiglu else 2)  # SwiGLU: gate, up and down
    attention = 2 * 2 * tokens * tokens * hidden
    total = patch_embed + layers * (qkvo + mlp + attention)
    return {"total": total / 1e9, "attention": layers * attention / 1e9, "patch_embed": patch_embed / 1e9}


def matmul_rate(dtype_name: str, size: int = 2048, budget_s: float = 5.0) -> dict:
    """GFLOP/s of a (size x size) @ (size x size) torch.mm; the size shrinks when the dtype is slow."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    probe = 512
    a = torch.randn(probe, probe).to(dtype)
    torch.mm(a, a)  # the first call selects kernels
    start = time.perf_counter()
    torch.mm(a, a)
    rate = 2 * probe**3 / max(time.perf_counter() - start, 1e-9)
    while size > probe and 2 * size**3 / rate > budget_s:  # keep each product within the budget
        size //= 2
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return {"dtype": dtype_name, "size": size, "gflops_per_s": 2 * size**3 / min(times) / 1e9}


def _test_image(size: int) -> np.ndarray:
    """(size, size) float32 in [0, 1]: smooth blobs plus noise, like a preprocessed slice."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size, :size].astype(np.float32)
    image = np.zeros((size, size), np.float32)
    for cy, cx, r in rng.uniform([0, 0, 3], [size, size, 30], size=(40, 3)):
        image += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    image += 0.1 * rng.random((size, size), dtype=np.float32)
    return (image - image.min()) / (image.max() - image.min())


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def run_child(name: str, args: argparse.Namespace) -> dict:
    """Build one backbone and time it; runs inside the child process."""
    import torch
    from transformers import Dinov2Model, Dinov2WithRegistersModel  # noqa: F401  (imported before timing the build)

    from core.features.backbones import load_backbone
    from core.devices import default_precision, describe_device, select_device

    spec = get_spec(name)
    baseline_gb = _rss_gb()
    start = time.perf_counter()
    precision = "numpy" if spec.family == "filterbank" else None
    backbone = load_backbone(name, args.weights, device=args.device, precision=precision)
    build_s = time.perf_counter() - start
    image = _test_image(args.size)
    row = {"backbone": name, "title": spec.title, "label": backbone.label(), "weights_id": backbone.weights_id,
           "build_s": build_s, "size": args.size, "grid": args.size // backbone.patch_size, "embed_dim": backbone.embed_dim,
           "n_params": spec.n_params, "device": describe_device(backbone.device), "runs": []}
    if spec.family == "filterbank":
        precisions = ["numpy"]
    else:
        device = select_device(args.device)
        precisions = args.precisions or [default_precision(device)]
        config = backbone.model.config
        mlp = backbone.model.encoder.layer[0].mlp
        width = (mlp.gate_proj if config.use_swiglu_ffn else mlp.fc1).weight.shape[0]
        row["gflops"] = vit_gflops(hidden=config.hidden_size, layers=config.num_hidden_layers, mlp_width=width,
                                   swiglu=config.use_swiglu_ffn, size=args.size, registers=spec.registers)
    for precision in precisions:
        variant = copy.copy(backbone)
        variant.precision = precision
        times = []
        for index in range(args.warmup + args.repeats):
            start = time.perf_counter()
            tokens = variant.embed(image)
            elapsed = time.perf_counter() - start
            if index >= args.warmup:
                times.append(elapsed)
        row["runs"].append({"precision": precision, "times_s": times, "median_s": statistics.median(times),
                            "min_s": min(times), "finite": bool(np.isfinite(tokens).all())})
        print(f"  {name} {precision}: {statistics.median(times):.2f} s", file=sys.stderr, flush=True)
    row["rss_baseline_gb"] = baseline_gb
    row["peak_rss_gb"] = _rss_gb()
    row["threads"] = torch.get_num_threads()
    return row


def _table(rows: list[dict], rates: dict[str, float]) -> list[str]:
    head = (f"{'backbone':<20}{'precision':<15}{'build s':>8}{'s/slice':>9}{'GFLOP':>8}{'attn %':>7}{'GFLOP/s':>9}"
            f"{'of peak':>8}{'H100 ms':>9}{'A100 ms':>9}{'peak RSS GB':>12}")
    lines = [head, "-" * len(head)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['backbone']:<20}ERROR {row['error'][:90]}")
            continue
        for run in row["runs"]:
            gflops = row.get("gflops")
            text = f"{row['backbone']:<20}{run['precision']:<15}{row['build_s']:>8.1f}{run['median_s']:>9.2f}"
            if gflops:
                achieved = gflops["total"] / run["median_s"]
                peak = rates.get("bf16" if run["precision"].startswith("bf16") else "fp32")
                text += (f"{gflops['total']:>8.0f}{100 * gflops['attention'] / gflops['total']:>7.0f}{achieved:>9.1f}"
                         f"{(achieved / peak if peak else float('nan')):>8.2f}"
                         f"{gflops['total'] / PEAK_TFLOPS['H100']:>9.2f}{gflops['total'] / PEAK_TFLOPS['A100']:>9.2f}")
            else:
                text += f"{'-':>8}{'-':>7}{'-':>9}{'-':>8}{'-':>9}{'-':>9}"
            lines.append(text + f"{row['peak_rss_gb']:>12.2f}")
    return lines


def _write_json(path: Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2), overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["dinov2_vits14", "dinov2_vitb14", "filterbank"],
                        help=f"registry names (space or comma separated): {', '.join(BACKBONES)}")
    parser.add_argument("--size", type=int, default=980, help="square input side in pixels (multiple of 14)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per precision")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="DINOv2 precisions to time (default: the device's default precision)")
    parser.add_argument("--weights", default="random", help="'random' (default), 'hub' or a path")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, mps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        names = [get_spec(n).name for part in args.backbones for n in part.split(",") if n]
    except BackboneError as error:
        parser.error(str(error))

    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return

    import torch

    from core.devices import cpu_bf16_is_faster, default_precision, describe_device, select_device

    device = select_device(args.device)
    rates = {}
    if device.type == "cpu":
        for dtype in ("fp32", "bf16"):
            rates[dtype] = matmul_rate(dtype)
            print(f"matmul {dtype}: {rates[dtype]['gflops_per_s']:.1f} GFLOP/s ({rates[dtype]['size']}^2)", file=sys.stderr)
    rows = []
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--child", name, "--size", str(args.size), "--repeats", str(args.repeats),
                   "--warmup", str(args.warmup), "--weights", args.weights]
        if args.device:
            command += ["--device", args.device]
        if args.precisions:
            command += ["--precisions", *args.precisions]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            last_line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
            rows.append({"backbone": name, "error": last_line})
            print(done.stderr[-2000:], file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    plain_rates = {k: v["gflops_per_s"] for k, v in rates.items()}
    lines = _table(rows, plain_rates)
    print("\n".join(lines))
    _write_json(args.out, {
        "benchmark": "backbones",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "device": describe_device(device), "default_precision": default_precision(device),
                    "cpu_bf16_is_faster": cpu_bf16_is_faster() if device.type == "cpu" else None,
                    "torch": torch.__version__, "load_average": os.getloadavg()},
        "settings": {"size": args.size, "repeats": args.repeats, "warmup": args.warmup, "weights": args.weights,
                     "precisions": args.precisions},
        "matmul": rates,
        "peak_tflops_bf16": PEAK_TFLOPS,
        "results": rows,
        "table": lines,
    })
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
