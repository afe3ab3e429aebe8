"""AppTest of the Batch page: apply a saved prototype (best mode, the default) to the whole 24-slice demo, files
written server-side (TIFF, OME-TIFF, HDF5, CSV), areas and volume; resume from the cache; errors for bad input."""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from core.metrics import dice
from core.prototypes import prototype_to_bytes
from ui import testing

Z = 12


@pytest.fixture
def app(tmp_path_factory, monkeypatch, tmp_path):
    at = testing.demo_with_saved_prototype(tmp_path_factory.getbasetemp(), tmp_path / "out", monkeypatch, Z)
    return testing.goto(at, "batch")


def test_batch_writes_masks_areas_and_volume(app, tmp_path):
    assert not app.exception and not app.error
    assert app.radio(key="_w.batch.source").value == "saved"
    assert app.multiselect(key="_w.batch.formats").options == [
        "Multi-page TIFF (ImageJ) (.tif)", "OME-TIFF (.ome.tif)", "HDF5 (.h5)"]  # no .ims copy for a TIFF source
    app.multiselect(key="_w.batch.formats").set_value(["tif", "ome", "h5"]).run()
    app.button(key="batch.run").click().run(timeout=300)
    assert not app.exception and not app.error
    assert any("Batch finished: 24 slices" in s.value for s in app.success)

    out = tmp_path / "out"
    tif = next(p for p in out.glob("*.tif") if not p.name.endswith(".ome.tif"))
    with tifffile.TiffFile(tif) as handle:
        masks = handle.series[0].asarray()
        assert handle.imagej_metadata["spacing"] == pytest.approx(2.0)
    assert masks.shape == (24, 256, 256) and masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 255}
    with tifffile.TiffFile(next(out.glob("*.ome.tif"))) as handle:
        np.testing.assert_array_equal(handle.series[0].asarray(), masks)
    with h5py.File(next(out.glob("*.h5")), "r") as handle:
        np.testing.assert_array_equal(handle["mask"][()], masks)
        np.testing.assert_allclose(handle["mask"].attrs["element_size_um"], [2.0, 0.8, 0.8])

    rows = list(csv.DictReader(io.StringIO(next(out.glob("*_areas.csv")).read_text())))
    assert [int(r["z"]) for r in rows] == list(range(24))
    counts = (masks == 255).sum(axis=(1, 2))
    assert [int(r["area_px"]) for r in rows] == counts.tolist()
    np.testing.assert_allclose([float(r["area_um2"]) for r in rows], counts * 0.64, rtol=1e-5)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Slices"] == "24"
    assert metrics["Mask voxels"] == f"{int(counts.sum()):,}"
    assert metrics["Volume (µm³)"] == f"{counts.sum() * 0.64 * 2.0:,.0f}"  # area x 0.8 µm x 0.8 µm x 2 µm slices
    # best mode (the default): slice 12 is the mask the Segment page showed; the calibrated threshold lets the
    # area follow the data (not 10 % of every slice), and the masks follow the demo's vessels
    np.testing.assert_array_equal(masks[Z] == 255, app.session_state["segment.view"].segmentation.mask)
    assert np.ptp(counts / 65536) > 0.03
    truth = [testing.demo_truth(z) for z in range(24)]
    assert np.mean([dice(masks[z] == 255, truth[z]) for z in range(24)]) > 0.5
    labels = [b.label for b in app.get("download_button")]
    assert any(label.startswith("Download Multi-page TIFF") for label in labels)
    assert any(label.startswith("Download Per-slice areas (CSV)") for label in labels)
    assert app.session_state["batch.result"].montage_png[:4] == b"\x89PNG"
    assert not list(out.glob(".~*")) and not list(out.glob("*.npy"))  # no temp or memmap files left

    # with the filter bank, best mode's pixel classifier needs no patch embeddings (nothing to resume from)
    assert any("24 slice(s) of synthetic_vessels.ome.tif; no patch embeddings needed" in c.value for c in app.caption)


