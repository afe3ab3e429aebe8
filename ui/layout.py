"""What every page shares: the error guard, the sidebar status (sample, backbone, device, mode) and page links."""

from __future__ import annotations

import logging
from typing import Any, Callable

import streamlit as st

from core.devices import describe_device
from core.errors import ProtoscopeError
from core.io.channels import channel_label
from ui import home, resources, settings, state

LOG = logging.getLogger("protoscope.app")
RANDOM_WARNING = "RANDOM WEIGHTS — timing only: the heatmaps and masks mean nothing."

#: Widget key of the sidebar's mode radio (the Open sample page's own is '_w.home.mode').
SIDEBAR_MODE = "_w.sidebar.mode"
#: st.Page objects registered by app.py ('home', 'segment', 'features', 'batch', 'evaluate', 'refine').
PAGES: dict[str, Any] = {}


def run_page(body: Callable[[], None]) -> None:
    """Run a page body; a problem the user can fix becomes a short st.error, never a traceback."""
    try:
        body()
    except ProtoscopeError as error:
        st.error(str(error))
    except MemoryError:
        st.error("Out of memory: the slice or result is too large for this machine; use a smaller z-range or "
                 "a machine with more RAM.")
    except Exception as error:  # noqa: BLE001 - a bug must not show a traceback to the user
        LOG.exception("unexpected error in a page")
        st.error(f"Unexpected error ({type(error).__name__}: {str(error)[:300]}). Your points, prototypes and "
                 "settings are kept; try again, and report this if it persists.")


def page_link(name: str, label: str, icon: str | None = None) -> None:
    page = PAGES.get(name)
    if page is not None:
        st.page_link(page, label=label, icon=icon)


def require_context() -> resources.Context:
    """The page context, or a hint to open a sample first (and the page stops)."""
    ctx = resources.context()
    if ctx is None:
        st.info("No sample is open. Open the synthetic demo or one of your stacks on the **Open sample** page.")
        page_link("home", "Open sample", icon=":material/folder_open:")
        st.stop()
    return ctx


def sidebar_status() -> None:
    """Sample, backbone (label, weights, device) and mode in the sidebar; a loud warning for random weights."""
    with st.sidebar:
        sample = state.get("home.sample")
        if sample is None:
            st.caption("No sample open")
        else:
            st.markdown(f"**Sample** `{sample.name}`")
            if sample.is_demo:
                st.caption("Synthetic demo stack (generated, not a real sample)")
            truth = state.get("home.truth")
            names = _channel_names(sample.path)
            st.caption(f"image channel {channel_label(names, state.get('home.channel'))}"
                       + (f" · ground truth: {truth.describe(names)}" if truth is not None else ""))
        try:
            backbone = resources.active_backbone()
        except ProtoscopeError as error:
            st.error(f"Backbone not loaded: {error}")
        else:
            st.markdown(f"**Backbone** {backbone.label()}")
            st.caption(f"Device: {describe_device(backbone.device)}")
            if backbone.is_random:
                st.warning(RANDOM_WARNING, icon=":material/warning:")
        st.caption(f"Data root: `{settings.data_root()}`")
        mode = state.get("home.mode")
        try:
            config = resources.pipeline_config()
        except ProtoscopeError as error:
            st.error(f"Pipeline options: {error}")
        else:
            st.markdown(f"**Mode** {mode}")
            st.caption(config.describe())


def _channel_names(path: str) -> list[str]:
    try:
        return resources.open_cached_stack(path).channel_names
    except ProtoscopeError:  # the page itself says what is wrong with the file
        return []


def mode_switch() -> None:
    """The mode radio in the sidebar, under the mode's description (every page but Open sample, which has its
    own with the advanced options): thesis mode stays one click away while segmenting."""
    st.sidebar.radio("Mode", list(home.MODES), horizontal=True,
                     **state.widget("home.mode", "best", on_change=home.on_mode_change, args=(SIDEBAR_MODE,),
                                   widget_key=SIDEBAR_MODE), label_visibility="collapsed",
                     format_func=lambda m: m + (" (recommended)" if m == "best" else ""),
                     help="best: pixel classifier on filter features, calibrated threshold; thesis: reproduces the "
                          "thesis (patch cosine, top 10 %). Advanced options are on the Open sample page.")
