"""AppTest of the Feature space page: PCA of the slice's patches, colouring, ground-truth scores, selection;
UMAP computed in the background while the PCA map is shown (its first fit compiles numba code for a minute)."""

from __future__ import annotations

import numpy as np
import pytest

from core.metrics import knn_accuracy, patch_labels, silhouette
from core.projection import pca_2d
from ui import features, testing

Z = 12


@pytest.fixture
def app(tmp_path_factory, monkeypatch):
    for key, value in testing.app_environment(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)
    at = testing.open_demo(testing.new_app())
    return testing.goto(at, "features")


def slice_embeddings(at) -> np.ndarray:
    """The slice's (70, 70, 49) embeddings read straight from the on-disk cache with core."""
    from core.features.backbones import load_backbone
    from core.features.embedding import SliceEmbedder
    from core.features.embedding_cache import EmbeddingCache
    from core.io import open_stack

    from core.config import PipelineConfig

    with open_stack(at.session_state["home.sample"].path) as stack:  # best mode (the default): stack normalisation
        embedder = SliceEmbedder(stack, 0, load_backbone("filterbank"), PipelineConfig.best().preprocess,
                                 cache=EmbeddingCache())
        assert embedder.is_cached(Z)
        return embedder.embed(Z)


def test_pca_with_ground_truth_scores(app):
    assert not app.exception and not app.error
    grid = slice_embeddings(app)
    flat = grid.reshape(-1, grid.shape[-1])
    labels = patch_labels(testing.demo_truth(Z), grid.shape[:2]).ravel()
    names = np.where(labels, "structure", "background")
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Silhouette (ground truth, cosine)"] == f"{silhouette(flat, names):.3f}"
    assert metrics["10-NN accuracy (ground truth)"] == f"{knn_accuracy(flat, names, k=10):.3f}"
    assert metrics["Patches"] == "4,900 × 49 dims"
    assert app.get("plotly_chart")  # the scatter is drawn
    color_radio = next(r for r in app.radio if "Colour by" == r.label)
    assert color_radio.options == ["ground truth", "clicked points"]  # no mask before any click


def test_colours_follow_mask_and_points_after_clicks(app):
    testing.goto(app, "segment")
    positive, negative = testing.seed_points(testing.demo_truth(Z))
    testing.click(app, positive, "positive")
    testing.click(app, negative, "negative")
    testing.goto(app, "features")
    color_radio = next(r for r in app.radio if "Colour by" == r.label)
    assert color_radio.options == ["current mask", "ground truth", "clicked points"]
    mask = app.session_state["segment.view"].segmentation.mask
    labelled = features.mask_labels(mask, (70, 70))
    assert (labelled.names == "structure").sum() == patch_labels(mask, (70, 70)).sum()
    assert not app.exception and not app.error


def test_figure_and_selection_helpers():
    flat = np.array([[1, 0], [0, 1], [1, 1], [2, 0.5]], np.float32)
    proj = pca_2d(flat, flat[:3])
    labelled = features.Labelled(np.array(["structure", "background", "structure", "background"]), ("structure", "background"))
    fig = features.figure(proj, labelled, ["positive prototype 1", "positive prototype 2", "negative prototype 1"])
    # issue 11, point 6: one legend entry per kind of prototype, in the colour of its stars
    assert [trace.name for trace in fig.data] == ["structure (2)", "background (2)", "positive prototypes (2)",
                                                  "negative prototype"]
    assert fig.data[2].marker.color == features.PROTOTYPE_COLORS["positive"] == "#006400"
    assert fig.data[3].marker.color == features.PROTOTYPE_COLORS["negative"] == "#8b0000"
    assert list(fig.data[2].x) == pytest.approx(proj.extra_coords[:2, 0]) and list(fig.data[3].text) == [
        "negative prototype 1"]
    assert list(fig.data[0].customdata) == [0, 2]  # patch indices travel with the points
    event = {"selection": {"points": [{"customdata": 2}, {"customdata": [0]}, {"x": 1.0}], "point_indices": [0, 1]}}
    selected = features.selected_indices(event)
    assert selected.tolist() == [0, 2]  # the prototype star (no customdata) is ignored
    grid = features.selection_grid(selected, (2, 2))
    assert grid.tolist() == [[True, False], [True, False]]


def _chart_axis(at) -> str:
    import json

    return json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["xaxis"]["title"]["text"]


def test_umap_runs_in_the_background_while_pca_is_shown(app, monkeypatch):
    # UMAP itself is replaced by PCA here, because its first fit in a fresh environment compiles numba code for
    # a minute; core's own UMAP test (tests/test_projection.py) runs the real one.
    import dataclasses
    import threading

    release, calls, phases = threading.Event(), [], []

    def slow_umap(embeddings, extra=None, *, on_phase=None, **kwargs):
        calls.append(embeddings.shape)
        for phase in ("load", "fit"):
            on_phase(phase)
            phases.append(phase)
        assert release.wait(60)
        return dataclasses.replace(pca_2d(embeddings, extra), method="umap", explained_variance=None)

    monkeypatch.setattr(features, "umap_2d", slow_umap)
    assert _chart_axis(app).startswith("PC1 (")
    app.radio(key="_w.features.method").set_value("umap").run()
    assert not app.exception and not app.error
    job = next(iter(app.session_state["features.umap_jobs"].values()))
    assert job.running and calls == [(4900, 49)]
    assert _chart_axis(app).startswith("PC1 (")  # the PCA map at once, not a blank page
    notes = [i.value for i in app.info if i.value.startswith("UMAP: ")]
    assert len(notes) == 1 and "the PCA map is shown meanwhile" in notes[0]
    app.run()  # a rerun while it runs neither restarts it nor waits for it
    assert calls == [(4900, 49)] and job.running and phases == ["load", "fit"]
    assert "UMAP: fitting the map" in [i.value for i in app.info if i.value.startswith("UMAP: ")][0]
    release.set()
    job.thread.join(60)
    assert job.phase == "done" and job.result.method == "umap"
    app.run()
    assert _chart_axis(app) == "UMAP 1" and not any(i.value.startswith("UMAP: ") for i in app.info)
    app.radio(key="_w.features.method").set_value("pca").run()
    app.radio(key="_w.features.method").set_value("umap").run()
    assert _chart_axis(app) == "UMAP 1" and len(calls) == 1  # kept: not computed again


def test_a_failed_umap_says_so_and_keeps_the_pca_map(app, monkeypatch):
    def broken_umap(*args, **kwargs):
        raise MemoryError("no room for the graph")

    monkeypatch.setattr(features, "umap_2d", broken_umap)
    app.radio(key="_w.features.method").set_value("umap").run()
    job = next(iter(app.session_state["features.umap_jobs"].values()))
    job.thread.join(30)
    app.run()
    assert [e.value for e in app.error] == ["UMAP failed (MemoryError: no room for the graph); the PCA map is shown."]
    assert _chart_axis(app).startswith("PC1 (") and not app.exception


def test_a_rerun_does_not_normalise_the_slice_again(app, monkeypatch):
    """The display image of the slice is memoised per (stack, slice, size): reruns (a selection, a radio) reuse it."""
    from core.features.embedding import SliceEmbedder

    calls = []
    original = SliceEmbedder.normalized

    def counting(self, z):
        calls.append(z)
        return original(self, z)

    monkeypatch.setattr(SliceEmbedder, "normalized", counting)
    app.run()
    app.run()
    assert not app.exception and not app.error
    assert calls == []  # the first run (the fixture) made the display image; the reruns only recalled it