def test_bad_slices_and_foreign_prototypes_are_short_errors(app):
    app.text_input(key="_w.batch.z").input("0:99").run()
    assert any("ends outside the stack" in e.value for e in app.error)
    app.text_input(key="_w.batch.z").input("0:4").run()
    assert not app.error
    assert any("4 slice(s)" in c.value for c in app.caption)

    saved = app.session_state["segment.prototypes"][0].prototype
    foreign = dataclasses.replace(saved, backbone="dinov2_vits14")
    app.radio(key="_w.batch.source").set_value("upload").run()
    app.file_uploader(key="batch.upload").upload("other.npz", prototype_to_bytes(foreign)).run()
    errors = [e.value for e in app.error]
    assert len(errors) == 1
    assert "'other.npz' was made with backbone 'dinov2_vits14' but 'filterbank' is selected" in errors[0]
    assert not app.exception


def test_uploaded_prototype_applies_to_a_few_slices(app, tmp_path):
    data = app.session_state["segment.prototypes"][0].data
    app.radio(key="_w.batch.source").set_value("upload").run()
    app.file_uploader(key="batch.upload").upload("mine.npz", data).run()
    app.text_input(key="_w.batch.z").input("10:14").run()
    app.button(key="batch.run").click().run(timeout=300)
    assert not app.exception and not app.error
    out = tmp_path / "out"
    tif = next(p for p in out.glob("*_mine_*.tif"))
    with tifffile.TiffFile(tif) as handle:
        assert handle.series[0].shape == (4, 256, 256)
    assert Path(app.session_state["batch.result"].files["csv"]).exists()


def test_other_stack_by_path_with_its_channel_names(app, tmp_path, monkeypatch):
    demo_dir = Path(app.session_state["home.sample"].path).parent
    monkeypatch.setenv("PROTOSCOPE_DATA_ROOT", str(demo_dir))
    app.radio(key="_w.batch.target").set_value("other").run()
    app.text_input(key="_w.batch.other_path").input("synthetic_vessels.ome.tif").run()
    picker = app.selectbox(key="_w.batch.other_channel")
    assert picker.options == ["0 · Synthetic vessels (demo)", "1 · Ground truth (synthetic)"]
    assert picker.value == 0  # by name: never the ground truth
    app.text_input(key="_w.batch.z").input("11:13").run()
    app.button(key="batch.run").click().run(timeout=300)
    assert not app.exception and not app.error
    assert app.session_state["batch.result"].z_values == [11, 12]


@pytest.mark.shared_data
def test_imaris_copy_gets_the_mask_channel(shared_data, tmp_path_factory, monkeypatch, tmp_path):
    """A real Imaris file (ImarisWriter sample: 40 x 260 x 300, channels image, image, 0/255 mask)."""
    import h5py

    from core.io import open_stack

    env = testing.app_environment(tmp_path_factory.getbasetemp(), data_root=shared_data / "ims")
    env["PROTOSCOPE_OUTPUT_DIR"] = str(tmp_path / "out")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    at = testing.new_app(timeout=300)
    at.radio(key="_w.home.source").set_value("File in the data root").run()
    at.selectbox(key="home.file_pick").set_value("imariswriter_sample.ims").run()
    at.button(key="home.open_file").click().run()
    # the lab convention (the penultimate channel of an .ims) would pick 'Ramp x+2y+50z', a test pattern
    assert at.session_state["home.channel"] == 0
    assert at.session_state["home.truth"].channel == 2  # 'Mask'
    testing.goto(at, "segment")
    source = shared_data / "ims" / "imariswriter_sample.ims"
    with open_stack(source) as stack:
        truth = stack.read_slice(20, 2) > 0
    positive, negative = testing.seed_points(truth)
    testing.click(at, positive, "positive", slice_shape=truth.shape)
    testing.click(at, negative, "negative", slice_shape=truth.shape)
    at.button(key="segment.save").click().run()
    testing.goto(at, "batch")
    at.multiselect(key="_w.batch.formats").set_value(["ims"]).run()
    at.text_input(key="_w.batch.z").input("19:21").run()
    at.button(key="batch.run").click().run(timeout=300)
    assert not at.exception and not at.error
    copy = Path(at.session_state["batch.result"].files["ims"])
    with open_stack(copy) as stack:
        assert stack.shape == (40, 4, 260, 300)  # one channel more than the source
        assert stack.read_slice(0, 3).max() == 0  # slices outside the z-range stay empty
        masks = [stack.read_slice(z, 3) for z in (19, 20)]
    areas = at.session_state["batch.result"].area_px
    assert [int((m > 0).sum()) for m in masks] == areas and all(a > 0 for a in areas)
    with h5py.File(source, "r") as original:
        assert len([k for k in original["DataSet/ResolutionLevel 0/TimePoint 0"]]) == 3  # source untouched
    from core.io.ims import read_str_attr

    with h5py.File(copy, "r") as written:  # the prototype summary's 'λ' is written in Imaris's Latin-1 by core
        description = read_str_attr(written["DataSetInfo/Channel 3"], "Description")
    assert description.startswith("Protoscope masks of imariswriter_sample.ims (") and "?=" in description


