"""AppTest of the Segment page: clicks (injected as the canvas's value), heatmap, mask, area, thresholds,
undo/clear, points on several slices, saved prototypes, and the state kept across pages; in thesis mode
(exact top-10 % numbers) and in best mode, the default (patch preview first, then the pixel classifier)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tifffile

from core.config import PipelineConfig
from core.demo import make_demo
from core.features.embedding import SliceEmbedder
from core.features.embedding_cache import EmbeddingCache
from core.io import open_stack
from core.pipeline import Scorer, adapt_prototype, build_prototype, prototype_lineage
from core.prototypes import PointSet, load_prototype
from core.thresholds import ThresholdSpec, otsu_value
from ui import canvas, testing

Z = 12  # the page opens on slice 24 // 2


@pytest.fixture
def best_app(tmp_path_factory, monkeypatch):
    """The Segment page on the demo in the default mode (best)."""
    for key, value in testing.app_environment(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)
    at = testing.open_demo(testing.new_app())
    return testing.goto(at, "segment")


@pytest.fixture
def app(tmp_path_factory, monkeypatch):
    """The Segment page on the demo in thesis mode (exact, hand-checkable numbers)."""
    for key, value in testing.app_environment(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)
    at = testing.set_mode(testing.open_demo(testing.new_app()), "thesis")
    return testing.goto(at, "segment")


@pytest.fixture
def seeds():
    return testing.seed_points(testing.demo_truth(Z))


def click_four(at, seeds):
    positive, negative = seeds
    testing.click(at, positive, "positive")
    return testing.click(at, negative, "negative")


def sid(at) -> str:
    return testing.canvas_key(at).split(".")[2]


def reference_segmentation(at, points: PointSet, threshold: str = "top:10", config: PipelineConfig | None = None):
    """The same segmentation computed directly with core (fresh embedder, same on-disk cache)."""
    sample = at.session_state["home.sample"]
    config = config or PipelineConfig.thesis()
    with open_stack(sample.path) as stack:
        embedder = SliceEmbedder(stack, 0, load_backbone_filterbank(), config.preprocess, cache=EmbeddingCache())
        prototype = build_prototype(embedder, points, config)
        scorer = Scorer(prototype)
        return scorer.segment(embedder, Z, threshold=ThresholdSpec.parse(threshold))


def seed_point_set(seeds) -> PointSet:
    return PointSet(np.array([[x, y, Z] for x, y in seeds[0]]), np.array([[x, y, Z] for x, y in seeds[1]]))


def load_backbone_filterbank():
    from core.features.backbones import load_backbone

    return load_backbone("filterbank")


def test_page_asks_for_points_first(app):
    assert not app.exception and not app.error
    assert any("Click positive points" in info.value for info in app.info)
    view = app.session_state["segment.view"]
    assert view.segmentation is None and view.display == (512, 512)


def test_clicks_give_the_heatmap_mask_and_area_of_core(app, seeds):
    click_four(app, seeds)
    assert not app.exception and not app.error
    (px, py), (nx, ny) = seeds[0][0], seeds[1][0]
    stored = app.session_state["segment.points"][sid(app)][Z]
    assert [p[2] for p in stored] == [1, 1, -1, -1]
    assert stored[0][:2] == [px, py] and stored[2][:2] == [nx, ny]  # canvas px -> image px round trip
    view = app.session_state["segment.view"]
    expected = reference_segmentation(app, seed_point_set(seeds))
    np.testing.assert_array_equal(view.segmentation.mask, expected.mask)
    assert view.segmentation.score_map.shape == (70, 70)
    assert int((view.segmentation.score_map >= expected.threshold).sum()) >= 490  # top 10 % of 4900 patches
    area = int(expected.mask.sum())
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Mask area (px)"] == f"{area:,}"
    assert metrics["Mask area (µm²)"] == f"{area * 0.8 * 0.8:,.0f}"  # demo pixels are 0.8 x 0.8 µm
    assert set(view.timings) == {"prototype", "scores", "mask", "image", "total"}
    assert view.image_png[:2] == b"\xff\xd8"  # JPEG overlay for the canvas


def test_threshold_move_recomputes_only_the_mask(app, seeds):
    click_four(app, seeds)
    prototypes = dict(app.session_state["segment._memo.prototype"])
    scores = dict(app.session_state["segment._memo.scores"])
    area_10 = app.session_state["segment.view"].area_px
    app.slider(key="_w.segment.th_top").set_value(20.0).run()
    view = app.session_state["segment.view"]
    # same prototype and score-map objects: nothing but the mask was computed
    assert dict(app.session_state["segment._memo.prototype"]) == prototypes
    assert all(app.session_state["segment._memo.scores"][k] is v for k, v in scores.items())
    assert view.area_px > area_10
    grid = view.segmentation.score_map
    assert int((grid >= view.segmentation.threshold).sum()) == 980  # exactly 20 % of 4900 patches (no ties)


def test_absolute_score_and_the_otsu_button(app, seeds):
    click_four(app, seeds)
    app.radio(key="_w.segment.th_kind").set_value("score").run()
    app.slider(key="_w.segment.th_score").set_value(0.1).run()
    seg = app.session_state["segment.view"].segmentation
    assert seg.threshold == pytest.approx(0.1)
    assert seg.mask.sum() == (seg.scores >= 0.1).sum()
    app.button(key="segment.otsu").click().run()
    seg = app.session_state["segment.view"].segmentation
    assert app.session_state["segment.th_kind"] == "score"
    assert app.session_state["segment.th_score"] == pytest.approx(round(otsu_value(seg.scores), 2))
    assert seg.threshold == pytest.approx(app.session_state["segment.th_score"])


def test_undo_and_clear(app, seeds):
    click_four(app, seeds)
    app.button(key="segment.undo").click().run()
    assert [p[2] for p in app.session_state["segment.points"][sid(app)][Z]] == [1, 1, -1]
    app.button(key="segment.clear").click().run()
    assert Z not in app.session_state["segment.points"][sid(app)]
    assert app.session_state["segment.view"].segmentation is None
    assert not app.exception


def test_points_on_two_slices_are_both_used(app, seeds):
    click_four(app, seeds)
    app.slider(key="_w.segment.z").set_value(5).run()
    positive, _ = testing.seed_points(testing.demo_truth(5))
    testing.click(app, positive[:1], "positive")
    view = app.session_state["segment.view"]
    assert view.prototype.points.slices == [5, 12]
    assert len(view.prototype.positive_examples) == 3 and len(view.prototype.negative_examples) == 2
    assert "3 positive, 2 negative on 2 slice(s)" in " ".join(m.value for m in app.markdown)


def test_saved_prototype_downloads_and_loads_back(app, seeds):
    click_four(app, seeds)
    app.text_input(key="segment.proto_name").input("vessels").run()
    app.button(key="segment.save").click().run()
    assert any("Saved 'vessels'" in s.value for s in app.success)
    saved = app.session_state["segment.prototypes"]
    assert [p.name for p in saved] == ["vessels"]
    assert any(b.label == "Download vessels.npz" for b in app.get("download_button"))
    loaded = load_prototype(saved[0].data, backbone="filterbank", embed_dim=49)
    assert str(loaded.config.threshold) == "top:10"
    np.testing.assert_array_equal(loaded.points.positive, [[x, y, Z] for x, y in seeds[0]])
    with pytest.raises(Exception, match="made with backbone 'filterbank'"):
        load_prototype(saved[0].data, backbone="dinov2_vits14")


def test_points_and_settings_survive_other_pages(app, seeds):
    click_four(app, seeds)
    app.slider(key="_w.segment.th_top").set_value(15.0).run()
    app.slider(key="_w.segment.opacity").set_value(0.8).run()
    testing.goto(app, "features")
    app.switch_page("app.py").run()
    testing.goto(app, "segment")
    assert app.slider(key="_w.segment.th_top").value == 15.0
    assert app.slider(key="_w.segment.opacity").value == 0.8
    assert len(app.session_state["segment.points"][sid(app)][Z]) == 4
    assert app.session_state["segment.view"].segmentation is not None


def test_canvas_geometry_and_label_sync():
    # a point-mode click at canvas (100, 100) on a 512 px canvas over a 256 px slice: Fabric stores
    # left = 100 - (radius 4 + stroke 2 / 2) = 95, top = 100; the image pixel is (50, 50)
    circle = {"type": "Circle", "left": 95, "top": 100, "radius": 4, "strokeWidth": 2, "originX": "left", "originY": "center"}
    assert canvas.to_image_xy(circle, (512, 512), (256, 256)) == (50, 50)
    assert canvas.to_image_xy(canvas.to_object(31, 7, -1, (512, 256), (100, 200)), (512, 256), (100, 200)) == (31, 7)
    stored = [[50, 50, 1]]
    objects = [circle, canvas.to_object(10, 20, 1, (512, 512), (256, 256))]
    merged, added = canvas.sync_points(stored, objects, -1, (512, 512), (256, 256))
    assert merged == [[50, 50, 1], [10, 20, -1]] and added == 1  # the new point takes the radio's label
    merged, added = canvas.sync_points(merged, objects[:1], -1, (512, 512), (256, 256))
    assert merged == [[50, 50, 1]] and added == 0  # the canvas's own undo removed one


def test_best_mode_previews_the_patch_heatmap_then_shows_the_pixel_mask(best_app, seeds):
    app = best_app
    assert app.session_state["home.mode"] == "best"
    testing.click(app, seeds[0], "positive")
    view = app.session_state["segment.view"]
    # positives only: the patch-level preview at once, and a hint that the classifier needs background
    assert view.preview and not view.pending and view.segmentation is None
    assert any("needs negative points too" in info.value for info in app.info)
    assert next(iter(app.session_state["segment._memo.preview_scores"].values())).shape == (70, 70)
    testing.click(app, seeds[1], "negative")
    assert not app.exception and not app.error
    # the run drew the preview, trained the classifier and reran: the page now shows the pixel result
    view = app.session_state["segment.view"]
    assert not view.preview and view.segmentation.score_map.shape == (256, 256)
    assert app.session_state["segment.th_kind"] == "calibrated"
    assert view.segmentation.threshold == pytest.approx(view.prototype.calibrated_threshold)
    expected = reference_segmentation(app, seed_point_set(seeds), "calibrated", PipelineConfig.best())
    np.testing.assert_array_equal(view.segmentation.mask, expected.mask)
    assert {m.label: m.value for m in app.metric}["Mask area (px)"] == f"{int(expected.mask.sum()):,}"
    assert app.session_state["segment.preview_timings"]["total"] > 0
    assert app.session_state["segment.pixel_timings"]["prototype"] > 0  # the forest was fitted in that run
    assert any(c.value.startswith("Server time: live linear preview ") and ", then pixel classifier " in c.value
               for c in app.caption)


def test_best_mode_score_slider_takes_over_from_the_calibrated_threshold(best_app, seeds):
    app = click_four(best_app, seeds)
    seg = app.session_state["segment.view"].segmentation
    slider = app.slider(key="_w.segment.th_score")
    assert slider.value == pytest.approx(round(seg.threshold, 2))  # it shows the cut in effect
    app.slider(key="_w.segment.th_score").set_value(round(seg.threshold, 2) + 0.3).run()
    moved = app.session_state["segment.view"].segmentation
    assert app.session_state["segment.th_kind"] == "score"
    assert moved.threshold == pytest.approx(round(seg.threshold, 2) + 0.3)
    assert moved.mask.sum() == (seg.scores >= moved.threshold).sum() < seg.mask.sum()


def test_the_sidebar_switches_to_thesis_mode(best_app, seeds):
    app = click_four(best_app, seeds)
    app.radio(key="_w.sidebar.mode").set_value("thesis").run()  # the sidebar's switch, on the Segment page
    assert not app.exception and not app.error
    view = app.session_state["segment.view"]
    assert view.segmentation.score_map.shape == (70, 70)
    assert app.session_state["segment.th_kind"] == "top"
    np.testing.assert_array_equal(view.segmentation.mask, reference_segmentation(app, seed_point_set(seeds)).mask)


def test_toggles_and_opacity_keep_their_values_over_ten_page_round_trips(app, seeds):
    """Issue 11, point 3: back on Segment, the Heatmap and Mask outline toggles and the opacity slider showed
    their widget defaults (off, off, 0) in about 6 of 10 round trips. Entering a page runs it twice at once
    (the canvas reports its first value), and a browser that drew only the second run's widgets shows what
    that run told it: the stored value, or the widget's default when the run did not send it."""
    click_four(app, seeds)
    app.slider(key="_w.segment.opacity").set_value(0.7).run()
    keys = {"_w.segment.show_heatmap": True, "_w.segment.show_mask": True, "_w.segment.opacity": 0.7}

    def widgets():
        return [app.toggle(key="_w.segment.show_heatmap"), app.toggle(key="_w.segment.show_mask"),
                app.slider(key="_w.segment.opacity")]

    for trip, other in enumerate(["features", "batch", "evaluate", "home", "features"] * 2):
        testing.goto(app, other)
        testing.goto(app, "segment")
        testing.rerun_unmounted(app, widgets())
        shown = {w.key: testing.shown_value(w) for w in widgets()}
        assert shown == pytest.approx(keys), f"round trip {trip + 1} via {other}"
        assert (app.session_state["segment.show_heatmap"], app.session_state["segment.show_mask"],
                app.session_state["segment.opacity"]) == (True, True, 0.7)
    assert not app.exception and not app.error


