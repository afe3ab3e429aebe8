"""Feature backbones: loading a registered backbone (weights, device, precision) as a ``Backbone`` that embeds slices.

The names and their facts (patch size, embedding dim, layers, parameter count, title) and the default-backbone
rule live in ``core.features.registry``, which does not import torch; they are re-exported here. Names
(docs/spec/PIPELINE.md A.2, docs/backbones.md): ``dinov2_vits14``, ``dinov2_vitb14``, ``dinov2_vitl14``, ``dinov2_vitg14``, the
register variants ``dinov2_vit{s,b,l,g}14_reg`` (4 register tokens), and ``filterbank`` (offline,
no weights, ``core.features.filterbank``). The DINOv2 models run through ``transformers`` (``Dinov2Model`` /
``Dinov2WithRegistersModel``, SDPA attention) with explicit configs: 518 px, patch 14 (the transformers
defaults are 224 px, and patch 16 for the register config).

Weights (``load_backbone(name, weights)``):

- ``'hub'`` (default): the standard Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), repo
  ``facebook/dinov2-{small,base,large,giant}`` or ``facebook/dinov2-with-registers-...``. A cached model
  loads with ``local_files_only=True`` (no network). A missing one fails at once under
  ``HF_HUB_OFFLINE=1``; otherwise one metadata request with a 5 s timeout decides whether the hub
  (``HF_ENDPOINT``) is reachable (transformers alone spends ~23 s in retries when offline), then
  ``huggingface_hub`` downloads config.json and the weights of the main revision into the cache. A
  download that arrives incomplete is fetched once more, then refused; a cached weights file that is cut
  short is never loaded (downloaded again, or refused under ``HF_HUB_OFFLINE``). docs/backbones.md.
- a path: a Hugging Face model folder (config.json + safetensors/bin) or Meta's official
  ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``. The .pth is read with ``torch.load(weights_only=True)``
  (tensors only, never pickled code) and its keys renamed to the transformers names
  (``convert_meta_state_dict``); the architecture is read from the tensor shapes.
- ``'random'``: seeded random weights, for timing and plumbing only (labelled as such everywhere).

Models are built on the meta device and then receive their weights, so ViT-g's 30-45 s random
initialisation is never paid (a random model gets a fast seeded normal init instead).

Position embeddings at sizes other than 518 px are resized by transformers' own
``interpolate_pos_encoding`` (bicubic in float32 to (H/14, W/14); with antialias for the register
models). At 518 px Meta's code, timm and transformers give identical tokens; at 980 px the non-register
models differ from Meta's (which resizes by a scale factor with a 0.1 offset) by a token cosine
>= 0.9994. The method is part of ``Backbone.signature()``.

Precision (``core.devices``; docs/backbones.md): 'fp32', 'bf16-weights' (the model converted to bfloat16 once,
when the ``Backbone`` is built: the default where bf16 matmuls are fast), 'bf16-autocast', 'fp16-autocast'.
It is part of ``Backbone.signature()``, so embeddings of different precisions never share a cache entry.

Loading is pure: ``load_backbone`` builds a new model on each call (the app wraps it in
``st.cache_resource``). ``get_backbone`` is the process-level memo for scripts and the CLI.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.devices import compute_dtypes, default_precision, describe_device, normalize_precision, select_device
from core.errors import BackboneError
from core.features import filterbank
from core.features.registry import (
    BACKBONES,
    RANDOM_LABEL,
    BackboneSpec,
    cached_snapshot,
    default_backbone_name,
    dinov2_arch,
    get_spec,
    hf_cache_dir,
    hf_offline,
    spec_for_architecture,
    weights_file_problem,
    weights_status,
)

__all__ = [
    "BACKBONES",
    "RANDOM_LABEL",
    "Backbone",
    "BackboneSpec",
    "clear_backbone_memo",
    "convert_meta_state_dict",
    "default_backbone_name",
    "dinov2_config",
    "get_backbone",
    "get_spec",
    "infer_meta_architecture",
    "load_backbone",
    "weights_status",
]

SIGNATURE_VERSION = "backbone-v1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Position-embedding resizing, recorded in the embedding-cache signature (see module docstring).
POS_INTERPOLATION = {0: "transformers-bicubic-fp32", 4: "transformers-bicubic-antialias-fp32"}
_HUB_TIMEOUT_S = 5.0
_DINOV2_HEAD_DIM = 64  # every released DINOv2 ViT has 64-dim heads


# ----------------------------------------------------------------------------------------------------------
# Configs


_CONFIG_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "intermediate_size", "hidden_act",
    "layer_norm_eps", "image_size", "patch_size", "qkv_bias", "layerscale_value", "use_swiglu_ffn",
    "initializer_range", "num_register_tokens",
)


def _mlp_hidden(hidden: int, ratio: int, swiglu: bool) -> int:
    """Width of the MLP's hidden layer as transformers and Meta build it (SwiGLU keeps 2/3, rounded to 8)."""
    width = int(hidden * ratio)
    return (int(width * 2 / 3) + 7) // 8 * 8 if swiglu else width


