"""Batch: apply the current, a saved or an uploaded prototype to a z-range of this or another stack."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.batch import embeds_ahead, plan_batch
from core.errors import ProtoscopeError
from core.prototypes import load_prototype
from core.thresholds import ThresholdSpec
from core.zspec import parse_z_spec
from core.io.channels import default_image_channel
from ui import batch, home, jobs, layout, resources, segment, settings, state, views

SOURCES = ("current", "saved", "upload")


def choose_prototype(ctx: resources.Context):
    """(prototype, name) from the chosen source; ProtoscopeError when there is none or it does not fit."""
    saved = state.get("segment.prototypes")
    labels = {"current": "current points (Segment page)", "saved": f"saved in this session ({len(saved)})",
              "upload": "upload a .npz prototype file"}
    source = st.radio("Prototype", SOURCES, format_func=labels.get, horizontal=True,
                      **state.widget("batch.source", "saved" if saved else "current"))
    if source == "current":
        with st.spinner("Building the prototype of the current points…", show_time=ctx.config.uses_pixels):
            built = segment.prototype_and_scorer(ctx, state.point_set(ctx.sid))
        if isinstance(built, str):
            st.info(f"No prototype from the current points yet. {built} (Segment page)")
            return None, ""
        return segment.with_threshold(built[0], segment.current_spec(ctx)), "current"
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
    """The embedder of the stack to segment (this one, or another inside the data root) and its channel; the
    other stack's channel starts at the one named like the prototype's source channel."""
    target = st.radio("Stack", ["this", "other"], horizontal=True, **state.widget("batch.target", "this"),
                      format_func={"this": f"this stack: {ctx.sample.name}", "other": "another stack in the data root"}.get)
    if target == "this":
        stack, channel, path = ctx.stack, ctx.channel, ctx.sample.path
    else:
        c1, c2 = st.columns([3, 1])
        text = c1.text_input("Path of the other stack (relative to the data root, or absolute inside it)",
                             **state.widget("batch.other_path", ""))
        if not text.strip():
            raise ProtoscopeError("type the path of the other stack, inside the data root "
                                  f"{settings.data_root()}")
        path = settings.resolve_in_root(text)
        stack = resources.open_cached_stack(path)
        default = batch.target_channel_default(stack, prototype, default_image_channel(stack))
        chosen_for = (str(path), batch.source_channel_name(prototype))
        if state.get("batch.other_channel_for") != chosen_for:  # a new stack or prototype: start from the default
            state.put("batch.other_channel_for", chosen_for)
            state.set_bound("batch.other_channel", default)
        channel = c2.selectbox("Its image channel", list(range(stack.shape[1])), format_func=home.channel_labeller(stack),
                               **state.widget("batch.other_channel", default))
    embedder = resources.embedder_for(path, int(channel), ctx.choice, prototype.config.preprocess)
    for warning in batch.channel_warnings(stack, int(channel), prototype, embedder):
        st.warning(warning, icon=":material/warning:")
    return embedder


def run_controls(ctx: resources.Context, result_slot) -> None:
    state.put("batch.inputs", None)  # until every input below is read without an error
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
    z_text = c1.text_input("Slices (e.g. all, 0:40, 3,7,9)", **state.widget("batch.z", "all"))
    z_values = parse_z_spec(z_text, stack.shape[0])
    threshold_text = c2.text_input(f"Threshold (blank: the prototype's, {prototype.config.threshold})",
                                   **state.widget("batch.threshold", "")).strip()
    threshold = ThresholdSpec.parse(threshold_text) if threshold_text else None
    available = batch.available_formats(stack)
    if any(k not in available for k in state.get("batch.formats", [])):
        state.set_bound("batch.formats", [k for k in state.get("batch.formats") if k in available])
    formats = st.multiselect("Write", available, format_func=lambda k: f"{batch.FORMATS[k][0]} ({batch.FORMATS[k][1]})",
                             **state.widget("batch.formats", ["tif"]))
    plan = plan_batch(embedder, prototype, z_values)
    st.caption(f"{batch.plan_caption(plan, stack.name)}. Output folder: `{settings.output_dir(stack.path, create=False)}`")
    inputs = batch.run_signature(prototype, name, stack.path, embedder.channel, z_values, threshold, formats)
    state.put("batch.inputs", inputs)
    embeds = embeds_ahead(embedder, plan)  # phase 'embed' runs (and reports progress) only then
    if st.button("Run batch", type="primary", key="batch.run"):
        # the previous result leaves the page the moment a new run starts: it is not this run's result
        state.put("batch.result", None)
        result_slot.empty()
        execute(embedder, prototype, name, z_values, formats, threshold, embeds, inputs)
    elif state.get("batch.running"):
        state.put("batch.running", False)
        st.warning("The batch was cancelled; no file was written." + (" The slices embedded so far are cached: "
                   "**Run batch** again resumes from there." if plan.embeds else ""))


def execute(embedder, prototype, name, z_values, formats, threshold, embeds: bool = True, inputs: str = "") -> None:
    """Run the batch under progress bars ('embed' only when the run embeds ahead, core.batch.embeds_ahead).

    It stops when the user presses Cancel (the click interrupts this script run at its next progress update) or
    leaves: once the session has ended (tab closed, ui.jobs) nobody would see the result, so ``should_stop`` ends
    the run at the next slice."""
    cancel = st.empty()
    cancel.button("Cancel", key="batch.cancel", help="Stops after the current slice; embedded slices stay cached")
    watch = jobs.session_watch()
    bars = {"embed": st.progress(0.0, text="Embedding uncached slices…") if embeds else st.empty(),
            "mask": st.progress(0.0, text="Masks: waiting…")}
    titles = {"embed": "Embedding", "mask": "Scoring and thresholding"}

    def on_progress(phase: str, done: int, total: int, eta: float | None) -> None:
        bars[phase].progress(done / max(total, 1), text=f"{titles[phase]}: {done} / {total} slices · {batch.format_eta(eta)}")

    state.put("batch.running", True)
    outputs = batch.run(embedder, prototype, z_values, formats, prototype_name=name, threshold=threshold,
                        on_progress=on_progress, should_stop=watch.should_stop)
    outputs.inputs = inputs
    state.put("batch.running", False)
    state.put("batch.result", outputs)
    cancel.empty()
    if outputs.result.cancelled:
        st.warning("The batch was cancelled; run it again to resume from the cache.")


def show_result(ctx: resources.Context) -> None:
    """The last run's result: 'Batch finished', figures, downloads and the views in 3-D while the settings are
    those that made it; marked as the previous run's once any setting changed (or cannot be read)."""
    outputs: batch.BatchOutputs | None = state.get("batch.result")
    if outputs is None or outputs.result.cancelled:
        return
    result = outputs.result
    if outputs.inputs and outputs.inputs == state.get("batch.inputs"):
        st.success(f"Batch finished: {len(outputs.z_values)} slices in {result.seconds:.1f} s.")
        st.subheader(f"Result · {outputs.stack_name}")
    else:
        st.subheader(f"Previous result · {outputs.stack_name}")
        st.info("The settings above changed since this result was made: it is the previous run's result, not one "
                "of the current settings. Press **Run batch** for a new one.", icon=":material/history:")
    c1, c2, c3 = st.columns(3)
    c1.metric("Slices", len(result.z_values))
    c2.metric("Mask voxels", f"{result.volume_voxels:,}")
    c3.metric("Volume (µm³)", f"{result.volume_um3:,.0f}" if result.volume_um3 is not None else "n/a (no voxel size)")
    left, right = st.columns(2)
    left.plotly_chart(batch.area_figure(outputs), key="batch.area_plot")
    if outputs.montage_png:
        right.image(outputs.montage_png, caption="Montage: evenly spaced slices with the mask outline (cyan)")
    st.markdown(f"**Files** written to `{outputs.folder}`")
    for file in batch.output_files(outputs):
        if file.downloadable:
            st.download_button(f"Download {file.title} · {file.path.name} ({file.size / 1e6:.1f} MB)",
                               data=lambda p=file.path: p.read_bytes(), file_name=file.path.name,
                               key=f"batch.download.{file.key}", on_click="ignore")
        else:
            st.caption(f"{file.title}: `{file.path}` ({file.size / 1e6:.0f} MB: too large to download through the "
                       "browser; open it from the server's disk)")
    layout.run_page(lambda: views.batch_views(ctx, outputs))


def page() -> None:
    layout.mode_switch()
    ctx = layout.require_context()
    st.header("Batch")
    controls = st.container()
    result_slot = st.empty()  # a run clears it at once, so no earlier result is shown as if it were the new one
    with controls:
        layout.run_page(lambda: run_controls(ctx, result_slot))
    with result_slot.container():
        show_result(ctx)


layout.run_page(page)
