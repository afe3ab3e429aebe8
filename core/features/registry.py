"""The backbone registry: stable names -> facts, and the default-backbone rule, without importing torch.

Names: ``dinov2_vits14``, ``dinov2_vitb14``, ``dinov2_vitl14``, ``dinov2_vitg14``, the register variants
``dinov2_vit{s,b,l,g}14_reg`` (4 register tokens), and ``filterbank`` (offline, no weights,
``core.features.filterbank``). Each name has a ``BackboneSpec`` (patch size, embedding dim, layers,
parameter count, title); the DINOv2 names also have a ``Dinov2Arch`` (width, depth, heads, MLP kind) that
``core.features.backbones`` turns into a transformers config.

Everything here is plain Python (the Hugging Face cache is looked up through ``huggingface_hub``, which
does not import torch), so the app, the CLI's help and the benchmarks can list backbones and choose the
default without paying torch's start-up time. Loading a backbone is ``core.features.backbones``.

>>> get_spec("dinov2_vitb14").embed_dim, get_spec("filterbank").patch_size
(768, 14)
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import BackboneError
from core.features.filterbank import FilterBankConfig

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "CachedSnapshot",
    "DEFAULT_BACKBONE",
    "Dinov2Arch",
    "OFFLINE_BACKBONE",
    "RANDOM_LABEL",
    "cached_commit",
    "cached_snapshot",
    "default_backbone_name",
    "dinov2_arch",
    "get_spec",
    "hf_cache_dir",
    "hf_offline",
    "spec_for_architecture",
    "weights_file_problem",
    "weights_status",
]

#: Shown wherever a backbone with random weights is named (labels, reports, warnings).
RANDOM_LABEL = "RANDOM WEIGHTS (timing only, results meaningless)"
#: The backbone used when its hub weights are cached, and the one that needs no weights at all.
DEFAULT_BACKBONE = "dinov2_vits14"
OFFLINE_BACKBONE = "filterbank"


@dataclass(frozen=True)
class BackboneSpec:
    """Facts about one registered backbone (no weights are touched to read them)."""

    name: str  # 'dinov2_vits14', ..., 'filterbank'
    family: str  # 'dinov2' | 'filterbank'
    patch_size: int  # pixels
    embed_dim: int  # D of the patch embeddings
    n_layers: int  # transformer blocks (0 for the filter bank)
    n_params: int  # parameters at 518 px (position embeddings included)
    hf_repo: str | None
    meta_checkpoint: str | None  # file name of Meta's official weights
    registers: int  # register tokens: 0 or 4
    title: str  # 'DINOv2 ViT-S/14', 'Filter bank (offline)'


@dataclass(frozen=True)
class Dinov2Arch:
    """The architecture of one DINOv2 size (shared by its plain and register variants)."""

    letter: str  # 's', 'b', 'l', 'g'
    size: str  # Hugging Face repo suffix: 'small', ...
    hidden: int  # embedding width
    layers: int  # transformer blocks
    heads: int  # attention heads
    swiglu: bool  # SwiGLU MLP (ViT-g) instead of a plain one
    params: tuple[int, int]  # without / with 4 registers, counted on the meta device at 518 px


_ARCHS = (
    Dinov2Arch("s", "small", 384, 12, 6, False, (22_056_576, 22_058_112)),
    Dinov2Arch("b", "base", 768, 12, 12, False, (86_580_480, 86_583_552)),
    Dinov2Arch("l", "large", 1024, 24, 16, False, (304_368_640, 304_372_736)),
    Dinov2Arch("g", "giant", 1536, 40, 24, True, (1_136_480_768, 1_136_486_912)),
)


def _dinov2_spec(arch: Dinov2Arch, registers: int) -> BackboneSpec:
    reg = "_reg" if registers else ""
    letter = arch.letter.upper() if arch.letter != "g" else "g"
    return BackboneSpec(
        name=f"dinov2_vit{arch.letter}14{reg}",
        family="dinov2",
        patch_size=14,
        embed_dim=arch.hidden,
        n_layers=arch.layers,
        n_params=arch.params[1 if registers else 0],
        hf_repo=f"facebook/dinov2-{'with-registers-' if registers else ''}{arch.size}",
        meta_checkpoint=f"dinov2_vit{arch.letter}14{'_reg4' if registers else ''}_pretrain.pth",
        registers=registers,
        title=f"DINOv2 ViT-{letter}/14{' + registers' if registers else ''}",
    )


def _build_registry() -> tuple[dict[str, BackboneSpec], dict[str, Dinov2Arch]]:
    specs: dict[str, BackboneSpec] = {}
    archs: dict[str, Dinov2Arch] = {}
    for registers in (0, 4):
        for arch in _ARCHS:
            spec = _dinov2_spec(arch, registers)
            specs[spec.name] = spec
            archs[spec.name] = arch
    specs[OFFLINE_BACKBONE] = BackboneSpec(
        name=OFFLINE_BACKBONE, family="filterbank", patch_size=14, embed_dim=FilterBankConfig().n_features,
        n_layers=0, n_params=0, hf_repo=None, meta_checkpoint=None, registers=0, title="Filter bank (offline)",
    )
    return specs, archs


#: Every registered backbone by its stable name, in display order (plain DINOv2 S..g, registers S..g, filter bank).
BACKBONES: dict[str, BackboneSpec]
_ARCH_BY_NAME: dict[str, Dinov2Arch]
BACKBONES, _ARCH_BY_NAME = _build_registry()


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name`` (case and surrounding spaces ignored); BackboneError listing the valid
    names otherwise."""
    key = str(name).strip().lower()
    if key not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[key]


