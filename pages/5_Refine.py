"""Refine (U-Net): train on stacks with ground truth with a live loss plot, cancel, save the model, apply it."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.errors import ProtoscopeError
from core.protocol import EvalStack
from core.refine.model import RefineConfig
from core.zspec import parse_z_spec
from ui import jobs, layout, refine, resources, settings, state
from ui.batch import format_eta
from ui.evaluate import short_list

SLICE_CHOICES = {"spaced": "evenly spaced in every stack", "chosen": "these slices in every stack"}


def remove_stack(index: int) -> None:
    stacks = list(state.get("refine.stacks"))
    del stacks[index]
    state.put("refine.stacks", stacks)


def training_stacks(ctx: resources.Context) -> list[EvalStack]:
    st.subheader("1 · Training stacks")
    st.caption("Stacks with a ground truth: the network learns to turn their prototype heatmaps into the truth.")
    stacks: list[EvalStack] = []
    current = None
    if st.checkbox(f"This stack: {ctx.sample.name}", **state.widget("refine.include_current", True)):
        try:
            current = refine.stack_from_context(ctx)
            stacks.append(current)
            st.caption(refine.describe_stack(current))
        except ProtoscopeError as error:
            st.error(str(error))
    others = state.get("refine.stacks")
    for index, spec in enumerate(others):
        left, right = st.columns([5, 1], vertical_alignment="center")
        left.markdown(f"`{spec.label}` · {refine.describe_stack(spec)}")
        right.button("Remove", key=f"refine.remove.{index}", on_click=remove_stack, args=(index,))
    stacks += others
    with st.expander("Add a stack from the data root", expanded=current is None and not others):
        c1, c2 = st.columns([3, 1])
        path = c1.text_input("Stack path (relative to the data root, or absolute inside it)", key="refine.add_path")
        channel = c2.number_input("Image channel", -8, 64, value=0, step=1, key="refine.add_channel")
        kind = st.radio("Its ground truth", ["channel", "file"], horizontal=True, key="refine.add_truth_kind",
                        format_func={"channel": "a channel of the stack", "file": "a mask file in the data root"}.get)
        if kind == "channel":
            truth = st.number_input("Ground-truth channel", -8, 64, value=-1, step=1, key="refine.add_truth_channel")
            truth_path = None
        else:
            truth, truth_path = None, st.text_input("Mask file (same Z, Y, X; foreground > 0)", key="refine.add_truth_path")
        if st.button("Add stack", key="refine.add"):
            try:
                new = refine.stack_from_root(path, channel, truth, truth_path)
                state.put("refine.stacks", refine.add_stack(others, new, current))
                st.rerun()
            except ProtoscopeError as error:
                st.error(str(error))
    return stacks


def slices_section(stacks: list[EvalStack]) -> dict[str, list[int]]:
    st.subheader("2 · Slices")
    how = st.radio("Slices", list(SLICE_CHOICES), format_func=SLICE_CHOICES.get, horizontal=True,
                   label_visibility="collapsed", **state.widget("refine.slice_choice", "spaced"))
    count, skip, text = 10, 2, "all"
    if how == "spaced":
        c1, c2 = st.columns(2)
        count = c1.number_input("Slices per stack", 2, 500, **state.widget("refine.count", 10),
                                help="the thesis used 25 per stack")
        skip = c2.number_input("Skip at each end", 0, 500, **state.widget("refine.skip", 2),
                               help="shrinks for shallow stacks; the thesis skipped 40")
    else:
        text = st.text_input("Slices (e.g. 0:40, 3,7,9, all)", **state.widget("refine.z", "all"))
    z_values = refine.slice_lists(stacks, how, count, skip, text)
    st.caption(" · ".join(f"{label}: {len(zs)} slice(s) ({short_list(zs, 8)})" for label, zs in z_values.items())
               or "no stacks yet")
    return z_values


def inputs_section(ctx: resources.Context) -> dict:
    st.subheader("3 · Inputs")
    c1, c2 = st.columns(2)
    input_set = c1.selectbox("Input set", list(refine.INPUT_SETS), format_func=refine.INPUT_SETS.get,
                             **state.widget("refine.input_set", "raw+heatmap"))
    chosen = {"input_set": input_set, "heatmaps": "none", "prototype": None, "prototype_name": ""}
    if input_set == "raw":
        c2.caption("The raw slice alone needs no heatmap.")
        return chosen
    chosen["heatmaps"] = c2.radio("Heatmaps from", list(refine.HEATMAPS), format_func=refine.HEATMAPS.get,
                                  **state.widget("refine.heatmaps", "prototype"))
    if chosen["heatmaps"] == "prototype":
        saved = state.get("segment.prototypes")
        if not saved:
            st.info("No prototype saved yet: click points on the **Segment** page and press **Save prototypes**, or "
                    "take per-slice prototypes from the ground truth.")
            return chosen
        names = [p.name for p in saved]
        name = st.selectbox("Prototype", names, index=len(names) - 1, key="refine.prototype_name")
        chosen.update(prototype=saved[names.index(name)].prototype, prototype_name=name)
        st.caption(chosen["prototype"].summary())
    else:
        c3, c4 = st.columns(2)
        chosen["n_points"] = c3.number_input("Points per class and slice", 1, 200, **state.widget("refine.n_points", 25))
        chosen["points_seed"] = c4.number_input("Sampling seed", 0, 10_000, **state.widget("refine.points_seed", 0))
        st.caption(f"Prototypes in the session's mode ({ctx.config.mode.value}), with {ctx.backbone.spec.name}.")
    return chosen


def training_section(stacks: list[EvalStack]) -> tuple[dict, tuple]:
    st.subheader("4 · Training")
    c1, c2, c3, c4 = st.columns(4)
    config = {
        "input_size": c1.select_slider("Input size (px)", list(refine.INPUT_SIZES), **state.widget("refine.input_size", 128),
                                       help="slices are resized to this square; small is fast on a CPU (thesis: 980)"),
        "max_epochs": c2.number_input("Epochs (at most)", 1, 500, **state.widget("refine.epochs", 15)),
        "patience": c3.number_input("Patience (epochs)", 1, 100, **state.widget("refine.patience", 5),
                                    help="stop when the validation loss has not improved for this many epochs"),
        "seed": c4.number_input("Seed", 0, 10_000, **state.widget("refine.seed", 0)),
    }
    c5, c6 = st.columns([1, 2])
    config["augment"] = c5.toggle("Augment (flips, 90° turns)", **state.widget("refine.augment", True))
    kinds = {"fraction": "validate on a fraction of each stack's slices", "stack": "hold out one stack"}
    kind = c6.radio("Validation", list(kinds), format_func=kinds.get, **state.widget("refine.val_kind", "fraction"))
    if kind == "fraction":
        value = c6.slider("Validation fraction", 0.1, 0.5, step=0.05, **state.widget("refine.val_fraction", 0.2),
                          label_visibility="collapsed")
    else:
        labels = [s.label for s in stacks]
        value = c6.selectbox("Validation stack", labels, key="refine.val_stack") if labels else ""
    return config, (kind, value)


def start(ctx, stacks, z_values, inputs, config, validation) -> None:
    refine_config = RefineConfig(input_set=inputs["input_set"], **config)
    plan = refine.make_plan(ctx, stacks, z_values, refine_config, heatmaps=inputs["heatmaps"],
                            prototype=inputs["prototype"], prototype_name=inputs["prototype_name"],
                            n_points=inputs.get("n_points", 25), points_seed=inputs.get("points_seed", 0),
                            validation=validation)
    state.put("refine.job", refine.start_training(ctx, plan))
    st.rerun()


@st.fragment(run_every=1.0)
def live_panel() -> None:
    """Progress, live loss plot and Cancel, redrawn every second while the training thread runs."""
    job: refine.TrainJob | None = state.get("refine.job")
    if job is None:
        return
    if not job.running:
        st.rerun()  # the whole page: it shows the finished training and the model
    fraction, text = refine.progress_text(job)
    st.progress(fraction, text=text)
    if job.history:
        st.plotly_chart(refine.loss_figure(job.history), key="refine.live_plot")
    st.button("Cancel", key="refine.cancel", on_click=job.cancel, disabled=job.cancelling,
              help="Stops after the current slice; the best model so far is kept")
    if job.cancelling:
        st.caption("Cancelling after the current slice…")


def collect(job: refine.TrainJob) -> None:
    """Keep a finished job's model in the session (once)."""
    if job.running or job.collected:
        return
    job.collected = True
    if job.model is not None:
        models = state.get("refine.models")
        job.model.name = refine.unique_model_name(job.model.name, models)
        state.put("refine.models", [*models, job.model])
        state.set_bound("refine.model_pick", job.model.name)