def test_plan_batch_names_the_slices_to_embed():
    """core.batch.plan_batch, the plan the page shows and apply_prototype follows: z-neighbours within 2·z_sigma
    are needed, cached ones are skipped; best mode's pixel classifier (no patch projection) embeds nothing."""
    from types import SimpleNamespace

    from core.batch import plan_batch
    from core.config import PipelineConfig
    from core.errors import OptionError

    embedder = SimpleNamespace(n_slices=10, cached_slices=lambda: {1, 5, 8})
    thesis = SimpleNamespace(config=PipelineConfig.for_mode("thesis").with_options(z_sigma=1), pixel_projection=None)
    plan = plan_batch(embedder, thesis, [9, 2])
    assert plan.z_values == (9, 2)
    assert plan.needed == (0, 1, 2, 3, 4, 7, 8, 9)  # 2 ± 2 and 9 - 2 .. 9 (the stack ends at 9)
    assert plan.embeds and plan.to_embed == (0, 2, 3, 4, 7, 9) and plan.cached == 2
    best = SimpleNamespace(config=PipelineConfig.for_mode("best"), pixel_projection=None)
    plan = plan_batch(embedder, best, [2])
    assert (plan.needed, plan.embeds, plan.to_embed, plan.cached) == ((2,), False, (), 0)
    with pytest.raises(OptionError, match="slice z=10 is outside the stack"):
        plan_batch(embedder, thesis, [3, 10])


# ---- issue 11: stale results (point 5) and the channel by name (points 2 and 7) -------------------------


def _downloads(at) -> list[str]:
    return [b.label for b in at.get("download_button") if b.label.startswith("Download ") and ".npz" not in b.label]


def test_a_new_run_removes_the_previous_result_at_once(app, monkeypatch):
    from core.errors import ProtoscopeError
    from ui import batch as batch_ui

    app.text_input(key="_w.batch.z").input("11:13").run()
    app.button(key="batch.run").click().run(timeout=300)
    assert any("Batch finished: 2 slices" in s.value for s in app.success) and _downloads(app)
    seen = {}

    def failing_run(*args, **kwargs):
        seen["result"] = app.session_state["batch.result"] if "batch.result" in app.session_state else "unset"
        raise ProtoscopeError("the disk is full; free some space")

    monkeypatch.setattr(batch_ui, "run", failing_run)
    app.button(key="batch.run").click().run(timeout=300)
    assert seen == {"result": None}  # gone from the session (and its slot emptied) before the new run started
    assert [e.value for e in app.error] == ["the disk is full; free some space"]
    assert not any("Batch finished" in s.value for s in app.success)
    assert not _downloads(app) and not any("Result" in h.value for h in app.subheader)


def test_a_result_is_marked_stale_when_its_settings_change(app):
    app.text_input(key="_w.batch.z").input("11:13").run()
    app.button(key="batch.run").click().run(timeout=300)
    assert [h.value for h in app.subheader] == ["Result · synthetic_vessels.ome.tif"]
    app.text_input(key="_w.batch.z").input("11:14").run()
    assert not any("Batch finished" in s.value for s in app.success)
    assert [h.value for h in app.subheader] == ["Previous result · synthetic_vessels.ome.tif"]
    assert any("it is the previous run's result" in i.value for i in app.info)
    app.text_input(key="_w.batch.z").input("11:13").run()  # the same settings again: it is their result
    assert any("Batch finished: 2 slices" in s.value for s in app.success)