def _ratio_for_width(hidden: int, width: int, swiglu: bool) -> int | None:
    for ratio in range(1, 17):
        if _mlp_hidden(hidden, ratio, swiglu) == width:
            return ratio
    return None


def dinov2_config(name: str, overrides: dict | None = None):
    """The transformers config of a registered DINOv2 backbone (``Dinov2Config`` or ``Dinov2WithRegistersConfig``).

    overrides : tests and benchmarks only, e.g. {'num_hidden_layers': 2, 'hidden_size': 32,
        'num_attention_heads': 2, 'intermediate_size': 64} for a tiny model of the same architecture.
        ``intermediate_size`` is the plain MLP's width; it becomes transformers' integer ``mlp_ratio``.
    Raises BackboneError for an unknown override key or a width that no integer mlp_ratio gives.
    """
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    spec = get_spec(name)
    if spec.family != "dinov2":
        raise BackboneError(f"backbone {spec.name!r} has no transformers config")
    arch = dinov2_arch(spec.name)
    values: dict[str, Any] = dict(
        hidden_size=arch.hidden, num_hidden_layers=arch.layers, num_attention_heads=arch.heads, mlp_ratio=4,
        use_swiglu_ffn=arch.swiglu, image_size=518, patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6,
        hidden_act="gelu", qkv_bias=True,
    )
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(_CONFIG_FIELDS))
    if unknown:
        raise BackboneError(f"config override(s) {unknown} are not DINOv2 config fields; allowed: {list(_CONFIG_FIELDS)}")
    width = overrides.pop("intermediate_size", None)
    values.update(overrides)
    if width is not None:
        ratio = _ratio_for_width(int(values["hidden_size"]), int(width), bool(values["use_swiglu_ffn"]))
        if ratio is None:
            raise BackboneError(f"intermediate_size={width} is not reachable with an integer mlp_ratio for "
                                f"hidden_size={values['hidden_size']}")
        values["mlp_ratio"] = ratio
    if int(values["hidden_size"]) % int(values["num_attention_heads"]):
        raise BackboneError(f"hidden_size={values['hidden_size']} is not divisible by "
                            f"num_attention_heads={values['num_attention_heads']}")
    if spec.registers:
        values.setdefault("num_register_tokens", spec.registers)
        return Dinov2WithRegistersConfig(attn_implementation="sdpa", **values)
    if values.pop("num_register_tokens", 0):
        raise BackboneError(f"{spec.name!r} has no register tokens; use {spec.name + '_reg'!r}")
    return Dinov2Config(attn_implementation="sdpa", **values)


def _model_class(spec: BackboneSpec):
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    return Dinov2WithRegistersModel if spec.registers else Dinov2Model


