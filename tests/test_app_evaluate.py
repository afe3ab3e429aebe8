"""AppTest of the Evaluate page: a small thesis-protocol run on the demo's ground truth, same numbers as core."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.backbones import load_backbone
from core.config import PipelineConfig
from core.embedding_cache import EmbeddingCache
from core.protocol import EvalStack, Method, ProtocolSettings, evaluate
from ui import testing


@pytest.fixture
def app(tmp_path_factory, monkeypatch):
    for key, value in testing.app_environment(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)
    at = testing.open_demo(testing.new_app(timeout=300))
    return testing.goto(at, "evaluate")


def test_small_run_matches_core(app):
    app.number_input(key="_w.evaluate.n_slices").set_value(2)
    app.number_input(key="_w.evaluate.skip").set_value(2)
    app.number_input(key="_w.evaluate.points").set_value(10)
    app.multiselect(key="_w.evaluate.methods").set_value(["session", "otsu"])
    app.multiselect(key="_w.evaluate.settings").set_value(["same-slice"])
    app.button(key="evaluate.run").click().run(timeout=300)
    assert not app.exception and not app.error
    result = app.session_state["evaluate.result"]
    assert result.slices == {"synthetic_vessels": [2, 21]}  # 2 evenly spaced slices between 2 and 21
    assert len(result.rows) == 4  # (thesis, otsu) x 2 slices x 1 seed, same-slice only
    summary = app.dataframe[0].value
    assert list(summary["method"]) == ["thesis (session)", "otsu"]
    per_slice = app.dataframe[1].value
    assert len(per_slice) == 4 and per_slice["dice"].between(0, 1).all()
    assert app.get("plotly_chart")

    sample = app.session_state["home.sample"]
    expected = evaluate(
        [EvalStack(Path(sample.path), 0, mask_channel=1, name="synthetic_vessels")],
        [Method("thesis (session)", PipelineConfig.thesis()), Method("otsu", None)],
        [load_backbone("filterbank")],
        ProtocolSettings(n_points=10, seeds=(0,), n_slices=2, skip_ends=2, settings=("same-slice",)),
        cache=EmbeddingCache(),
    )
    assert [round(r["dice"], 9) for r in result.rows] == [round(r["dice"], 9) for r in expected.rows]
    assert [r["hd95_px"] for r in result.rows] == [r["hd95_px"] for r in expected.rows]


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
