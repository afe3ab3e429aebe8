"""The Evaluate page's work: the thesis protocol (core.protocol) on the open stack and its ground truth, with the
adapt setting for a prototype made elsewhere (core.protocol.score_adapted), and "Score my prototype": the user's own
prototype (the Segment page's current one or a saved one) scored slice by slice against the same ground truth
(core.protocol.score_prototype)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from core.config import PipelineConfig
from core.errors import ProtoscopeError
from core.io import stack_label
from core.prototypes import Prototype
from core.protocol import (
    ADAPT,
    BASELINES,
    EvalStack,
    EvaluationResult,
    Method,
    ProtocolSettings,
    evaluate,
    score_adapted,
    score_prototype,
    select_slices,
)
from core.zspec import parse_z_spec
from ui import resources, segment, state
from ui.resources import Context

#: Settings that make sense for one stack (cross-file needs two or more).
ONE_STACK_SETTINGS = ("same-slice", "same-file")
#: The settings the page offers: the one-stack ones, and adapt (a prototype made elsewhere plus a few points here).
SETTINGS = (*ONE_STACK_SETTINGS, ADAPT)
SLICE_CHOICES = {"spaced": "evenly spaced (the thesis protocol)", "chosen": "exactly these slices"}
METHODS = {
    "session": "the session's settings",
    "thesis": "thesis mode",
    "best": "best mode",
    "otsu": "baseline: Otsu of the raw slice",
    "intensity": "baseline: intensity halfway between the points",
}


def methods_for(ctx: Context, names: list[str]) -> list[Method]:
    """core.protocol Methods for the chosen names ('session' = the mode with the advanced options)."""
    methods = []
    for name in names:
        if name == "session":
            methods.append(Method(f"{ctx.config.mode.value} (session)", ctx.config))
        elif name in ("thesis", "best"):
            methods.append(Method(name, PipelineConfig.for_mode(name)))
        elif name in BASELINES:
            methods.append(Method(name, None))
        else:
            raise ProtoscopeError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if not methods:
        raise ProtoscopeError("choose at least one method to evaluate")
    return methods


def spaced_defaults(n: int) -> tuple[int, int, int]:
    """For a stack of n slices: (default number of evenly spaced slices, most slices to skip at each end, default
    skip): 5 slices, 2 skipped at each end, as far as the stack allows."""
    return min(5, n), max(0, (n - 1) // 2), min(2, (n - 1) // 2)


def parse_slices(text: str, n_slices: int) -> tuple[int, ...]:
    """The typed z selection (core.zspec: '12', '3,7,9', '0:24:4', 'all') as sorted distinct slice indices."""
    return tuple(sorted(parse_z_spec(text, n_slices)))


def short_list(values: tuple[int, ...] | list[int], limit: int = 12) -> str:
    """'2, 5, 9', or '0, 1, 2, …, 23' beyond ``limit`` values, for captions."""
    if len(values) <= limit:
        return ", ".join(str(v) for v in values)
    return ", ".join(str(v) for v in values[: limit - 1]) + f", …, {values[-1]}"


def eval_stack(ctx: Context) -> EvalStack:
    """The open stack with its ground truth, as core.protocol takes it (ProtoscopeError without a ground truth)."""
    truth = ctx.truth
    if truth is None:
        raise ProtoscopeError("the Evaluate page needs a ground truth: choose a channel or a mask file on the Open "
                              "sample page")
    return EvalStack(Path(ctx.sample.path), ctx.channel, mask_channel=truth.channel,
                     mask_path=Path(truth.path) if truth.path else None, name=stack_label(Path(ctx.sample.path)))


def run(
    ctx: Context,
    *,
    method_names: list[str],
    n_points: int,
    n_seeds: int,
    protocol_settings: list[str],
    n_slices: int = 5,
    skip_ends: int = 2,
    z_values: tuple[int, ...] | None = None,
    adapt_choice: str | None = None,
    adapt_points: int = 3,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Evaluate the open stack against its ground truth; rows per (method, setting, slice, seed).

    z_values : exactly these slices (core.protocol's explicit selection); else ``n_slices`` evenly spaced
        ones after skipping ``skip_ends`` at each end.
    adapt_choice : the prototype the adapt setting adapts (a ``prototype_choices`` entry; needed for adapt):
        ``adapt_points`` + ``adapt_points`` points per seed on one slice here (core.protocol.score_adapted); its
        rows come after the methods' (the methods are not needed for adapt alone).
    """
    if not protocol_settings:
        raise ProtoscopeError("choose at least one setting (same-slice, same-file, adapt)")
    stack = eval_stack(ctx)
    protocol = ProtocolSettings(n_points=int(n_points), seeds=tuple(range(int(n_seeds))), n_slices=int(n_slices),
                                skip_ends=int(skip_ends), settings=tuple(s for s in protocol_settings if s != ADAPT),
                                z_values=tuple(int(z) for z in z_values) if z_values is not None else None,
                                adapt_points=int(adapt_points))
    if ADAPT in protocol_settings and adapt_choice is None:
        raise ProtoscopeError("adapt needs a prototype to adapt: save one on the Segment page (made on another "
                              "sample, or loaded from a file) and choose it")
    result = EvaluationResult()
    if protocol.settings:
        result = evaluate([stack], methods_for(ctx, method_names), [ctx.backbone], protocol,
                          cache=resources.embedding_cache(), log=log)
    if ADAPT in protocol_settings:
        name, prototype = chosen_prototype(ctx, adapt_choice)
        adapted = score_adapted(prototype, stack, protocol, backbone=ctx.backbone, cache=resources.embedding_cache(),
                                name=name)
        result.rows.extend(adapted.rows)
        result.notes.extend(note for note in adapted.notes if note not in result.notes)
        result.stacks, result.slices = adapted.stacks, adapted.slices
        result.seconds += adapted.seconds
    if "same-file" in protocol_settings and z_values is not None and len(set(z_values)) < 2:
        result.notes.append("same-file applies one slice's prototype to the other evaluated slices: with one slice "
                            "there are none, so only same-slice was scored")
    return result