def _empty_model(spec: BackboneSpec, config) -> torch.nn.Module:
    """The model with its parameters on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return _model_class(spec)(config)


# ----------------------------------------------------------------------------------------------------------
# Meta's checkpoints -> transformers names

_BLOCK = re.compile(r"^blocks\.(?:\d+\.)?(\d+)\.(.+)$")  # 'blocks.3.x' and chunked 'blocks.0.3.x'
_TOP_LEVEL = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_IN_BLOCK = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attn.proj.weight": "attention.o_proj.weight", "attn.proj.bias": "attention.o_proj.bias",
    "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    "mlp.w3.weight": "mlp.down_proj.weight", "mlp.w3.bias": "mlp.down_proj.bias",
}
#: Fused tensors split along dim 0 into equal parts: Meta's qkv, and SwiGLU's w12 = [gate; up]
#: (Meta computes silu(x1) * x2 with x1, x2 = w12(x).chunk(2)).
_SPLIT = {
    "attn.qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    "mlp.w12": ("mlp.gate_proj", "mlp.up_proj"),
}


def _unwrap_state_dict(state: Any) -> dict[str, torch.Tensor]:
    """Accept {name: tensor}, or one level of {'model'|'state_dict'|'teacher': {...}}; strip 'module.'/'backbone.'."""
    if isinstance(state, dict):
        for key in ("model", "state_dict", "teacher"):
            if key in state and isinstance(state[key], dict) and "cls_token" not in state:
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError("not a state dict of tensors")
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith("head."):  # Meta's classifier head (Identity in the hub backbones)
            out[key] = value
    return out


def convert_meta_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Meta's DINOv2 keys (``dinov2/models/vision_transformer.py``) to the transformers 5 names.

    The rename of Hugging Face's conversion script (``convert_dinov2_to_hf.py``), written for the current
    module names: ``blocks.i.attn.qkv`` -> ``encoder.layer.i.attention.{q,k,v}_proj`` (thirds along dim 0),
    ``attn.proj`` -> ``attention.o_proj``, ``ls1.gamma`` -> ``layer_scale1.lambda1``, ``mlp.fc1/fc2`` kept,
    SwiGLU ``mlp.w12`` -> ``mlp.gate_proj`` + ``mlp.up_proj`` (halves), ``mlp.w3`` -> ``mlp.down_proj``,
    ``patch_embed.proj`` -> ``embeddings.patch_embeddings.projection``, ``pos_embed`` ->
    ``embeddings.position_embeddings``, ``cls_token`` / ``mask_token`` / ``register_tokens`` ->
    ``embeddings.*``, ``norm`` -> ``layernorm``. Values are float32 copies (split parts never share memory).
    Raises BackboneError naming the keys it does not know.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        tensor = tensor.detach().to(torch.float32)
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = tensor.clone()
            continue
        match = _BLOCK.match(key)
        if match is None:
            unknown.append(key)
            continue
        layer, rest = int(match.group(1)), match.group(2)
        prefix = f"encoder.layer.{layer}."
        stem, _, kind = rest.rpartition(".")
        if rest in _IN_BLOCK:
            out[prefix + _IN_BLOCK[rest]] = tensor.clone()
        elif stem in _SPLIT:
            targets = _SPLIT[stem]
            if tensor.shape[0] % len(targets):
                raise BackboneError(f"{key} has {tensor.shape[0]} rows, not divisible into {len(targets)} parts")
            for target, part in zip(targets, tensor.chunk(len(targets), dim=0)):
                out[f"{prefix}{target}.{kind}"] = part.clone()
        else:
            unknown.append(key)
    if unknown:
        raise BackboneError(f"unexpected key(s) for a DINOv2 checkpoint: {unknown[:6]}"
                            f"{' ...' if len(unknown) > 6 else ''}")
    return out


def infer_meta_architecture(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Config values read from the shapes of a Meta DINOv2 state dict.

    Returns {'hidden_size', 'num_hidden_layers', 'mlp_ratio', 'use_swiglu_ffn', 'num_register_tokens',
    'patch_size', 'image_size'}; the head count cannot be read from shapes (see ``load_backbone``).
    Raises BackboneError naming the missing keys when the dict is not a DINOv2 ViT.
    """
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
    missing = [key for key in required if key not in state]
    if missing or not any(_BLOCK.match(key) for key in state):
        found = list(state)[:6]
        raise BackboneError(f"missing DINOv2 key(s) {missing or ['blocks.*']} (found e.g. {found})")
    hidden = int(state["cls_token"].shape[-1])
    projection = state["patch_embed.proj.weight"]
    patch = int(projection.shape[-1])
    positions = int(state["pos_embed"].shape[1]) - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise BackboneError(f"pos_embed has {positions} patch positions, not a square grid")
    layers = sorted({int(m.group(1)) for m in map(_BLOCK.match, state) if m})
    if layers != list(range(len(layers))):
        raise BackboneError(f"block indices are not 0..{len(layers) - 1}: {layers[:5]} ...")
    swiglu = "blocks.0.mlp.w12.weight" in state or any(k.endswith(".0.mlp.w12.weight") for k in state)
    width_suffix = "mlp.w12.weight" if swiglu else "mlp.fc1.weight"
    width_key = next((k for k in state if _BLOCK.match(k) and k.endswith(width_suffix)), None)
    if width_key is None:
        raise BackboneError("no MLP weights (blocks.*.mlp.fc1 or mlp.w12) found")
    width = int(state[width_key].shape[0]) // (2 if swiglu else 1)
    ratio = _ratio_for_width(hidden, width, swiglu)
    if ratio is None:
        raise BackboneError(f"MLP width {width} for hidden size {hidden} matches no integer mlp_ratio")
    registers = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
    return dict(hidden_size=hidden, num_hidden_layers=len(layers), mlp_ratio=ratio, use_swiglu_ffn=swiglu,
                num_register_tokens=registers, patch_size=patch, image_size=grid * patch)


def _registered_name(arch: dict[str, Any]) -> str | None:
    """The registered name of the architecture ``infer_meta_architecture`` read, or None."""
    return spec_for_architecture(arch["hidden_size"], arch["num_hidden_layers"], arch["num_register_tokens"])


# ----------------------------------------------------------------------------------------------------------
# Where the weights come from


def _missing_weights_message(spec: BackboneSpec, problem: str) -> str:
    return (
        f"{problem}. Three ways to provide the weights of {spec.name!r}: "
        f"(1) download them once with network access into the Hugging Face cache, e.g. "
        f"`python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{spec.hf_repo}')\"` "
        f"(later runs work offline; set HF_HUB_OFFLINE=1 to never wait for the network); "
        f"(2) point --weights PATH at a local Hugging Face model folder (config.json + model.safetensors) "
        f"or at Meta's official {spec.meta_checkpoint}; "
        f"(3) --weights random, for timing and plumbing only (results meaningless). "
        f"The 'filterbank' backbone needs no weights."
    )


_HASH_MEMO: dict[tuple, str] = {}


def _weights_digest(paths: list[Path]) -> str:
    """SHA-256 (first 12 hex digits) over the files' names and bytes; memoised by path, size and mtime."""
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if key not in _HASH_MEMO:
        digest = hashlib.sha256()
        for path in paths:
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    digest.update(chunk)
        _HASH_MEMO[key] = digest.hexdigest()[:12]
    return _HASH_MEMO[key]


