"""AppTest of the Evaluate page: a small thesis-protocol run on the demo's ground truth, same numbers as core."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.features.backbones import load_backbone
from core.config import PipelineConfig
from core.features.embedding_cache import EmbeddingCache
from core.metrics import segmentation_scores
from core.protocol import EvalStack, Method, ProtocolSettings, evaluate
from ui import testing


@pytest.fixture
def app(tmp_path_factory, monkeypatch):
    for key, value in testing.app_environment(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)
    at = testing.open_demo(testing.new_app(timeout=300))
    return testing.goto(at, "evaluate")


def core_evaluation(at, methods, **settings):
    sample = at.session_state["home.sample"]
    return evaluate([EvalStack(Path(sample.path), 0, mask_channel=1, name="synthetic_vessels")], methods,
                    [load_backbone("filterbank")], ProtocolSettings(n_points=10, seeds=(0,), **settings),
                    cache=EmbeddingCache())


def test_chosen_slices_in_best_mode_match_core(app):
    app.radio(key="_w.evaluate.slice_choice").set_value("chosen").run()
    app.text_input(key="_w.evaluate.z").input("21, 5").run()
    assert "2 slice(s): 5, 21" in [c.value for c in app.caption]
    app.number_input(key="_w.evaluate.points").set_value(10)
    app.multiselect(key="_w.evaluate.methods").set_value(["session", "otsu"])
    app.multiselect(key="_w.evaluate.settings").set_value(["same-slice", "same-file"])
    app.button(key="evaluate.run").click().run(timeout=300)
    assert not app.exception and not app.error
    result = app.session_state["evaluate.result"]
    assert result.slices == {"synthetic_vessels": [5, 21]}  # exactly the typed slices
    # best (session): 2 same-slice + 1 same-file (the other slice); otsu: 2 same-slice
    assert [(r["method"], r["setting"], r["z"]) for r in result.rows] == [
        ("best (session)", "same-slice", 5), ("best (session)", "same-slice", 21),
        ("best (session)", "same-file", 5 if result.rows[2]["ref_z"] == 21 else 21),
        ("otsu", "same-slice", 5), ("otsu", "same-slice", 21)]
    assert list(app.dataframe[0].value["method"]) == ["best (session)", "best (session)", "otsu"]
    assert app.get("plotly_chart")
    expected = core_evaluation(app, [Method("best (session)", PipelineConfig.best()), Method("otsu", None)],
                               z_values=(5, 21), settings=("same-slice", "same-file"))
    assert [round(r["dice"], 9) for r in result.rows] == [round(r["dice"], 9) for r in expected.rows]
    assert [r["hd95_px"] for r in result.rows] == [r["hd95_px"] for r in expected.rows]


def test_evenly_spaced_slices_in_thesis_mode_match_core(app):
    app.number_input(key="_w.evaluate.n_slices").set_value(2)
    app.number_input(key="_w.evaluate.skip").set_value(2)
    app.number_input(key="_w.evaluate.points").set_value(10)
    app.multiselect(key="_w.evaluate.methods").set_value(["thesis"])
    app.multiselect(key="_w.evaluate.settings").set_value(["same-slice"])
    app.button(key="evaluate.run").click().run(timeout=300)
    assert not app.exception and not app.error
    result = app.session_state["evaluate.result"]
    assert result.slices == {"synthetic_vessels": [2, 21]}  # 2 evenly spaced slices between 2 and 21
    per_slice = app.dataframe[1].value
    assert len(per_slice) == 2 and per_slice["dice"].between(0, 1).all()
    expected = core_evaluation(app, [Method("thesis", PipelineConfig.thesis())], n_slices=2, skip_ends=2,
                               settings=("same-slice",))
    assert [round(r["dice"], 9) for r in result.rows] == [round(r["dice"], 9) for r in expected.rows]


def test_a_bad_slice_selection_is_a_short_error(app):
    app.radio(key="_w.evaluate.slice_choice").set_value("chosen").run()
    app.text_input(key="_w.evaluate.z").input("3, 40").run()
    assert [e.value for e in app.error] == [
        "z 40 is outside the stack; valid z: 0..23 (or -24..-1 from the end), ranges like 0:24, or 'all'"]
    assert not app.exception


def test_without_ground_truth_the_page_says_what_to_do(app):
    app.switch_page("app.py").run()
    app.radio(key="_w.home.truth_kind").set_value("None").run()
    testing.goto(app, "evaluate")
    assert not app.exception and not app.error
    assert any("needs a ground truth" in i.value or "compares masks with a ground truth" in i.value for i in app.info)


def test_no_method_is_a_short_error(app):
    app.multiselect(key="_w.evaluate.methods").set_value([])
    app.button(key="evaluate.run").click().run()
    assert [e.value for e in app.error] == ["choose at least one method to evaluate"]
    assert not app.exception


def test_score_my_prototype_gives_core_metrics_of_the_segment_pages_masks(app):
    """Issue 11, point 7: Evaluate could not score the user's own prototype. The current prototype's row for slice
    12 is core.metrics of the very mask the Segment page shows on slice 12; a saved one scores as saved."""
    testing.set_mode(app, "thesis")
    testing.goto(app, "evaluate")
    assert any("No prototype yet" in i.value for i in app.info)
    testing.goto(app, "segment")
    positive, negative = testing.seed_points(testing.demo_truth(12))
    testing.click(app, positive, "positive")
    testing.click(app, negative, "negative")
    segment_mask = app.session_state["segment.view"].segmentation.mask
    app.button(key="segment.save").click().run()
    app.slider(key="_w.segment.th_top").set_value(20.0).run()  # the current prototype now cuts at 20 %
    current_mask = app.session_state["segment.view"].segmentation.mask
    testing.goto(app, "evaluate")
    assert app.selectbox(key="_w.evaluate.mine_choice").options == [
        "the current prototype (Segment page, its threshold now)", "saved: prototype-1"]
    assert app.text_input(key="_w.evaluate.mine_z").value == "2, 7, 12, 16, 21"
    app.text_input(key="_w.evaluate.mine_z").input("12, 5").run()
    app.button(key="evaluate.mine_run").click().run(timeout=300)
    assert not app.exception and not app.error
    result = app.session_state["evaluate.mine_result"]
    assert [(r["method"], r["setting"], r["z"]) for r in result.rows] == [("current", "prototype", 5),
                                                                        ("current", "prototype", 12)]
    expected = segmentation_scores(current_mask, testing.demo_truth(12), pixel_size_um=(0.8, 0.8))
    row = result.rows[1]
    assert (row["dice"], row["iou"], row["hd95_px"], row["hd95_um"]) == (
        expected.dice, expected.iou, expected.hd95_px, expected.hd95_um)
    assert row["mask_fraction"] == pytest.approx(0.20, abs=0.01)  # top 20 % of the patches
    table = app.dataframe[0].value
    assert list(table["z"]) == ["5", "12", "mean"]
    assert table["dice"].iloc[2] == pytest.approx(round((result.rows[0]["dice"] + row["dice"]) / 2, 3))
    assert any(m.value.startswith("**current** on synthetic_vessels, 2 slice(s): mean Dice ") for m in app.markdown)
    # the saved prototype keeps the threshold it was saved with (top 10 %)
    app.selectbox(key="_w.evaluate.mine_choice").set_value("prototype-1").run()
    app.button(key="evaluate.mine_run").click().run(timeout=300)
    saved_row = app.session_state["evaluate.mine_result"].rows[1]
    assert saved_row["method"] == "prototype-1"
    assert saved_row["dice"] == segmentation_scores(segment_mask, testing.demo_truth(12)).dice
    assert saved_row["mask_fraction"] == pytest.approx(0.10, abs=0.01)


def test_adapt_adapts_a_saved_prototype_with_three_plus_three_points_as_core_does(app):
    """Issue 15: the adapt setting on the Evaluate page: a saved prototype plus 3 + 3 points sampled on one slice of
    this stack, scored on the other chosen slices beside the prototype as it is; the numbers of core.protocol."""
    from core.protocol import reference_slice, score_adapted

    testing.set_mode(app, "thesis")
    testing.goto(app, "segment")
    positive, negative = testing.seed_points(testing.demo_truth(12))
    testing.click(app, positive, "positive")
    testing.click(app, negative, "negative")
    app.button(key="segment.save").click().run()
    testing.goto(app, "evaluate")
    app.radio(key="_w.evaluate.slice_choice").set_value("chosen").run()
    app.text_input(key="_w.evaluate.z").input("5, 12, 21").run()
    app.multiselect(key="_w.evaluate.methods").set_value([])  # adapt alone needs no method
    app.multiselect(key="_w.evaluate.settings").set_value(["adapt"]).run()
    assert app.selectbox(key="_w.evaluate.adapt_base").options == [
        "the current prototype (Segment page, its threshold now)", "saved: prototype-1"]
    app.selectbox(key="_w.evaluate.adapt_base").set_value("prototype-1").run()
    app.button(key="evaluate.run").click().run(timeout=300)
    assert not app.exception and not app.error
    result = app.session_state["evaluate.result"]
    clicked = reference_slice([5, 12, 21], 0)
    others = [z for z in (5, 12, 21) if z != clicked]
    assert [(r["method"], r["setting"], r["z"]) for r in result.rows] == [
        row for z in others for row in (("prototype-1", "prototype", z), ("prototype-1 + 3+3 points", "adapt", z))]
    saved = next(p for p in app.session_state["segment.prototypes"] if p.name == "prototype-1").prototype
    sample = app.session_state["home.sample"]
    expected = score_adapted(saved, EvalStack(Path(sample.path), 0, mask_channel=1, name="synthetic_vessels"),
                             ProtocolSettings(n_points=25, seeds=(0,), z_values=(5, 12, 21)),
                             backbone=load_backbone("filterbank"), cache=EmbeddingCache(), name="prototype-1")
    assert [(r["dice"], r["hd95_px"]) for r in result.rows] == [(r["dice"], r["hd95_px"]) for r in expected.rows]