def _with_source_channel(prototype, name: str):
    """The prototype recording another name for its source channel (matched ignoring case)."""
    return dataclasses.replace(prototype, source_channel_name=name)


def test_the_other_stacks_channel_is_found_by_the_prototypes_channel_name(app, tmp_path, monkeypatch):
    demo = Path(app.session_state["home.sample"].path)
    root = tmp_path / "root"
    root.mkdir()
    with tifffile.TiffFile(demo) as handle:
        data = handle.series[0].asarray()  # (Z, C, Y, X): image, truth
    tifffile.imwrite(root / "swapped.ome.tif", data[:, ::-1], metadata={
        "axes": "ZCYX", "Channel": {"Name": ["Ground truth (synthetic)", "Synthetic vessels (demo)"]}})
    monkeypatch.setenv("PROTOSCOPE_DATA_ROOT", str(root))
    saved = app.session_state["segment.prototypes"][0]
    saved.prototype = _with_source_channel(saved.prototype, "synthetic vessels (DEMO)")
    app.radio(key="_w.batch.target").set_value("other").run()
    app.text_input(key="_w.batch.other_path").input("swapped.ome.tif").run()
    assert app.selectbox(key="_w.batch.other_channel").value == 1  # its name, not its place
    assert not app.warning and not app.error
    app.selectbox(key="_w.batch.other_channel").set_value(0).run()
    warnings = [w.value for w in app.warning]
    assert len(warnings) == 2 and "made on the channel 'synthetic vessels (DEMO)'" in warnings[0]
    assert "channel 0 · Ground truth (synthetic) is selected; channel 1 · Synthetic vessels (demo) has that name" \
        in warnings[0]
    # the truth channel holds 0/1, far from the image's intensities the prototype recorded
    assert "intensities (0-1) are far from those the prototype was made on" in warnings[1]
    app.selectbox(key="_w.batch.other_channel").set_value(1).run()
    app.text_input(key="_w.batch.z").input("12:13").run()
    app.button(key="batch.run").click().run(timeout=300)
    assert not app.exception and not app.error
    np.testing.assert_array_equal(  # the same image as the demo's slice 12: the mask the Segment page showed
        app.session_state["batch.result"].result.area_px, [int(app.session_state["segment.view"].area_px)])


# ---- issue 11: names never collide, a closed tab stops its batch, the result in 3-D -----------------------------


def test_output_names_of_two_runs_in_one_second_differ(monkeypatch):
    from ui import batch as batch_ui

    monkeypatch.setattr(batch_ui.time, "strftime", lambda fmt: "20261205-120000")  # the same second
    first, second = (batch_ui.base_name(Path("/data/stack A.ome.tif"), "vessels 1") for _ in range(2))
    assert first != second
    assert re.fullmatch(r"stack_A_vessels_1_20261205-120000-[0-9a-f]{4}", first)
    assert batch_ui.base_name(Path("/data/a.tif"), "p", tail="beef") == "a_p_20261205-120000-beef"


def test_a_batch_stops_when_its_session_has_ended(app, tmp_path, monkeypatch):
    """The tab was closed (ui.jobs: the session is no longer active): the run stops at the next slice and
    writes nothing."""
    from ui import jobs

    monkeypatch.setattr(jobs, "session_watch", lambda: jobs.SessionWatch("closed-tab", grace_s=0,
                                                                          is_active=lambda session_id: False))
    app.button(key="batch.run").click().run(timeout=300)
    assert not app.exception and not app.error
    assert app.session_state["batch.result"].result.cancelled
    assert app.session_state["batch.result"].result.area_px == []
    assert any("The batch was cancelled" in w.value for w in app.warning)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*_areas.csv"))


def test_the_result_records_its_stack_and_channel_and_is_shown_in_3d(app):
    app.text_input(key="_w.batch.z").input("10:14").run()
    app.button(key="batch.run").click().run(timeout=300)
    assert not app.exception and not app.error
    outputs = app.session_state["batch.result"]
    assert (outputs.stack_path, outputs.channel) == (app.session_state["home.sample"].path, 0)
    assert any(m.value == "**In 3-D**" for m in app.markdown)
    assert len(app.get("plotly_chart")) == 2  # the area per slice and the 3-D view of the masks
    assert any("connected piece" in c.value for c in app.caption)
