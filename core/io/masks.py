"""Mask arrays as every writer takes them: validation of a (Z, Y, X) array-like and the 0/255 rule.

Any numeric mask is accepted; nonzero means foreground and is stored as 255 (uint8 0/255). Used by
`core.io.writers` and `core.io.ims_append`, which therefore do not import each other's helpers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from core.errors import StackError

__all__ = ["as_mask_array", "mask_to_uint8"]


def mask_to_uint8(mask: Any) -> np.ndarray:
    """Any numeric array -> uint8 with 255 where nonzero and 0 elsewhere (same shape)."""
    return (np.asarray(mask) != 0).view(np.uint8) * np.uint8(255)


def as_mask_array(masks: Any, out_path: Path | str) -> Any:
    """Validate a (Z, Y, X) mask array-like without loading it; (Y, X) becomes (1, Y, X).

    Arrays, np.memmap and h5py datasets stay lazy; lists are converted with numpy.
    """
    if not (hasattr(masks, "shape") and hasattr(masks, "dtype") and hasattr(masks, "__getitem__")):
        masks = np.asarray(masks)
    dtype = np.dtype(masks.dtype)
    if dtype.kind not in "biuf":
        raise StackError(f"mask for '{Path(out_path).name}' has dtype {dtype}; use bool or integer (0 = background)")
    if len(masks.shape) == 2:
        masks = np.asarray(masks)[None]
    if len(masks.shape) != 3 or min(masks.shape) < 1:
        raise StackError(f"mask for '{Path(out_path).name}' has shape {tuple(masks.shape)}; expected (Z, Y, X) "
                         "with at least one slice")
    return masks
