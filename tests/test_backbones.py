"""Backbone registry, weight loading and embedding, on tiny models (2 blocks, width 32, 2 heads).

Nothing here downloads: the hub tests run with HF_HUB_OFFLINE=1 and an HF_HOME in tmp_path, and the
Meta-format checkpoints are random tensors of tiny shapes written by the tests themselves.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.features import filterbank
from core.features.backbones import (
    BACKBONES,
    Backbone,
    RANDOM_LABEL,
    clear_backbone_memo,
    convert_meta_state_dict,
    default_backbone_name,
    dinov2_config,
    get_backbone,
    get_spec,
    infer_meta_architecture,
    load_backbone,
    weights_status,
)
from core.devices import default_precision, describe_device, select_device
from core.errors import BackboneError

TINY = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
HEADS = {"num_attention_heads": 2}
DINOV2_NAMES = [name for name in BACKBONES if name != "filterbank"]


def _image(height: int = 56, width: int = 70, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width), dtype=np.float32)


def _meta_state(*, registers: int = 0, swiglu: bool = False, hidden: int = 32, layers: int = 2, grid: int = 4,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """A Meta-format DINOv2 state dict (official key names) with random tensors of tiny shapes."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    state = {
        "cls_token": rand(1, 1, hidden), "mask_token": rand(1, hidden),
        "pos_embed": rand(1, 1 + grid * grid, hidden),
        "patch_embed.proj.weight": rand(hidden, 3, 14, 14, scale=0.02), "patch_embed.proj.bias": rand(hidden),
        "norm.weight": 1 + rand(hidden), "norm.bias": rand(hidden),
    }
    if registers:
        state["register_tokens"] = rand(1, registers, hidden)
    for i in range(layers):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": 1 + rand(hidden), b + "norm1.bias": rand(hidden),
            b + "attn.qkv.weight": rand(3 * hidden, hidden), b + "attn.qkv.bias": rand(3 * hidden),
            b + "attn.proj.weight": rand(hidden, hidden), b + "attn.proj.bias": rand(hidden),
            b + "ls1.gamma": 1 + rand(hidden), b + "ls2.gamma": 1 + rand(hidden),
            b + "norm2.weight": 1 + rand(hidden), b + "norm2.bias": rand(hidden),
        })
        if swiglu:  # hidden 32, mlp_ratio 4 -> SwiGLU width (int(128 * 2 / 3) + 7) // 8 * 8 = 88
            state.update({b + "mlp.w12.weight": rand(2 * 88, hidden), b + "mlp.w12.bias": rand(2 * 88),
                          b + "mlp.w3.weight": rand(hidden, 88), b + "mlp.w3.bias": rand(hidden)})
        else:
            state.update({b + "mlp.fc1.weight": rand(64, hidden), b + "mlp.fc1.bias": rand(64),
                          b + "mlp.fc2.weight": rand(hidden, 64), b + "mlp.fc2.bias": rand(hidden)})
    return state