def training_result(job: refine.TrainJob) -> None:
    kind, message = refine.outcome(job)
    getattr(st, kind)(message)
    if job.history:
        st.plotly_chart(refine.loss_figure(job.history), key="refine.loss_plot")
    if job.model is not None:
        st.download_button(f"Download the model · {job.model.name}.safetensors", data=job.model.data,
                           file_name=f"{job.model.name}.safetensors", mime="application/octet-stream",
                           key="refine.download_model", on_click="ignore")
        st.caption(f"Kept in this session for section 5 · {job.model.summary}")


def train_controls(ctx: resources.Context) -> None:
    stacks = training_stacks(ctx)
    z_values = slices_section(stacks) if stacks else {}
    inputs = inputs_section(ctx)
    config, validation = training_section(stacks)
    job: refine.TrainJob | None = state.get("refine.job")
    if job is not None and job.running:
        st.markdown("**Training**")
        live_panel()
        return
    if st.button("Train", type="primary", key="refine.train", disabled=not stacks):
        start(ctx, stacks, z_values, inputs, config, validation)
    if job is not None:
        collect(job)
        training_result(job)


def choose_model() -> refine.TrainedModel | None:
    models = state.get("refine.models")
    names = [m.name for m in models]
    options = names + ["upload"]
    if state.get("refine.model_pick") not in options:
        state.set_bound("refine.model_pick", names[-1] if names else "upload")
    pick = st.selectbox("Model", options, **state.widget("refine.model_pick", options[0]),
                        format_func=lambda n: "upload a model file (.safetensors)" if n == "upload" else n)
    if pick != "upload":
        return models[names.index(pick)]
    uploaded = st.file_uploader("Refiner model (.safetensors, from this page or `python -m core refine train`)",
                                type=["safetensors"], key="refine.upload_model")
    if uploaded is None:
        return None
    return refine.uploaded_model(uploaded.name, uploaded.getvalue())


