"""Parse z-slice selections such as ``5``, ``3,7,9``, ``0:40``, ``0:40:2``, ``-1``, ``0:5,9`` or ``all``.

Errors raise :class:`ZSpecError`, which is both a ``ValueError`` and a
:class:`core.errors.ProtoscopeError` (so the CLI prints it as ``error: ...``); its message gives
the valid range ``0..n-1``.
"""

from __future__ import annotations

import re

from core.errors import ZSpecError

__all__ = ["parse_z_spec", "ZSpecError"]

_INT = re.compile(r"^[+-]?\d+$")



def parse_z_spec(spec: str, n_slices: int) -> list[int]:
    """Slice indices selected by `spec` for a stack of `n_slices` slices.

    spec : comma-separated items, each an index (negatives count from the end: -1 = last), a
        Python-style half-open range ``start:stop`` or ``start:stop:step`` (``10:`` = 10 to the end,
        ``:5`` = 0..4, ``-5:`` = the last five), or ``all``.
    Returns indices in 0..n-1 in the order given, each once (later repeats are dropped).
    Raises ZSpecError (a ValueError) for malformed text, indices or range ends outside the stack,
    a zero step, or a selection that selects nothing.

    >>> parse_z_spec("0:5,9", 20)
    [0, 1, 2, 3, 4, 9]
    >>> parse_z_spec("-1", 20)
    [19]
    """
    if isinstance(n_slices, bool) or not isinstance(n_slices, int) or n_slices < 1:
        raise ZSpecError(f"cannot select slices from a stack with {n_slices!r} slices")
    n = n_slices
    valid = f"valid z: 0..{n - 1} (or -{n}..-1 from the end), ranges like 0:{n}, or 'all'"
    text = str(spec).strip()
    if not text:
        raise ZSpecError(f"empty z selection; {valid}")
    out: list[int] = []
    seen: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ZSpecError(f"z selection {spec!r} has an empty item; {valid}")
        for z in _parse_item(item, n, valid):
            if z not in seen:
                seen.add(z)
                out.append(z)
    return out


def _parse_item(item: str, n: int, valid: str) -> list[int]:
    if item.lower() == "all":
        return list(range(n))
    if _INT.match(item):
        z = int(item)
        if not -n <= z < n:
            raise ZSpecError(f"z {z} is outside the stack; {valid}")
        return [z % n]
    parts = item.split(":")
    if len(parts) not in (2, 3) or not all(p.strip() == "" or _INT.match(p.strip()) for p in parts):
        raise ZSpecError(f"cannot read z selection {item!r}; {valid}")
    start, stop, step = (int(p) if p.strip() else None for p in (parts + [""])[:3])
    if step == 0:
        raise ZSpecError(f"z range {item!r} has step 0; {valid}")
    if start is not None and not -n <= start < n:
        raise ZSpecError(f"z range {item!r} starts outside the stack; {valid}")
    if stop is not None and not -n <= stop <= n:
        raise ZSpecError(f"z range {item!r} ends outside the stack (the end is exclusive, at most {n}); {valid}")
    selected = list(range(n))[slice(start, stop, step)]
    if not selected:
        raise ZSpecError(f"z range {item!r} selects no slices; {valid}")
    return selected
