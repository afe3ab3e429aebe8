"""Leave one stack out: the thesis's evaluation of the refiner (§3.8.1, §4.2.3, Table 4.3).

For every stack and seed, ``leave_one_out`` trains on the other stacks (core.refine.train), validates
on the held-out stack and scores the refined masks there next to the prototype masks (Dice, HD95).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.errors import RefineError
from core.metrics import dice, hd95
from core.refine.model import RefineConfig, RefineSample
from core.refine.train import EpochReport, train_unet


@dataclass(frozen=True)
class FoldProgress:
    """LOO progress: fold (0-based) of n_folds holding out ``held_out``, training with ``seed``."""

    fold: int
    n_folds: int
    held_out: str
    seed: int
    epoch: EpochReport


@dataclass(frozen=True)
class LeaveOneOutRow:
    """One (held-out stack, seed) run; per-slice tuples follow ``z`` order.

    dice, hd95 : mean over the held-out slices of the refined masks (core.metrics; hd95 in pixels
        of the slice, the slice diagonal when exactly one of prediction and truth is empty).
    proto_dice, proto_hd95 : the same for the input prototype masks (the baseline).
    """

    held_out: str
    seed: int
    threshold: float
    epochs_run: int
    z: tuple[int, ...]
    slice_dice: tuple[float, ...]
    slice_hd95: tuple[float, ...]
    slice_proto_dice: tuple[float, ...]
    slice_proto_hd95: tuple[float, ...]

    @property
    def dice(self) -> float:
        return _finite_mean(self.slice_dice)

    @property
    def hd95(self) -> float:
        return _finite_mean(self.slice_hd95)

    @property
    def proto_dice(self) -> float:
        return _finite_mean(self.slice_proto_dice)

    @property
    def proto_hd95(self) -> float:
        return _finite_mean(self.slice_proto_hd95)


@dataclass(frozen=True)
class LeaveOneOutResult:
    """rows : one per (fold, seed); summary : per-slice means/stds over all rows (see ``summarise``)."""

    input_set: str
    rows: tuple[LeaveOneOutRow, ...]
    summary: dict[str, float]
    cancelled: bool = False


def _finite_mean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _finite_std(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.std()) if arr.size else float("nan")


def summarise(rows: Sequence[LeaveOneOutRow]) -> dict[str, float]:
    """Means and stds over every evaluated slice of every row (the thesis reports per-slice means).

    Keys: dice_mean, dice_std, hd95_mean, hd95_std, proto_dice_mean, proto_dice_std,
    proto_hd95_mean, proto_hd95_std, dice_gain (dice_mean - proto_dice_mean), n_slices, n_runs.
    """
    cols = {
        "dice": [v for r in rows for v in r.slice_dice],
        "hd95": [v for r in rows for v in r.slice_hd95],
        "proto_dice": [v for r in rows for v in r.slice_proto_dice],
        "proto_hd95": [v for r in rows for v in r.slice_proto_hd95],
    }
    out: dict[str, float] = {}
    for name, values in cols.items():
        out[f"{name}_mean"] = _finite_mean(values)
        out[f"{name}_std"] = _finite_std(values)
    out["dice_gain"] = out["dice_mean"] - out["proto_dice_mean"]
    out["n_slices"] = float(len(cols["dice"]))
    out["n_runs"] = float(len(rows))
    return out


def leave_one_out(
    samples: Sequence[RefineSample],
    config: RefineConfig = RefineConfig(),
    seeds: Sequence[int] = (0, 1, 2),
    *,
    on_progress: Callable[[FoldProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str | torch.device | None = None,
) -> LeaveOneOutResult:
    """Leave-one-stack-out evaluation as in the thesis (§3.8.1, Table 3.5).

    For every stack (in order of first appearance) and seed: train on the other stacks' samples,
    validate (early stopping, threshold) on the held-out stack's samples, and score the refined
    masks on those same samples against their truth, next to the prototype masks (``sample.mask``).
    Note this follows the thesis: the reported fold is also the validation fold, which makes the
    scores slightly optimistic.

    samples : RefineSamples with truth and prototype mask, from >= 2 distinct stack_id values.
    Returns LeaveOneOutResult; if should_stop fires, the finished runs only with cancelled=True.
    """
    order = list(dict.fromkeys(s.stack_id for s in samples))
    if len(order) < 2:
        raise RefineError(f"leave-one-out needs samples from at least 2 stacks, got {len(order)} ({order})")
    if not seeds:
        raise RefineError("leave-one-out needs at least one seed")
    missing = [f"{s.stack_id} z={s.z}" for s in samples if s.mask is None or s.truth is None]
    if missing:
        raise RefineError(f"leave-one-out needs the prototype mask and the truth of every sample; missing for {missing[:5]}")

    rows: list[LeaveOneOutRow] = []
    for fold, held_out in enumerate(order):
        test = sorted((s for s in samples if s.stack_id == held_out), key=lambda s: s.z)
        train = [s for s in samples if s.stack_id != held_out]
        proto_dice = tuple(float(dice(s.mask, s.truth)) for s in test)
        proto_hd95 = tuple(float(hd95(s.mask, s.truth)) for s in test)
        for seed in seeds:
            def report(epoch: EpochReport, fold=fold, held_out=held_out, seed=seed) -> None:
                if on_progress is not None:
                    on_progress(FoldProgress(fold, len(order), held_out, seed, epoch))

            result = train_unet(train, test, dataclasses.replace(config, seed=int(seed)), on_epoch=report,
                                should_stop=should_stop, device=device)
            if result.cancelled:
                return LeaveOneOutResult(config.input_set, tuple(rows), summarise(rows), cancelled=True)
            refiner = result.refiner
            preds = [refiner.predict(s) for s in test]
            rows.append(LeaveOneOutRow(
                held_out=held_out,
                seed=int(seed),
                threshold=refiner.threshold,
                epochs_run=len(result.history),
                z=tuple(int(s.z) for s in test),
                slice_dice=tuple(float(dice(p, s.truth)) for p, s in zip(preds, test)),
                slice_hd95=tuple(float(hd95(p, s.truth)) for p, s in zip(preds, test)),
                slice_proto_dice=proto_dice,
                slice_proto_hd95=proto_hd95,
            ))
    return LeaveOneOutResult(config.input_set, tuple(rows), summarise(rows))
