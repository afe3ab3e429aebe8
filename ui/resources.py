"""Cached heavy objects (backbone, stacks, embedders, embedding cache) and the page context built from them.

Backbones, stacks and embedders live in ``st.cache_resource`` (one per process, shared by sessions); their
cache keys are plain strings and tuples. The on-disk embedding cache makes a slice's embedding a file read
after its first computation, so clicks and threshold moves never re-embed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from core.features.backbones import Backbone, default_backbone_name, load_backbone
from core.config import PipelineConfig
from core.features.embedding import SliceEmbedder
from core.features.embedding_cache import EmbeddingCache, default_cache_dir
from core.errors import ProtoscopeError, StackError
from core.io import Stack, open_stack
from core.io.atomic import write_bytes
from core.preprocess import PreprocessConfig
from ui import settings, state
from ui.state import BackboneChoice, Sample, Truth


def _file_signature(path: str) -> str:
    """Cheap identity for resource keys: size and mtime (a changed file gets a fresh reader)."""
    status = Path(path).stat()
    return f"{status.st_size}:{status.st_mtime_ns}"


@st.cache_resource(max_entries=8, show_spinner=False)
def _stack(path: str, signature: str) -> Stack:
    return open_stack(path)


def open_cached_stack(path: str | Path) -> Stack:
    """The shared, lazily read Stack of ``path`` (StackError for unreadable files)."""
    text = str(path)
    try:
        signature = _file_signature(text)
    except OSError:
        raise StackError(f"'{text}' cannot be found any more; open it again") from None
    stack = _stack(text, signature)
    if stack.closed:  # closed by someone else: open it afresh
        _stack.clear()
        stack = _stack(text, signature)
    return stack


@st.cache_resource(max_entries=4, show_spinner=False)
def _backbone(name: str, weights: str, seed: int, overrides_json: str) -> Backbone:
    overrides = json.loads(overrides_json) if overrides_json else None
    return load_backbone(name, weights, seed=seed, config_overrides=overrides)


def backbone_key(choice: BackboneChoice) -> tuple[str, str, int, str]:
    """Arguments of the cached loader; the hidden test overrides apply to random weights only."""
    overrides = state.get("home.backbone_overrides") if choice.weights == "random" else None
    return choice.name, choice.weights, int(choice.seed), json.dumps(overrides, sort_keys=True) if overrides else ""


def backbone_choice() -> BackboneChoice:
    choice = state.get("home.backbone")
    if choice is None:
        choice = BackboneChoice(default_backbone_name(), "hub")
        state.put("home.backbone", choice)
    return choice


def load_choice(choice: BackboneChoice) -> Backbone:
    """Load (or fetch from the resource cache) a backbone; BackboneError says how to get missing weights.

    Local weights are read only from inside ``settings.weights_root()`` (ProtoscopeError otherwise), whether
    the path was typed, restored from a workspace or imported with one."""
    if choice.weights not in ("hub", "random") and choice.name != "filterbank":
        choice = dataclasses.replace(choice, weights=str(settings.resolve_weights_path(choice.weights)))
    return _backbone(*backbone_key(choice))


def active_backbone() -> Backbone:
    return load_choice(backbone_choice())


@st.cache_resource(max_entries=2, show_spinner=False)
def _embedding_cache(directory: str) -> EmbeddingCache:
    return EmbeddingCache(directory)


def embedding_cache() -> EmbeddingCache:
    """The on-disk embedding cache ($PROTOSCOPE_CACHE or ~/.cache/protoscope/embeddings)."""
    return _embedding_cache(str(default_cache_dir()))


@st.cache_resource(max_entries=8, show_spinner="Preparing the stack (intensity range)…")
def _embedder(path: str, signature: str, channel: int, key: tuple, preprocess_json: str, cache_dir: str) -> SliceEmbedder:
    preprocess = PreprocessConfig.from_dict(json.loads(preprocess_json))
    return SliceEmbedder(_stack(path, signature), channel, _backbone(*key), preprocess, cache=_embedding_cache(cache_dir))


def embedder_for(path: str | Path, channel: int, choice: BackboneChoice, preprocess: PreprocessConfig) -> SliceEmbedder:
    """The shared SliceEmbedder of (stack, channel, backbone, preprocessing): recent embeddings in memory, all
    cached on disk."""
    text = str(path)
    stack = open_cached_stack(text)
    channel = stack.resolve_channel(channel)
    return _embedder(text, _file_signature(text), channel, backbone_key(choice),
                     json.dumps(preprocess.as_dict(), sort_keys=True), str(default_cache_dir()))


def pipeline_config() -> PipelineConfig:
    """The session's mode with its advanced options (ProtoscopeError for a bad option value)."""
    options = {k: v for k, v in state.get("home.options").items() if v not in (None, "")}
    return PipelineConfig.for_mode(state.get("home.mode")).with_options(**options)


@dataclass
class Context:
    """Everything a page needs about the opened sample."""

    sample: Sample
    stack: Stack
    channel: int
    truth: Truth | None
    choice: BackboneChoice
    backbone: Backbone
    config: PipelineConfig
    embedder: SliceEmbedder
    sid: str

    @property
    def n_slices(self) -> int:
        return int(self.stack.shape[0])

    @property
    def slice_shape(self) -> tuple[int, int]:
        return int(self.stack.shape[2]), int(self.stack.shape[3])

    def truth_slice(self, z: int) -> np.ndarray | None:
        """(Y, X) bool ground truth of slice z, or None without a ground truth."""
        if self.truth is None:
            return None
        if self.truth.path is not None:
            mask_stack = open_cached_stack(self.truth.path)
            check_truth_file(mask_stack, self.stack)
            return np.asarray(mask_stack.read_slice(z, 0)) > 0
        return np.asarray(self.stack.read_slice(z, self.truth.channel)) > 0


def check_truth_file(mask_stack: Stack, image: Stack) -> None:
    """StackError unless the mask stack has the image's Z, Y and X."""
    if mask_stack.shape[0] != image.shape[0] or mask_stack.shape[2:] != image.shape[2:]:
        raise StackError(
            f"the mask file '{mask_stack.name}' is {mask_stack.shape[0]} x {mask_stack.shape[2]} x {mask_stack.shape[3]} "
            f"(Z x Y x X) but '{image.name}' is {image.shape[0]} x {image.shape[2]} x {image.shape[3]}; "
            "choose the mask file that belongs to this stack"
        )


def context() -> Context | None:
    """The page context, or None when no sample is open. Raises ProtoscopeError (shown by the page guard)."""
    sample: Sample | None = state.get("home.sample")
    if sample is None:
        return None
    stack = open_cached_stack(sample.path)
    channel = stack.resolve_channel(state.get("home.channel"))
    choice = backbone_choice()
    backbone = load_choice(choice)
    config = pipeline_config()
    embedder = embedder_for(sample.path, channel, choice, config.preprocess)
    return Context(sample, stack, channel, state.get("home.truth"), choice, backbone, config, embedder,
                   state.stack_id(sample.path, channel))


def save_upload(name: str, data: bytes) -> Path:
    """Store an uploaded file under the upload folder (one sub-folder per content hash) and return its path."""
    import hashlib

    if not name or Path(name).name != name:
        raise ProtoscopeError(f"upload name {name!r} is not a plain file name")
    digest = hashlib.sha256(data).hexdigest()[:16]
    folder = settings.upload_dir() / digest
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if not path.exists() or path.stat().st_size != len(data):
        write_bytes(path, data, overwrite=True)
    return path