def per_slice(result: EvaluationResult) -> list[dict]:
    """Rows for the per-slice table: method, setting, z, seed, reference z, Dice, IoU, HD95."""
    keys = ("method", "setting", "z", "seed", "ref_z", "dice", "iou", "hd95_px", "hd95_um", "mask_fraction", "truth_fraction")
    return [{k: row.get(k) for k in keys} for row in result.rows]


def summary(result: EvaluationResult) -> list[dict]:
    """Mean and std per (method, setting); Dice and IoU to 3 decimals, HD95 to 0.1."""
    keys = ("method", "setting", "n", "dice", "dice_std", "iou", "iou_std", "hd95_px", "hd95_px_std", "hd95_um")
    digits = {"dice": 3, "dice_std": 3, "iou": 3, "iou_std": 3, "hd95_px": 1, "hd95_px_std": 1, "hd95_um": 1}
    rows = []
    for entry in result.summary():
        row = {k: entry.get(k) for k in keys}
        for key, places in digits.items():
            if isinstance(row[key], float):
                row[key] = round(row[key], places)
        rows.append(row)
    return rows


def per_slice_table(result: EvaluationResult):
    """The per-slice rows as a DataFrame, led by a 'method / setting' column (for the plots and the CSV)."""
    import pandas as pd

    table = pd.DataFrame(per_slice(result))
    table.insert(0, "method / setting", table["method"] + " / " + table["setting"])
    return table


def dice_figure(table):
    """Plotly strip of Dice per slice, one column per method / setting."""
    import plotly.express as px

    fig = px.strip(table, x="method / setting", y="dice", color="method / setting", hover_data=["z", "seed", "ref_z"],
                   title="Dice per slice")
    fig.update_layout(height=340, showlegend=False, yaxis_range=[0, 1], margin=dict(l=10, r=10, t=40, b=10))
    return fig


def hd95_figure(table):
    """Plotly lines of HD95 (pixels) along z, one line per method / setting."""
    import plotly.express as px

    fig = px.line(table.sort_values(["method / setting", "z"]), x="z", y="hd95_px", color="method / setting",
                  markers=True, title="HD95 per slice (pixels)")
    fig.update_layout(height=340, margin=dict(l=10, r=10, t=40, b=10))
    return fig


# ---- score my prototype ----------------------------------------------------------------------------------

CURRENT = "\x00current"  # the choice "the Segment page's current prototype" (no saved name can be this)


def prototype_choices(ctx: Context) -> list[str]:
    """The prototypes that can be scored: the Segment page's current one (when its points make one), then every
    prototype saved in the session."""
    current = [CURRENT] if not isinstance(segment.prototype_and_scorer(ctx, state.point_set(ctx.sid)), str) else []
    return current + [saved.name for saved in state.get("segment.prototypes")]


def choice_label(choice: str) -> str:
    return "the current prototype (Segment page, its threshold now)" if choice == CURRENT else f"saved: {choice}"


def chosen_prototype(ctx: Context, choice: str) -> tuple[str, Prototype]:
    """(name, prototype) of a choice: the current one with the Segment page's threshold in effect, or a saved one as
    saved. ProtoscopeError when it is gone."""
    if choice == CURRENT:
        built = segment.prototype_and_scorer(ctx, state.point_set(ctx.sid))
        if isinstance(built, str):
            raise ProtoscopeError(f"there is no current prototype: {built} (Segment page)")
        return "current", segment.with_threshold(built[0], segment.current_spec(ctx))
    for saved in state.get("segment.prototypes"):
        if saved.name == choice:
            return saved.name, saved.prototype
    raise ProtoscopeError(f"no saved prototype is called {choice!r} any more; choose another")


def default_score_slices(n: int) -> str:
    """The z selection the section starts from: the evaluate page's evenly spaced default, e.g. '2, 7, 12, 16, 21'."""
    count, _, skip = spaced_defaults(n)
    return ", ".join(str(z) for z in select_slices(n, count, skip)[0])


def score_mine(ctx: Context, choice: str, z_values: tuple[int, ...]) -> EvaluationResult:
    """Dice, IoU and HD95 per slice of the chosen prototype's masks against the open stack's ground truth."""
    name, prototype = chosen_prototype(ctx, choice)
    return score_prototype(prototype, eval_stack(ctx), z_values, backbone=ctx.backbone,
                           cache=resources.embedding_cache(), name=name)


def mine_table(result: EvaluationResult) -> list[dict]:
    """One row per slice (z, Dice, IoU, HD95 in px and µm, mask and truth shares), then a 'mean' row."""
    keys = ("z", "dice", "iou", "hd95_px", "hd95_um", "mask_fraction", "truth_fraction")
    rows: list[dict] = [{k: row.get(k) for k in keys} for row in result.rows]
    if rows:
        (mean,) = result.summary()
        rows.append({"z": "mean", "dice": mean["dice"], "iou": mean["iou"], "hd95_px": mean["hd95_px"],
                     "hd95_um": mean["hd95_um"], "mask_fraction": None, "truth_fraction": None})
    for row in rows:
        for key, places in (("dice", 3), ("iou", 3), ("hd95_px", 1), ("hd95_um", 1), ("mask_fraction", 3),
                            ("truth_fraction", 3)):
            if isinstance(row[key], float):
                row[key] = round(row[key], places)
        row["z"] = str(row["z"])
    return rows
