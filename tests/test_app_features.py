"""AppTest of the Feature space page: PCA of the slice's patches, colouring, ground-truth scores, selection;
UMAP behind its button (slow: numba compiles on first use)."""

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
    proj = pca_2d(flat, flat[:1])
    labelled = features.Labelled(np.array(["structure", "background", "structure", "background"]), ("structure", "background"))
    fig = features.figure(proj, labelled, ["positive prototype 1"])
    assert [trace.name for trace in fig.data] == ["structure (2)", "background (2)", "prototypes"]
    assert list(fig.data[0].customdata) == [0, 2]  # patch indices travel with the points
    event = {"selection": {"points": [{"customdata": 2}, {"customdata": [0]}, {"x": 1.0}], "point_indices": [0, 1]}}
    selected = features.selected_indices(event)
    assert selected.tolist() == [0, 2]  # the prototype star (no customdata) is ignored
    grid = features.selection_grid(selected, (2, 2))
    assert grid.tolist() == [[True, False], [True, False]]


def test_umap_behind_its_button(app, monkeypatch):
    # The button plumbing only: UMAP itself is replaced by PCA here, because its first fit in a fresh
    # environment compiles numba code for minutes; core's own UMAP test (tests/test_projection.py) runs the real one.
    import dataclasses

    calls = []

    def fake_umap(embeddings, extra=None, **kwargs):
        calls.append(embeddings.shape)
        return dataclasses.replace(pca_2d(embeddings, extra), method="umap", explained_variance=None)

    monkeypatch.setattr(features, "umap_2d", fake_umap)
    app.radio(key="_w.features.method").set_value("umap").run()
    assert any("UMAP takes a few seconds" in info.value for info in app.info)
    assert not calls  # nothing is computed before the button
    app.button(key="features.compute_umap").click().run(timeout=120)
    assert not app.exception and not app.error
    assert calls and calls[0][0] == 70 * 70
    assert app.get("plotly_chart")


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
