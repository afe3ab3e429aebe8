"""Segment: click positive/negative points, see the similarity heatmap and the mask, save prototypes."""

from __future__ import annotations

import streamlit as st

from core.io import stack_label
from core.live import warm_up_slice
from ui import canvas, layout, render, resources, segment, state, views


def page() -> None:
    layout.mode_switch()
    ctx = layout.require_context()
    st.header("Segment")
    z = segment.choose_slice(ctx, f"Embedding slice {{z}} with {ctx.backbone.spec.title} (once: it is cached on disk)…")
    if ctx.config.uses_pixels and hasattr(ctx.embedder, "warm_up_pixels"):
        ctx.embedder.warm_up_pixels(ctx.config.pixel_max_side)  # the first click needs the stack's statistics
        warm_up_slice(ctx.embedder, z, ctx.config)  # ... and this slice's pixel features: computed before it

    # the canvas's clicks first, so the heatmap drawn behind it includes them
    display = render.display_size(ctx.slice_shape)
    canvas_key, label, initial = canvas.prepare(ctx.sid, z, display, ctx.slice_shape)

    segment.sync_threshold_defaults(ctx)
    spec = segment.current_spec(ctx)
    options = dict(opacity=state.get("segment.opacity", 0.5), show_heatmap=state.get("segment.show_heatmap", True),
                   show_mask=state.get("segment.show_mask", True), display=display)
    with st.spinner("Scoring…"):
        view = segment.compute_view(ctx, z, spec, preview=True, **options)
        otsu = segment.apply_otsu_request(view)
        if otsu is not None:
            spec = otsu
            view = segment.compute_view(ctx, z, spec, **options)
    st.session_state["segment.view"] = view

    left, right = st.columns([3, 2], gap="large")
    with left:
        st.radio("A click adds a", ["positive", "negative"], horizontal=True, **state.widget("segment.label", "positive"),
                 format_func={"positive": ":green[**positive**] point (structure)",
                              "negative": ":red[**negative**] point (background)"}.get)
        canvas.draw(canvas_key, view.image_png, initial, display, label)
        pending_slot = st.empty()
        fresh = st.session_state.pop("segment.pixel_fresh", False)
        st.caption(f"{segment.timing_caption(view, ctx.config, fresh)} · heatmap: inferno, bright = similar to the "
                   "positives · mask outline in cyan")
        if view.base is not None:
            st.caption(segment.base_caption(view.base))
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
        segment.show_threshold_in_effect(view, ctx.slice_shape)
        threshold_controls(view)
        mask_summary(ctx, view, z)
        points_summary(ctx, view.base)
        prototype_controls(ctx, view, spec)
    views.orthogonal_panel(ctx, z, slice_mask=view.segmentation.mask if view.segmentation is not None else None)
    if view.live_next and prepare_live_preview(ctx, z, pending_slot):
        st.rerun()  # to show the live step's mask; the pixel classifier follows
    if view.pending:
        finish_pixel_result(ctx, z, spec, options, pending_slot, live=view.classifier == segment.LIVE_PREVIEW)


def prepare_live_preview(ctx: resources.Context, z: int, slot) -> bool:
    """Best mode after a patch preview: compute the pixel features of the clicked slices (once per slice); True
    when the live step can now show its mask."""
    with slot.container(), st.spinner("Best mode: computing this slice's pixel features (once per slice)…",
                                      show_time=True):
        return segment.prepare_live(ctx, state.point_set(ctx.sid), z)


def finish_pixel_result(ctx: resources.Context, z: int, spec, options: dict, slot, live: bool = False) -> None:
    """Best mode after the preview was drawn: fit the pixel classifier and score the slice (memoised), then rerun
    to show its heatmap and mask in place of the preview. A click meanwhile interrupts this run and starts over."""
    busy = (f"Best mode: the {ctx.config.pixel_classifier} refines the live mask…" if live
            else "Best mode: training the pixel classifier on your points…")
    with slot.container(), st.spinner(busy, show_time=True):
        full = segment.compute_view(ctx, z, spec, **options)
    state.put("segment.pixel_timings", dict(full.timings))
    state.put("segment.pixel_fresh", True)
    st.rerun()


