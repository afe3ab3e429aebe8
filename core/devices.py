"""Which torch device and which precision the feature backbones run on.

Automatic choice: CUDA, then Apple MPS, then the CPU. Precision: ``bf16-weights`` (the model converted once to
bfloat16) on a CUDA GPU that supports bf16 (``fp16-autocast`` otherwise); float32 on MPS (16-bit there is
untested on our machines); on the CPU, ``bf16-weights`` only where this CPU runs bfloat16 matmuls clearly faster
than float32, else ``fp32``.

Precisions (``PRECISIONS``):

- ``fp32``: weights and activations in float32.
- ``bf16-weights``: weights, activations and the residual stream in bfloat16, converted once at load; layer
  norms and softmax accumulate in float32 inside their kernels, and transformers resizes the position embeddings
  in float32. On a 2-core AMX VM ViT-S/14 at 980 px ran 1.05-1.1x faster than ``bf16-autocast`` (which
  re-casts every weight and activation on each call) on one thread and ~1.45x on two; tokens stay within
  cosine 0.9999 of fp32 (random ViT-S at 980 px; docs/backbones.md).
- ``bf16-autocast`` (alias ``bf16``), ``fp16-autocast``: float32 weights, matmuls autocast to 16 bits, the
  residual stream in float32. Kept for comparison and for GPUs without bf16.

Why the CPU choice is measured rather than assumed: on one of our 2-core VMs (with AVX-512 BF16 and AMX)
bf16 ran ViT-S/14 at 980 px 3-4x faster than fp32, while on another (AMD EPYC, AVX2 only,
no AVX-512) bf16 matmuls ran at 0.2-4 GFLOP/s against 80 GFLOP/s in fp32 and ViT-S/14 at 980 px took
36.5 s in bf16 autocast against 13.6 s in fp32. The probe (``cpu_bf16_is_faster``) is skipped when oneDNN
reports no bf16 support, and otherwise costs ~0.1 s once per process.
"""

from __future__ import annotations

import functools
import os
import time

import torch

from core.errors import BackboneError

__all__ = [
    "PRECISIONS",
    "cpu_bf16_is_faster",
    "compute_dtypes",
    "default_precision",
    "describe_device",
    "normalize_precision",
    "select_device",
]

#: Precisions a DINOv2 backbone accepts ('numpy' is the filter bank's).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16-weights", "bf16-autocast", "fp16-autocast")
_PRECISION_ALIASES = {"float32": "fp32", "bf16": "bf16-autocast", "bfloat16": "bf16-autocast",
                      "fp16": "fp16-autocast", "float16": "fp16-autocast", "half": "fp16-autocast"}
#: precision -> (dtype of the weights and activations, autocast dtype or None)
_DTYPES = {"fp32": (torch.float32, None), "bf16-weights": (torch.bfloat16, None),
           "bf16-autocast": (torch.float32, torch.bfloat16), "fp16-autocast": (torch.float32, torch.float16)}
#: bf16 must beat fp32 by this factor in the probe to become the CPU default (a clear win, not noise).
_CPU_BF16_MIN_SPEEDUP = 1.3


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(preference: str | torch.device | None = None) -> torch.device:
    """The torch device to run a backbone on.

    preference : None or 'auto' (CUDA, then MPS, then CPU), or 'cpu', 'cuda', 'cuda:1', 'mps'.
    Raises BackboneError when the requested device is not available on this machine.

    >>> select_device("cpu")
    device(type='cpu')
    """
    if isinstance(preference, torch.device):
        preference = str(preference)
    text = (preference or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise BackboneError(f"device {preference!r} is not a torch device; "
                            "use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackboneError(f"device {preference!r} was requested but this torch has no usable CUDA GPU; "
                                "use device 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackboneError(f"device {preference!r} was requested but only {torch.cuda.device_count()} CUDA "
                                "device(s) exist")
    elif device.type == "mps":
        if not _mps_available():
            raise BackboneError(f"device {preference!r} was requested but Apple MPS is not available; use 'auto' or 'cpu'")
    elif device.type != "cpu":
        raise BackboneError(f"device {preference!r} is not supported; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return device


def normalize_precision(precision: str) -> str:
    """Canonical precision name: 'fp32' | 'bf16-weights' | 'bf16-autocast' | 'fp16-autocast'.

    Accepts the aliases 'float32', 'bf16' / 'bfloat16' (autocast), 'fp16' / 'float16' / 'half' (autocast).
    """
    text = str(precision).strip().lower()
    text = _PRECISION_ALIASES.get(text, text)
    if text not in PRECISIONS:
        raise BackboneError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return text


def compute_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype the model's weights and activations are kept in, autocast dtype or None) of a precision.

    >>> compute_dtypes("bf16-weights")
    (torch.bfloat16, None)
    """
    return _DTYPES[normalize_precision(precision)]


def _matmul_seconds(dtype: torch.dtype, size: int, repeats: int) -> float:
    """Fastest of ``repeats`` (size x size) products: the minimum is what the CPU can do when not interrupted."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: first call selects kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return min(times)


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_faster() -> bool:
    """True when bfloat16 matmuls on this CPU beat float32 by >= 1.3x (measured once per process).

    Skipped (False) when oneDNN reports no bf16 support (e.g. AVX2-only x86), where bf16 matmuls fall back
    to slow reference kernels.
    """
    if os.environ.get("PROTOSCOPE_CPU_BF16", "").strip() in ("0", "1"):  # explicit override for odd machines
        return os.environ["PROTOSCOPE_CPU_BF16"].strip() == "1"
    mkldnn = getattr(torch.ops, "mkldnn", None)
    supported = getattr(mkldnn, "_is_mkldnn_bf16_supported", None) if mkldnn is not None else None
    try:
        if supported is None or not supported():
            return False
    except RuntimeError:
        return False
    with torch.inference_mode():  # shared machines: the fastest of 5 products each
        fp32 = _matmul_seconds(torch.float32, 512, 5)
        bf16 = _matmul_seconds(torch.bfloat16, 512, 5)
    return fp32 / bf16 >= _CPU_BF16_MIN_SPEEDUP


def default_precision(device: torch.device | str) -> str:
    """The precision a DINOv2 backbone uses on ``device`` unless told otherwise.

    CUDA: 'bf16-weights' (or 'fp16-autocast' on GPUs without bf16); MPS: 'fp32';
    CPU: 'bf16-weights' when ``cpu_bf16_is_faster()``, else 'fp32'.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16-weights" if torch.cuda.is_bf16_supported() else "fp16-autocast"
    if device.type == "cpu":
        return "bf16-weights" if cpu_bf16_is_faster() else "fp32"
    return "fp32"


def describe_device(device: torch.device | str | None) -> str:
    """One short line for the UI/CLI: 'CPU (2 threads)', 'CUDA: NVIDIA H100 80GB HBM3', 'Apple MPS'."""
    if device is None:
        return "CPU (numpy)"
    device = torch.device(device)
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple MPS"
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads != 1 else ''})"
