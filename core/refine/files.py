"""The refiner's model file: one safetensors file with the weights and a JSON metadata document.

No pickle anywhere: the weights are safetensors tensors, and the header metadata holds one JSON document
under the key ``protoscope.refiner`` (see ``save_refiner``), readable without torch (the safetensors
header is an 8-byte little-endian length followed by that many bytes of JSON, whose ``__metadata__``
object maps strings to strings). A model can be read from a file (``load_refiner``) or from the bytes of
one (``refiner_from_bytes``, for uploads and models kept in memory). Writes go through
``core.io.atomic``. Every problem reading a file (missing, truncated, not safetensors, not a refiner,
missing or ill-typed metadata, weights of the wrong shapes) raises ``core.errors.ModelFileError``
naming the file and saying what to do; a model that does not fit the caller's inputs raises
``RefineError``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save

from core.errors import ModelFileError, RefineError
from core.io.atomic import write_bytes
from core.refine.model import RefineConfig, Refiner, ShallowUNet, resolve_device

FORMAT_VERSION = 1
METADATA_KEY = "protoscope.refiner"

#: Metadata keys every refiner file has: the Python types their JSON values load as, and the JSON type's name.
REQUIRED_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "format_version": ((int,), "an integer"),
    "input_set": ((str,), "a string"),
    "channels": ((list,), "a list"),
    "threshold": ((int, float), "a number"),
    "config": ((dict,), "an object"),
}
#: Upper bound of a refiner's safetensors header (bytes): a few kB in practice; larger means a damaged length.
_MAX_HEADER = 16 * 1024 * 1024
_REMAKE = "train a new model (`python -m core refine train` or the app's Refine page) or copy the file again"


def refiner_bytes(refiner: Refiner) -> bytes:
    """The refiner as the bytes of a safetensors file (what ``save_refiner`` writes).

    The header metadata key ``protoscope.refiner`` holds JSON with: format_version, input_set,
    channels, base_channels, input_size, threshold, config, source (backbone, weights,
    heatmap_mode), train/val slices, seed, epochs_run, validation scores, created (UTC).
    """
    config = refiner.config
    document = {
        **refiner.metadata,
        "format_version": FORMAT_VERSION,
        "kind": "protoscope.refiner",
        "input_set": config.input_set,
        "channels": list(config.channels),
        "base_channels": config.base_channels,
        "input_size": config.input_size,
        "heatmap_norm": config.heatmap_norm.value,
        "threshold": float(refiner.threshold),
        "config": config.to_json(),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in refiner.model.state_dict().items()}
    return save(state, metadata={METADATA_KEY: json.dumps(document)})


def save_refiner(refiner: Refiner, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the refiner (``refiner_bytes``) to ``path`` atomically (core.io.atomic); returns the path.

    Raises RefineError if ``path`` exists and ``overwrite`` is False, or if its folder does not exist.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise RefineError(f"refiner file {path} already exists; choose another name or pass overwrite=True")
    if not path.parent.is_dir():
        raise RefineError(f"cannot save refiner to {path}: folder {path.parent} does not exist")
    return write_bytes(path, refiner_bytes(refiner), overwrite=overwrite)


def _one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (the CLI prints errors as one line), at most ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_a(value: Any, types: tuple[type, ...]) -> bool:
    # JSON true/false are bools, which Python also counts as ints
    return isinstance(value, types) and not isinstance(value, bool)


def _check_document(meta: Any, where: str) -> dict[str, Any]:
    """The metadata document, checked: a JSON object with the REQUIRED_KEYS of the right types."""
    if not isinstance(meta, dict):
        raise ModelFileError(f"{where}: refiner metadata is a JSON {type(meta).__name__}, not an object; {_REMAKE}")
    for key, (types, json_type) in REQUIRED_KEYS.items():
        if key not in meta:
            raise ModelFileError(f"{where}: refiner metadata lacks {key!r}; the file is damaged or was not written by "
                                 f"Protoscope: {_REMAKE}")
        if not _is_a(meta[key], types):
            raise ModelFileError(f"{where}: refiner metadata {key!r} is {meta[key]!r}, not {json_type}; {_REMAKE}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ModelFileError(f"{where}: refiner format version {meta['format_version']} is not supported (this "
                             f"Protoscope reads {FORMAT_VERSION}); use the Protoscope that wrote it, or {_REMAKE}")
    threshold = float(meta["threshold"])
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ModelFileError(f"{where}: refiner threshold {threshold!r} is not a probability in [0, 1]; {_REMAKE}")
    if not all(isinstance(c, str) for c in meta["channels"]):
        raise ModelFileError(f"{where}: refiner metadata 'channels' must be a list of names, got {meta['channels']!r}; "
                             f"{_REMAKE}")
    if not isinstance(meta.get("source") or {}, dict):
        raise ModelFileError(f"{where}: refiner metadata 'source' is {meta['source']!r}, not an object; {_REMAKE}")
    return meta


def _header_metadata(head: bytes, size: int, where: str) -> dict[str, Any]:
    """The checked refiner document from the start of a safetensors file.

    head : the file's first bytes (at least the 8-byte length and the JSON header it announces);
    size : the file's length in bytes.
    """
    if size < 8 or len(head) < 8:
        raise ModelFileError(f"{where} is not a readable safetensors file (only {size} bytes); it may be truncated "
                             f"or damaged: {_REMAKE}")
    length = int.from_bytes(head[:8], "little")
    if length > min(size - 8, _MAX_HEADER) or len(head) < 8 + length:
        raise ModelFileError(f"{where} is not a readable safetensors file (its header announces {length} bytes, the "
                             f"file has {size}); it may be truncated or damaged: {_REMAKE}")
    try:
        header = json.loads(head[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{where} is not a readable safetensors file (header: {_one_line(err)}); it may be "
                             f"truncated or damaged: {_REMAKE}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise ModelFileError(f"{where} is a safetensors file but not a Protoscope refiner (no {METADATA_KEY!r} "
                             "metadata); give a model made by `python -m core refine train` or the app's Refine page")
    if not isinstance(metadata[METADATA_KEY], str):
        raise ModelFileError(f"{where}: refiner metadata is not a JSON text; {_REMAKE}")
    try:
        document = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ModelFileError(f"{where}: refiner metadata is not valid JSON ({_one_line(err)}); {_REMAKE}") from None
    return _check_document(document, where)


def read_refiner_metadata(path: str | os.PathLike, *, name: str | None = None) -> dict[str, Any]:
    """The JSON metadata document of a refiner file, checked, without loading the weights (nor torch).

    name : how messages call the file (default: its path).
    Raises ModelFileError when the file is missing or unreadable, not a safetensors file, not a refiner,
    of another format version, or its metadata lacks a key of REQUIRED_KEYS or has one of another type.
    """
    path = Path(path)
    where = name or str(path)
    if not path.is_file():
        raise ModelFileError(f"refiner file {where} does not exist; check the path, or train one with "
                             "`python -m core refine train`")
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(8)
            if len(head) == 8:
                head += handle.read(min(int.from_bytes(head, "little"), _MAX_HEADER))
    except OSError as err:
        raise ModelFileError(f"cannot read refiner file {where} ({_one_line(err)}); check its permissions") from None
    return _header_metadata(head, size, where)


def check_fits(
    config: RefineConfig,
    source: Mapping[str, Any] | None,
    *,
    expected_input_set: str | None = None,
    expected_backbone: str | None = None,
    where: str = "the refiner",
) -> None:
    """RefineError unless a refiner (its ``config`` and metadata ``source``) fits the caller's inputs.

    expected_input_set : the model must have been trained on this input set.
    expected_backbone : the heatmaps it was trained on must come from this backbone (checked only for
        input sets that use the heatmap or mask).
    """
    if expected_input_set is not None and expected_input_set != config.input_set:
        raise RefineError(
            f"{where} was trained on input set {config.input_set!r}, not {expected_input_set!r}; "
            "train a refiner for this input set or pick the matching one"
        )
    if expected_backbone is not None and config.channels != ("raw",):
        trained = (source or {}).get("backbone")
        if trained != expected_backbone:
            raise RefineError(
                f"{where} was trained on heatmaps from backbone {trained!r}, but the current heatmaps come from "
                f"{expected_backbone!r}; its inputs would not match, so train a refiner on this backbone's heatmaps"
            )


def check_refiner(refiner: Refiner, *, expected_input_set: str | None = None, expected_backbone: str | None = None,
                  where: str = "the refiner") -> None:
    """``check_fits`` for a loaded or trained refiner."""
    check_fits(refiner.config, refiner.metadata.get("source"), expected_input_set=expected_input_set,
               expected_backbone=expected_backbone, where=where)


def _build(
    meta: dict[str, Any],
    read_state: Callable[[], dict[str, torch.Tensor]],
    where: str,
    expected_input_set: str | None,
    expected_backbone: str | None,
    device: str | torch.device | None,
) -> Refiner:
    """The Refiner of a checked metadata document and its weights (``read_state()``), checked to fit."""
    try:
        config = RefineConfig.from_json(meta["config"])
    except (RefineError, TypeError, ValueError) as err:
        raise ModelFileError(f"{where}: refiner metadata has no usable 'config' ({_one_line(err)}); {_REMAKE}") from None
    if list(config.channels) != meta["channels"]:
        raise ModelFileError(f"{where}: channel order {meta['channels']} does not match input set "
                             f"{config.input_set!r}; {_REMAKE}")
    check_fits(config, meta.get("source"), expected_input_set=expected_input_set, expected_backbone=expected_backbone,
               where=where)
    try:
        state = read_state()
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{where}: the weights cannot be read ({_one_line(err)}); it may be truncated or "
                             f"damaged: {_REMAKE}") from None
    model = ShallowUNet(len(config.channels), config.base_channels)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelFileError(f"{where}: weights do not fit the recorded architecture ({_one_line(err)}); "
                             f"{_REMAKE}") from None
    model.to(resolve_device(device)).eval()
    metadata = {k: v for k, v in meta.items() if k != "config"}
    return Refiner(model=model, config=config, threshold=float(meta["threshold"]), metadata=metadata)


def load_refiner(
    path: str | os.PathLike,
    *,
    expected_input_set: str | None = None,
    expected_backbone: str | None = None,
    device: str | torch.device | None = None,
    name: str | None = None,
) -> Refiner:
    """Load a refiner written by save_refiner, checking it fits the caller's inputs (``check_fits``).

    name : how messages call the file (default: its path).
    Raises ModelFileError for a missing, unreadable or damaged file (see ``read_refiner_metadata``; also an
    unusable 'config', or weights that are truncated or do not fit the recorded architecture), RefineError
    for a model that does not fit the caller's inputs.
    """
    path = Path(path)
    meta = read_refiner_metadata(path, name=name)
    return _build(meta, lambda: load_file(str(path)), name or str(path), expected_input_set, expected_backbone, device)


def refiner_from_bytes(
    data: bytes,
    *,
    name: str = "the model",
    expected_input_set: str | None = None,
    expected_backbone: str | None = None,
    device: str | torch.device | None = None,
) -> Refiner:
    """``load_refiner`` for the bytes of a model file (an upload, a model kept in memory); ``name`` in messages."""
    data = bytes(data)
    meta = _header_metadata(data, len(data), name)
    return _build(meta, lambda: load(data), name, expected_input_set, expected_backbone, device)
