"""AppTest: a damaged prototype file uploaded on the Batch page is one short st.error that names the file and
says what to do, never "Unexpected error" (issue #10, point 6)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from core.config import PipelineConfig
from core.features.registry import get_spec
from core.prototypes import PointSet, Prototype, prototype_to_bytes
from ui import testing

DIM = get_spec("filterbank").embed_dim


def damaged_prototype(drop: str) -> bytes:
    """The bytes of a valid filter-bank prototype file whose metadata lacks the key ``drop``."""
    rows = np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    prototype = Prototype(
        positive_references=rows[:1], negative_references=rows[2:], positive_examples=rows[:2],
        negative_examples=rows[2:], config=PipelineConfig.best(), backbone="filterbank", weights_id="none",
        embed_dim=DIM, points=PointSet(np.array([[10, 10, 12], [30, 30, 12]]), np.array([[200, 200, 12]])),
    )
    with np.load(io.BytesIO(prototype_to_bytes(prototype)), allow_pickle=False) as archive:
        contents = {key: archive[key] for key in archive.files}
    metadata = json.loads(str(contents["metadata_json"]))
    del metadata[drop]
    contents["metadata_json"] = np.array(json.dumps(metadata))
    buffer = io.BytesIO()
    np.savez(buffer, **contents)
    return buffer.getvalue()


@pytest.fixture
def batch_page(tmp_path_factory, monkeypatch, tmp_path):
    env = testing.app_environment(tmp_path_factory.getbasetemp())
    env["PROTOSCOPE_OUTPUT_DIR"] = str(tmp_path / "out")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    at = testing.goto(testing.open_demo(testing.new_app()), "batch")
    at.radio(key="_w.batch.source").set_value("upload").run()
    return at


@pytest.mark.parametrize("key", ["embed_dim", "config"])
def test_a_prototype_file_without_a_metadata_key_is_a_short_error(batch_page, key):
    batch_page.file_uploader(key="batch.upload").upload("damaged.npz", damaged_prototype(key)).run()
    assert not batch_page.exception
    errors = [element.value for element in batch_page.error]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"'damaged.npz': metadata lacks '{key}'")
    assert "make it again (Segment page: Save prototype" in errors[0]  # what to do
    assert "Unexpected error" not in errors[0] and len(errors[0]) < 300
    assert "batch.run" not in {button.key for button in batch_page.button}  # nothing to run with a bad file
