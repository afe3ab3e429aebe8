"""What every experiment module shares: the experiment names, the result object, row grouping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["EXPERIMENTS", "RANDOM_NOTE", "Experiment", "Log", "group_rows"]

EXPERIMENTS = ("backbones", "separability", "points", "threshold", "transfer")
RANDOM_NOTE = "RANDOM WEIGHTS — plumbing only, not results"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Experiment:
    """One experiment's results.

    tables : CSV name (without .csv) -> rows (dicts with the same keys).
    figures : file stem -> plotly Figure.
    notes : things the reader should know (skipped slices, shallow stacks, ...).
    info : facts for the report (mode, configuration, slices per stack, seconds, ...).
    """

    name: str
    tables: dict[str, list[dict]]
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)



def group_rows(rows: Sequence[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Rows grouped by the values of ``keys``, groups and rows in first-seen order.

    >>> group_rows([{"a": 1, "b": 2}, {"a": 1, "b": 3}], "a")
    {(1,): [{'a': 1, 'b': 2}, {'a': 1, 'b': 3}]}
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups
