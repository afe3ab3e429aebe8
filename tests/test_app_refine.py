"""AppTest of the Refine page: train a tiny U-Net on demo slices (input 32 px, 2 epochs) with the live plot's
data, keep and reload the model, apply it to two slices (same masks as core's own apply); cancel; the
short errors for a stack without ground truth, a prototype of another backbone, a model of another one and a
corrupt model file; and the loaded network shared by the SHA-256 of the file's bytes."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json

import numpy as np
import pytest
import tifffile

from core.errors import RefineError
from core.refine.files import load_refiner
from core.refine.model import RefineConfig, RefineSample
from core.refine.train import train_unet
from core.refine.samples import PrototypeMaps, slice_sample
from ui import refine, testing

Z = 12


@pytest.fixture
def app(tmp_path_factory, monkeypatch, tmp_path):
    """The Refine page after saving a prototype of four clicks on the demo's slice 12 (default mode: best)."""
    at = testing.demo_with_saved_prototype(tmp_path_factory.getbasetemp(), tmp_path / "out", monkeypatch, Z)
    return testing.goto(at, "refine")


def tiny_settings(at, z: str = "10:14", epochs: int = 2):
    at.radio(key="_w.refine.slice_choice").set_value("chosen").run()
    at.text_input(key="_w.refine.z").input(z).run()
    at.select_slider(key="_w.refine.input_size").set_value(32).run()
    at.number_input(key="_w.refine.epochs").set_value(epochs).run()
    return at


def train(at, timeout: float = 240):
    """Press Train, wait for the background thread, and run the page again (what the live panel does)."""
    at.button(key="refine.train").click().run()
    job = at.session_state["refine.job"]
    job.thread.join(timeout)
    assert not job.thread.is_alive()
    return job, at.run()


def figure_traces(chart) -> dict[str, list[float]]:
    spec = json.loads(chart.proto.spec)
    return {trace["name"]: trace["y"] for trace in spec["data"]}


def test_train_plot_save_and_apply(app, tmp_path):
    tiny_settings(app)
    assert not app.exception and not app.error
    assert "synthetic_vessels: 4 slice(s) (10, 11, 12, 13)" in [c.value for c in app.caption]
    job, app = train(app)
    assert job.phase == "done" and job.error is None
    assert (job.n_train, job.n_val) == (3, 1)  # 4 slices, one fifth (rounded, at least one) validates
    assert len(job.history) == 2
    assert any(s.value.startswith("Trained 2 epoch(s)") for s in app.success)
    # the plot shows exactly the epochs' numbers
    traces = figure_traces(app.get("plotly_chart")[0])
    assert traces["train loss"] == pytest.approx([r.train_loss for r in job.history])
    assert traces["val loss"] == pytest.approx([r.val_loss for r in job.history])
    assert traces["val Dice"] == pytest.approx([r.val_dice for r in job.history])

    # the model is kept in the session and offered for download; the file is a refiner core reads back
    model = app.session_state["refine.models"][-1]
    assert any(b.label == f"Download the model · {model.name}.safetensors" for b in app.get("download_button"))
    model_path = tmp_path / "model.safetensors"
    model_path.write_bytes(model.data)
    refiner = load_refiner(model_path, expected_backbone="filterbank")
    assert refiner.config.input_size == 32 and refiner.config.input_set == "raw+heatmap"
    assert refiner.metadata["source"]["heatmap_mode"] == "best"
    assert [s["z"] for s in refiner.metadata["train_slices"]] + [s["z"] for s in refiner.metadata["val_slices"]] == [10, 11, 13, 12]
    assert app.selectbox(key="_w.refine.model_pick").value == model.name

    app.text_input(key="_w.refine.apply_z").input("11:13").run()
    app.button(key="refine.apply").click().run()
    assert not app.exception and not app.error
    outputs = app.session_state["refine.result"]
    with tifffile.TiffFile(outputs.files["tif"]) as handle:
        masks = handle.series[0].asarray()
    assert masks.shape == (2, 256, 256) and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 255}
    rows = list(csv.DictReader(io.StringIO(open(outputs.files["csv"]).read())))
    assert [int(r["z"]) for r in rows] == [11, 12]
    assert [int(r["area_px"]) for r in rows] == (masks == 255).sum(axis=(1, 2)).tolist()
    assert {m.label: m.value for m in app.metric}["Slices"] == "2"
    assert outputs.montage_png[:4] == b"\x89PNG"
    assert outputs.notes == ["2 of these slices were used to train or validate the model (11, 12): their Dice is optimistic"]
    assert len(outputs.dice_refined) == len(outputs.dice_prototype) == 2
    # the same mask as core's own refine apply: the prototype's heatmap and mask, the refiner, its threshold
    ctx_stack = app.session_state["home.sample"].path
    from core.features.backbones import load_backbone
    from core.features.embedding import SliceEmbedder
    from core.features.embedding_cache import EmbeddingCache
    from core.io import open_stack

    prototype = app.session_state["segment.prototypes"][-1].prototype
    with open_stack(ctx_stack) as stack:
        embedder = SliceEmbedder(stack, 0, load_backbone("filterbank"), prototype.config.preprocess, cache=EmbeddingCache())
        sample = slice_sample(stack, 0, 12, maps=PrototypeMaps(embedder, prototype))
    np.testing.assert_array_equal(masks[1] == 255, refiner.predict(sample))


def test_cancel_stops_training(app):
    tiny_settings(app, z="10:14", epochs=500)
    app.button(key="refine.train").click().run()
    job = app.session_state["refine.job"]
    assert job.running and app.button(key="refine.cancel")  # the live panel with its Cancel button
    app.button(key="refine.cancel").click().run()
    job.thread.join(240)
    assert job.phase == "cancelled" and len(job.history) < 500
    app.run()
    warnings = [w.value for w in app.warning]
    if job.history:
        assert any("best model so far is kept" in w for w in warnings)
        assert app.session_state["refine.models"]
    else:
        assert any("before the first epoch finished: no model" in w for w in warnings)


def test_errors_say_what_to_do(app, tmp_path):
    # a prototype of another backbone cannot make the heatmaps
    saved = app.session_state["segment.prototypes"][-1]
    app.session_state["segment.prototypes"] = [dataclasses.replace(
        saved, prototype=dataclasses.replace(saved.prototype, backbone="dinov2_vits14", embed_dim=384))]
    tiny_settings(app)
    app.button(key="refine.train").click().run()
    errors = [e.value for e in app.error]
    assert any("was made with backbone 'dinov2_vits14'" in e and "load 'dinov2_vits14' on the Open sample page" in e
               for e in errors)
    assert app.session_state["refine.job"] is None
    app.session_state["segment.prototypes"] = [saved]

    # a model trained on another backbone's heatmaps is refused before anything runs
    rng = np.random.default_rng(0)
    toy = [RefineSample(rng.random((8, 8)), rng.random((8, 8)), None, truth=rng.random((8, 8)) > 0.5, stack_id="t", z=z)
           for z in range(2)]
    foreign = train_unet(toy[:1], toy[1:], RefineConfig(input_size=8, max_epochs=1, base_channels=2),
                         metadata={"backbone": "dinov2_vits14", "heatmap_mode": "best"}).refiner
    app.selectbox(key="_w.refine.model_pick").set_value("upload").run()
    app.file_uploader(key="refine.upload_model").upload("foreign.safetensors", refine.refiner_bytes(foreign)).run()
    errors = [e.value for e in app.error]
    assert any("model 'foreign' was trained on heatmaps from backbone 'dinov2_vits14'" in e
               and "train a refiner on this backbone's heatmaps" in e for e in errors)
    assert not app.exception

    # without a ground truth, this stack cannot be a training stack
    testing.goto(app, "home")
    app.radio(key="_w.home.truth_kind").set_value("None").run()
    testing.goto(app, "refine")
    assert any("has no ground truth" in e.value and "Open sample page" in e.value for e in app.error)
    assert app.button(key="refine.train").disabled
    assert not app.exception