def dinov2_arch(name: str) -> Dinov2Arch:
    """The architecture of a registered DINOv2 backbone; BackboneError for the filter bank or an unknown name."""
    spec = get_spec(name)
    if spec.name not in _ARCH_BY_NAME:
        raise BackboneError(f"backbone {spec.name!r} is not a DINOv2 ViT")
    return _ARCH_BY_NAME[spec.name]


def spec_for_architecture(hidden_size: int, n_layers: int, registers: int) -> str | None:
    """The registered DINOv2 name with this width, depth and register count, or None."""
    for spec in BACKBONES.values():
        if spec.family == "dinov2" and (spec.embed_dim, spec.n_layers, spec.registers) == (hidden_size, n_layers, registers):
            return spec.name
    return None


# ----------------------------------------------------------------------------------------------------------
# Is a backbone's hub weights in the local Hugging Face cache? (no network, no torch)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it at import)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hf_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids the network."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def weights_file_problem(path: Path) -> str | None:
    """Why a weights file cannot be whole, or None; reads only its header (milliseconds, even for ViT-g's 4.5 GB).

    ``*.safetensors``: the file must be exactly 8 + header length + the end of its last tensor bytes long,
    the check safetensors itself makes on loading ("incomplete metadata, file not fully covered").
    PyTorch ``*.bin`` zip archives: the end-of-archive record must be there (a cut zip loses it).
    Any other file: None (nothing to check).

    >>> weights_file_problem(Path("config.json")) is None
    True
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return _safetensors_problem(path)
        if path.suffix == ".bin":
            with open(path, "rb") as stream:
                is_zip_start = stream.read(4) == b"PK\x03\x04"
            # legacy pickled .bin files (no zip) cannot be checked this way; only a cut zip is reported
            return "a zip archive without its end record (cut short)" if is_zip_start and not zipfile.is_zipfile(path) else None
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as stream:
        head = stream.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors header"
        header_size = int.from_bytes(head, "little")
        if header_size > size - 8:
            return f"{size} bytes, but its header alone claims {header_size + 8}"
        try:
            header = json.loads(stream.read(header_size))
            ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its safetensors header is not valid JSON with data_offsets"
    expected = 8 + header_size + max(ends, default=0)
    if size != expected:
        return f"{size} bytes, but its safetensors header describes {expected}"
    return None


@dataclass(frozen=True)
class CachedSnapshot:
    """A snapshot of a hub repo in the Hugging Face cache that holds config.json and the weights."""

    commit: str  # 40 hex digits (refs/main -> snapshots/<commit>)
    folder: Path  # .../models--facebook--dinov2-small/snapshots/<commit>
    weights: tuple[Path, ...]  # the weights files a load reads (one file, or every shard)
    damaged: tuple[tuple[Path, str], ...]  # (file, ``weights_file_problem``) of weights that are cut short


def cached_snapshot(repo: str, cache_dir: Path, check: bool = True) -> CachedSnapshot | None:
    """The cached snapshot of ``repo``'s main revision holding config.json and weights (whole or damaged),
    or None. No network; with ``check`` the weights' headers are read (``weights_file_problem``), else
    ``damaged`` is empty."""
    from huggingface_hub import try_to_load_from_cache  # its import costs ~0.3 s; only needed here

    config = try_to_load_from_cache(repo, "config.json", cache_dir=str(cache_dir))
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    weights: list[Path] = []
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, name, cache_dir=str(cache_dir))
        if isinstance(path, str) and Path(path).parent == folder:
            weights = [Path(path)]
            break
    if not weights:
        index = try_to_load_from_cache(repo, "model.safetensors.index.json", cache_dir=str(cache_dir))
        if not (isinstance(index, str) and Path(index).parent == folder):
            return None
        try:  # sharded weights: every shard present
            shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        weights = [folder / shard for shard in shards]
        if not shards or not all(path.is_file() for path in weights):
            return None
    problems = [(path, weights_file_problem(path)) for path in weights] if check else []
    damaged = tuple((path, problem) for path, problem in problems if problem is not None)
    return CachedSnapshot(folder.name, folder, tuple(weights), damaged)


def cached_commit(repo: str, cache_dir: Path) -> str | None:
    """Commit hash of the cached snapshot of ``repo`` holding config.json and weights, or None (no network).

    Presence only: a weights file that is cut short still counts (``cached_snapshot(...).damaged`` names it;
    ``load_backbone`` checks it before loading and downloads it again or refuses).
    """
    snapshot = cached_snapshot(repo, cache_dir, check=False)
    return snapshot.commit if snapshot is not None else None


def weights_status(name: str) -> str:
    """Whether ``load_backbone(name, 'hub')`` can work, without any network wait (files are looked up, not read).

    'cached' (in the Hugging Face cache; always for 'filterbank', which has no weights),
    'offline-only' (not cached and HF_HUB_OFFLINE is set: it cannot be downloaded now),
    'not cached' (a first load would download it, if the network allows).
    """
    spec = get_spec(name)
    if spec.hf_repo is None:
        return "cached"
    if cached_commit(spec.hf_repo, hf_cache_dir()) is not None:
        return "cached"
    return "offline-only" if hf_offline() else "not cached"


def default_backbone_name() -> str:
    """'dinov2_vits14' when its hub weights are cached locally, else the offline 'filterbank'."""
    return DEFAULT_BACKBONE if weights_status(DEFAULT_BACKBONE) == "cached" else OFFLINE_BACKBONE
