"""Feature space: PCA / UMAP of a slice's patch embeddings, coloured by mask, ground truth or points."""

from __future__ import annotations

import math

import streamlit as st

from ui import features, layout, render, resources, segment, state


def page() -> None:
    layout.mode_switch()
    ctx = resources.require_context()
    st.header("Feature space")
    features.start_umap_warm_up()
    n_slices = ctx.n_slices
    if state.get("segment.z") is None or not 0 <= state.get("segment.z") < n_slices:
        state.set_bound("segment.z", n_slices // 2)
    z = st.slider("Slice z", 0, n_slices - 1, key=state.bind("segment.z", n_slices // 2), on_change=state.store,
                  args=("segment.z",)) if n_slices > 1 else 0
    if not ctx.embedder.is_cached(z):
        with st.spinner(f"Embedding slice {z} (once: it is cached on disk)…"):
            segment.ensure_embedded(ctx, z)
    grid = features.embeddings(ctx, z)
    grid_shape = grid.shape[:2]
    flat = grid.reshape(-1, grid.shape[-1])
    key = features.data_key(ctx, z)

    # the current mask and prototype, exactly as the Segment page shows them (memoised there)
    busy = "Best mode: training the pixel classifier on your points…" if ctx.config.uses_pixels else "Scoring…"
    with st.spinner(busy, show_time=ctx.config.uses_pixels):
        view = segment.compute_view(ctx, z, segment.current_spec(ctx))
    truth = ctx.truth_slice(z)

    options = [k for k in features.COLOR_BY if (k != "truth" or truth is not None) and (k != "mask" or view.segmentation is not None)]
    c1, c2 = st.columns(2)
    method = c1.radio("Projection", ["pca", "umap"], horizontal=True, key=state.bind("features.method", "pca"),
                      on_change=state.store, args=("features.method",),
                      format_func={"pca": "PCA (instant)", "umap": "UMAP (seconds; first use compiles ~1 min)"}.get)
    color_by = c2.radio("Colour by", options, format_func=features.COLOR_BY.get, horizontal=True,
                        key=f"features.color_by.{'-'.join(options)}")
    if color_by == "mask":
        labelled = features.mask_labels(view.segmentation.mask, grid_shape)
    elif color_by == "truth":
        labelled = features.mask_labels(truth, grid_shape)
    else:
        labelled = features.point_labels(ctx, z, grid_shape)
    extra, proto_names = features.prototype_points(view.prototype)

    if truth is not None:
        silhouette, knn = features.separation_scores(key, flat, features.mask_labels(truth, grid_shape).names)
        m1, m2, m3 = st.columns(3)
        m1.metric("Silhouette (ground truth, cosine)", "n/a" if math.isnan(silhouette) else f"{silhouette:.3f}")
        m2.metric("10-NN accuracy (ground truth)", "n/a" if math.isnan(knn) else f"{knn:.3f}")
        m3.metric("Patches", f"{flat.shape[0]:,} × {flat.shape[1]} dims")
    else:
        st.caption("Choose a ground truth on the Open sample page to see the silhouette and kNN accuracy.")

    if method == "umap" and not st.session_state.get(f"features.umap_ready.{key}.{len(proto_names)}"):
        st.info("UMAP takes a few seconds (about a minute the very first time, while it compiles).")
        if not st.button("Compute UMAP", type="primary", key="features.compute_umap"):
            return
    with st.spinner("Computing the UMAP map…" if method == "umap" else "Computing PCA…"):
        proj = features.projection(key, method, flat, extra)
    if method == "umap":
        st.session_state[f"features.umap_ready.{key}.{len(proto_names)}"] = True

    left, right = st.columns([3, 2], gap="large")
    with left:
        event = st.plotly_chart(features.figure(proj, labelled, proto_names), on_select="rerun",
                                selection_mode=("box", "lasso"), key=f"features.chart.{method}.{key}")
    selected = features.selected_indices(event)
    with right:
        display = render.display_size(ctx.slice_shape, 420, 520)
        tint = features.selection_grid(selected, grid_shape) if len(selected) else None
        image = render.compose(ctx.embedder.normalized(z), display, tint=tint,
                               mask=view.segmentation.mask if view.segmentation is not None else None)
        st.image(image, caption=(f"{len(selected)} selected patch(es) highlighted in blue" if len(selected)
                                 else "Select patches in the plot (box or lasso) to highlight them here")
                 + " · mask outline in cyan")


layout.run_page(page)