def apply_controls(ctx: resources.Context) -> None:
    st.subheader(f"5 · Apply to this stack: {ctx.sample.name}")
    model = choose_model()
    if model is None:
        st.info("Train a model above, or upload one.")
        return
    st.caption(model.summary)
    prototype, name = None, ""
    if model.input_set != "raw":
        saved = state.get("segment.prototypes")
        if not saved:
            st.info("This model reads the prototype heatmap: save a prototype on the **Segment** page first.")
            return
        names = [p.name for p in saved]
        name = st.selectbox("Prototype for the heatmaps", names, index=len(names) - 1, key="refine.apply_prototype")
        prototype = saved[names.index(name)].prototype
    refine.model_fits(model, prototype, name, ctx.backbone)  # a mismatch is a short error before anything runs
    text = st.text_input("Slices (e.g. all, 0:40, 3,7,9)", **state.widget("refine.apply_z", "all"))
    z_values = parse_z_spec(text, ctx.n_slices)
    st.caption(f"{len(z_values)} slice(s); masks are written as a multi-page TIFF (and the areas as CSV) to "
               f"`{settings.output_dir(ctx.stack.path, create=False)}`")
    if st.button("Refine these slices", type="primary", key="refine.apply"):
        cancel = st.empty()
        cancel.button("Cancel", key="refine.apply_cancel", help="Stops now; nothing is written")
        bar = st.progress(0.0, text="Refining…")

        def on_progress(done: int, total: int, eta: float | None) -> None:
            bar.progress(done / max(total, 1), text=f"Refining: {done} / {total} slices · {format_eta(eta)}")

        outputs = refine.apply_model(ctx, model, prototype, z_values, prototype_name=name, on_progress=on_progress,
                                     should_stop=jobs.session_watch().should_stop)
        cancel.empty()
        if outputs is None:  # the session ended mid-run: nobody is left to see a message
            return
        state.put("refine.result", outputs)
        st.success(f"Refined {len(outputs.z_values)} slices in {outputs.seconds:.1f} s.")


def apply_result() -> None:
    outputs: refine.RefineOutputs | None = state.get("refine.result")
    if outputs is None:
        return
    st.markdown(f"**Result** · {outputs.stack_name} · model {outputs.model_name}")
    for note in outputs.notes:
        st.caption(f"Note: {note}")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Slices", len(outputs.z_values))
    c2.metric("Mask voxels", f"{outputs.volume_voxels:,}")
    c3.metric("Volume (µm³)", f"{outputs.volume_um3:,.0f}" if outputs.volume_um3 is not None else "n/a (no voxel size)")
    if outputs.dice_refined is not None:
        proto = (f" (prototype masks {sum(outputs.dice_prototype) / len(outputs.dice_prototype):.3f})"
                 if outputs.dice_prototype else "")
        c4.metric("Dice vs ground truth", f"{sum(outputs.dice_refined) / len(outputs.dice_refined):.3f}", help=proto or None)
        if proto:
            st.caption(f"Mean Dice of the refined masks against the ground truth{proto}.")
    if outputs.montage_png:
        st.image(outputs.montage_png, caption="Refined masks (cyan outline) on evenly spaced slices")
    for key, title in (("tif", "Refined masks (multi-page TIFF)"), ("csv", "Per-slice areas (CSV)")):
        path = Path(outputs.files[key])
        if path.exists():
            st.download_button(f"Download {title} · {path.name}", data=lambda p=path: p.read_bytes(), file_name=path.name,
                               key=f"refine.download.{key}", on_click="ignore")


def page() -> None:
    layout.mode_switch()
    ctx = layout.require_context()
    st.header("Refine (U-Net)")
    st.caption("A shallow U-Net learns to turn prototype heatmaps into better masks (thesis §3.7): train it on stacks "
               "with a ground truth, then apply it to this stack. Training runs in the background; you may leave the "
               "page and come back.")
    layout.run_page(lambda: train_controls(ctx))
    st.divider()
    layout.run_page(lambda: apply_controls(ctx))
    apply_result()


layout.run_page(page)
