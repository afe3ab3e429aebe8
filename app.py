"""Protoscope app: open a sample, choose channels, backbone and mode (this page); the other pages segment it.

Run: ``bash scripts/run_app.sh`` (or ``streamlit run app.py``). This file is the router: it sets up the
session, restores the tab's workspace (ui.workspace), draws the sidebar status on every page, runs the selected
page and then saves the work.
"""

from __future__ import annotations

import streamlit as st

from core.features.backbones import weights_status
from core.config import OPTION_NAMES, Scoring, Upsampling
from core.errors import ProtoscopeError
from ui import home, layout, resources, settings, state, workspace
from ui.state import BackboneChoice


def sample_section() -> None:
    st.subheader("Sample")
    source = st.radio("Open", home.SOURCES, horizontal=True, **state.widget("home.source", home.SOURCES[0]))
    if source == home.SOURCES[0]:
        st.caption("A small synthetic stack made by `core/demo.py` (bright winding vessels, round cells as "
                   "distractors, noise); channel 1 is its ground truth. It is not a real sample.")
        if st.button("Open the synthetic demo", type="primary", key="home.open_demo"):
            with st.spinner("Writing the demo stack…"):
                home.open_demo()
            st.rerun()
    elif source == home.SOURCES[1]:
        path_picker()
    else:
        uploaded = st.file_uploader("Stack file (small files; open large ones by path in the data root)",
                                    type=["tif", "tiff", "ims", "png", "jpg", "jpeg", "bmp"], key="home.upload")
        if uploaded is not None and st.button("Open the uploaded file", type="primary", key="home.open_upload"):
            home.open_upload(uploaded.name, uploaded.getvalue())
            st.rerun()


def _enter_folder(rel: str) -> None:
    state.put("home.browse", rel)
    st.session_state.pop("home.browse_pick", None)


def path_picker() -> None:
    root = settings.data_root()
    rel = state.get("home.browse") or ""
    try:
        folder = settings.resolve_in_root(rel or ".", root)
    except ProtoscopeError:
        rel, folder = "", root
        state.put("home.browse", "")
    folders, files = settings.list_folder(folder, root)
    st.caption(f"Data root `{root}` › `{rel or '.'}`")
    left, right = st.columns(2)
    with left:
        choices = ([".."] if rel else []) + [f.name + "/" for f in folders]
        pick = st.selectbox("Folder", choices, index=None, placeholder="go into a folder…", key="home.browse_pick")
        if pick:
            _enter_folder(home.picked_folder(folder, root, pick))
            st.rerun()
        if rel and st.button("Open this folder as a stack of images", key="home.open_folder"):
            home.open_path(str(folder))
            st.rerun()
    with right:
        name = st.selectbox("Stack file", [f.name for f in files], index=None,
                            placeholder="no stack files here" if not files else "choose a file…", key="home.file_pick")
        if name and st.button("Open file", type="primary", key="home.open_file"):
            home.open_path(str(folder / name))
            st.rerun()
    typed = st.text_input("…or type a path (relative to the data root, or absolute inside it)", key="home.path_text")
    if typed and st.button("Open path", key="home.open_path"):
        home.open_path(typed)
        st.rerun()


def channel_section() -> None:
    sample = state.get("home.sample")
    if sample is None:
        return
    stack = resources.open_cached_stack(sample.path)
    st.subheader("Channels")
    st.markdown(f"**{sample.name}**" + (" — *synthetic demo, not a real sample*" if sample.is_demo else ""))
    st.caption(home.describe_stack(stack))
    n_channels = stack.shape[1]
    label = home.channel_labeller(stack)
    channel = st.selectbox("Image channel", list(range(n_channels)), format_func=label,
                           **state.widget("home.channel", 0, on_change=home.on_channel_setting_change,
                                          args=("home.channel",)))
    kinds = list(home.TRUTH_KINDS)
    kind = st.radio("Ground truth (optional: for the feature-space scores and the Evaluate page)", kinds,
                    horizontal=True, **state.widget("home.truth_kind", "None", on_change=home.on_channel_setting_change,
                                                    args=("home.truth_kind",)))
    if kind == kinds[0]:
        state.put("home.truth", None)
    elif kind == kinds[1]:
        truth_channel = st.selectbox("Ground-truth channel", list(range(n_channels)), format_func=label,
                                     **state.widget("home.truth_channel", home.default_truth_channel(stack, channel),
                                                    on_change=home.on_channel_setting_change,
                                                    args=("home.truth_channel",)))
        try:
            state.put("home.truth", home.truth_from_channel(stack, channel, truth_channel))
        except ProtoscopeError as error:
            state.put("home.truth", None)
            st.error(str(error))
    else:
        truth_file_picker(stack)


def truth_file_picker(stack) -> None:
    typed = st.text_input("Mask file path inside the data root (same Z, Y, X; foreground > 0)", key="home.truth_path")
    uploaded = st.file_uploader("…or upload the mask file", type=["tif", "tiff", "png", "ims"], key="home.truth_upload")
    if st.button("Use this mask file", key="home.use_truth"):
        if uploaded is not None:
            path = resources.save_upload(uploaded.name, uploaded.getvalue())
        else:
            path = settings.resolve_in_root(typed)
        try:
            state.put("home.truth", home.truth_from_file(stack, path))
        except ProtoscopeError:
            state.put("home.truth", None)
            raise
    truth = state.get("home.truth")
    if truth is not None and truth.path is not None:
        st.caption(f"Ground truth: {truth.path}")


