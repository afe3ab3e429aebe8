"""Time the feature backbones per slice against the FLOP limit of this machine and of an H100/A100.

Run from the repository root:
    .venv/bin/python bench/bench_backbones.py [--backbones dinov2_vits14 dinov2_vitb14 filterbank]
        [--size 980] [--repeats 2] [--precisions fp32 bf16-weights] [--weights random]
Prints a table and writes bench/results/backbones.json.

    .venv/bin/python bench/bench_backbones.py --fraction [--sizes 518 980 1022]
        [--precisions fp32 bf16-autocast bf16-weights] [--repeats 5] [--threads 1 --clock cpu]
measures, in this process, how close a random ViT-S/14 forward comes to this machine's matmul rate in each
precision (``vit_matmul_fraction``), interleaving precisions, sizes and the matmul probes round by round;
writes bench/results/vit_fraction.json.

Per backbone (each in its own child process, so that peak RSS is that backbone's alone): build time
(``load_backbone``, transformers already imported), one warm-up run, then ``--repeats`` timed runs of
``embed`` on one (size x size) slice per precision, each precision on its own copy of the backbone (a
precision is fixed when a backbone is built) (default: the device's default precision only; bf16 on a CPU
without bf16 matmul support is 20-400x slower than fp32). Analytic GFLOP per
slice (multiply-adds x 2): patch embedding + per block the q/k/v/o and MLP matmuls and the attention
QK^T and AV products, N = tokens including CLS and registers. The machine's matmul rate is one large
``torch.mm`` per dtype (the bf16 size shrinks when bf16 is slow); "of peak" = achieved GFLOP/s over that
rate; the FLOP-limited times assume dense bf16 peaks of 990 TFLOP/s (H100 SXM) and 312 (A100).
This VM's speed drifts up to 2x between runs and other jobs share its 2 cores: read the figures as
+-30 %, and compare variants within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.errors import BackboneError  # noqa: E402
from core.features.registry import BACKBONES, get_spec  # noqa: E402  (no torch: the parent stays light)
from core.io.atomic import write_text  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "backbones.json"
FRACTION_RESULTS = ROOT / "bench" / "results" / "vit_fraction.json"
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


def _model_gflops(backbone: Any, size: int) -> dict[str, float]:
    """``vit_gflops`` of a loaded DINOv2 backbone (its actual config: tiny test models too)."""
    config = backbone.model.config
    mlp = backbone.model.encoder.layer[0].mlp
    width = (mlp.gate_proj if config.use_swiglu_ffn else mlp.fc1).weight.shape[0]
    return vit_gflops(hidden=config.hidden_size, layers=config.num_hidden_layers, mlp_width=width,
                      swiglu=config.use_swiglu_ffn, size=size, patch=backbone.patch_size, registers=backbone.registers)


def _matmul_dtype_name(precision: str) -> str:
    """The dtype whose matmul rate a precision is judged against: its compute dtype."""
    return {"fp32": "fp32", "bf16-weights": "bf16", "bf16-autocast": "bf16", "fp16-autocast": "fp16"}[precision]


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(name: str):
    """'wall': time.perf_counter; 'cpu': time.process_time, the CPU time of this process, which on a shared
    machine leaves out the time other jobs hold the cores (meaningful with one torch thread on the CPU: with
    more, it also counts the threads' spin-waiting)."""
    import torch

    if name == "wall":
        return time.perf_counter
    if name != "cpu":
        raise ValueError(f"clock {name!r} is not 'wall' or 'cpu'")
    if torch.get_num_threads() != 1:
        raise ValueError("clock='cpu' needs torch.set_num_threads(1) "
                         "(with more threads, process time also counts their spin-waits)")
    return time.process_time


def _best_matmul_rate(dtype_name: str, size: int, device: Any, tensors: dict, clock=time.perf_counter) -> float:
    """GFLOP/s of the fastest of 3 (size x size) products (operands made once per dtype and kept in ``tensors``)."""
    import torch

    if dtype_name not in tensors:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        a, b = (torch.randn(size, size).to(device=device, dtype=dtype) for _ in range(2))
        torch.mm(a, b)  # the first call selects kernels
        tensors[dtype_name] = (a, b)
    a, b = tensors[dtype_name]
    best = math.inf
    with torch.inference_mode():
        for _ in range(3):
            _synchronize(device)
            start = clock()
            torch.mm(a, b)
            _synchronize(device)
            best = min(best, clock() - start)
    return 2 * size**3 / best / 1e9


def interleaved_fractions(backbones: Sequence[Any], sizes: Sequence[int] = (980,), *, repeats: int = 3,
                          warmup: int = 1, matmul_size: int = 2048, clock: str = "wall") -> list[dict]:
    """``vit_matmul_fraction`` for several backbones (e.g. one per precision), measured round by round.

    Every round times, for each size and backbone in turn, the matmul rate in the backbone's compute dtype
    (best of 3 products) and then one ``embed`` of a (size x size) image, so that A/B comparisons and each
    forward/matmul pair see the same machine load. Returns one dict per backbone (see ``vit_matmul_fraction``).
    """
    import torch

    timer = _clock(clock)

    sizes = [int(size) for size in sizes]
    for size in sizes:
        if size < 14 or size % 14:
            raise ValueError(f"size {size} is not a positive multiple of the 14-px patch")
    images = {size: _test_image(size) for size in sizes}
    tensors: dict = {}
    samples = {(i, size): {"forward": [], "matmul": []} for i in range(len(backbones)) for size in sizes}
    for i, backbone in enumerate(backbones):
        for size in sizes:
            for _ in range(warmup):
                backbone.embed(images[size])
    for _ in range(repeats):
        for size in sizes:
            for i, backbone in enumerate(backbones):
                device = backbone.device
                rate = _best_matmul_rate(_matmul_dtype_name(backbone.precision), matmul_size, device, tensors, timer)
                _synchronize(device)
                start = timer()
                backbone.embed(images[size])  # returns numpy on the CPU: the device is done when it returns
                samples[i, size]["forward"].append(timer() - start)
                samples[i, size]["matmul"].append(rate)
    results = []
    for i, backbone in enumerate(backbones):
        rows = []
        for size in sizes:
            gflops = _model_gflops(backbone, size)
            forward, matmul = samples[i, size]["forward"], samples[i, size]["matmul"]
            ratios = [gflops["total"] / seconds / rate for seconds, rate in zip(forward, matmul)]
            rows.append({
                "size": size, "tokens": (size // backbone.patch_size) ** 2 + 1 + backbone.registers,
                "gflop": gflops["total"], "attention_gflop": gflops["attention"],
                "forward_s": statistics.median(forward), "forward_min_s": min(forward), "forward_times_s": forward,
                "achieved_gflops_per_s": gflops["total"] / statistics.median(forward),
                "matmul_gflops_per_s": statistics.median(matmul), "matmul_max_gflops_per_s": max(matmul),
                "matmul_rounds_gflops_per_s": matmul,
                "fraction": statistics.median(ratios), "fraction_best": gflops["total"] / min(forward) / max(matmul),
            })
        results.append({"backbone": backbone.label(), "name": backbone.spec.name, "precision": backbone.precision,
                        "device": str(backbone.device), "threads": torch.get_num_threads(), "clock": clock,
                        "matmul_dtype": _matmul_dtype_name(backbone.precision), "matmul_size": matmul_size,
                        "sizes": rows})
    return results


def vit_matmul_fraction(backbone: Any = None, *, sizes: Sequence[int] = (980,), repeats: int = 3, warmup: int = 1,
                        matmul_size: int = 2048, clock: str = "wall") -> dict:
    """How close one DINOv2 forward comes to this machine's matmul rate in the precision it runs in.

    backbone : a loaded DINOv2 ``Backbone`` (``core.features.backbones.load_backbone`` / ``get_backbone``);
        default: random-weight ViT-S/14 on the default device at its default precision.
    sizes : square input sides in pixels (multiples of 14); the app feeds 980 (any slice is resized to it).
    repeats : rounds of [best-of-3 (matmul_size)² ``torch.mm`` in the compute dtype, one timed ``embed``],
        after ``warmup`` untimed forwards per size.
    clock : 'wall' (default) or 'cpu' (process CPU time; needs one torch thread; on a loaded shared machine
        the robust choice, since other jobs' time slices are left out of both the forward and the matmul).
    Returns {'backbone' (label), 'name', 'precision', 'device', 'threads', 'clock', 'matmul_dtype' ('fp32' | 'bf16' |
    'fp16'), 'matmul_size', 'sizes': [per size: 'size', 'tokens', 'gflop' and 'attention_gflop' (analytic,
    ``vit_gflops``), 'forward_s' (median), 'forward_min_s', 'forward_times_s', 'achieved_gflops_per_s'
    (gflop / median forward), 'matmul_gflops_per_s' (median of the rounds), 'matmul_max_gflops_per_s',
    'matmul_rounds_gflops_per_s' (one per round, paired with 'forward_times_s'),
    'fraction' (median over rounds of gflop / forward / matmul rate of the same round), 'fraction_best'
    (fastest forward against the fastest matmul)]}. Figures on a shared machine: compare within one call.

    >>> result = vit_matmul_fraction(sizes=(518,))                    # doctest: +SKIP
    >>> result["sizes"][0]["fraction"]                                 # doctest: +SKIP
    0.41
    """
    if backbone is None:
        from core.features.backbones import get_backbone

        backbone = get_backbone("dinov2_vits14", "random")
    if backbone.spec.family != "dinov2":
        raise ValueError(f"{backbone.spec.name!r} is not a ViT; the matmul fraction applies to DINOv2 backbones")
    return interleaved_fractions([backbone], sizes, repeats=repeats, warmup=warmup, matmul_size=matmul_size,
                                 clock=clock)[0]


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
    if spec.family == "filterbank":
        precisions = ["numpy"]
    else:
        precisions = args.precisions or [default_precision(select_device(args.device))]
    backbone = load_backbone(name, args.weights, device=args.device, precision=precisions[0])
    build_s = time.perf_counter() - start
    image = _test_image(args.size)
    row = {"backbone": name, "title": spec.title, "label": backbone.label(), "weights_id": backbone.weights_id,
           "build_s": build_s, "size": args.size, "grid": args.size // backbone.patch_size, "embed_dim": backbone.embed_dim,
           "n_params": spec.n_params, "device": describe_device(backbone.device), "runs": []}
    if spec.family != "filterbank":
        row["gflops"] = _model_gflops(backbone, args.size)
    for precision in precisions:
        # the precision is fixed when a backbone is built ('bf16-weights' converts the model): one per precision
        variant = backbone if precision == backbone.precision else load_backbone(
            name, args.weights, device=args.device, precision=precision)
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
        del variant
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


def run_fraction(name: str, args: argparse.Namespace) -> None:
    """``--fraction``: ``interleaved_fractions`` over the precisions, a table, and the JSON."""
    import torch

    from core.devices import default_precision, describe_device, select_device
    from core.features.backbones import load_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    precisions = args.precisions or list(dict.fromkeys(["fp32", default_precision(device)]))
    backbones = [load_backbone(name, args.weights, device=args.device, precision=p) for p in precisions]
    results = interleaved_fractions(backbones, args.sizes, repeats=args.repeats, warmup=args.warmup, clock=args.clock)
    head = (f"{'precision':<15}{'size':>6}{'tokens':>7}{'GFLOP':>8}{'attn %':>7}{'s (median)':>11}{'s (min)':>9}"
            f"{'GFLOP/s':>9}{'mm GFLOP/s':>11}{'fraction':>9}{'best':>6}")
    lines = [f"{results[0]['name']} ({args.weights} weights), {describe_device(device)}, {args.clock} clock, matmul "
             f"{results[0]['matmul_size']}² per round; fraction = median over rounds, best = fastest/fastest", head,
             "-" * len(head)]
    for result in results:
        for row in result["sizes"]:
            lines.append(f"{result['precision']:<15}{row['size']:>6}{row['tokens']:>7}{row['gflop']:>8.0f}"
                         f"{100 * row['attention_gflop'] / row['gflop']:>7.0f}{row['forward_s']:>11.3f}"
                         f"{row['forward_min_s']:>9.3f}{row['achieved_gflops_per_s']:>9.0f}"
                         f"{row['matmul_gflops_per_s']:>11.0f}{row['fraction']:>9.2f}{row['fraction_best']:>6.2f}")
    print("\n".join(lines))
    out = args.out or FRACTION_RESULTS
    _write_json(out, {
        "benchmark": "vit_fraction",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "device": describe_device(device), "default_precision": default_precision(device),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": os.getloadavg()},
        "settings": {"sizes": args.sizes, "repeats": args.repeats, "warmup": args.warmup, "weights": args.weights,
                     "precisions": precisions, "clock": args.clock},
        "results": results,
        "table": lines,
    })
    print(f"wrote {out}", file=sys.stderr)


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
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON output (default {RESULTS.relative_to(ROOT)}, "
                             f"with --fraction {FRACTION_RESULTS.relative_to(ROOT)})")
    parser.add_argument("--fraction", action="store_true",
                        help="in this process: ViT forward against the matmul rate per precision and size (the first "
                             "--backbones name; --sizes; --precisions, default fp32 and the device's default)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[518, 980, 1022], help="--fraction: input sides (px)")
    parser.add_argument("--threads", type=int, default=None, help="--fraction: torch threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="--fraction: wall time, or process CPU time (needs --threads 1; robust on a "
                             "loaded machine)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        names = [get_spec(n).name for part in args.backbones for n in part.split(",") if n]
    except BackboneError as error:
        parser.error(str(error))

    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return
    if args.fraction:
        run_fraction(names[0], args)
        return
    args.out = args.out or RESULTS

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
