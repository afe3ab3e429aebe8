"""Batch: apply the current, a saved or an uploaded prototype to a z-range of this or another stack."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import streamlit as st

from core.errors import ProtoscopeError
from core.prototypes import load_prototype
from core.thresholds import ThresholdSpec
from core.zspec import parse_z_spec
from ui import batch, layout, resources, segment, settings, state

SOURCES = ("current", "saved", "upload")


def choose_prototype(ctx: resources.Context):
    """(prototype, name) from the chosen source; ProtoscopeError when there is none or it does not fit."""
    saved = state.get("segment.prototypes")
    labels = {"current": "current points (Segment page)", "saved": f"saved in this session ({len(saved)})",
              "upload": "upload a .npz prototype file"}
    source = st.radio("Prototype", SOURCES, format_func=labels.get, horizontal=True,
                      key=state.bind("batch.source", "saved" if saved else "current"), on_change=state.store,
                      args=("batch.source",))
    if source == "current":
        with st.spinner("Building the prototype of the current points…", show_time=ctx.config.uses_pixels):
            built = segment.prototype_and_scorer(ctx, state.point_set(ctx.sid))
        if isinstance(built, str):
            st.info(f"No prototype from the current points yet. {built} (Segment page)")
            return None, ""
        prototype = built[0]
        return dataclasses.replace(prototype, config=prototype.config.with_options(threshold=segment.current_spec(ctx))), "current"
    if source == "saved":
        if not saved:
            st.info("No prototypes saved yet: save some on the Segment page, or upload a .npz file.")
            return None, ""
        names = [p.name for p in saved]
        name = st.selectbox("Saved prototype", names, index=len(names) - 1, key="batch.saved_name")
        return saved[names.index(name)].prototype, name
    uploaded = st.file_uploader("Prototype file (.npz)", type=["npz"], key="batch.upload")
    if uploaded is None:
        st.info("Upload a prototype .npz file (saved from the Segment page or made by `python -m core prototype`).")
        return None, ""
    prototype = load_prototype(uploaded.getvalue(), backbone=ctx.backbone.spec.name, embed_dim=ctx.backbone.embed_dim,
                               name=f"'{uploaded.name}'")
    return prototype, Path(uploaded.name).stem


def choose_target(ctx: resources.Context, prototype):
    """The embedder of the stack to segment (this one, or another inside the data root)."""
    target = st.radio("Stack", ["this", "other"], horizontal=True, key=state.bind("batch.target", "this"),
                      on_change=state.store, args=("batch.target",),
                      format_func={"this": f"this stack: {ctx.sample.name}", "other": "another stack in the data root"}.get)
    if target == "this":
        return resources.embedder_for(ctx.sample.path, ctx.channel, ctx.choice, prototype.config.preprocess)
    c1, c2 = st.columns([3, 1])
    text = c1.text_input("Path of the other stack (relative to the data root, or absolute inside it)",
                         key=state.bind("batch.other_path", ""), on_change=state.store, args=("batch.other_path",))
    channel = c2.number_input("Its image channel", min_value=-8, max_value=64, step=1,
                              key=state.bind("batch.other_channel", 0), on_change=state.store,
                              args=("batch.other_channel",))
    if not text.strip():
        raise ProtoscopeError("type the path of the other stack, inside the data root "
                              f"{settings.data_root()}")
    path = settings.resolve_in_root(text)
    return resources.embedder_for(path, int(channel), ctx.choice, prototype.config.preprocess)


def run_controls(ctx: resources.Context) -> None:
    prototype, name = choose_prototype(ctx)
    if prototype is None:
        return
    st.caption(prototype.summary())
    if prototype.weights_id != ctx.backbone.weights_id:
        st.warning(f"This prototype was made with weights {prototype.weights_id}, the active backbone uses "
                   f"{ctx.backbone.weights_id}: load the same weights on the Open sample page for meaningful masks.")
    embedder = choose_target(ctx, prototype)
    stack = embedder.stack
    c1, c2 = st.columns(2)
    z_text = c1.text_input("Slices (e.g. all, 0:40, 3,7,9)", key=state.bind("batch.z", "all"), on_change=state.store,
                           args=("batch.z",))
    z_values = parse_z_spec(z_text, stack.shape[0])
    threshold_text = c2.text_input(f"Threshold (blank: the prototype's, {prototype.config.threshold})",
                                   key=state.bind("batch.threshold", ""), on_change=state.store,
                                   args=("batch.threshold",)).strip()
    threshold = ThresholdSpec.parse(threshold_text) if threshold_text else None
    available = [k for k in batch.FORMATS if k != "ims" or stack.format == "ims"]
    if any(k not in available for k in state.get("batch.formats", [])):
        state.set_bound("batch.formats", [k for k in state.get("batch.formats") if k in available])
    formats = st.multiselect("Write", available, format_func=lambda k: f"{batch.FORMATS[k][0]} ({batch.FORMATS[k][1]})",
                             key=state.bind("batch.formats", ["tif"]), on_change=state.store, args=("batch.formats",))
    embeds = batch.needs_embeddings(embedder, prototype)
    if embeds:
        done = f"{batch.cached_count(embedder, z_values)} already embedded (cached, skipped)"
    else:
        done = "no patch embeddings needed (best mode's pixel classifier reads filter features of the slices)"
    st.caption(f"{len(z_values)} slice(s) of {stack.name}; {done}; the per-slice areas are always written as CSV. "
               f"Output folder: `{settings.output_dir(stack.path, create=False)}`")
    if st.button("Run batch", type="primary", key="batch.run"):
        execute(embedder, prototype, name, z_values, formats, threshold, embeds)
    elif state.get("batch.running"):
        state.put("batch.running", False)
        st.warning("The batch was cancelled; no file was written." + (" The slices embedded so far are cached: "
                   "**Run batch** again resumes from there." if embeds else ""))


def execute(embedder, prototype, name, z_values, formats, threshold, embeds: bool = True) -> None:
    cancel = st.empty()
    cancel.button("Cancel", key="batch.cancel", help="Stops after the current slice; embedded slices stay cached")
    bars = {"embed": st.progress(0.0, text="Embedding uncached slices…") if embeds else st.empty(),
            "mask": st.progress(0.0, text="Masks: waiting…")}
    titles = {"embed": "Embedding", "mask": "Scoring and thresholding"}

    def on_progress(phase: str, done: int, total: int, eta: float | None) -> None:
        bars[phase].progress(done / max(total, 1), text=f"{titles[phase]}: {done} / {total} slices · {batch.format_eta(eta)}")

    state.put("batch.running", True)
    outputs = batch.run(embedder, prototype, z_values, formats, prototype_name=name, threshold=threshold,
                        on_progress=on_progress)
    state.put("batch.running", False)
    state.put("batch.result", outputs)
    cancel.empty()
    if outputs.cancelled:
        st.warning("The batch was cancelled; run it again to resume from the cache.")
    else:
        st.success(f"Batch finished: {len(outputs.z_values)} slices in {outputs.seconds:.1f} s.")


def show_result() -> None:
    outputs: batch.BatchOutputs | None = state.get("batch.result")
    if outputs is None or outputs.cancelled:
        return
    st.subheader(f"Result · {outputs.stack_name}")
    c1, c2, c3 = st.columns(3)
    c1.metric("Slices", len(outputs.z_values))
    c2.metric("Mask voxels", f"{outputs.volume_voxels:,}")
    c3.metric("Volume (µm³)", f"{outputs.volume_um3:,.0f}" if outputs.volume_um3 is not None else "n/a (no voxel size)")
    left, right = st.columns(2)
    with left:
        import plotly.graph_objects as go

        values, label = batch.area_series(outputs)
        fig = go.Figure(go.Scatter(x=outputs.z_values, y=values, mode="lines+markers", name=label))
        fig.update_layout(height=320, margin=dict(l=10, r=10, t=30, b=10), xaxis_title="slice z", yaxis_title=label,
                          title=f"Area per slice (threshold {outputs.threshold})")
        st.plotly_chart(fig, key="batch.area_plot")
    with right:
        if outputs.montage_png:
            st.image(outputs.montage_png, caption="Montage: evenly spaced slices with the mask outline (cyan)")
    st.markdown(f"**Files** written to `{outputs.folder}`")
    for key, path_text in outputs.files.items():
        path = Path(path_text)
        size = path.stat().st_size if path.exists() else 0
        title = "Per-slice areas (CSV)" if key == "csv" else batch.FORMATS[key][0]
        if path.exists() and size <= settings.DOWNLOAD_LIMIT_BYTES:
            st.download_button(f"Download {title} · {path.name} ({size / 1e6:.1f} MB)", data=lambda p=path: p.read_bytes(),
                               file_name=path.name, key=f"batch.download.{key}", on_click="ignore")
        else:
            st.caption(f"{title}: `{path}` ({size / 1e6:.0f} MB: too large to download through the browser; "
                       "open it from the server's disk)")


def page() -> None:
    layout.mode_switch()
    ctx = resources.require_context()
    st.header("Batch")
    layout.run_page(lambda: run_controls(ctx))
    show_result()


layout.run_page(page)
