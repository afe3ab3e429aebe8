"""The experiments' plotly figures (thesis Figs. 4.1-4.3, 4.6, 4.7, 4.9), drawn from the tables' rows so that a
figure can be redrawn from its CSV. Every figure names its backbones under the title and carries a red banner
when one of them has random weights."""

from __future__ import annotations

from typing import Sequence

from core.experiments.base import RANDOM_NOTE, group_rows
from core.features.registry import RANDOM_LABEL

__all__ = ["COLOURS", "backbones_figure", "is_random_label", "points_figure", "projection_figure",
           "threshold_figure", "transfer_figure"]

#: Thesis Figs. 4.1/4.2: structure orange, background blue, positive prototype green, negative red.
COLOURS = {"structure": "#ff7f0e", "background": "#1f77b4", "positive prototype": "#2ca02c",
           "negative prototype": "#d62728"}


def is_random_label(label: str) -> bool:
    """True when a Backbone.label() says the weights are random."""
    return RANDOM_LABEL in label or "RANDOM WEIGHTS" in label.upper()


def _mark(fig, labels: Sequence[str], subtitle: str = "") -> None:
    """Backbone labels (and a subtitle) under the title; a red banner when any backbone has random weights."""
    lines = [subtitle] if subtitle else []
    lines += list(dict.fromkeys(labels))
    title = fig.layout.title.text or ""
    fig.update_layout(title={"text": title + "<br><sup>" + "<br>".join(lines) + "</sup>", "x": 0.02, "xanchor": "left"},
                      margin={"t": 90 + 18 * len(lines)}, template="plotly_white")
    if any(is_random_label(label) for label in labels):
        fig.add_annotation(text=f"<b>{RANDOM_NOTE}</b>", xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                           font={"size": 26, "color": "rgba(200,0,0,0.55)"}, textangle=-20)


def backbones_figure(per_stack: Sequence[dict], stacks: Sequence[str] | None = None, *, n_seeds: int | None = None):
    """Fig. 4.3: grouped bars of mean Dice (± std) per stack (x) and backbone (colour; legend = backbone label)."""
    import plotly.graph_objects as go

    stacks = list(stacks or dict.fromkeys(r["stack"] for r in per_stack))
    fig = go.Figure()
    labels = []
    for (backbone,), group in group_rows(per_stack, "backbone").items():
        by_stack = {r["stack"]: r for r in group}
        label = group[0]["backbone_label"]
        labels.append(label)
        fig.add_bar(name=label, showlegend=True, x=stacks, y=[by_stack[s]["dice"] if s in by_stack else None for s in stacks],
                    error_y={"type": "data", "array": [by_stack[s]["dice_std"] if s in by_stack else None for s in stacks]})
    seeds = f", {n_seeds} seed(s)" if n_seeds else ""
    fig.update_layout(title="Mean Dice per stack and backbone (same slice" + seeds + ")", barmode="group",
                      yaxis={"title": "Dice", "range": [0, 1]}, xaxis={"title": "stack"},
                      legend={"orientation": "h", "y": -0.25}, width=1000, height=560)
    _mark(fig, labels)
    return fig


def projection_figure(rows: Sequence[dict], label: str, explained: dict | None = None, where: str = ""):
    """Figs. 4.1/4.2: one panel per projection; structure orange, background blue, prototypes green / red."""
    from plotly.subplots import make_subplots

    methods = list(dict.fromkeys(r["method"] for r in rows))
    titles = []
    for method in methods:
        ratio = (explained or {}).get(method)
        titles.append(f"PCA (PC1 {ratio[0]:.0%}, PC2 {ratio[1]:.0%} of variance)" if method == "pca" and ratio
                      else method.upper())
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=titles)
    for column, method in enumerate(methods, start=1):
        for kind in ("background", "structure", "positive prototype", "negative prototype"):
            part = [r for r in rows if r["method"] == method and r["kind"] == kind]
            if not part:
                continue
            prototype = kind.endswith("prototype")
            fig.add_scatter(
                x=[r["x"] for r in part], y=[r["y"] for r in part], mode="markers", name=kind, legendgroup=kind,
                showlegend=column == 1, row=1, col=column,
                marker={"color": COLOURS[kind], "size": 16 if prototype else 4, "opacity": 1.0 if prototype else 0.5,
                        "line": {"width": 2, "color": "black"} if prototype else {"width": 0}},
            )
    fig.update_layout(title=f"Patch embeddings{' of ' + where if where else ''} (structure / background by ground truth)",
                      legend={"orientation": "h", "y": -0.12}, width=1200, height=600)
    _mark(fig, [label])
    return fig


