"""The fast precision ('bf16-weights': the model converted once to bfloat16) against fp32, on tiny DINOv2s.

Random tiny models of the DINOv2 architecture (as in test_backbones.py). The default random init (weights
std 0.02, LayerScale 1) changes the tokens little from layer to layer, so the mask test also uses a "stressed"
model: weights x5, random LayerScale in [0.5, 1.5) and non-zero biases, saved as a Hugging Face folder and
loaded through the ordinary folder path in each precision. Measured on it (280 px, 400 patches): per-patch
cosine to fp32 min 0.99994, mean 0.99997 (bf16 autocast: 0.99996 / 0.99999); the top-10 % masks of a
prototype score map are identical. The bounds below leave a margin of about 10x in 1 - cosine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.devices import PRECISIONS, compute_dtypes, cpu_bf16_is_faster, default_precision, normalize_precision
from core.errors import BackboneError
from core.features.backbones import load_backbone
from core.features.embedding_cache import CacheKey
from core.metrics import dice
from core.scoring import l2_normalize, score_embeddings
from core.thresholds import top_percent_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_backbones import _test_image, vit_gflops, vit_matmul_fraction  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

TINY = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
# head dim 64 like every released DINOv2
TINY_HEAD64 = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 1, "intermediate_size": 256}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def stressed_folder(tmp_path_factory) -> Path:
    """A tiny ViT (4 blocks, width 64, one 64-dim head) with larger weights, as a Hugging Face model folder."""
    torch.set_num_threads(1)
    source = load_backbone("dinov2_vits14", "random", device="cpu", precision="fp32", config_overrides=TINY_HEAD64)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in source.model.named_parameters():
            if parameter.ndim >= 2:  # linear and patch weights, cls token, position embeddings
                parameter.mul_(5.0)
            elif name.endswith("lambda1"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            elif name.endswith("bias") and "norm" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    folder = tmp_path_factory.mktemp("stressed") / "model"
    source.model.save_pretrained(folder)
    return folder


def _prototype_scores(embeddings: np.ndarray, positive_patches: np.ndarray) -> np.ndarray:
    """(h, w) thesis score: mean prototype of the marked patches minus 0.8 x that of the others."""
    positive = l2_normalize(embeddings[positive_patches].mean(0))[None]
    negative = l2_normalize(embeddings[~positive_patches].mean(0))[None]
    return score_embeddings(embeddings, positive, negative, negative_weight=0.8)


# ---------------------------------------------------------------------------------------------- precision names


def test_precision_names_and_dtypes():
    assert PRECISIONS == ("fp32", "bf16-weights", "bf16-autocast", "fp16-autocast")
    assert compute_dtypes("bf16-weights") == (torch.bfloat16, None)
    assert compute_dtypes("fp32") == (torch.float32, None)
    assert compute_dtypes("bf16") == (torch.float32, torch.bfloat16)  # 'bf16' stays the autocast alias
    assert normalize_precision(" BF16-Weights ") == "bf16-weights"
    with pytest.raises(BackboneError, match="bf16-weights"):
        normalize_precision("int8")


@pytest.mark.parametrize(("flag", "expected"), [("1", "bf16-weights"), ("0", "fp32")])
def test_cpu_default_precision_follows_the_probe(monkeypatch, flag, expected):
    monkeypatch.setenv("PROTOSCOPE_CPU_BF16", flag)
    cpu_bf16_is_faster.cache_clear()
    try:
        assert default_precision("cpu") == expected
    finally:
        monkeypatch.undo()
        cpu_bf16_is_faster.cache_clear()
    assert default_precision("mps") == "fp32"


# ---------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_bf16_weights_model_and_tokens(name):
    image = _test_image(140)[:, :126]  # 10 x 9 patches: not the native grid, so position embeddings are resized
    fp32 = load_backbone(name, "random", device="cpu", precision="fp32", config_overrides=TINY)
    fast = load_backbone(name, "random", device="cpu", precision="bf16-weights", config_overrides=TINY)
    assert {p.dtype for p in fast.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    reference, tokens = fp32.embed(image), fast.embed(image)
    assert tokens.shape == reference.shape == (10, 9, 32) and tokens.dtype == np.float32
    cosines = _cosines(reference, tokens)
    assert not np.array_equal(reference, tokens)  # bf16 did run
    assert cosines.min() > 0.9995 and cosines.mean() > 0.99995  # measured 0.99996 / 0.99999
    assert fast.label().endswith("CPU bf16") and fp32.label().endswith("CPU fp32")


def test_bf16_weights_mask_equals_fp32_on_a_stressed_model(stressed_folder):
    image = _test_image(280)
    patch_means = image.reshape(20, 14, 20, 14).mean(axis=(1, 3))
    bright = patch_means > np.quantile(patch_means, 0.8)  # the "clicked" patches: the brightest fifth
    results = {}
    for precision in ("fp32", "bf16-weights", "bf16-autocast"):
        embeddings = load_backbone("dinov2_vits14", str(stressed_folder), device="cpu", precision=precision).embed(image)
        scores = _prototype_scores(embeddings, bright)
        results[precision] = embeddings, scores, top_percent_mask(scores, 10)
    reference, reference_scores, reference_mask = results["fp32"]
    assert reference_mask.sum() == 40  # round(400 x 10 %)
    fast, fast_scores, fast_mask = results["bf16-weights"]
    cosines = _cosines(reference, fast)
    assert cosines.min() > 0.9995 and cosines.mean() > 0.9998  # measured 0.99994 / 0.99997
    assert np.abs(fast_scores - reference_scores).max() < 0.02  # measured 0.004 (scores span -1.1 .. 1.3)
    assert dice(fast_mask, reference_mask) >= 0.95  # measured 1.0
    # autocast (the former default) is as close or closer: it keeps the residual stream in float32
    assert _cosines(reference, results["bf16-autocast"][0]).mean() >= cosines.mean() - 1e-6


# ---------------------------------------------------------------------------------------------- cache keys


def test_precisions_never_share_an_embedding_cache_key():
    signatures = {p: load_backbone("dinov2_vits14", "random", device="cpu", precision=p,
                                   config_overrides=TINY).signature()
                  for p in ("fp32", "bf16-weights", "bf16-autocast")}
    for precision, signature in signatures.items():
        assert f"|precision={precision}|" in signature
    keys = {CacheKey("stack.tif|1|2|abc", 0, 0, signature, "pre-v1").digest() for signature in signatures.values()}
    assert len(keys) == 3


# ---------------------------------------------------------------------------------------------- matmul fraction


def test_vit_gflops_by_hand():
    # 28 px: 4 patches + CLS = 5 tokens, width 32, 2 blocks, MLP 64: patch embedding 2*4*588*32 = 150528;
    # per block q/k/v/o 2*5*32*128 = 40960, MLP 2*5*32*64*2 = 40960, QK^T + AV 4*25*32 = 3200
    gflops = vit_gflops(hidden=32, layers=2, mlp_width=64, swiglu=False, size=28)
    assert gflops["total"] == pytest.approx((150528 + 2 * (40960 + 40960 + 3200)) / 1e9)
    assert gflops["attention"] == pytest.approx(2 * 3200 / 1e9)
    # ViT-S/14 at 980 px (the figure docs/backbones.md quotes): 653 GFLOP, 68 % attention
    vits = vit_gflops(hidden=384, layers=12, mlp_width=1536, swiglu=False, size=980)
    assert round(vits["total"]) == 653 and round(100 * vits["attention"] / vits["total"]) == 68


def test_vit_matmul_fraction_reports_consistent_figures():
    backbone = load_backbone("dinov2_vits14_reg", "random", device="cpu", precision="bf16-weights",
                             config_overrides=TINY)
    result = vit_matmul_fraction(backbone, sizes=(28, 42), repeats=2, warmup=1, matmul_size=128)
    assert (result["precision"], result["matmul_dtype"], result["threads"]) == ("bf16-weights", "bf16", 1)
    small, large = result["sizes"]
    assert (small["size"], small["tokens"], large["tokens"]) == (28, 4 + 1 + 4, 9 + 1 + 4)
    for row in result["sizes"]:
        assert len(row["forward_times_s"]) == 2 and row["forward_min_s"] == min(row["forward_times_s"])
        assert row["achieved_gflops_per_s"] == pytest.approx(row["gflop"] / row["forward_s"])
        assert row["fraction_best"] == pytest.approx(row["gflop"] / row["forward_min_s"] / row["matmul_max_gflops_per_s"])
        paired = [row["gflop"] / seconds / rate for seconds, rate in zip(row["forward_times_s"],
                                                                        row["matmul_rounds_gflops_per_s"])]
        assert row["fraction"] == pytest.approx(float(np.median(paired))) and row["fraction"] > 0
    assert vit_matmul_fraction(backbone, sizes=(28,), repeats=1, matmul_size=128, clock="cpu")["clock"] == "cpu"
    torch.set_num_threads(2)  # process CPU time would count the second thread's spin-waits
    with pytest.raises(ValueError, match="set_num_threads"):
        vit_matmul_fraction(backbone, sizes=(28,), repeats=1, matmul_size=128, clock="cpu")
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match="not a ViT"):
        vit_matmul_fraction(load_backbone("filterbank"))
    with pytest.raises(ValueError, match="multiple of the 14-px patch"):
        vit_matmul_fraction(backbone, sizes=(30,))
