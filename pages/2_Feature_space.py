"""Feature space: PCA / UMAP of a slice's patch embeddings, coloured by mask, ground truth or points."""

from __future__ import annotations

import math

import streamlit as st

from ui import features, layout, render, segment, state


def page() -> None:
    layout.mode_switch()
    ctx = layout.require_context()
    st.header("Feature space")
    features.start_umap_warm_up()
    z = segment.choose_slice(ctx, "Embedding slice {z} (once: it is cached on disk)…")
    patches = features.slice_patches(ctx, z)
    key = patches.key

    # the current mask and prototype, exactly as the Segment page shows them (memoised there)
    busy = "Best mode: training the pixel classifier on your points…" if ctx.config.uses_pixels else "Scoring…"
    with st.spinner(busy, show_time=ctx.config.uses_pixels):
        view = segment.compute_view(ctx, z, segment.current_spec(ctx))
    truth = ctx.truth_slice(z)
    mask = view.segmentation.mask if view.segmentation is not None else None

    options = features.color_options(truth is not None, mask is not None)
    c1, c2 = st.columns(2)
    method = c1.radio("Projection", ["pca", "umap"], horizontal=True, **state.widget("features.method", "pca"),
                      format_func={"pca": "PCA (instant)", "umap": "UMAP (seconds; first use compiles ~1 min)"}.get)
    color_by = c2.radio("Colour by", options, format_func=features.COLOR_BY.get, horizontal=True,
                        key=f"features.color_by.{'-'.join(options)}")
    labelled = features.labels_for(color_by, ctx, z, patches.grid_shape, mask, truth)
    extra, proto_names = features.prototype_points(view.prototype)

    if truth is not None:
        truth_names = features.mask_labels(truth, patches.grid_shape).names
        silhouette, knn = features.separation_scores(key, patches.flat, truth_names)
        m1, m2, m3 = st.columns(3)
        m1.metric("Silhouette (ground truth, cosine)", "n/a" if math.isnan(silhouette) else f"{silhouette:.3f}")
        m2.metric("10-NN accuracy (ground truth)", "n/a" if math.isnan(knn) else f"{knn:.3f}")
        m3.metric("Patches", f"{patches.flat.shape[0]:,} × {patches.flat.shape[1]} dims")
    else:
        st.caption("Choose a ground truth on the Open sample page to see the silhouette and kNN accuracy.")

    umap_ready = f"features.umap_ready.{key}.{len(proto_names)}"
    if method == "umap" and not st.session_state.get(umap_ready):
        st.info("UMAP takes a few seconds (about a minute the very first time, while it compiles).")
        if not st.button("Compute UMAP", type="primary", key="features.compute_umap"):
            return
    with st.spinner("Computing the UMAP map…" if method == "umap" else "Computing PCA…"):
        proj = features.projection(key, method, patches.flat, extra)
    if method == "umap":
        st.session_state[umap_ready] = True

    left, right = st.columns([3, 2], gap="large")
    with left:
        event = st.plotly_chart(features.figure(proj, labelled, proto_names), on_select="rerun",
                                selection_mode=("box", "lasso"), key=f"features.chart.{method}.{key}")
    selected = features.selected_indices(event)
    with right:
        display = render.display_size(ctx.slice_shape, 420, 520)
        tint = features.selection_grid(selected, patches.grid_shape) if len(selected) else None
        # the display-size slice is memoised per (stack, slice, size): a rerun does not normalise it again
        image = render.compose(segment.display_image(ctx, z, display), display, tint=tint, mask=mask)
        st.image(image, caption=(f"{len(selected)} selected patch(es) highlighted in blue" if len(selected)
                                 else "Select patches in the plot (box or lasso) to highlight them here")
                 + " · mask outline in cyan")


layout.run_page(page)