def _meta_reference(state: dict[str, torch.Tensor], image01: np.ndarray, heads: int) -> np.ndarray:
    """Meta's DinoVisionTransformer forward written out by hand (image at the native pos-embed grid)."""
    x = torch.from_numpy(image01)[None, None].expand(1, 3, -1, -1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.conv2d((x - mean) / std, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
    h, w = x.shape[2:]
    x = torch.cat([state["cls_token"], x.flatten(2).transpose(1, 2)], dim=1) + state["pos_embed"]
    registers = state.get("register_tokens")
    if registers is not None:
        x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
    dim = x.shape[-1]
    layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(layers):
        p = lambda name: state[f"blocks.{i}.{name}"]  # noqa: E731
        y = F.layer_norm(x, (dim,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(1, -1, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads), dim=-1) @ v
        y = F.linear(attn.transpose(1, 2).reshape(1, -1, dim), p("attn.proj.weight"), p("attn.proj.bias"))
        x = x + p("ls1.gamma") * y
        y = F.layer_norm(x, (dim,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        if f"blocks.{i}.mlp.w12.weight" in state:
            x1, x2 = F.linear(y, p("mlp.w12.weight"), p("mlp.w12.bias")).chunk(2, dim=-1)
            y = F.linear(F.silu(x1) * x2, p("mlp.w3.weight"), p("mlp.w3.bias"))
        else:
            y = F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        x = x + p("ls2.gamma") * y
    x = F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    skip = 1 + (0 if registers is None else registers.shape[1])
    return x[0, skip:].reshape(h, w, dim).numpy()


def _tiny_random(**kw) -> Backbone:
    return load_backbone("dinov2_vits14", "random", device="cpu", precision=kw.pop("precision", "fp32"),
                         config_overrides=TINY, **kw)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---------------------------------------------------------------------------------------------- registry


def test_registry_facts():
    expected = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}
    for letter, (dim, layers, _) in expected.items():
        for suffix, registers in (("", 0), ("_reg", 4)):
            spec = get_spec(f"dinov2_vit{letter}14{suffix}")
            assert (spec.family, spec.patch_size, spec.embed_dim, spec.n_layers, spec.registers) == (
                "dinov2", 14, dim, layers, registers)
    assert get_spec("dinov2_vits14").hf_repo == "facebook/dinov2-small"
    assert get_spec("dinov2_vitg14_reg").hf_repo == "facebook/dinov2-with-registers-giant"
    assert get_spec("dinov2_vitb14_reg").meta_checkpoint == "dinov2_vitb14_reg4_pretrain.pth"
    assert get_spec("dinov2_vits14").title == "DINOv2 ViT-S/14"
    fb = get_spec("filterbank")
    n_features = filterbank.FilterBankConfig().n_features
    assert (fb.family, fb.embed_dim, fb.n_layers, fb.hf_repo) == ("filterbank", n_features, 0, None)
    assert len(BACKBONES) == 9
    with pytest.raises(BackboneError, match="dinov2_vits14.*filterbank"):
        get_spec("dinov3_vits16")


@pytest.mark.parametrize("name", DINOV2_NAMES)
def test_full_size_configs_on_meta_device(name):
    spec = get_spec(name)
    config = dinov2_config(name)
    assert (config.image_size, config.patch_size, config.hidden_size, config.num_hidden_layers) == (
        518, 14, spec.embed_dim, spec.n_layers)
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.use_swiglu_ffn == name.startswith("dinov2_vitg14")
    assert getattr(config, "num_register_tokens", 0) == spec.registers
    assert config._attn_implementation == "sdpa"
    from core.features.backbones import _empty_model

    model = _empty_model(spec, config)
    count = sum(p.numel() for p in model.parameters())
    thesis = {"s": 21e6, "b": 86e6, "l": 300e6, "g": 1.1e9}[name[10]]  # thesis §3.4
    assert abs(count - thesis) / thesis < 0.10
    assert count == spec.n_params
    if config.use_swiglu_ffn:  # ViT-g: SwiGLU width 4096 (2/3 of 4 x 1536)
        assert tuple(model.encoder.layer[0].mlp.gate_proj.weight.shape) == (4096, 1536)


def test_bad_config_overrides():
    with pytest.raises(BackboneError, match="not DINOv2 config fields"):
        dinov2_config("dinov2_vits14", {"hidden_sizee": 32})
    with pytest.raises(BackboneError, match="intermediate_size=50"):
        dinov2_config("dinov2_vits14", {"hidden_size": 32, "intermediate_size": 50})


# ---------------------------------------------------------------------------------------------- tiny random


def test_tiny_random_embed_shape_determinism_and_label():
    backbone = _tiny_random()
    tokens = backbone.embed(_image())
    assert tokens.shape == (4, 5, 32) and tokens.dtype == np.float32
    assert np.array_equal(tokens, _tiny_random().embed(_image()))
    assert not np.allclose(tokens, _tiny_random(seed=1).embed(_image()))
    # last layer is layer-normed (unit affine in the random init): each token has mean 0 and variance 1
    assert np.allclose(tokens.mean(-1), 0, atol=1e-5) and np.allclose(tokens.var(-1), 1, atol=1e-3)
    assert backbone.is_random and RANDOM_LABEL in backbone.label() and "RANDOM WEIGHTS" in backbone.label()
    assert backbone.weights_id.startswith("random:seed0:")
    assert (backbone.embed_dim, backbone.patch_size, backbone.precision) == (32, 14, "fp32")
    assert backbone.device == torch.device("cpu")


def test_embed_batch_and_bad_sizes():
    backbone = _tiny_random()
    images = np.stack([_image(seed=0), _image(seed=1)])
    batch = backbone.embed_batch(images, batch_size=2)
    assert batch.shape == (2, 4, 5, 32)
    assert np.allclose(batch[1], backbone.embed(images[1]), atol=1e-5)
    assert backbone.embed_batch(images[:0]).shape == (0, 4, 5, 32)
    with pytest.raises(ValueError, match="57 x 70.*multiple of the patch size 14"):
        backbone.embed(_image(57, 70))


def test_signature_names_what_the_embeddings_depend_on():
    fp32, bf16 = _tiny_random(), _tiny_random(precision="bf16")
    assert fp32.signature() != bf16.signature()
    for part in ("dinov2_vits14", "random:seed0", "precision=fp32", "dim=32", "posinterp=transformers-bicubic"):
        assert part in fp32.signature()
    assert "precision=bf16-autocast" in bf16.signature()


def test_bf16_autocast_close_to_fp32():
    image = _image()
    fp32 = _tiny_random().embed(image)
    bf16 = _tiny_random(precision="bf16-autocast").embed(image)
    assert bf16.dtype == np.float32
    assert _cosines(fp32, bf16).min() > 0.99


def test_get_backbone_memo():
    clear_backbone_memo()
    first = get_backbone("dinov2_vits14", "random", device="cpu", precision="fp32", config_overrides=TINY)
    assert get_backbone("dinov2_vits14", "random", device="cpu", precision="fp32", config_overrides=dict(TINY)) is first
    other_seed = get_backbone("dinov2_vits14", "random", device="cpu", precision="fp32", seed=1, config_overrides=TINY)
    assert other_seed is not first
    assert get_backbone("filterbank") is get_backbone("filterbank")
    clear_backbone_memo()
    assert get_backbone("dinov2_vits14", "random", device="cpu", precision="fp32", config_overrides=TINY) is not first


# ---------------------------------------------------------------------------------------------- weights


def test_conversion_by_hand():
    state = _meta_state(registers=4)
    hf = convert_meta_state_dict(state)
    qkv = state["blocks.1.attn.qkv.weight"]
    assert torch.equal(hf["encoder.layer.1.attention.q_proj.weight"], qkv[:32])
    assert torch.equal(hf["encoder.layer.1.attention.k_proj.weight"], qkv[32:64])
    assert torch.equal(hf["encoder.layer.1.attention.v_proj.bias"], state["blocks.1.attn.qkv.bias"][64:])
    assert torch.equal(hf["encoder.layer.0.layer_scale1.lambda1"], state["blocks.0.ls1.gamma"])
    assert torch.equal(hf["encoder.layer.0.attention.o_proj.weight"], state["blocks.0.attn.proj.weight"])
    assert torch.equal(hf["embeddings.position_embeddings"], state["pos_embed"])
    assert torch.equal(hf["embeddings.register_tokens"], state["register_tokens"])
    assert torch.equal(hf["layernorm.bias"], state["norm.bias"])
    assert len(hf) == len(state) + 2 * 2 * 2  # qkv weight and bias -> 3 tensors each (+2), in 2 blocks
    swiglu = _meta_state(swiglu=True)
    hf = convert_meta_state_dict(swiglu)
    w12 = swiglu["blocks.0.mlp.w12.weight"]
    assert torch.equal(hf["encoder.layer.0.mlp.gate_proj.weight"], w12[:88])  # silu(x1) * x2, x1 first
    assert torch.equal(hf["encoder.layer.0.mlp.up_proj.weight"], w12[88:])
    assert torch.equal(hf["encoder.layer.0.mlp.down_proj.weight"], swiglu["blocks.0.mlp.w3.weight"])
    assert infer_meta_architecture(swiglu) == dict(hidden_size=32, num_hidden_layers=2, mlp_ratio=4, use_swiglu_ffn=True,
                                                   num_register_tokens=0, patch_size=14, image_size=56)
    assert infer_meta_architecture(state)["mlp_ratio"] == 2  # fc1 width 64 = 2 x 32


@pytest.mark.parametrize(("name", "registers", "swiglu"), [
    ("dinov2_vits14", 0, False), ("dinov2_vits14_reg", 4, False), ("dinov2_vitg14", 0, True),
])
def test_meta_pth_and_hf_folder_give_identical_tokens(tmp_path, name, registers, swiglu):
    state = _meta_state(registers=registers, swiglu=swiglu)
    meta_file = tmp_path / get_spec(name).meta_checkpoint
    torch.save(state, meta_file)
    from_pth = load_backbone(name, str(meta_file), device="cpu", precision="fp32", config_overrides=HEADS)
    assert not from_pth.is_random and from_pth.embed_dim == 32
    assert from_pth.weights_id.startswith(f"file:{meta_file}#") and len(from_pth.weights_id.split("#")[1]) == 12
    assert meta_file.name in from_pth.label() and "RANDOM" not in from_pth.label()

    image = _image(56, 56)  # at the checkpoint's own 4 x 4 grid: no position-embedding resizing
    tokens = from_pth.embed(image)
    assert np.allclose(tokens, _meta_reference(state, image, heads=2), atol=2e-5)

    folder = tmp_path / "hf"
    from_pth.model.save_pretrained(folder)
    from_folder = load_backbone(name, str(folder), device="cpu", precision="fp32")
    assert from_folder.weights_id.startswith(f"file:{folder}#")
    assert np.array_equal(from_folder.embed(image), tokens)
    assert np.array_equal(from_folder.embed(_image()), from_pth.embed(_image()))  # resized position embeddings


def test_chunked_meta_blocks_convert():
    """Training checkpoints may hold blocks in chunks ('blocks.0.1.norm1.weight'); the inner index is global."""
    state = _meta_state()
    chunked = {re.sub(r"^blocks\.(\d+)\.", r"blocks.0.\1.", key): value for key, value in state.items()}
    assert "blocks.0.1.attn.qkv.weight" in chunked
    plain, converted = convert_meta_state_dict(state), convert_meta_state_dict(chunked)
    assert plain.keys() == converted.keys() and all(torch.equal(plain[k], converted[k]) for k in plain)
    assert infer_meta_architecture(chunked)["num_hidden_layers"] == 2


def test_wrong_checkpoints_fail_clearly(tmp_path):
    missing = tmp_path / "nothing_here.pth"
    with pytest.raises(BackboneError, match="nothing_here.pth does not exist"):
        load_backbone("dinov2_vits14", str(missing), device="cpu")

    wrong_keys = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, wrong_keys)
    with pytest.raises(BackboneError, match=r"resnet\.pth is not a DINOv2 checkpoint.*missing DINOv2 key"):
        load_backbone("dinov2_vits14", str(wrong_keys), device="cpu")

    pickled = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a pickled module: refused by weights_only=True
    with pytest.raises(BackboneError, match="cannot read weights file .*module.pth"):
        load_backbone("dinov2_vits14", str(pickled), device="cpu")

    with_registers = tmp_path / "reg.pth"
    torch.save(_meta_state(registers=4), with_registers)
    with pytest.raises(BackboneError, match="4 register tokens.*'dinov2_vits14_reg'"):
        load_backbone("dinov2_vits14", str(with_registers), device="cpu", config_overrides=HEADS)

    tiny = tmp_path / "tiny.pth"
    torch.save(_meta_state(), tiny)
    with pytest.raises(BackboneError, match="width 32 and 2 blocks, not 'dinov2_vits14'"):
        load_backbone("dinov2_vits14", str(tiny), device="cpu")
    with pytest.raises(BackboneError, match="attention heads"):
        load_backbone("dinov2_vits14", str(tiny), device="cpu", config_overrides={"num_hidden_layers": 2})

    not_a_model = tmp_path / "empty_folder"
    not_a_model.mkdir()
    with pytest.raises(BackboneError, match="empty_folder is not a Hugging Face model folder"):
        load_backbone("dinov2_vits14", str(not_a_model), device="cpu")


# ---------------------------------------------------------------------------------------------- hub cache


@pytest.fixture
def empty_hf_home(tmp_path, monkeypatch):
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    return tmp_path / "hf_home"


def test_missing_hub_weights_offline_fail_fast_with_the_three_ways(empty_hf_home):
    with pytest.raises(BackboneError) as raised:
        load_backbone("dinov2_vits14", "hub", device="cpu")
    message = str(raised.value)
    assert "facebook/dinov2-small" in message and str(empty_hf_home) in message and "HF_HUB_OFFLINE" in message
    assert "(1) download them once" in message and "(2) point --weights PATH" in message
    assert "dinov2_vits14_pretrain.pth" in message and "(3) --weights random" in message
    assert weights_status("dinov2_vits14") == "offline-only"
    assert weights_status("filterbank") == "cached"
    assert default_backbone_name() == "filterbank"


def test_unreachable_hub_fails_with_the_three_ways(empty_hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub

    def refused(*args, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refused)
    assert weights_status("dinov2_vitb14") == "not cached"
    with pytest.raises(BackboneError, match=r"cannot be reached \(ConnectionError\).*\(3\) --weights random"):
        load_backbone("dinov2_vitb14", "hub", device="cpu")


def test_cached_hub_model_loads_offline(empty_hf_home, tmp_path):
    """A model in the standard cache layout (refs/main -> snapshots/<commit>) loads with no network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_home / "hub" / "models--facebook--dinov2-small"
    source = _tiny_random()
    source.model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    assert weights_status("dinov2_vits14") == "cached"
    assert default_backbone_name() == "dinov2_vits14"
    backbone = load_backbone("dinov2_vits14", "hub", device="cpu", precision="fp32")
    assert backbone.weights_id == f"hub:facebook/dinov2-small@{commit}"
    assert "hub weights facebook/dinov2-small" in backbone.label() and "CPU fp32" in backbone.label()
    assert np.array_equal(backbone.embed(_image()), source.embed(_image()))
    assert json.loads((repo / "snapshots" / commit / "config.json").read_text())["model_type"] == "dinov2"


# ---------------------------------------------------------------------------------------------- filter bank, devices


def test_filterbank_backbone():
    backbone = load_backbone("filterbank")
    image = _image()
    features = backbone.embed(image)
    assert features.shape == (4, 5, filterbank.FilterBankConfig().n_features) and features.dtype == np.float32
    assert np.array_equal(features, filterbank.patch_features(image, 14, filterbank.FilterBankConfig()))
    assert (backbone.weights_id, backbone.is_random, backbone.device, backbone.precision) == ("none", False, None, "numpy")
    assert "filterbank-v1" in backbone.signature() and "RANDOM" not in backbone.label()
    small = load_backbone("filterbank", config_overrides={"sigmas": (1.0,)})
    assert small.embed(image).shape == (4, 5, 9) and small.signature() != backbone.signature()


def test_devices():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(None).type in ("cpu", "cuda", "mps")
    assert default_precision("cpu") in ("fp32", "bf16-weights")
    assert describe_device("cpu") == f"CPU ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
    with pytest.raises(BackboneError, match="'tpu'"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackboneError, match="no usable CUDA GPU"):
            select_device("cuda")
