"""Segment: click positive/negative points, see the similarity heatmap and the mask, save prototypes."""

from __future__ import annotations

import streamlit as st

from core.io import stack_label
from ui import canvas, layout, render, resources, segment, state


def threshold_state(ctx: resources.Context) -> None:
    """Start the threshold controls from the mode's default, and again whenever the mode's default changes."""
    kind, top, score = segment.default_threshold(ctx.config)
    if state.get("segment.threshold_source") != str(ctx.config.threshold):
        state.put("segment.threshold_source", str(ctx.config.threshold))
        state.set_bound("segment.th_kind", kind)
        state.set_bound("segment.th_top", top)
        state.set_bound("segment.th_score", score)


def request_otsu() -> None:
    st.session_state["segment.otsu_request"] = True


def choose_threshold(kind: str, key: str) -> None:
    """on_change of a threshold slider: keep its value and make its kind the active one (the control the
    user touches is in charge, e.g. moving the absolute score leaves best mode's calibrated threshold)."""
    state.store(key)
    state.set_bound("segment.th_kind", kind)


def show_threshold_in_effect(view: segment.View, shape: tuple[int, int]) -> None:
    """Let the sliders that are not in charge show the cut in effect: the absolute score of the threshold and the
    share of the slice in the mask, so that touching one starts from the current mask."""
    if view.segmentation is None:
        return
    kind = state.get("segment.th_kind")
    if kind != "score":
        state.set_bound("segment.th_score", round(min(max(float(view.segmentation.threshold), -1.0), 1.0), 2))
    if kind != "top":
        share = 100.0 * view.area_px / (shape[0] * shape[1])
        state.set_bound("segment.th_top", min(max(round(share * 2) / 2, 0.5), 100.0))