def backbone_section() -> None:
    st.subheader("Backbone")
    active = resources.backbone_choice()
    names = home.backbone_options()
    left, right = st.columns(2)
    with left:
        name = st.selectbox("Backbone", names, format_func=home.backbone_title,
                            **state.widget("home.backbone_name", active.name))
    is_dinov2 = name != "filterbank"
    weights = "hub"
    with right:
        if is_dinov2:
            kinds = list(home.WEIGHT_KINDS)
            kind = st.radio("Weights", kinds, format_func=home.WEIGHT_KINDS.get, horizontal=True,
                            **state.widget("home.weights_kind", "hub"))
            if kind == "hub":
                st.caption(f"Hugging Face cache: {weights_status(name)}")
            elif kind == "path":
                weights = st.text_input("Weights path (a Hugging Face model folder or Meta's *_pretrain.pth)",
                                        **state.widget("home.weights_path", "")).strip()
            else:
                weights = "random"
                st.warning("RANDOM WEIGHTS — timing only: masks made with them mean nothing.", icon=":material/warning:")
        else:
            st.caption("The filter bank needs no weights and runs offline on the CPU.")
    choice = BackboneChoice(name, weights if is_dinov2 else "hub")
    if st.button("Load backbone", type="primary" if choice != active else "secondary", key="home.load_backbone",
                 disabled=is_dinov2 and not weights):
        with st.spinner(f"Loading {name}…"):
            resources.load_choice(choice)  # raises BackboneError with what to do
        state.put("home.backbone", choice)
        st.rerun()
    backbone = resources.load_choice(active)
    st.markdown(f"Active: **{backbone.label()}**")
    if backbone.is_random:
        st.warning(layout.RANDOM_WARNING, icon=":material/warning:")
    if choice != active:
        st.caption("Press **Load backbone** to switch to the selection above.")


def mode_section() -> None:
    st.subheader("Mode")
    mode = st.radio("Pipeline", list(home.MODES), horizontal=True,
                    **state.widget("home.mode", "best", on_change=home.on_mode_change), format_func=home.MODES.get,
                    help="The mode can also be switched in the sidebar of every page.")
    if state.get("home.options_mode") != mode:  # a mode switch starts from that mode's own settings
        home.reset_mode_options(mode)
    with st.expander("Advanced options"):
        options = {}
        options["negative_weight"] = st.slider("Negative weight λ (S = Sp − λ·Sn)", 0.0, 2.0, step=0.05,
                                               **state.widget("home.opt_lambda", 0.8))
        options["scoring"] = st.selectbox("Scoring", [s.value for s in Scoring],
                                          **state.widget("home.opt_scoring", "mean"))
        options["upsampling"] = st.selectbox("Upsampling of the patch scores", ["(mode default)"] + [u.value for u in Upsampling],
                                  **state.widget("home.opt_upsampling", "(mode default)"))
        options["normalization"] = st.selectbox("Intensity normalisation", ["(mode default)", "slice", "stack"],
                                     **state.widget("home.opt_normalization", "(mode default)"),
                                     help="slice: percentiles of each slice (thesis); stack: one scale for the "
                                          "whole stack, so transferred prototypes see the same intensities")
        options["pixel_classifier"] = st.selectbox("Pixel classifier", ["(mode default)", "none", "forest", "linear"],
                                  **state.widget("home.opt_pixel_classifier", "(mode default)"),
                                  help="none: patch scores only; forest: random forest on per-pixel filter "
                                       "features of the clicked pixels (best mode); linear: logistic regression, "
                                       "faster and a little less accurate")
        options["threshold"] = st.text_input("Default threshold (top:P, score:T, otsu, calibrated; blank = mode default)",
                                             **state.widget("home.opt_threshold", ""))
        more = st.text_area(
            "More options (one name=value per line)", **state.widget("home.opt_more", ""),
            placeholder="z_sigma=1\nhole_size_px=20\nmin_size_px=20",
            help="Any option of `python -m core ... --option`: " + ", ".join(OPTION_NAMES) + ". z_sigma (Gaussian "
                 "smoothing of the scores along z, in slices) acts in Batch; the clean-up (hole_size_px, "
                 "min_size_px, closing_px, in pixels) acts everywhere. See docs/method.md.")
        state.put("home.options", home.session_options(mode, options, more))  # a bad value stops here
    config = resources.pipeline_config()
    st.caption(f"Active: {config.describe()}")


def home_page() -> None:
    st.title("Protoscope")
    st.caption("Segment structures in fluorescence microscopy stacks by clicking a few positive and negative points.")
    for section in (sample_section, channel_section, backbone_section, mode_section):
        layout.run_page(section)
    if state.get("home.sample") is not None:
        layout.page_link("segment", "Go to Segment", icon=":material/touch_app:")


st.set_page_config(page_title="Protoscope", page_icon=":material/biotech:", layout="wide")
state.init()
# before any widget: a reloaded tab (?ws=<id> in its address) gets its sample, points, prototypes and bound
# settings back, and a workspace open in another tab shows its conflict choices above the page (docs/workspace.md)
workspace.restore_on_start()
layout.PAGES.update(
    home=st.Page(home_page, title="Open sample", icon=":material/folder_open:", default=True),
    segment=st.Page("pages/1_Segment.py", title="Segment", icon=":material/touch_app:"),
    features=st.Page("pages/2_Feature_space.py", title="Feature space", icon=":material/scatter_plot:"),
    batch=st.Page("pages/3_Batch.py", title="Batch", icon=":material/dynamic_feed:"),
    evaluate=st.Page("pages/4_Evaluate.py", title="Evaluate", icon=":material/rule:"),
    refine=st.Page("pages/5_Refine.py", title="Refine (U-Net)", icon=":material/auto_fix_high:"),
)
navigation = st.navigation(list(layout.PAGES.values()))
layout.sidebar_status()
navigation.run()
workspace.autosave()  # saves what changed in this run; draws the sidebar's Workspace box (status, export, import)
