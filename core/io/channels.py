"""Channel rules by name: how a channel is labelled, which one holds the ground truth, which one to segment.

One place for every picker of the app and the CLI. Names are compared case- and space-insensitively
(``'Ground truth'``, ``'ground_truth'`` and ``'GroundTruth'`` are alike).

>>> guess_truth_channel(["Smoothed", "Vessels", "Ground truth"])
2
>>> guess_truth_channel(["Nuclei", "Dynactin"]) is None
True
"""

from __future__ import annotations

import re
from typing import Sequence

from core.io.base import Stack, lab_convention_channel

#: Name of the mask channel core.io.writers.write_masks appends to an Imaris copy (its ``channel_name``).
PROTOSCOPE_MASK_NAME = "Protoscope mask"

# Truth-like names, strongest first: a channel called 'Ground truth' beats one called 'Mask'.
_TRUTH_PATTERNS = (
    r"ground ?truth|\bgt\b",
    r"\blabel(s|led|ed)?\b|\blabel ?map",
    r"\bannotat(ion|ions|ed)\b",
    r"\bsegmentation\b|\bsegmented\b",
    r"\bmasks?\b",
)
# Synthetic test content, not a sample: ImarisWriter's 'Ramp x+2y+50z', gradients, test patterns.
_PATTERN_NAMES = r"\bramp\b|\bgradient\b|test ?pattern|\bcheckerboard\b"


def _words(name: str) -> str:
    """'Ground_Truth-2' -> 'ground truth 2': lower case, separators as single spaces."""
    return " ".join(re.split(r"[\s_\-./:]+", str(name).strip().lower())).strip()


def _squeezed(name: str) -> str:
    """'Ground Truth' -> 'groundtruth': lower case without spaces or separators (for matching names)."""
    return re.sub(r"[\s_\-./:]+", "", str(name).strip().lower())


def _names(stack_or_names: Stack | Sequence[str]) -> list[str]:
    names = stack_or_names.channel_names if isinstance(stack_or_names, Stack) else stack_or_names
    return [str(n) for n in names]


def channel_label(stack_or_names: Stack | Sequence[str], c: int) -> str:
    """'1 · Vessels': the index and name every channel picker shows (just '1' for an unnamed channel)."""
    names = _names(stack_or_names)
    name = names[c].strip() if 0 <= c < len(names) else ""
    return f"{c} · {name}" if name else str(c)


def channel_name(stack_or_names: Stack | Sequence[str], c: int) -> str:
    """Channel c's own name, or '' when it has none (out of range, or the readers' stand-in 'Channel N')."""
    names = _names(stack_or_names)
    name = names[c].strip() if 0 <= c < len(names) else ""
    return "" if re.fullmatch(r"channel ?\d+", name.lower()) else name


def same_channel_name(a: str, b: str) -> bool:
    """Whether two channel names are alike ignoring case, spaces and separators ('Ground truth' ~ 'ground_truth')."""
    return _squeezed(a) == _squeezed(b)


def is_protoscope_mask(name: str) -> bool:
    """Whether a channel is one Protoscope appended (named 'Protoscope mask', perhaps with a suffix)."""
    return _squeezed(name).startswith(_squeezed(PROTOSCOPE_MASK_NAME))


def truth_rank(name: str) -> int | None:
    """How strongly ``name`` reads as a ground truth: 0 ('ground truth', 'GT') ... 4 ('mask'); None when it
    does not; Protoscope's own mask channel is a result, not a truth (None)."""
    if is_protoscope_mask(name):
        return None
    words = _words(name)
    squeezed = _squeezed(name)
    for rank, pattern in enumerate(_TRUTH_PATTERNS):
        if re.search(pattern, words) or (rank == 0 and "groundtruth" in squeezed):
            return rank
    return None


def is_truth_like(name: str) -> bool:
    """A channel named like a mask, label, ground truth, segmentation or annotation (not Protoscope's own)."""
    return truth_rank(name) is not None


def is_test_pattern(name: str) -> bool:
    """A channel named like synthetic test content: a ramp, gradient, test pattern or checkerboard."""
    return re.search(_PATTERN_NAMES, _words(name)) is not None


def guess_truth_channel(names: Sequence[str], *, image_channel: int | None = None) -> int | None:
    """The channel whose name reads most like a ground truth (mask / label / ground truth / segmentation /
    annotation, case-insensitive), else None. Never ``image_channel`` nor Protoscope's own mask channel.

    >>> guess_truth_channel(["Smoothed", "Vessels", "Ground truth", "Protoscope mask"])
    2
    >>> guess_truth_channel(["Vessels", "Protoscope mask"]) is None
    True
    """
    ranked = [(rank, c) for c, name in enumerate(names)
              if c != image_channel and (rank := truth_rank(name)) is not None]
    return min(ranked)[1] if ranked else None


def default_image_channel(stack: Stack, requested: int | None = None) -> int:
    """The channel to segment (the one rule of the app and the CLI): ``requested`` when given (negatives count
    from the end; StackError outside the stack), else the lab convention by position
    (``core.io.base.lab_convention_channel``) refined by the channels' names.

    The app's own appended mask channels at the end are set aside first (so a reopened ``.ims`` copy
    defaults like its source). The rule's channel is kept unless it is named like a ground truth or
    Protoscope's mask, or like a test pattern ('Ramp'); then the nearest channel named like neither
    (the lower one on a tie), else the nearest that is at least no truth or mask, else the rule's channel.
    """
    if requested is not None:
        return stack.resolve_channel(requested)
    names = _names(stack)
    n = len(names)
    while n > 1 and is_protoscope_mask(names[n - 1]):
        n -= 1
    base = min(lab_convention_channel(stack), n - 1)
    if stack.format == "ims" and n != len(names):  # the lab rule (second to last) on the source's channels
        base = n - 2 if n >= 2 else 0

    def excluded(c: int) -> bool:
        return is_truth_like(names[c]) or is_protoscope_mask(names[c])

    by_distance = sorted(range(len(names)), key=lambda c: (abs(c - base), c))
    for acceptable in (lambda c: not excluded(c) and not is_test_pattern(names[c]), lambda c: not excluded(c)):
        for c in by_distance:
            if acceptable(c):
                return c
    return base


def matching_channel(stack_or_names: Stack | Sequence[str], name: str | None) -> int | None:
    """The channel whose name equals ``name`` ignoring case and spaces ('vessels' finds 'Vessels'), else
    None (also for a blank ``name``); the first one when several match.

    >>> matching_channel(["Ground truth", "Vessels"], " vessels ")
    1
    """
    if name is None or not _squeezed(name):
        return None
    wanted = _squeezed(name)
    return next((c for c, n in enumerate(_names(stack_or_names)) if _squeezed(n) == wanted), None)
