"""AppTest of the home page (app.py): open the demo, by path inside the data root, by upload; channels,
ground truth, backbones (with the random-weights warning) and the errors a user can cause."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from core.config import PipelineConfig
from ui import testing


@pytest.fixture
def data_root(tmp_path):
    """A data root with one 3-slice uint16 stack in a sub-folder and one damaged TIFF."""
    root = tmp_path / "root"
    (root / "lab").mkdir(parents=True)
    stack = np.arange(3 * 2 * 32 * 40, dtype=np.uint16).reshape(3, 2, 32, 40)
    tifffile.imwrite(root / "lab" / "sample.tif", stack, imagej=True, metadata={"axes": "ZCYX"})
    (root / "broken.tif").write_bytes(b"II*\x00 this is not really a tiff")
    return root


@pytest.fixture
def app(tmp_path_factory, monkeypatch, data_root):
    for key, value in testing.app_environment(tmp_path_factory.getbasetemp(), data_root).items():
        monkeypatch.setenv(key, value)
    return testing.new_app()


def texts(at, kind: str) -> list[str]:
    return [element.value for element in getattr(at, kind)]


def test_home_starts_with_the_offline_backbone_and_no_sample(app):
    assert not app.exception
    assert "No sample open" in texts(app, "caption")
    assert any("Filter bank (offline)" in text for text in texts(app, "markdown"))
    assert "Device: CPU (numpy)" in texts(app, "caption")
    assert app.session_state["home.sample"] is None


def test_demo_opens_with_image_channel_0_and_truth_channel_1(app):
    testing.open_demo(app)
    assert not app.exception and not app.error
    sample = app.session_state["home.sample"]
    assert sample.origin == "demo" and sample.path.endswith("synthetic_vessels.ome.tif")
    assert any("synthetic demo, not a real sample" in text for text in texts(app, "markdown"))
    assert "ome-tiff · 24 slices x 2 channel(s) x 256 x 256 px · uint16 · voxel 0.8 x 0.8 x 2 µm" in texts(app, "caption")
    assert app.session_state["home.channel"] == 0
    assert app.session_state["home.truth"].channel == 1
    assert "Synthetic demo stack (generated, not a real sample)" in texts(app, "caption")


def test_truth_channel_equal_to_image_channel_is_an_error(app):
    testing.open_demo(app)
    app.selectbox(key="_w.home.truth_channel").set_value(0).run()
    assert any("is the image channel" in text for text in texts(app, "error"))
    assert app.session_state["home.truth"] is None
    app.selectbox(key="_w.home.channel").set_value(1).run()  # swap: image 1, truth 0
    assert not app.error
    assert app.session_state["home.truth"].channel == 0
    assert app.session_state["home.channel"] == 1


def test_path_outside_the_data_root_is_refused(app, tmp_path):
    app.radio(key="_w.home.source").set_value("File in the data root").run()
    outside = tmp_path / "outside.tif"
    tifffile.imwrite(outside, np.zeros((2, 8, 8), np.uint8), photometric="minisblack")
    for typed in (str(outside), "../outside.tif"):
        app.text_input(key="home.path_text").input(typed).run()
        app.button(key="home.open_path").click().run()
        assert any("is outside the data root" in text and "PROTOSCOPE_DATA_ROOT" in text for text in texts(app, "error"))
        assert app.session_state["home.sample"] is None
    assert not app.exception


def test_picker_opens_a_stack_inside_the_root(app, data_root):
    app.radio(key="_w.home.source").set_value("File in the data root").run()
    app.selectbox(key="home.browse_pick").set_value("lab/").run()
    assert app.session_state["home.browse"] == "lab"
    app.selectbox(key="home.file_pick").set_value("sample.tif").run()
    app.button(key="home.open_file").click().run()
    assert not app.error and not app.exception
    assert app.session_state["home.sample"].path == str((data_root / "lab" / "sample.tif").resolve())
    assert "imagej-tiff · 3 slices x 2 channel(s) x 32 x 40 px · uint16 · voxel unknown (areas in pixels only)" in texts(app, "caption")
    assert app.session_state["home.truth"] is None


def test_damaged_file_gives_a_short_error(app):
    app.radio(key="_w.home.source").set_value("File in the data root").run()
    app.selectbox(key="home.file_pick").set_value("broken.tif").run()
    app.button(key="home.open_file").click().run()
    assert not app.exception
    errors = texts(app, "error")
    assert len(errors) == 1 and "broken.tif" in errors[0] and "Traceback" not in errors[0]
    assert app.session_state["home.sample"] is None


def test_upload_opens_the_file(app, tmp_path):
    app.radio(key="_w.home.source").set_value("Upload a small file").run()
    path = tmp_path / "up.tif"
    tifffile.imwrite(path, np.full((4, 16, 16), 7, np.uint8), photometric="minisblack")
    app.file_uploader(key="home.upload").upload("up.tif", path.read_bytes(), "image/tiff").run()
    app.button(key="home.open_upload").click().run()
    assert not app.error and not app.exception
    sample = app.session_state["home.sample"]
    assert sample.origin == "upload" and sample.name == "up.tif"
    with tifffile.TiffFile(sample.path) as tif:
        assert tif.series[0].shape == (4, 16, 16)


def test_truth_file_with_another_shape_is_refused(app, data_root):
    testing.open_demo(app)
    app.radio(key="_w.home.truth_kind").set_value("A mask file").run()
    app.text_input(key="home.truth_path").input("lab/sample.tif").run()
    app.button(key="home.use_truth").click().run()
    assert any("is 3 x 32 x 40" in text and "choose the mask file that belongs" in text for text in texts(app, "error"))
    assert app.session_state["home.truth"] is None


def test_random_weights_are_loaded_and_flagged(app):
    app.session_state["home.backbone_overrides"] = testing.TINY_DINOV2
    app.selectbox(key="_w.home.backbone_name").set_value("dinov2_vits14").run()
    app.radio(key="_w.home.weights_kind").set_value("random").run()
    app.button(key="home.load_backbone").click().run()
    assert not app.error and not app.exception
    warnings = texts(app, "warning")
    assert any("RANDOM WEIGHTS — timing only" in text for text in warnings)
    assert any("DINOv2 ViT-S/14 · RANDOM WEIGHTS" in text for text in texts(app, "markdown"))
    assert app.session_state["home.backbone"].weights == "random"


def test_missing_weights_say_what_to_do(app, data_root):
    (data_root / "weights").mkdir()
    (data_root / "weights" / "broken.pth").write_bytes(b"not a checkpoint")
    app.selectbox(key="_w.home.backbone_name").set_value("dinov2_vits14").run()
    app.radio(key="_w.home.weights_kind").set_value("path").run()
    app.text_input(key="_w.home.weights_path").input("weights/broken.pth").run()
    app.button(key="home.load_backbone").click().run()
    errors = texts(app, "error")
    assert len(errors) == 1 and "broken.pth" in errors[0], errors
    assert app.session_state["home.backbone"].name == "filterbank"  # the active backbone is unchanged
    assert not app.exception


@pytest.mark.parametrize("typed", ["/etc/passwd", "../outside.pth", "missing.pth"])
def test_weights_are_read_only_inside_the_weights_root(app, data_root, typed):
    """No user can make the server read or hash a file outside the data root (or PROTOSCOPE_WEIGHTS_DIR)."""
    (data_root.parent / "outside.pth").write_bytes(b"secret")
    app.selectbox(key="_w.home.backbone_name").set_value("dinov2_vits14").run()
    app.radio(key="_w.home.weights_kind").set_value("path").run()
    app.text_input(key="_w.home.weights_path").input(typed).run()
    app.button(key="home.load_backbone").click().run()
    errors = texts(app, "error")
    assert len(errors) == 1 and errors[0].count("weights") >= 1 and str(data_root) in errors[0], errors
    assert ("outside" in errors[0]) if typed != "missing.pth" else ("does not exist" in errors[0])
    assert app.session_state["home.backbone"].name == "filterbank"
    assert not app.exception


def test_best_mode_and_a_bad_threshold_option(app):
    app.radio(key="_w.home.mode").set_value("best").run()
    assert "mode=best" in " ".join(texts(app, "caption"))
    app.text_input(key="_w.home.opt_threshold").input("top:lots").run()
    assert any("cannot read the number in threshold" in text for text in texts(app, "error"))
    app.text_input(key="_w.home.opt_threshold").input("score:0.3").run()
    assert not app.error
    assert "threshold=score:0.3" in " ".join(texts(app, "caption"))


def test_advanced_options_change_only_what_was_changed(app):
    assert app.session_state["home.mode"] == "best"  # the default, the CLI's default too
    assert app.radio(key="_w.home.mode").options[0].startswith("best (recommended)")
    app.slider(key="_w.home.opt_lambda").set_value(0.5).run()
    assert app.session_state["home.options"]["negative_weight"] == 0.5
    assert app.session_state["home.options"]["scoring"] is None  # untouched: the mode's default stays in charge
    assert "λ=0.5" in " ".join(texts(app, "caption"))
    app.radio(key="_w.home.mode").set_value("thesis").run()  # a mode switch starts from that mode's settings
    thesis = PipelineConfig.thesis().negative_weight
    assert app.slider(key="_w.home.opt_lambda").value == thesis
    assert app.session_state["home.options"]["negative_weight"] is None
    assert f"mode=thesis norm=slice size=980 λ={thesis:g}" in " ".join(texts(app, "caption"))


def test_every_option_can_be_switched_on_the_home_page(app):
    app.selectbox(key="_w.home.opt_pixel_classifier").set_value("linear").run()
    app.selectbox(key="_w.home.opt_normalization").set_value("slice").run()
    app.text_area(key="_w.home.opt_more").input("z_sigma=1\nmin_size_px=20\n").run()
    assert not app.error
    caption = " ".join(texts(app, "caption"))
    assert "mode=best norm=slice" in caption and "z_sigma=1" in caption
    assert "pixels=linear(" in caption and "cleanup(min_size_px=20)" in caption
    app.text_area(key="_w.home.opt_more").input("z_sigma 1").run()
    assert any("must look like name=value" in text for text in texts(app, "error"))
    app.text_area(key="_w.home.opt_more").input("colour=red").run()
    assert any("unknown pipeline option 'colour'" in text for text in texts(app, "error"))
    app.text_area(key="_w.home.opt_more").input("scoring=knn").run()
    assert any("set scoring with its own control above" in text for text in texts(app, "error"))
    # A bad entry is refused before it is stored: the last valid options stay in force.
    assert app.session_state["home.options"]["z_sigma"] == "1"
    assert "colour" not in app.session_state["home.options"]
    assert not app.exception


def test_output_folder_is_shown_without_being_created(tmp_path, monkeypatch):
    from ui import settings

    monkeypatch.delenv("PROTOSCOPE_OUTPUT_DIR", raising=False)
    stack = tmp_path / "data" / "a.ims"
    stack.parent.mkdir()
    expected = stack.parent / settings.OUTPUT_FOLDER
    assert settings.output_dir(stack, root=tmp_path, create=False) == expected
    assert not expected.exists()  # only naming where results will go writes nothing
    assert settings.output_dir(stack, root=tmp_path) == expected and expected.is_dir()


def test_session_options_keep_only_what_differs_from_the_mode():
    """ui.home.session_options: '(mode default)' and blank mean the mode's value, so does a value equal to it;
    an option typed under 'More options' that has its own control is refused."""
    from pathlib import Path

    from core.errors import OptionError, ProtoscopeError
    from ui import home

    controls = {"negative_weight": 0.8, "scoring": "knn", "upsampling": "(mode default)", "threshold": " top:5 "}
    assert home.session_options("thesis", controls, "z_sigma=1\n\n") == {
        "negative_weight": None, "scoring": "knn", "upsampling": None, "threshold": "top:5", "z_sigma": "1"}
    with pytest.raises(ProtoscopeError, match="set scoring with its own control"):
        home.session_options("thesis", controls, "scoring=mean")
    with pytest.raises(OptionError, match="scoring"):
        home.session_options("thesis", {**controls, "scoring": "max"}, "")
    assert home.picked_folder(Path("/r/a/b"), Path("/r"), "..") == "a"
    assert home.picked_folder(Path("/r/a"), Path("/r"), "..") == ""
    assert home.picked_folder(Path("/r/a"), Path("/r"), "c/") == "a/c"


# ---- issue 11: headings, channels by name, the sidebar, PNG images -------------------------------------


def open_by_path(at, relative: str):
    at.radio(key="_w.home.source").set_value("File in the data root").run()
    at.text_input(key="home.path_text").input(relative).run()
    return at.button(key="home.open_path").click().run()


def sidebar_captions(at) -> list[str]:
    return [c.value for c in at.sidebar.caption]


def test_headings_have_no_numbers_that_skip(app):
    assert [h.value for h in app.subheader] == ["Sample", "Backbone", "Mode"]  # no sample: no Channels section
    testing.open_demo(app)
    assert [h.value for h in app.subheader] == ["Sample", "Channels", "Backbone", "Mode"]


@pytest.fixture
def named_ims(data_root):
    """Two Imaris stacks in the data root, channels named like the issue's two-photon files; the second is
    the app's own copy with the mask channel appended."""
    from tests.helpers_io import write_ims

    data = np.random.default_rng(0).integers(0, 200, (1, 4, 2, 32, 32)).astype(np.uint8)
    write_ims(data_root / "two_photon.ims", data[:, :3], chunks=(2, 32, 32),
              channel_names=["Smoothed", "Vessels", "Ground truth"])
    write_ims(data_root / "two_photon_masks.ims", data, chunks=(2, 32, 32),
              channel_names=["Smoothed", "Vessels", "Ground truth", "Protoscope mask"])
    return data_root