def test_adding_stacks_from_the_data_root(app, tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    demo = app.session_state["home.sample"].path
    with tifffile.TiffFile(demo) as handle:
        volume = handle.series[0].asarray()  # (24, 2, 256, 256): image, truth
    tifffile.imwrite(root / "other.tif", volume[:6], imagej=True, metadata={"axes": "ZCYX"})
    tifffile.imwrite(root / "small_mask.tif", np.zeros((6, 32, 32), np.uint8), photometric="minisblack")
    monkeypatch.setenv("PROTOSCOPE_DATA_ROOT", str(root))

    def add(path: str, truth_kind: str = "channel", truth: str | int = 1):
        app.text_input(key="refine.add_path").input(path)
        app.radio(key="refine.add_truth_kind").set_value(truth_kind).run()
        if truth_kind == "channel":
            app.number_input(key="refine.add_truth_channel").set_value(truth)
        else:
            app.text_input(key="refine.add_truth_path").input(truth)
        app.button(key="refine.add").click().run()
        return [e.value for e in app.error]

    errors = add("other.tif", "file", "small_mask.tif")
    assert any("mask file 'small_mask.tif' is 6 x 32 x 32" in e for e in errors)
    assert add("other.tif", "channel", 0) == [
        "'other.tif': the ground-truth channel 0 is the image channel; choose another one"]
    assert any("is outside the data root" in e for e in add(demo))
    assert add("other.tif", "channel", 1) == []
    assert [s.label for s in app.session_state["refine.stacks"]] == ["other"]
    # both stacks get the slices typed; the other stack has only 6
    app.radio(key="_w.refine.slice_choice").set_value("chosen").run()
    app.text_input(key="_w.refine.z").input("2:5").run()
    assert "synthetic_vessels: 3 slice(s) (2, 3, 4) · other: 3 slice(s) (2, 3, 4)" in [c.value for c in app.caption]
    app.radio(key="_w.refine.val_kind").set_value("stack").run()
    assert app.selectbox(key="refine.val_stack").options == ["synthetic_vessels", "other"]
    app.button(key="refine.remove.0").click().run()
    assert app.session_state["refine.stacks"] == []
    assert not app.exception


def tiny_model_bytes(backbone: str = "filterbank", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    toy = [RefineSample(rng.random((8, 8)), rng.random((8, 8)), None, truth=rng.random((8, 8)) > 0.5, stack_id="t", z=z)
           for z in range(2)]
    result = train_unet(toy[:1], toy[1:], RefineConfig(input_size=8, max_epochs=1, base_channels=2, seed=seed),
                        metadata={"backbone": backbone, "heatmap_mode": "best"})
    return refine.refiner_bytes(result.refiner)


def test_a_corrupt_model_file_is_a_short_error(app):
    app.selectbox(key="_w.refine.model_pick").set_value("upload").run()
    good = tiny_model_bytes()
    for name, data, phrase in (("garbage.safetensors", b"not a safetensors file", "is not a readable safetensors file"),
                               ("cut.safetensors", good[:-16], "the weights cannot be read"),
                               ("head.safetensors", good[:40], "is not a readable safetensors file")):
        app.file_uploader(key="refine.upload_model").upload(name, data).run()
        errors = [e.value for e in app.error]
        assert len(errors) == 1 and errors[0].startswith(f"model '{name}'") and phrase in errors[0], errors
        assert "train a new model" in errors[0] and "Unexpected error" not in errors[0]
        assert not app.exception
        assert "refine.apply" not in [b.key for b in app.button]  # nothing to run with


def test_the_network_is_loaded_once_per_file_content(monkeypatch):
    calls = []
    original = refine.refiner_from_bytes

    def counting(data, **kwargs):
        calls.append(len(data))
        return original(data, **kwargs)

    monkeypatch.setattr(refine, "refiner_from_bytes", counting)
    refine._cached_refiner.clear()
    first, other = tiny_model_bytes(seed=0), tiny_model_bytes(seed=1)
    a = refine.load_model(first, expected_backbone="filterbank", name="a")
    assert refine.load_model(bytes(first), name="a again") is a  # same bytes: the same network, not loaded again
    assert len(calls) == 1
    b = refine.load_model(other, name="b")
    assert b is not a and len(calls) == 2
    assert refine.model_digest(first) == hashlib.sha256(first).hexdigest()
    # the backbone check runs on every use, also for a cached network
    with pytest.raises(RefineError, match="model 'a' was trained on heatmaps from backbone 'filterbank'"):
        refine.load_model(first, expected_backbone="dinov2_vits14", name="a")