def points_figure(rows: Sequence[dict], labels: dict[str, str]):
    """Fig. 4.6: box plot of same-slice Dice per number of points per class (one colour per backbone)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for (backbone,), group in group_rows(rows, "backbone").items():
        fig.add_box(name=labels[backbone], showlegend=True, x=[str(r["n_points"]) for r in group], y=[r["dice"] for r in group],
                    boxmean=True, boxpoints=False)
    fig.update_layout(title="Same-slice Dice against the number of points per class", boxmode="group",
                      xaxis={"title": "points per class (positive = negative)", "type": "category"},
                      yaxis={"title": "Dice", "range": [0, 1]}, legend={"orientation": "h", "y": -0.2},
                      width=1000, height=560)
    _mark(fig, list(labels.values()), "box: quartiles, whiskers 1.5 IQR; dashed line: mean")
    return fig


def threshold_figure(summary: Sequence[dict]):
    """Fig. 4.7: mean Dice against the top-% threshold, one line per stack and a thick pooled mean per backbone."""
    from plotly.subplots import make_subplots

    backbones = list(dict.fromkeys(r["backbone"] for r in summary))
    labels = {r["backbone"]: r["backbone_label"] for r in summary}
    fig = make_subplots(rows=1, cols=len(backbones), shared_yaxes=True,
                        subplot_titles=[labels[b].split(" · ")[0] for b in backbones])
    for column, backbone in enumerate(backbones, start=1):
        mine = [r for r in summary if r["backbone"] == backbone]
        for (stack,), group in group_rows(mine, "stack").items():
            group = sorted(group, key=lambda r: r["top_percent"])
            pooled = stack == "all"
            fig.add_scatter(x=[r["top_percent"] for r in group], y=[r["dice"] for r in group], mode="lines+markers",
                            name="mean (all slices)" if pooled else stack, legendgroup=stack, showlegend=column == 1,
                            line={"width": 4, "color": "black"} if pooled else {"width": 1.5}, row=1, col=column)
            if pooled:
                best = max(group, key=lambda r: r["dice"])
                fig.add_annotation(x=best["top_percent"], y=best["dice"], text=f"best {best['top_percent']:g} %: "
                                   f"{best['dice']:.3f}", row=1, col=column, showarrow=True, arrowhead=2, ay=-40)
        fig.update_xaxes(title_text="top-% threshold (share of patches kept)", row=1, col=column)
    fig.update_yaxes(title_text="Dice", range=[0, 1], row=1, col=1)
    fig.update_layout(title="Same-slice Dice against the top-% threshold", width=max(900, 600 * len(backbones)),
                      height=560, legend={"orientation": "h", "y": -0.2})
    _mark(fig, list(labels.values()))
    return fig


def transfer_figure(cells: Sequence[dict], stacks: Sequence[str] | None = None):
    """Fig. 4.9: heatmap of mean Dice, rows reference stack, columns target stack, annotated 'mean ± std'."""
    import plotly.graph_objects as go

    stacks = list(stacks or dict.fromkeys(c["reference"] for c in cells))
    by_cell = {(c["reference"], c["target"]): c for c in cells}
    z = [[by_cell[(r, t)]["dice"] if (r, t) in by_cell else None for t in stacks] for r in stacks]
    text = [[f"{by_cell[(r, t)]['dice']:.3f}<br>± {by_cell[(r, t)]['dice_std']:.3f}"
             if (r, t) in by_cell and by_cell[(r, t)]["n"] else "" for t in stacks] for r in stacks]
    label = cells[0]["backbone_label"] if cells else ""
    fig = go.Figure(go.Heatmap(z=z, x=stacks, y=stacks, text=text, texttemplate="%{text}", zmin=0, zmax=1,
                               colorscale="Viridis", colorbar={"title": "Dice"}))
    fig.update_layout(title="Prototype transfer: mean Dice (rows: reference stack, columns: target stack)",
                      xaxis={"title": "target stack", "side": "bottom"},
                      yaxis={"title": "reference stack", "autorange": "reversed"}, width=900, height=800)
    _mark(fig, [label], "diagonal: same file (other slices of the reference stack); elsewhere: cross file")
    return fig