def _folder_weight_files(folder: Path) -> list[Path]:
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    return weights


# ----------------------------------------------------------------------------------------------------------
# Backbones


class Backbone:
    """A loaded feature extractor: (H, W) grey image in [0, 1] -> (H/p, W/p, D) float32 patch embeddings.

    Attributes: spec, weights_id, is_random, device (None for the filter bank), precision, embed_dim,
    patch_size. Build it with ``load_backbone`` / ``get_backbone``.
    """

    spec: BackboneSpec
    weights_id: str
    is_random: bool
    device: torch.device | None
    precision: str
    embed_dim: int
    patch_size: int

    def label(self) -> str:
        """One line for the UI/CLI, e.g. 'DINOv2 ViT-S/14 · hub weights facebook/dinov2-small · CPU bf16'."""
        raise NotImplementedError

    def signature(self) -> str:
        """Stable text for the embedding-cache key (everything the embeddings depend on)."""
        raise NotImplementedError

    def _embed_images(self, images01: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _default_batch_size(self) -> int:
        return 1

    def _check_images(self, images01: np.ndarray) -> np.ndarray:
        images = np.asarray(images01)
        real = np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)
        if images.ndim != 3 or not real:
            raise ValueError(f"expected (N, H, W) real images in [0, 1], got shape {images.shape} dtype {images.dtype}")
        height, width = images.shape[1:]
        p = self.patch_size
        if height < p or width < p or height % p or width % p:
            raise ValueError(f"image is {height} x {width} pixels, not a positive multiple of the patch size {p}; "
                             f"resize it first (e.g. to {max(p, height // p * p)} x {max(p, width // p * p)})")
        return np.ascontiguousarray(images, dtype=np.float32)

    def embed(self, image01: np.ndarray) -> np.ndarray:
        """Patch embeddings of one image.

        image01 : (H, W) float grey image in [0, 1], H and W multiples of ``patch_size`` (the caller clips,
            rescales and resizes, ``core.preprocess``).
        Returns (H/p, W/p, D) float32 numpy (CPU). DINOv2: the last layer's layer-normed patch tokens
        (CLS and register tokens dropped). Filter bank: ``core.features.filterbank.patch_features``.
        Raises ValueError for a non-2-D image or a size that is not a multiple of the patch size.

        >>> backbone = load_backbone("filterbank")
        >>> backbone.embed(np.zeros((28, 42), np.float32)).shape[:2]
        (2, 3)
        """
        image = np.asarray(image01)
        if image.ndim != 2:
            raise ValueError(f"expected one (H, W) grey image, got shape {image.shape}")
        return self.embed_batch(image[None])[0]

    def embed_batch(self, images01: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """(N, H, W) float images in [0, 1] -> (N, H/p, W/p, D) float32, ``batch_size`` images per forward pass
        (default 8 on CUDA, 1 on CPU/MPS where batching gains nothing)."""
        images = self._check_images(images01)
        step = max(1, int(batch_size or self._default_batch_size()))
        parts = [self._embed_images(images[i:i + step]) for i in range(0, len(images), step)]
        if not parts:
            h, w = images.shape[1] // self.patch_size, images.shape[2] // self.patch_size
            return np.zeros((0, h, w, self.embed_dim), np.float32)
        return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]

    def __repr__(self) -> str:
        return f"<Backbone {self.label()}>"


_PRECISION_SHORT = {"fp32": "fp32", "bf16-weights": "bf16", "bf16-autocast": "bf16 autocast",
                    "fp16-autocast": "fp16 autocast", "numpy": "numpy"}


