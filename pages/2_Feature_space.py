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
    z = segment.choose_slice(ctx, "Embedding slice {z} (once: it is cached on disk)…", widget_key="_w.features.z")
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
                      format_func={"pca": "PCA (instant)", "umap": "UMAP (computed in the background)"}.get)
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

    proj = features.projection(key, "pca", patches.flat, extra)  # instant: shown at once, and while UMAP runs
    if method == "umap":
        job = features.umap_job(key, patches.flat, extra)
        if job.result is not None:
            proj = job.result
        elif job.error is not None:
            st.error(f"UMAP failed ({job.error}); the PCA map is shown.")
            st.button("Try UMAP again", key="features.umap_retry", on_click=features.forget_umap_job, args=(job.key,))
        else:
            umap_progress(job)
    left, right = st.columns([3, 2], gap="large")
    with left:
        event = st.plotly_chart(features.figure(proj, labelled, proto_names), on_select="rerun",
                                selection_mode=("box", "lasso"), key=f"features.chart.{proj.method}.{key}")
    selected = features.selected_indices(event)
    with right:
        display = render.display_size(ctx.slice_shape, 420, 520)
        tint = features.selection_grid(selected, patches.grid_shape) if len(selected) else None
        # the display-size slice is memoised per (stack, slice, size): a rerun does not normalise it again
        image = render.compose(segment.display_image(ctx, z, display), display, tint=tint, mask=mask)
        st.image(image, caption=(f"{len(selected)} selected patch(es) highlighted in blue" if len(selected)
                                 else "Select patches in the plot (box or lasso) to highlight them here")
                 + " · mask outline in cyan")


@st.fragment(run_every=1.0)
def umap_progress(job: features.UmapJob) -> None:
    """The UMAP job's phase and time, redrawn every second; the whole page reruns to show the map when ready."""
    if not job.running:
        st.rerun()
    st.info(f"{job.progress_text()} — the PCA map is shown meanwhile; the UMAP map replaces it when it is ready.",
            icon=":material/hourglass_top:")


layout.run_page(page)