def threshold_controls(view: segment.View) -> None:
    st.markdown("**Threshold**")
    kinds = list(segment.THRESHOLD_KINDS)
    st.radio("Kind", kinds, format_func=segment.THRESHOLD_KINDS.get, horizontal=True, label_visibility="collapsed",
             **state.widget("segment.th_kind", "top"))
    st.slider("Top % of the slice", 0.5, 100.0, step=0.5,
              **state.widget("segment.th_top", 10.0, on_change=segment.choose_threshold, args=("top", "segment.th_top")))
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    left.slider("Absolute score", -1.0, 1.0, step=0.01,
                **state.widget("segment.th_score", 0.0, on_change=segment.choose_threshold,
                               args=("score", "segment.th_score")),
                help="Best mode's scores are 2·p − 1 of the pixel classifier (0 = probability 0.5)")
    right.button("Otsu", key="segment.otsu", on_click=segment.request_otsu, disabled=view.segmentation is None,
                 help="Set the absolute score to Otsu's threshold of this slice's scores")
    st.slider("Heatmap opacity", 0.0, 1.0, step=0.05, **state.widget("segment.opacity", 0.5))
    c1, c2 = st.columns(2)
    c1.toggle("Heatmap", **state.widget("segment.show_heatmap", True))
    c2.toggle("Mask outline", **state.widget("segment.show_mask", True))


def mask_summary(ctx: resources.Context, view: segment.View, z: int) -> None:
    if view.segmentation is None:
        return
    area = view.area_px
    um2 = segment.area_um2(area, ctx.stack.voxel_size)
    c1, c2 = st.columns(2)
    c1.metric("Mask area (px)", f"{area:,}")
    c2.metric("Mask area (µm²)", f"{um2:,.0f}" if um2 is not None else "n/a (no voxel size)")
    share = segment.area_share(area, ctx.slice_shape)
    st.caption(f"{share:.1f} % of the slice · threshold at score {view.segmentation.threshold:.3f}")
    mask = view.segmentation.mask
    voxel = ctx.stack.voxel_size
    st.download_button("Download this slice's mask (TIFF)", data=lambda: segment.mask_tiff_bytes(mask, voxel),
                       file_name=f"{stack_label(ctx.stack.path)}_z{z}_mask.tif", mime="image/tiff",
                       key="segment.download_mask", on_click="ignore")


def points_summary(ctx: resources.Context, base: segment.Base | None) -> None:
    rows = state.point_summary(ctx.sid)
    if base is not None:
        origins = segment.origin_rows(ctx, base, state.point_set(ctx.sid))
        here = origins[0]["positive"] + origins[0]["negative"]
        inherited = sum(r["positive"] + r["negative"] for r in origins[1:])
        st.markdown(f"**Examples** from this stack: {here}, inherited: {inherited}")
        st.dataframe(origins, hide_index=True)
    if rows:
        total_p = sum(r["positive"] for r in rows)
        total_n = sum(r["negative"] for r in rows)
        st.markdown(f"**Points** {total_p} positive, {total_n} negative on {len(rows)} slice(s) — all are used")
        st.dataframe(rows, hide_index=True, height=min(36 * (len(rows) + 1) + 2, 180))


def prototype_controls(ctx: resources.Context, view: segment.View, spec) -> None:
    st.markdown("**Prototypes**")
    segment.base_picker()
    saved_list = state.get("segment.prototypes")
    left, right = st.columns([3, 2], vertical_alignment="bottom")
    default_name = f"prototype-{len(saved_list) + 1}"
    name = left.text_input("Name", placeholder=default_name, key="segment.proto_name")
    if right.button("Save prototypes", key="segment.save", disabled=view.prototype is None, type="primary"):
        saved = segment.save_prototype(ctx, view, spec, name or default_name)
        lineage = segment.lineage_text(saved.prototype)
        st.success(f"Saved '{saved.name}' ({saved.prototype.summary()[:90]}…)" + (f" · examples from {lineage}" if lineage else ""))
    for index, saved in enumerate(saved_list):
        st.download_button(f"Download {saved.name}.npz", data=saved.data, file_name=f"{saved.name}.npz",
                           mime="application/octet-stream", key=f"segment.download_proto.{index}", on_click="ignore")


layout.run_page(page)