class Dinov2Backbone(Backbone):
    """A transformers DINOv2 model with its weights, device and precision (see ``Backbone``).

    ``precision`` is fixed at construction: for 'bf16-weights' the model is converted to bfloat16 in place
    (``model`` is then the bf16 module); the other precisions keep float32 weights.
    """

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, weights_id: str, weights_text: str, *,
                 is_random: bool, device: torch.device, precision: str) -> None:
        self.spec = spec
        self.model = model
        self.weights_id = weights_id
        self._weights_text = weights_text
        self.is_random = is_random
        self.device = device
        self.precision = normalize_precision(precision)
        self._dtype, self._autocast = compute_dtypes(self.precision)
        if self._dtype != torch.float32:
            # converted once: autocast would re-cast every weight on every call, and its float32 residual
            # stream costs a cast before and after every matmul (docs/backbones.md, "Device and precision")
            model.to(self._dtype)
        config = model.config
        self.embed_dim = int(config.hidden_size)
        patch = config.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        self.registers = int(getattr(config, "num_register_tokens", 0)) if spec.registers else 0
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def label(self) -> str:
        weights = RANDOM_LABEL if self.is_random else self._weights_text
        device = describe_device(self.device).split(" (")[0].split(":")[0]
        return f"{self.spec.title} · {weights} · {device} {_PRECISION_SHORT[self.precision]}"

    def signature(self) -> str:
        return (f"{SIGNATURE_VERSION}|{self.spec.name}|weights={self.weights_id}|precision={self.precision}"
                f"|dim={self.embed_dim}|patch={self.patch_size}|tokens=last-layernorm-patch"
                f"|posinterp={POS_INTERPOLATION[self.registers and 4]}")

    def _default_batch_size(self) -> int:
        return 8 if self.device.type == "cuda" else 1

    def _embed_images(self, images01: np.ndarray) -> np.ndarray:
        count, height, width = images01.shape
        grey = torch.from_numpy(images01).to(self.device)[:, None]
        pixels = (grey.expand(-1, 3, -1, -1) - self._mean) / self._std  # grey -> RGB, ImageNet normalisation
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self._autocast or torch.float32,
                                                    enabled=self._autocast is not None):
            tokens = self.model(pixel_values=pixels.to(self._dtype)).last_hidden_state
        patches = tokens[:, 1 + self.registers:, :].float()
        grid = patches.reshape(count, height // self.patch_size, width // self.patch_size, self.embed_dim)
        return grid.cpu().numpy()


class FilterBankBackbone(Backbone):
    """``core.features.filterbank`` features as a backbone: numpy on the CPU, deterministic, no weights."""

    def __init__(self, spec: BackboneSpec, config: "filterbank.FilterBankConfig") -> None:
        self.spec = spec
        self.config = config
        self.weights_id = "none"
        self.is_random = False
        self.device = None
        self.precision = "numpy"
        self.embed_dim = config.n_features
        self.patch_size = spec.patch_size

    def label(self) -> str:
        return f"{self.spec.title} · {self.embed_dim} features, no weights · CPU numpy"

    def signature(self) -> str:
        return (f"{SIGNATURE_VERSION}|{self.spec.name}|weights=none|precision=numpy|dim={self.embed_dim}"
                f"|patch={self.patch_size}|features={self.config.signature()}")

    def _embed_images(self, images01: np.ndarray) -> np.ndarray:
        return np.stack([filterbank.patch_features(image, self.patch_size, self.config) for image in images01])


# ----------------------------------------------------------------------------------------------------------
# Loading


_RANDOM_POOL = 1 << 22  # 4 Mi normal samples shared by all parameters of a random model


def _random_init_(model: torch.nn.Module, config, seed: int) -> None:
    """Seeded fast init in place: normal(0, initializer_range) weights, zero biases, unit norms.

    transformers' own init (trunc_normal_ after nn.Linear's kaiming init) takes 30-45 s for ViT-g and even
    a plain ``normal_`` of 1.1 G values ~20-45 s on 2 cores. Here each weight is instead a window, at a
    seeded random offset, of one pool of 4 Mi normal samples (repeated cyclically when larger): ViT-g in a
    few seconds. Good enough for timing and plumbing, which is all random weights are for.
    """
    generator = torch.Generator().manual_seed(int(seed))
    std = float(config.initializer_range)
    pool = torch.randn(_RANDOM_POOL, generator=generator) * std
    with torch.no_grad():
        for module in model.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.LayerNorm):
                    parameter.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias" or name in ("mask_token", "register_tokens"):
                    parameter.zero_()
                elif name == "lambda1":
                    parameter.fill_(float(config.layerscale_value))
                else:  # linear/conv weights, cls token, position embeddings
                    flat = parameter.view(-1)
                    start = int(torch.randint(_RANDOM_POOL, (1,), generator=generator))
                    done = 0
                    while done < flat.numel():
                        count = min(flat.numel() - done, _RANDOM_POOL - start)
                        flat[done:done + count].copy_(pool[start:start + count])
                        done, start = done + count, 0