def page() -> None:
    layout.mode_switch()
    ctx = resources.require_context()
    st.header("Segment")
    n_slices = ctx.n_slices
    if state.get("segment.z") is None or not 0 <= state.get("segment.z") < n_slices:
        state.set_bound("segment.z", n_slices // 2)
    if n_slices > 1:
        z = st.slider("Slice z", 0, n_slices - 1, key=state.bind("segment.z", n_slices // 2),
                      on_change=state.store, args=("segment.z",))
    else:
        z = 0
    if not ctx.embedder.is_cached(z):
        with st.spinner(f"Embedding slice {z} with {ctx.backbone.spec.title} (once: it is cached on disk)…"):
            segment.ensure_embedded(ctx, z)
    if ctx.config.uses_pixels and hasattr(ctx.embedder, "warm_up_pixels"):
        ctx.embedder.warm_up_pixels(ctx.config.pixel_max_side)  # the first click needs the stack's statistics

    # the canvas's clicks first, so the heatmap drawn behind it includes them. The key holds the label: a
    # radio change gives a fresh canvas drawing in the new colour (an existing one would lag a click behind).
    display = render.display_size(ctx.slice_shape)
    label = 1 if state.get("segment.label", "positive") == "positive" else -1
    stem = f"segment.canvas.{ctx.sid}.{z}.{display[0]}.{state.get('segment.generation')}"
    canvas_key = f"{stem}.{label}"
    last = state.get("segment.canvas_last")
    sources = [(last[0], last[1])] if last and last[0] != canvas_key and last[0].startswith(stem + ".") else []
    for key, key_label in sources + [(canvas_key, label)]:
        stored = state.slice_points(ctx.sid, z)
        merged, _ = canvas.sync_points(stored, canvas.read_objects(key), key_label, display, ctx.slice_shape)
        if merged != stored:
            state.set_slice_points(ctx.sid, z, merged)
    state.put("segment.canvas_last", (canvas_key, label))
    snapshots = state.get("segment.snapshots")
    # a canvas being mounted starts from the points as they are now; a mounted one keeps its first snapshot
    if canvas_key not in snapshots or canvas.read_objects(canvas_key) is None:
        snapshots[canvas_key] = canvas.snapshot(state.slice_points(ctx.sid, z), display, ctx.slice_shape)
        while len(snapshots) > 64:
            snapshots.pop(next(iter(snapshots)))

    threshold_state(ctx)
    spec = segment.current_spec(ctx)
    options = dict(opacity=state.get("segment.opacity", 0.5), show_heatmap=state.get("segment.show_heatmap", True),
                   show_mask=state.get("segment.show_mask", True), display=display)
    with st.spinner("Scoring…"):
        view = segment.compute_view(ctx, z, spec, preview=True, **options)
        if st.session_state.pop("segment.otsu_request", False) and view.segmentation is not None:
            state.set_bound("segment.th_kind", "score")
            state.set_bound("segment.th_score", round(segment.otsu_score(view), 2))
            spec = segment.threshold_spec("score", 0, state.get("segment.th_score"))
            view = segment.compute_view(ctx, z, spec, **options)
    st.session_state["segment.view"] = view

    left, right = st.columns([3, 2], gap="large")
    with left:
        st.radio("A click adds a", ["positive", "negative"], horizontal=True, key=state.bind("segment.label", "positive"),
                 on_change=state.store, args=("segment.label",),
                 format_func={"positive": ":green[**positive**] point (structure)",
                              "negative": ":red[**negative**] point (background)"}.get)
        canvas.draw(canvas_key, view.image_png, snapshots[canvas_key], display, label)
        pending_slot = st.empty()
        fresh = st.session_state.pop("segment.pixel_fresh", False)
        st.caption(f"{segment.timing_caption(view, ctx.config, fresh)} · heatmap: inferno, bright = similar to the "
                   "positives · mask outline in cyan")
        b1, b2, b3 = st.columns(3)
        b1.button("Undo last point", key="segment.undo", on_click=state.undo_point, args=(ctx.sid, z),
                  width="stretch")
        b2.button("Clear this slice", key="segment.clear", on_click=state.clear_points, args=(ctx.sid, z),
                  width="stretch")
        b3.button("Clear all slices", key="segment.clear_all", on_click=state.clear_points, args=(ctx.sid, None),
                  width="stretch")
    with right:
        if view.message:
            st.info(view.message)
        show_threshold_in_effect(view, ctx.slice_shape)
        threshold_controls(view)
        mask_summary(ctx, view, z)
        points_summary(ctx)
        prototype_controls(ctx, view, spec)
    if view.pending:
        finish_pixel_result(ctx, z, spec, options, pending_slot)


def finish_pixel_result(ctx: resources.Context, z: int, spec, options: dict, slot) -> None:
    """Best mode after the preview was drawn: fit the pixel classifier and score the slice (memoised), then rerun
    to show the pixel-accurate heatmap and mask. A click meanwhile interrupts this run and starts over."""
    with slot.container(), st.spinner("Best mode: training the pixel classifier on your points…", show_time=True):
        full = segment.compute_view(ctx, z, spec, **options)
    state.put("segment.pixel_timings", dict(full.timings))
    state.put("segment.pixel_fresh", True)
    st.rerun()


def threshold_controls(view: segment.View) -> None:
    st.markdown("**Threshold**")
    kinds = list(segment.THRESHOLD_KINDS)
    st.radio("Kind", kinds, format_func=segment.THRESHOLD_KINDS.get, horizontal=True, label_visibility="collapsed",
             key=state.bind("segment.th_kind", "top"), on_change=state.store, args=("segment.th_kind",))
    st.slider("Top % of the slice", 0.5, 100.0, step=0.5, key=state.bind("segment.th_top", 10.0),
              on_change=choose_threshold, args=("top", "segment.th_top"))
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    left.slider("Absolute score", -1.0, 1.0, step=0.01, key=state.bind("segment.th_score", 0.0),
                on_change=choose_threshold, args=("score", "segment.th_score"),
                help="Best mode's scores are 2·p − 1 of the pixel classifier (0 = probability 0.5)")
    right.button("Otsu", key="segment.otsu", on_click=request_otsu, disabled=view.segmentation is None,
                 help="Set the absolute score to Otsu's threshold of this slice's scores")
    st.slider("Heatmap opacity", 0.0, 1.0, step=0.05, key=state.bind("segment.opacity", 0.5),
              on_change=state.store, args=("segment.opacity",))
    c1, c2 = st.columns(2)
    c1.toggle("Heatmap", key=state.bind("segment.show_heatmap", True), on_change=state.store, args=("segment.show_heatmap",))
    c2.toggle("Mask outline", key=state.bind("segment.show_mask", True), on_change=state.store, args=("segment.show_mask",))


def mask_summary(ctx: resources.Context, view: segment.View, z: int) -> None:
    if view.segmentation is None:
        return
    area = view.area_px
    um2 = segment.area_um2(area, ctx.stack.voxel_size)
    c1, c2 = st.columns(2)
    c1.metric("Mask area (px)", f"{area:,}")
    c2.metric("Mask area (µm²)", f"{um2:,.0f}" if um2 is not None else "n/a (no voxel size)")
    share = 100.0 * area / (ctx.slice_shape[0] * ctx.slice_shape[1])
    st.caption(f"{share:.1f} % of the slice · threshold at score {view.segmentation.threshold:.3f}")
    mask = view.segmentation.mask
    voxel = ctx.stack.voxel_size
    st.download_button("Download this slice's mask (TIFF)", data=lambda: segment.mask_tiff_bytes(mask, voxel),
                       file_name=f"{stack_label(ctx.stack.path)}_z{z}_mask.tif", mime="image/tiff",
                       key="segment.download_mask", on_click="ignore")


def points_summary(ctx: resources.Context) -> None:
    rows = state.point_summary(ctx.sid)
    if rows:
        total_p = sum(r["positive"] for r in rows)
        total_n = sum(r["negative"] for r in rows)
        st.markdown(f"**Points** {total_p} positive, {total_n} negative on {len(rows)} slice(s) — all are used")
        st.dataframe(rows, hide_index=True, height=min(36 * (len(rows) + 1) + 2, 180))


def prototype_controls(ctx: resources.Context, view: segment.View, spec) -> None:
    st.markdown("**Prototypes**")
    saved_list = state.get("segment.prototypes")
    left, right = st.columns([3, 2], vertical_alignment="bottom")
    default_name = f"prototype-{len(saved_list) + 1}"
    name = left.text_input("Name", placeholder=default_name, key="segment.proto_name")
    if right.button("Save prototypes", key="segment.save", disabled=view.prototype is None, type="primary"):
        saved = segment.save_prototype(ctx, view, spec, name or default_name)
        st.success(f"Saved '{saved.name}' ({saved.prototype.summary()[:90]}…)")
    for index, saved in enumerate(saved_list):
        st.download_button(f"Download {saved.name}.npz", data=saved.data, file_name=f"{saved.name}.npz",
                           mime="application/octet-stream", key=f"segment.download_proto.{index}", on_click="ignore")


layout.run_page(page)
