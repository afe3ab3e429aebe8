"""Evaluate: the thesis protocol on this stack's ground truth — Dice, IoU and HD95 per slice."""

from __future__ import annotations

import streamlit as st

from ui import evaluate, layout, resources, state


def slice_controls(ctx: resources.Context) -> dict:
    """Which slices: evenly spaced (the thesis protocol) or exactly the ones typed. Returns evaluate.run's arguments."""
    n = ctx.n_slices
    how = st.radio("Slices", list(evaluate.SLICE_CHOICES), format_func=evaluate.SLICE_CHOICES.get, horizontal=True,
                   **state.widget("evaluate.slice_choice", "spaced"))
    if how == "chosen":
        text = st.text_input("Slices to evaluate (e.g. 12, 3,7,9, 0:24:4, all)",
                             **state.widget("evaluate.z", str(n // 2)))
        z_values = evaluate.parse_slices(text, n)  # ZSpecError says what is valid
        st.caption(f"{len(z_values)} slice(s): {evaluate.short_list(z_values)}")
        return {"z_values": z_values, "n_slices": len(z_values), "skip_ends": 0}
    default_count, most_skip, default_skip = evaluate.spaced_defaults(n)
    c1, c2 = st.columns(2)
    n_slices = c1.number_input("Number of slices", 1, n, **state.widget("evaluate.n_slices", default_count),
                               help="evenly spaced between the skipped ends")
    skip = c2.number_input("Skip at each end", 0, most_skip, **state.widget("evaluate.skip", default_skip),
                           help="the thesis skips 40 of ~200")
    return {"z_values": None, "n_slices": n_slices, "skip_ends": skip}


def controls(ctx: resources.Context) -> None:
    chosen = slice_controls(ctx)
    c3, c4 = st.columns(2)
    points = c3.number_input("Points per class", 1, 200, **state.widget("evaluate.points", 25),
                             help="sampled from the ground truth, away from its boundary")
    seeds = c4.number_input("Seeds", 1, 10, **state.widget("evaluate.seeds", 1))
    c5, c6 = st.columns(2)
    methods = c5.multiselect("Methods", list(evaluate.METHODS), format_func=evaluate.METHODS.get,
                             **state.widget("evaluate.methods", ["session"]))
    settings = c6.multiselect("Settings", list(evaluate.SETTINGS),
                              **state.widget("evaluate.settings", ["same-slice", "same-file"]),
                              help="same-slice: prototypes from the slice itself; same-file: from one reference slice "
                                   "applied to the others; adapt: a prototype made elsewhere plus a few points sampled "
                                   "on one slice here, applied to the others (beside it: the prototype as it is)")
    adapt_choice = adapt_controls(ctx) if evaluate.ADAPT in settings else None
    if st.button("Run evaluation", type="primary", key="evaluate.run"):
        with st.status("Evaluating…", expanded=False) as status:
            result = evaluate.run(ctx, method_names=methods, n_points=points, n_seeds=seeds,
                                  protocol_settings=settings, log=status.write, adapt_choice=adapt_choice, **chosen)
            status.update(label=f"Evaluation finished in {result.seconds:.1f} s", state="complete")
        state.put("evaluate.result", result)


def adapt_controls(ctx: resources.Context) -> str | None:
    """The prototype adapt starts from (saved ones and the current one), or None (with a hint) when there is none."""
    choices = evaluate.prototype_choices(ctx)
    if not choices:
        st.info("adapt starts from a prototype made elsewhere: make one on another sample (or load one) on the Segment "
                "page and save it.")
        return None
    if state.get("evaluate.adapt_base") not in choices:
        state.set_bound("evaluate.adapt_base", choices[0])
    return st.selectbox("Prototype to adapt", choices, format_func=evaluate.choice_label,
                        **state.widget("evaluate.adapt_base", choices[0]),
                        help="3 positive + 3 negative points per seed are sampled from this stack's ground truth on one "
                             "slice (the same-file reference slice); the adapted prototype is scored on the other slices")


def show(result) -> None:
    for note in result.notes:
        st.caption(f"Note: {note}")
    st.caption("Evaluated slices: " + "; ".join(f"{name}: {zs}" for name, zs in result.slices.items()))
    st.subheader("Summary (mean ± std)")
    st.dataframe(evaluate.summary(result), hide_index=True)
    if not result.rows:
        return
    table = evaluate.per_slice_table(result)
    left, right = st.columns(2)
    left.plotly_chart(evaluate.dice_figure(table), key="evaluate.dice_plot")
    right.plotly_chart(evaluate.hd95_figure(table), key="evaluate.hd_plot")
    st.subheader("Per slice")
    st.dataframe(table, hide_index=True)
    st.download_button("Download the per-slice table (CSV)", data=table.to_csv(index=False), file_name="evaluation.csv",
                       mime="text/csv", key="evaluate.download", on_click="ignore")


def page() -> None:
    layout.mode_switch()
    ctx = layout.require_context()
    st.header("Evaluate")
    if ctx.truth is None:
        st.info("The evaluation compares masks with a ground truth: choose a ground-truth channel or mask file on the "
                "Open sample page (the synthetic demo's is channel 1).")
        layout.page_link("home", "Open sample", icon=":material/folder_open:")
        return
    protocol, mine = st.tabs(["Thesis protocol", "Score my prototype"])
    with protocol:
        st.caption(f"The thesis protocol: points are sampled from the ground truth "
                   f"({ctx.truth.describe(ctx.stack.channel_names)}), prototypes built from them, and the masks scored "
                   "with Dice, IoU and HD95 on evenly spaced slices or on the slices you choose.")
        layout.run_page(lambda: controls(ctx))
        result = state.get("evaluate.result")
        if result is not None:
            show(result)
    with mine:
        st.caption(f"Your own prototype's masks against the ground truth ({ctx.truth.describe(ctx.stack.channel_names)}), "
                   "slice by slice: Dice, IoU and HD95, no points sampled.")
        layout.run_page(lambda: score_mine(ctx))


def score_mine(ctx: resources.Context) -> None:
    """Score my prototype: which prototype, which slices, Run; the table and the mean."""
    choices = evaluate.prototype_choices(ctx)
    if not choices:
        st.info("No prototype yet: click points on the Segment page (or save a prototype there) to score it here.")
        layout.page_link("segment", "Segment", icon=":material/ads_click:")
        return
    if state.get("evaluate.mine_choice") not in choices:
        state.set_bound("evaluate.mine_choice", choices[0])
    choice = st.selectbox("Prototype", choices, format_func=evaluate.choice_label,
                          **state.widget("evaluate.mine_choice", choices[0]))
    text = st.text_input("Slices to score (e.g. 12, 3,7,9, 0:24:4, all)",
                         **state.widget("evaluate.mine_z", evaluate.default_score_slices(ctx.n_slices)))
    z_values = evaluate.parse_slices(text, ctx.n_slices)
    st.caption(f"{len(z_values)} slice(s): {evaluate.short_list(z_values)}")
    if st.button("Score the prototype", type="primary", key="evaluate.mine_run"):
        with st.spinner(f"Scoring on {len(z_values)} slice(s)…", show_time=True):
            state.put("evaluate.mine_result", evaluate.score_mine(ctx, choice, z_values))
    result = state.get("evaluate.mine_result")
    if result is None:
        return
    for note in result.notes:
        st.caption(f"Note: {note}")
    rows = evaluate.mine_table(result)
    if rows:
        mean = rows[-1]
        st.markdown(f"**{result.rows[0]['method']}** on {result.stacks[0]}, {len(result.rows)} slice(s): mean Dice "
                    f"{mean['dice']:.3f}, "
                    f"IoU {mean['iou']:.3f}, HD95 {mean['hd95_px']:.1f} px")
    st.dataframe(rows, hide_index=True)


layout.run_page(page)