@pytest.mark.parametrize("name", ["two_photon.ims", "two_photon_masks.ims"])
def test_channel_pickers_show_names_and_default_by_name(app, named_ims, name):
    open_by_path(app, name)
    assert not app.exception and not app.error
    image = app.selectbox(key="_w.home.channel")
    assert image.options[:3] == ["0 · Smoothed", "1 · Vessels", "2 · Ground truth"]
    assert image.value == 1  # never the ground truth, nor the app's own mask channel
    assert app.radio(key="_w.home.truth_kind").value == "A channel of this stack"
    truth = app.selectbox(key="_w.home.truth_channel")
    assert truth.value == 2 and truth.options[2] == "2 · Ground truth"
    assert app.session_state["home.truth"].channel == 2
    assert "image channel 1 · Vessels · ground truth: channel 2 (Ground truth)" in sidebar_captions(app)


def test_a_stack_without_a_truth_named_channel_defaults_to_no_ground_truth(app, data_root):
    open_by_path(app, "lab/sample.tif")  # channels 'Channel 0', 'Channel 1'
    assert app.radio(key="_w.home.truth_kind").value == "None"
    assert app.session_state["home.truth"] is None
    app.radio(key="_w.home.truth_kind").set_value("A channel of this stack").run()
    assert app.selectbox(key="_w.home.truth_channel").value == 1  # the first channel that is not the image
    assert app.session_state["home.truth"].channel == 1


def test_the_sidebar_shows_a_new_ground_truth_channel_at_once(app, named_ims):
    open_by_path(app, "two_photon.ims")
    app.selectbox(key="_w.home.truth_channel").set_value(0).run()
    assert app.session_state["home.truth"].channel == 0
    assert "image channel 1 · Vessels · ground truth: channel 0 (Smoothed)" in sidebar_captions(app)
    app.radio(key="_w.home.truth_kind").set_value("None").run()
    assert "image channel 1 · Vessels" in sidebar_captions(app)
    app.selectbox(key="_w.home.channel").set_value(0).run()
    assert "image channel 0 · Smoothed" in sidebar_captions(app)


def test_a_tiny_png_is_refused_at_once(app, data_root):
    from PIL import Image

    Image.fromarray(np.full((1, 1), 9, np.uint8)).save(data_root / "dot.png")
    open_by_path(app, "dot.png")
    assert not app.exception
    errors = texts(app, "error")
    assert len(errors) == 1 and "'dot.png' has slices of 1 x 1 px" in errors[0] and "at least 16 x 16" in errors[0]
    assert app.session_state["home.sample"] is None
