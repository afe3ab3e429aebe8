"""The backbone registry (core.features.registry): facts and the default-backbone rule without importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import BackboneError
from core.features import backbones, registry

ROOT = Path(__file__).resolve().parents[1]


def run_fresh(code: str, env_extra: dict | None = None) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line, returned parsed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(env_extra or {})
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_registry_imports_without_torch_or_transformers():
    found = run_fresh("import json, sys, core.features.registry as r; "
                      "print(json.dumps({'heavy': sorted(m for m in ('torch', 'transformers') if m in sys.modules), "
                      "'names': list(r.BACKBONES)}))")
    assert found["heavy"] == []
    assert found["names"] == ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vits14_reg",
                              "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg", "filterbank"]


def test_default_backbone_rule_without_torch(tmp_path):
    """No cached S/14 weights -> 'filterbank'; a cached snapshot (refs/main -> snapshots/<commit>) -> 'dinov2_vits14'.
    Neither answer imports torch."""
    code = ("import json, sys; from core.features.registry import default_backbone_name, weights_status; "
            "print(json.dumps([default_backbone_name(), weights_status('dinov2_vits14'), 'torch' in sys.modules]))")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    assert run_fresh(code, env) == ["filterbank", "offline-only", False]
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--facebook--dinov2-small"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "snapshots" / commit / "model.safetensors").write_bytes(b"")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert run_fresh(code, env) == ["dinov2_vits14", "cached", False]


def test_facts_of_every_name():
    # (embed dim, layers, heads, SwiGLU) of Meta's four sizes; the _reg variants share them
    sizes = {"s": (384, 12, 6, False), "b": (768, 12, 12, False), "l": (1024, 24, 16, False), "g": (1536, 40, 24, True)}
    for letter, (dim, layers, heads, swiglu) in sizes.items():
        for suffix, registers in (("", 0), ("_reg", 4)):
            name = f"dinov2_vit{letter}14{suffix}"
            spec = registry.get_spec(name)
            arch = registry.dinov2_arch(name)
            assert (spec.embed_dim, spec.n_layers, spec.patch_size, spec.registers) == (dim, layers, 14, registers)
            assert (arch.hidden, arch.layers, arch.heads, arch.swiglu) == (dim, layers, heads, swiglu)
            assert registry.spec_for_architecture(dim, layers, registers) == name
    # 4 register tokens of width 384 are the only parameters the _reg variant adds to ViT-S
    assert registry.get_spec("dinov2_vits14_reg").n_params - registry.get_spec("dinov2_vits14").n_params == 4 * 384
    assert registry.get_spec("dinov2_vitl14_reg").title == "DINOv2 ViT-L/14 + registers"
    assert registry.get_spec("dinov2_vitg14").title == "DINOv2 ViT-g/14"
    fb = registry.get_spec(" FilterBank ")
    assert (fb.name, fb.embed_dim, fb.n_params, fb.patch_size, fb.title) == ("filterbank", 1 + 8 * 6, 0, 14,
                                                                            "Filter bank (offline)")
    assert registry.spec_for_architecture(384, 6, 0) is None
    with pytest.raises(BackboneError, match="not a DINOv2 ViT"):
        registry.dinov2_arch("filterbank")
    with pytest.raises(BackboneError, match="choose one of: dinov2_vits14"):
        registry.get_spec("vit_huge")


def test_backbones_re_exports_the_registry():
    """Callers that import the facts from core.features.backbones get the very same objects."""
    for name in ("BACKBONES", "BackboneSpec", "RANDOM_LABEL", "default_backbone_name", "get_spec", "weights_status"):
        assert getattr(backbones, name) is getattr(registry, name)
    assert backbones.load_backbone("filterbank").spec is registry.BACKBONES["filterbank"]