def _finish(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    stuck = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if stuck:
        raise BackboneError(f"internal: tensors without weights after loading: {stuck[:5]}")
    model.requires_grad_(False)
    return model.to(device).eval()


def _load_random(spec: BackboneSpec, seed: int, overrides: dict | None) -> tuple[torch.nn.Module, str, str]:
    config = dinov2_config(spec.name, overrides)
    model = _empty_model(spec, config)
    model.to_empty(device="cpu")
    _random_init_(model, config, seed)
    weights_id = f"random:seed{int(seed)}"
    if overrides:
        weights_id += ":" + ",".join(f"{k}={overrides[k]}" for k in sorted(overrides))
    return model, weights_id, RANDOM_LABEL


def _load_meta_pth(spec: BackboneSpec, path: Path, overrides: dict | None) -> torch.nn.Module:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for pickled code, RuntimeError/EOFError for damaged files
        raise BackboneError(f"cannot read weights file {path}: {type(error).__name__}: {str(error)[:300]} "
                            "(expected Meta's DINOv2 *_pretrain.pth, a plain dict of tensors)") from None
    try:
        state = _unwrap_state_dict(raw)
        arch = infer_meta_architecture(state)
        converted = convert_meta_state_dict(state)
    except BackboneError as error:
        raise BackboneError(f"weights file {path} is not a DINOv2 checkpoint in Meta's format: {error}") from None
    if arch["num_register_tokens"] != spec.registers:
        other = _registered_name(arch) or (spec.name + "_reg" if arch["num_register_tokens"] else spec.name[:-4])
        raise BackboneError(f"weights file {path} has {arch['num_register_tokens']} register tokens but {spec.name!r} "
                            f"has {spec.registers}; use backbone {other!r}")
    overrides = dict(overrides or {})
    if not overrides and (arch["hidden_size"], arch["num_hidden_layers"]) != (spec.embed_dim, spec.n_layers):
        other = _registered_name(arch)
        hint = f"; it is {other!r}" if other else ""
        raise BackboneError(f"weights file {path} holds a ViT with width {arch['hidden_size']} and "
                            f"{arch['num_hidden_layers']} blocks, not {spec.name!r} "
                            f"({spec.embed_dim}, {spec.n_layers}){hint}")
    clashes = {k: (v, arch[k]) for k, v in overrides.items() if k in arch and v != arch[k]}
    if clashes:
        raise BackboneError(f"config overrides contradict the shapes in {path}: {clashes} (override, file)")
    values = {**overrides, **arch}
    values.pop("intermediate_size", None)
    if "num_attention_heads" not in values:
        if arch["hidden_size"] == spec.embed_dim:
            values["num_attention_heads"] = dinov2_arch(spec.name).heads
        elif arch["hidden_size"] % _DINOV2_HEAD_DIM == 0:
            values["num_attention_heads"] = arch["hidden_size"] // _DINOV2_HEAD_DIM
        else:
            raise BackboneError(f"cannot tell the number of attention heads of {path} from its shapes; "
                                "pass config_overrides={'num_attention_heads': N}")
    if not spec.registers:
        values.pop("num_register_tokens")
    config = dinov2_config(spec.name, values)
    model = _empty_model(spec, config)
    expected = set(model.state_dict())
    if "embeddings.mask_token" in expected and "embeddings.mask_token" not in converted:
        converted["embeddings.mask_token"] = torch.zeros(1, arch["hidden_size"])  # unused at inference
    missing, extra = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or extra:
        raise BackboneError(f"weights file {path} does not fit {spec.name!r}: "
                            f"missing {missing[:5]}, unexpected {extra[:5]}")
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as error:
        raise BackboneError(f"weights file {path} does not fit {spec.name!r}: {str(error)[:400]}") from None
    return model


def _load_hf_folder(spec: BackboneSpec, folder: Path) -> torch.nn.Module:
    config_path = folder / "config.json"
    if not config_path.is_file() or not _folder_weight_files(folder):
        raise BackboneError(f"weights folder {folder} is not a Hugging Face model folder: it needs config.json and "
                            "model.safetensors (or pytorch_model.bin)")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise BackboneError(f"cannot read {config_path}: {error}") from None
    expected = "dinov2_with_registers" if spec.registers else "dinov2"
    if model_type != expected:
        raise BackboneError(f"{config_path} describes a {model_type!r} model, but {spec.name!r} needs {expected!r}"
                            f"{' (use the _reg backbone)' if model_type == 'dinov2_with_registers' else ''}")
    try:
        model, info = _model_class(spec).from_pretrained(
            str(folder), local_files_only=True, dtype=torch.float32, attn_implementation="sdpa",
            output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise BackboneError(f"cannot load the model folder {folder}: {str(error)[:400]}") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise BackboneError(f"model folder {folder} does not fit {spec.name!r}: {bad}")
    return model


def _load_hub(spec: BackboneSpec) -> tuple[torch.nn.Module, str]:
    """(model, commit) from the Hugging Face cache, downloaded into it first when missing.

    A cached weights file that is cut short (``weights_file_problem``) is never loaded: with network
    access it is deleted and downloaded again, under HF_HUB_OFFLINE the load is refused naming the file.
    """
    cache_dir = hf_cache_dir()
    snapshot = cached_snapshot(spec.hf_repo, cache_dir)
    if snapshot is not None and snapshot.damaged:
        problems = "; ".join(f"{path.name}: {problem}" for path, problem in snapshot.damaged)
        if hf_offline():
            raise BackboneError(_missing_weights_message(
                spec, f"the cached weights of {spec.hf_repo} in {snapshot.folder} are incomplete ({problems}) and "
                      f"HF_HUB_OFFLINE is set, so they cannot be downloaded again; with network access, unset "
                      f"HF_HUB_OFFLINE and load again (the file is replaced), or delete "
                      f"{_repo_cache_folder(cache_dir, spec.hf_repo)}"))
        for path, _ in snapshot.damaged:
            _discard_cached_file(path)
        snapshot = None
    commit = snapshot.commit if snapshot is not None else _download_hub(spec, cache_dir)
    try:
        model = _model_class(spec).from_pretrained(
            spec.hf_repo, cache_dir=str(cache_dir), revision=commit, local_files_only=True,
            dtype=torch.float32, attn_implementation="sdpa")
    except (OSError, ValueError, RuntimeError, _safetensors_error()) as error:
        raise BackboneError(_missing_weights_message(
            spec, f"loading {spec.hf_repo} from the cache {cache_dir} failed: {str(error)[:300]}")) from None
    return model, commit


def _download_hub(spec: BackboneSpec, cache_dir: Path) -> str:
    """Download config.json and the weights of ``spec.hf_repo`` (main revision) into the cache; the commit.

    Fails at once under HF_HUB_OFFLINE; otherwise one metadata request with a 5 s timeout decides whether
    the hub (``HF_ENDPOINT``, default huggingface.co) is reachable and lists the repo's files.
    """
    if hf_offline():
        raise BackboneError(_missing_weights_message(
            spec, f"the weights {spec.hf_repo} are not in the Hugging Face cache {cache_dir} and HF_HUB_OFFLINE is set"))
    from huggingface_hub import HfApi

    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        info = HfApi(endpoint=endpoint).model_info(spec.hf_repo, timeout=_HUB_TIMEOUT_S)
    except Exception as error:  # no network, DNS failure, proxy, offline mode: all mean "cannot download now"
        raise BackboneError(_missing_weights_message(
            spec, f"the weights {spec.hf_repo} are not in the Hugging Face cache {cache_dir} and the hub "
                  f"cannot be reached ({type(error).__name__})")) from None
    names = {sibling.rfilename for sibling in info.siblings or []}
    files = _hub_files(names) if names else ["config.json", "model.safetensors"]  # a mirror may omit the list
    if not files:
        raise BackboneError(_missing_weights_message(
            spec, f"the hub repo {spec.hf_repo} holds no config.json with model.safetensors or pytorch_model.bin "
                  f"(it has: {sorted(names)[:8]})"))
    for name in files:
        path = _download_file(spec, name, cache_dir, endpoint)
        if name.endswith(".index.json"):  # sharded weights: the index names the shards
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as error:
                raise BackboneError(f"the weights index {path} of {spec.hf_repo} is unreadable ({error}); "
                                    f"delete it and load again") from None
            for shard in shards:
                _download_file(spec, shard, cache_dir, endpoint)
    snapshot = cached_snapshot(spec.hf_repo, cache_dir)
    if snapshot is None or snapshot.damaged:  # the repo changed between files (a new commit on main)
        raise BackboneError(_missing_weights_message(
            spec, f"the files of {spec.hf_repo} downloaded into {cache_dir} do not form one complete snapshot "
                  "(the repo may have changed during the download); run the same command again"))
    return snapshot.commit


def _hub_files(names: set[str]) -> list[str]:
    """The files of a hub repo a load reads: config.json and one set of weights (safetensors first, as
    transformers prefers them); [] when the repo has no config.json or no weights."""
    if "config.json" not in names:
        return []
    for weights in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if weights in names:
            return ["config.json", weights]
    return []


def _download_file(spec: BackboneSpec, filename: str, cache_dir: Path, endpoint: str | None) -> Path:
    """One file of ``spec.hf_repo`` (main revision) into the Hugging Face cache, whole; its snapshot path.

    huggingface_hub writes into a temporary file, resumes a dropped connection itself, compares the bytes
    received with the size the hub announced and only then moves the file into the cache. A file that still
    fails, or arrives cut short (``weights_file_problem``, e.g. a proxy that announced the short size), is
    deleted and fetched once more; a second failure is a BackboneError and nothing partial stays cached.
    """
    from huggingface_hub import hf_hub_download

    problem = ""
    for _attempt in range(2):
        try:
            path = Path(hf_hub_download(spec.hf_repo, filename, revision="main", cache_dir=str(cache_dir),
                                        endpoint=endpoint))
        except Exception as error:  # huggingface_hub's OSErrors and its HTTP library's transport errors alike
            problem = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
            continue
        problem = weights_file_problem(path) or ""
        if not problem:
            return path
        _discard_cached_file(path)
    raise BackboneError(_missing_weights_message(
        spec, f"downloading {filename} of {spec.hf_repo} from {endpoint or 'https://huggingface.co'} failed twice "
              f"({problem}); nothing incomplete was kept in the cache {cache_dir}, so running the same command "
              f"again retries the download"))


def _repo_cache_folder(cache_dir: Path, repo: str) -> Path:
    """The cache folder of one model repo (huggingface_hub's layout: models--{owner}--{name})."""
    return cache_dir / ("models--" + repo.replace("/", "--"))


def _discard_cached_file(path: Path) -> None:
    """Delete a file of a cache snapshot and the blob its link points to, so that it is downloaded anew."""
    blob = path.resolve()
    try:
        path.unlink(missing_ok=True)
        if blob.parent == path.parents[2].resolve() / "blobs":  # snapshots/<commit>/<file> -> ../../blobs/<etag>
            blob.unlink(missing_ok=True)
    except OSError as error:
        raise BackboneError(f"the cached weights file {path} is incomplete and cannot be deleted ({error.strerror}); "
                            f"delete it (and {blob}) by hand, then load again") from None


def _safetensors_error() -> type[Exception]:
    from safetensors import SafetensorError  # a dependency of transformers; lazy like transformers itself

    return SafetensorError


def _resolve_precision(device: torch.device, precision: str | None) -> str:
    return default_precision(device) if precision in (None, "auto") else normalize_precision(precision)


def load_backbone(name: str, weights: str = "hub", *, device: str | None = None, precision: str | None = None,
                  seed: int = 0, config_overrides: dict | None = None) -> Backbone:
    """Build a backbone (a new model on every call; ``get_backbone`` memoises).

    name : a key of ``BACKBONES``.
    weights : 'hub' (Hugging Face cache, downloads once if the hub is reachable), 'random' (seeded, timing only)
        or a path to a Hugging Face model folder or Meta's ``*_pretrain.pth``. Ignored for 'filterbank'.
    device : None/'auto' (CUDA, MPS, CPU), 'cpu', 'cuda', 'cuda:N', 'mps'. Ignored for 'filterbank'.
    precision : None (``core.devices.default_precision``), 'fp32', 'bf16-weights' (the model converted to
        bfloat16), 'bf16-autocast' or 'fp16-autocast'.
    seed : for 'random' weights.
    config_overrides : tests/benchmarks: config fields of a tiny model of the same architecture (random),
        or fields a .pth cannot tell (num_attention_heads); a folder's config.json is used as it is.
        For 'filterbank': ``FilterBankConfig`` fields, e.g. {'sigmas': (1.0, 4.0)}.
    Raises BackboneError naming the problem and the ways to get weights (unknown name, missing or
    unreadable weights, unavailable device).

    >>> load_backbone("filterbank").weights_id
    'none'
    """
    spec = get_spec(name)
    if spec.family == "filterbank":
        if precision not in (None, "auto", "numpy"):
            raise BackboneError(f"the filter bank runs in numpy float32; precision {precision!r} does not apply")
        try:
            config = filterbank.FilterBankConfig(**(config_overrides or {}))
        except (TypeError, ValueError) as error:
            raise BackboneError(f"filter bank settings {config_overrides}: {error}") from None
        return FilterBankBackbone(spec, config)

    torch_device = select_device(device)
    resolved_precision = _resolve_precision(torch_device, precision)
    text = str(weights).strip()
    is_random = text.lower() == "random"
    if is_random:
        model, weights_id, weights_text = _load_random(spec, seed, config_overrides)
    elif text.lower() == "hub":
        model, commit = _load_hub(spec)
        weights_id, weights_text = f"hub:{spec.hf_repo}@{commit}", f"hub weights {spec.hf_repo}"
    else:
        path = Path(text).expanduser().resolve()
        if not path.exists():
            raise BackboneError(_missing_weights_message(spec, f"weights path {path} does not exist"))
        if path.is_dir():
            model = _load_hf_folder(spec, path)
            files = [path / "config.json"] + _folder_weight_files(path)
        else:
            model = _load_meta_pth(spec, path, config_overrides)
            files = [path]
        weights_id, weights_text = f"file:{path}#{_weights_digest(files)}", f"weights {path.name}"
    model = _finish(model, torch_device)
    return Dinov2Backbone(spec, model, weights_id, weights_text, is_random=is_random, device=torch_device,
                          precision=resolved_precision)


_MEMO: dict[tuple, Backbone] = {}
_MEMO_LOCK = threading.Lock()


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def get_backbone(name: str, weights: str = "hub", **kw: Any) -> Backbone:
    """``load_backbone`` once per process: the same arguments return the same ``Backbone`` object.

    The memo key is (name, weights, device, precision, seed, config_overrides) with the device and precision
    resolved first (so None and 'cpu' share an entry on a CPU machine) and a weights path made absolute.
    A failed load is not remembered. ``clear_backbone_memo()`` frees the models.
    The Streamlit app uses ``st.cache_resource`` around ``load_backbone`` instead.
    """
    spec = get_spec(name)
    if spec.family == "filterbank":
        key = (spec.name, "none", None, "numpy", 0, _freeze(kw.get("config_overrides")))
    else:
        device = select_device(kw.get("device"))
        precision = _resolve_precision(device, kw.get("precision"))
        text = str(weights).strip()
        weights_key = text.lower() if text.lower() in ("hub", "random") else str(Path(text).expanduser().resolve())
        key = (spec.name, weights_key, str(device), precision, int(kw.get("seed", 0)),
               _freeze(kw.get("config_overrides")))
        kw = {**kw, "device": str(device), "precision": precision}
    with _MEMO_LOCK:
        if key not in _MEMO:
            _MEMO[key] = load_backbone(spec.name, weights, **kw)
        return _MEMO[key]


def clear_backbone_memo() -> None:
    """Forget every backbone ``get_backbone`` holds (their memory is freed when no one else uses them)."""
    with _MEMO_LOCK:
        _MEMO.clear()