@pytest.mark.parametrize("kind", ["grey8", "rgb", "grey16"])
def test_a_png_image_is_segmented(tmp_path_factory, monkeypatch, tmp_path, kind):
    """Issue 11, point 1: a PNG opened, then Segment failed with "'bytes' object has no attribute 'nbytes'"."""
    from PIL import Image

    for key, value in testing.app_environment(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)
    yy, xx = np.mgrid[0:64, 0:80]
    disc = ((yy - 32) ** 2 + (xx - 24) ** 2) < 144  # a bright disc on the left, dim noise elsewhere
    grey = (np.random.default_rng(1).random((64, 80)) * 50 + disc * 180).astype(np.uint8)
    image = {"grey8": grey, "rgb": np.stack([grey, grey, grey // 2], -1), "grey16": grey.astype(np.uint16) * 200}[kind]
    path = tmp_path / f"{kind}.png"
    Image.fromarray(image).save(path)
    at = testing.set_mode(testing.new_app(), "thesis")
    at.radio(key="_w.home.source").set_value("Upload a small file").run()
    at.file_uploader(key="home.upload").upload(path.name, path.read_bytes(), "image/png").run()
    at.button(key="home.open_upload").click().run()
    at = testing.goto(at, "segment")
    assert not at.exception and not at.error
    testing.click(at, [(24, 32), (20, 30)], "positive", slice_shape=(64, 80))
    testing.click(at, [(70, 8), (70, 56)], "negative", slice_shape=(64, 80))
    assert not at.exception and not at.error
    mask = at.session_state["segment.view"].segmentation.mask
    assert mask.shape == (64, 80) and mask[32, 24] and not mask[8, 70] and not mask[56, 70]


# ---- quick adapt: a saved prototype, a few clicks on another stack -------------------------------------------

B_SHAPE = (4, 128, 128)
B_Z = 2  # the page opens on slice 4 // 2


def open_second_stack(at, tmp_path):
    """Upload a second synthetic stack ('other.tif', one channel, inverted contrast: dark tubes on bright) and
    return its (Z, Y, X) bool ground truth."""
    image, truth = make_demo(B_SHAPE, seed=2)
    inverted = (65535 - image.astype(np.int64) * 8).clip(0, 65535).astype(np.uint16)
    path = tmp_path / "other.tif"
    tifffile.imwrite(path, inverted, imagej=True, metadata={"axes": "ZYX"})
    at.switch_page("app.py").run()
    at.radio(key="_w.home.source").set_value("Upload a small file").run()
    at.file_uploader(key="home.upload").upload(path.name, path.read_bytes(), "image/tiff").run()
    at.button(key="home.open_upload").click().run()
    testing.goto(at, "segment")
    return truth > 0


def test_quick_adapt_adds_this_stacks_clicks_to_a_saved_prototype(app, seeds, tmp_path):
    click_four(app, seeds)
    app.text_input(key="segment.proto_name").input("vessels").run()
    app.button(key="segment.save").click().run()
    truth_b = open_second_stack(app, tmp_path)
    assert app.session_state["home.sample"].name == "other.tif"
    app.selectbox(key="_w.segment.base").set_value("vessels").run()
    assert not app.exception and not app.error
    # no clicks here yet: the saved prototype as it is, on this stack
    view = app.session_state["segment.view"]
    saved = app.session_state["segment.prototypes"][0]
    assert view.prototype is saved.prototype and view.segmentation is not None
    assert "'vessels' as it was saved, on this stack" in view.message
    assert "Based on 'vessels' (2 + 2 examples from synthetic_vessels); the canvas shows this stack's points only" in [
        c.value for c in app.caption]
    assert "**Examples** from this stack: 0, inherited: 4" in [m.value for m in app.markdown]
    # 1 + 1 clicks on this stack
    positive, negative = testing.seed_points(truth_b[B_Z])
    testing.click(app, positive[:1], "positive", slice_shape=B_SHAPE[1:])
    testing.click(app, negative[:1], "negative", slice_shape=B_SHAPE[1:])
    assert not app.exception and not app.error
    view = app.session_state["segment.view"]
    prototype = view.prototype
    assert (len(prototype.positive_examples), len(prototype.negative_examples)) == (2 + 1, 2 + 1)
    assert len(app.session_state["segment.points"][sid(app)][B_Z]) == 2  # the canvas holds this stack's points only
    drawn = [len(d["objects"]) for k, d in app.session_state["segment.snapshots"].items() if f".{sid(app)}." in k]
    assert drawn and max(drawn) <= 2  # never the base's points (they lie on the other stack)
    assert "**Examples** from this stack: 2, inherited: 4" in [m.value for m in app.markdown]
    origins = app.dataframe[0].value
    assert list(origins["from"]) == ["this stack (other)", "inherited: synthetic_vessels"]
    assert list(origins["positive"]) == [1, 2] and list(origins["negative"]) == [1, 2]
    # the same as core's adapt_prototype on this stack
    points = PointSet(np.array([[*positive[0], B_Z]]), np.array([[*negative[0], B_Z]]))
    with open_stack(app.session_state["home.sample"].path) as stack:
        embedder = SliceEmbedder(stack, 0, load_backbone_filterbank(), PipelineConfig.thesis().preprocess,
                                 cache=EmbeddingCache())
        expected = adapt_prototype(saved.prototype, embedder, points, PipelineConfig.thesis())
        mask = Scorer(expected).segment(embedder, B_Z, threshold=ThresholdSpec("top", 10.0)).mask
    np.testing.assert_array_equal(view.segmentation.mask, mask)
    np.testing.assert_allclose(prototype.positive_references, expected.positive_references, rtol=1e-6)
    # saving keeps both sets of examples and records where they came from
    app.text_input(key="segment.proto_name").input("vessels-other").run()
    app.button(key="segment.save").click().run()
    assert any("examples from synthetic_vessels: 2 + 2, other: 1 + 1" in s.value for s in app.success)
    adapted = app.session_state["segment.prototypes"][1]
    assert [(e["positive"], e["negative"]) for e in prototype_lineage(adapted.prototype)] == [(2, 2), (1, 1)]
    with np.load(io.BytesIO(adapted.data), allow_pickle=False) as archive:
        lineage = json.loads(str(archive["metadata_json"]))["lineage"]
    assert [entry["source_file"].rsplit("/", 1)[-1] for entry in lineage] == ["synthetic_vessels.ome.tif", "other.tif"]
    assert len(load_prototype(adapted.data).positive_examples) == 3


def test_an_uploaded_base_of_another_mode_is_refused_with_a_message(app, seeds, tmp_path):
    click_four(app, seeds)
    app.button(key="segment.save").click().run()
    data = app.session_state["segment.prototypes"][0].data
    open_second_stack(app, tmp_path)
    app.selectbox(key="_w.segment.base").set_value("\x00upload").run()
    app.file_uploader(key="segment.base_file").upload("thesis-vessels.npz", data, "application/octet-stream").run()
    assert not app.exception and not app.error
    assert any(c.value.startswith("Based on 'thesis-vessels' (2 + 2 examples from synthetic_vessels)") for c in app.caption)
    app.radio(key="_w.sidebar.mode").set_value("best").run()
    assert not app.exception and not app.error
    view = app.session_state["segment.view"]
    assert view.prototype is None
    assert ("'thesis-vessels' cannot be adapted here: the base prototype was made in thesis mode but best mode is "
            "selected; switch to thesis mode to adapt it, or start a new prototype.") in [i.value for i in app.info]
    app.file_uploader(key="segment.base_file").upload("broken.npz", b"not a zip", "application/octet-stream").run()
    assert any("broken.npz" in e.value for e in app.error) and not app.exception


def test_orthogonal_views_follow_the_slice_with_the_mask_outline(app, seeds):
    click_four(app, seeds)
    captions = [c.value for c in app.caption if c.value.startswith("Point x ")]
    assert len(captions) == 1 and f"z {Z} " in captions[0] and "cyan: mask outline" in captions[0]
    assert app.get("image")  # the XY · XZ · YZ picture
    app.slider(key="_w.segment.z").set_value(5).run()
    assert any(c.value.startswith("Point x ") and "z 5 " in c.value for c in app.caption)
