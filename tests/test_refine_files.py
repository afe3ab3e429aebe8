"""core.refine.files: every damaged model file is a ModelFileError naming the file and what to do, never a raw
KeyError / SafetensorError; ``python -m core refine apply`` turns it into one ``error:`` line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import save

from core.cli.main import main
from core.errors import ModelFileError, RefineError
from core.refine.files import (
    METADATA_KEY,
    REQUIRED_KEYS,
    load_refiner,
    read_refiner_metadata,
    refiner_bytes,
    refiner_from_bytes,
    save_refiner,
)
from core.refine.model import RefineConfig, RefineSample
from core.refine.train import train_unet

PROJECT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def refiner():
    """A 'raw' refiner on 8 x 8 toy slices (one epoch, width 2)."""
    rng = np.random.default_rng(0)
    toy = [RefineSample(rng.random((8, 8)), None, None, truth=rng.random((8, 8)) > 0.5, stack_id="t", z=z)
           for z in range(2)]
    return train_unet(toy[:1], toy[1:], RefineConfig(input_set="raw", input_size=8, max_epochs=1,
                                                     base_channels=2)).refiner


def document(data: bytes) -> dict:
    """The refiner document inside safetensors bytes (8-byte length, JSON header, __metadata__)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8:8 + length])["__metadata__"][METADATA_KEY])


def with_document(refiner, doc: dict, state: dict | None = None) -> bytes:
    state = state if state is not None else dict(refiner.model.state_dict())
    return save(state, metadata={METADATA_KEY: json.dumps(doc)})


def damaged(refiner) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a phrase the error must contain)."""
    good = refiner_bytes(refiner)
    doc = document(good)
    wrong_head = dict(refiner.model.state_dict())
    wrong_head["head.weight"] = torch.zeros(1, 3, 1, 1)
    return {
        "truncated_weights": (good[:-16], "truncated or damaged"),
        "truncated_header": (good[:40], "truncated or damaged"),
        "empty": (b"", "only 0 bytes"),
        "missing_threshold": (with_document(refiner, {k: v for k, v in doc.items() if k != "threshold"}),
                              "lacks 'threshold'"),
        "missing_config": (with_document(refiner, {k: v for k, v in doc.items() if k != "config"}), "lacks 'config'"),
        "string_threshold": (with_document(refiner, {**doc, "threshold": "0.5"}), "'threshold' is '0.5', not a number"),
        "channels_not_a_list": (with_document(refiner, {**doc, "channels": "raw"}), "'channels' is 'raw', not a list"),
        "bad_config": (with_document(refiner, {**doc, "config": {**doc["config"], "input_size": "big"}}),
                       "no usable 'config'"),
        "other_version": (with_document(refiner, {**doc, "format_version": 7}), "format version 7 is not supported"),
        "not_json": (save(dict(refiner.model.state_dict()), metadata={METADATA_KEY: "{oops"}), "not valid JSON"),
        "not_a_refiner": (save({"w": torch.zeros(2)}), "not a Protoscope refiner"),
        "wrong_shapes": (with_document(refiner, doc, wrong_head), "do not fit the recorded architecture"),
    }


def test_round_trip_through_bytes_and_file(refiner, tmp_path):
    data = refiner_bytes(refiner)
    path = save_refiner(refiner, tmp_path / "m.safetensors")
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # the atomic write left no temp file
    meta = read_refiner_metadata(path)
    assert set(REQUIRED_KEYS) <= set(meta) and meta["channels"] == ["raw"] and meta["format_version"] == 1
    for loaded in (load_refiner(path), refiner_from_bytes(data)):
        assert loaded.config == refiner.config and loaded.threshold == refiner.threshold
        state = loaded.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in refiner.model.state_dict().items())


def test_every_damage_is_a_model_file_error(refiner, tmp_path):
    for name, (data, phrase) in damaged(refiner).items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(ModelFileError) as from_file:
            load_refiner(path)
        with pytest.raises(ModelFileError) as from_bytes:
            refiner_from_bytes(data, name=f"model '{name}'")
        for error, where in ((from_file.value, str(path)), (from_bytes.value, f"model '{name}'")):
            message = str(error)
            assert where in message and phrase in message and "\n" not in message, (name, message)
            # ... and it says what to do
            assert "train" in message or "copy" in message or "Protoscope" in message, (name, message)
    with pytest.raises(ModelFileError, match="does not exist; check the path"):
        read_refiner_metadata(tmp_path / "missing.safetensors")


def test_a_misfit_is_a_refine_error_not_a_file_error(refiner, tmp_path):
    data = refiner_bytes(refiner)
    with pytest.raises(RefineError, match="input set 'raw', not 'heatmap'") as error:
        refiner_from_bytes(data, expected_input_set="heatmap")
    assert not isinstance(error.value, ModelFileError)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("apply") / "s.tif"
    tifffile.imwrite(path, np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16))
    return path


@pytest.mark.parametrize("case", ["missing_threshold", "truncated_weights", "truncated_header", "wrong_shapes"])
def test_refine_apply_with_a_damaged_model_prints_one_error_line(refiner, stack, tmp_path, capsys, case):
    data, phrase = damaged(refiner)[case]
    model = tmp_path / "damaged.safetensors"
    model.write_bytes(data)
    status = main(["refine", "apply", str(stack), "--model", str(model), "--out", str(tmp_path / "out.tif")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {model}") and phrase in err[0]
    assert not (tmp_path / "out.tif").exists()


@pytest.mark.parametrize("case", ["missing_threshold", "truncated_weights"])
def test_refine_apply_in_a_fresh_process_has_no_traceback(refiner, stack, tmp_path, case):
    data, phrase = damaged(refiner)[case]
    model = tmp_path / "damaged.safetensors"
    model.write_bytes(data)
    done = subprocess.run([sys.executable, "-m", "core", "refine", "apply", str(stack), "--model", str(model),
                           "--out", str(tmp_path / "out.tif")], cwd=PROJECT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: ") and phrase in lines[0]
