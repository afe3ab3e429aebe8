"""Batch: apply the current, a saved or an uploaded prototype to a z-range of this or another stack, here or on the
Dask cluster the server is configured with (ui.cluster: the job runs on when the tab is closed)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.batch import embeds_ahead, plan_batch
from core.cluster.progress import FAILED, RUNNING
from core.errors import ProtoscopeError
from core.prototypes import load_prototype
from core.thresholds import ThresholdSpec
from core.zspec import parse_z_spec
from core.io.channels import default_image_channel
from ui import batch, cluster, home, jobs, layout, resources, segment, settings, state, views

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
    address = run_place()
    job, job_state = state.get("batch.job"), job_state_now()
    if job_state == RUNNING:
        st.caption("A batch is running on the cluster (below): **Run batch** is back when it has finished or is "
                   "cancelled.")
    resume = cluster.resumable(job, inputs, job_state) if address else None
    if resume is not None:
        st.caption(f"**Run batch** resumes the {job_state} batch of these settings on the cluster: its finished "
                   "slices are kept.")
    if st.button("Run batch", type="primary", key="batch.run", disabled=job_state == RUNNING):
        # the previous result leaves the page the moment a new run starts: it is not this run's result
        state.put("batch.result", None)
        result_slot.empty()
        if address:
            with st.spinner(f"Submitting to the Dask scheduler at {address}…"):
                recipe = cluster.backbone_recipe(ctx.choice, state.get("home.backbone_overrides"))
                state.put("batch.job", cluster.submit(embedder, prototype, prototype_name=name, z_values=z_values,
                                                      formats=formats, threshold=threshold, inputs=inputs,
                                                      address=address, recipe=recipe, resume=resume))
            st.rerun()  # the controls, drawn before the job existed, now follow it (Run batch waits for it)
        else:
            execute(embedder, prototype, name, z_values, formats, threshold, embeds, inputs)
    elif state.get("batch.running"):
        state.put("batch.running", False)
        st.warning("The batch was cancelled; no file was written." + (" The slices embedded so far are cached: "
                   "**Run batch** again resumes from there." if plan.embeds else ""))


def run_place() -> str | None:
    """Where the batch runs: None for here (the app's process), else the scheduler's address. The choice is offered
    only when the server is configured with one (PROTOSCOPE_DASK_SCHEDULER)."""
    address = settings.dask_scheduler()
    if address is None:
        return None
    labels = {"cluster": f"on the Dask cluster at {address}", "here": "here, in the app's process"}
    where = st.radio("Run", list(labels), format_func=labels.get, horizontal=True,
                     **state.widget("batch.where", "cluster"),
                     help="On the cluster the batch runs on when this tab is closed; reopening the page shows it. "
                          "The masks are written as OME-Zarr, and the formats chosen are exported from it.")
    return address if where == "cluster" else None


def job_state_now() -> str | None:
    """The state of the session's cluster job (core.cluster.read_progress), 'gone' when its output cannot be read,
    None without a job."""
    job = state.get("batch.job")
    if job is None:
        return None
    try:
        return cluster.progress(job).state
    except ProtoscopeError:
        return "gone"


def forget_job() -> None:
    state.put("batch.job", None)


def job_panel(ctx: resources.Context) -> None:
    """The session's batch on the cluster: live progress while it runs, what to do when it stopped, and once every
    slice is written its files and result (``cluster.finish``), shown below as a run in the app's process is."""
    job = state.get("batch.job")
    if job is None:
        return
    try:
        progress = cluster.progress(job)
    except ProtoscopeError as error:
        st.error(f"The batch on the cluster cannot be followed: {error}")
        st.button("Forget this batch", key="batch.job_forget", on_click=forget_job)
        return
    if progress.finished:
        with st.spinner(f"The batch on the cluster has finished: writing its files to `{Path(job.store).parent}`…"):
            state.put("batch.result", cluster.finish(job, montage_embedder(ctx, job)))
        state.put("batch.job", None)
        return
    if progress.state in cluster.ACTIVE:
        live_progress()
        return
    draw_job(job, progress)
    if progress.state == FAILED:
        block, message = next(iter(progress.failures.items()))
        st.error(f"The batch on the cluster failed: block {block}: {message}. The finished blocks are kept: **Run "
                 "batch** with the same settings runs the others again.")
    else:
        st.warning(f"The batch on the cluster is {progress.state}: {progress.slices_finished} of "
                   f"{progress.slices_total} slices are written. **Run batch** with the same settings resumes it.")
    st.button("Forget this batch", key="batch.job_forget", on_click=forget_job,
              help="The page stops following it; its output stays on disk")


@st.fragment(run_every=cluster.POLL_S)
def live_progress() -> None:
    """Progress of the running job, read from its output every POLL_S seconds; the whole page runs again when it
    stops running (finished: its result is written and shown)."""
    def body() -> None:
        job = state.get("batch.job")
        progress = cluster.progress(job) if job is not None else None
        if progress is None or progress.state not in cluster.ACTIVE:
            st.rerun()
        draw_job(job, progress)
        if progress.state == RUNNING:
            st.button("Cancel", key="batch.job_cancel", on_click=cluster.cancel, args=(job,),
                      help="The workers stop before their next slice; the finished slices stay in the output")
        else:
            st.caption("Cancelling: the blocks still running stop before their next slice.")

    layout.run_page(body)


def draw_job(job, progress) -> None:
    st.markdown(f"**On the cluster** `{job.scheduler}` · {job.stack_name} · prototype {job.prototype_name}")
    st.progress(progress.fraction, text=cluster.progress_text(progress))
    st.caption(f"Output: `{job.store}`. The batch runs on when this tab is closed: reopening the page (or this "
               "workspace after a restart) shows it.")


def montage_embedder(ctx: resources.Context, job):
    """The job's stack and channel for the result's montage, preprocessed as the job was; None when it cannot be
    opened any more (the result is shown without a montage)."""
    try:
        return resources.embedder_for(job.stack_path, job.channel, ctx.choice, cluster.preprocess_of(job))
    except ProtoscopeError:
        return None


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
        where = " on the cluster" if cluster.ZARR in outputs.files else ""
        st.success(f"Batch finished{where}: {len(outputs.z_values)} slices in {result.seconds:.1f} s.")
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
        elif file.key == cluster.ZARR:
            st.caption(f"{file.title}: `{file.path}` (a folder on the server's disk: napari and Fiji open it; "
                       "`python -m core export` converts it)")
        else:
            st.caption(f"{file.title}: `{file.path}` ({file.size / 1e6:.0f} MB: too large to download through the "
                       "browser; open it from the server's disk)")
    layout.run_page(lambda: views.batch_views(ctx, outputs))


def page() -> None:
    layout.mode_switch()
    ctx = layout.require_context()
    st.header("Batch")
    controls = st.container()
    job_slot = st.container()
    result_slot = st.empty()  # a run clears it at once, so no earlier result is shown as if it were the new one
    with controls:
        layout.run_page(lambda: run_controls(ctx, result_slot))
    with job_slot:
        layout.run_page(lambda: job_panel(ctx))
    with result_slot.container():
        show_result(ctx)


layout.run_page(page)
