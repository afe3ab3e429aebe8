"""Slice previews for a viewer: a lower-resolution plane at once, the full plane decoded in the background.

A chunked Imaris file decodes a whole z-chunk (e.g. 32 planes) to read one plane: 1.5-3.5 s for a
3050 x 2933 slice on a 2-core CPU. Once decoded, the z-chunk stays in the reader's cache
(`core.io.chunks.ZChunkCache`) and its planes read in milliseconds. So a slice change goes:

1. ``view_plane(stack, z, channel, max_side=640)``: when the plane is cheap (its z-chunk is decoded, or the
   format stores plane by plane) it returns the full-resolution plane (``full=True``). Otherwise it returns
   the plane of the coarsest pyramid level that still has ``max_side`` pixels on its longer side (Imaris
   ``ResolutionLevel 1..n``; level 2 of a 3050 x 2933 stack is 762 x 733, a 36 MB z-chunk, ~0.2 s) and
   starts decoding the full plane in a background thread (``loading``, a Future of the (Y, X) plane).
2. The viewer shows the preview, waits for ``loading`` (or polls ``loading.done()``), then calls
   `view_plane` again, which now returns the full plane from the cache.

Formats without a pyramid (TIFF, images, single-level .ims) return the full plane, level 0.
A new `load_plane` request on a stack cancels its earlier ones that have not started (a user scrolling
through slices does not queue a decode per slice); one decode runs at a time per process.

>>> view = view_plane(stack, 40, channel=0)                  # doctest: +SKIP
>>> view.image.shape, view.level, view.full                  # doctest: +SKIP
((762, 733), 2, False)
>>> full = view.loading.result()                             # (3050, 2933) uint16, z-chunk now cached
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from core.io.base import Stack

__all__ = ["PlaneView", "level_plane_index", "load_plane", "preview_level", "preview_plane", "view_plane"]

#: Longest side (pixels) of the Segment page's slice display (ui.render.display_size: 512 x 640 at most).
DISPLAY_MAX_SIDE = 640

_loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="protoscope-plane-loader")
_pending: "weakref.WeakKeyDictionary[Stack, dict[tuple[int, int, int], Future]]" = weakref.WeakKeyDictionary()
_pending_lock = threading.Lock()


@dataclass(frozen=True)
class PlaneView:
    """What a viewer shows for one slice now.

    image : (Yl, Xl) plane in the stack's dtype, at resolution `level` (level 0 = full resolution).
    full : True when `image` is the full-resolution plane.
    loading : when not `full`, a Future of the full-resolution (Y, X) plane being decoded; else None.
    """

    image: np.ndarray
    level: int
    full: bool
    loading: Future | None = None


def preview_level(stack: Stack, max_side: int) -> int:
    """The coarsest resolution level whose planes still have at least `max_side` pixels on their longer
    side; 0 when no coarser level has (or the stack has no pyramid). The one level rule: the orthogonal
    views (`core.views.choose_level`) use it too."""
    best = 0
    for level in range(1, stack.n_levels):
        _, n_y, n_x = stack.level_shape(level)
        if max(n_y, n_x) >= max_side:
            best = level
    return best


def level_plane_index(stack: Stack, z: int, level: int) -> int:
    """Plane of resolution `level` that covers level-0 plane `z`: z * Zl // Z (Imaris halves Z only in some
    levels; `core.views.level_point` uses the same rule)."""
    n_z = stack.level_shape(0)[0]
    return int(z) * stack.level_shape(level)[0] // n_z


def preview_plane(stack: Stack, z: int, max_side: int, channel: int = 0, *,
                  timepoint: int = 0) -> tuple[np.ndarray, int]:
    """(plane, level): level-0 slice `z` read at `preview_level(stack, max_side)`.

    plane : (Yl, Xl) in the stack's dtype; level 0 (the full plane) for stacks without a pyramid.
    Raises StackError as `Stack.read_slice` does (z is checked at level 0).
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1 pixel, got {max_side}")
    stack.plane_is_cheap(z, channel, timepoint=timepoint)  # checks z, channel and time point at level 0
    level = preview_level(stack, max_side)
    plane = stack.read_slice(level_plane_index(stack, z, level), channel, timepoint=timepoint, level=level)
    return plane, level


def load_plane(stack: Stack, z: int, channel: int = 0, *, timepoint: int = 0) -> Future:
    """Read the full-resolution plane in the background: a Future of the (Y, X) plane from `read_slice`
    (for an .ims, its z-chunk is then in the reader's cache).

    The same request while one is pending returns the same Future; a new request on this stack cancels
    the earlier ones that have not started. Errors (StackError) are raised by ``Future.result()``.
    """
    stack.plane_is_cheap(z, channel, timepoint=timepoint)  # check the indices now, in the caller's thread
    request = (int(z), stack.resolve_channel(channel), int(timepoint))
    with _pending_lock:
        requests = _pending.setdefault(stack, {})
        found = requests.get(request)
        if found is not None and not found.cancelled():
            return found
        for other, future in list(requests.items()):
            if future.done() or future.cancel():
                del requests[other]
        future = _loader.submit(stack.read_slice, *request[:2], timepoint=request[2])
        requests[request] = future
    return future


def view_plane(stack: Stack, z: int, channel: int = 0, *, max_side: int = DISPLAY_MAX_SIDE,
               timepoint: int = 0) -> PlaneView:
    """What to show for slice `z` now: the full plane when it is cheap to read, else a pyramid preview of at
    least `max_side` px plus the full plane loading in the background (see the module docstring).

    Stable entry point for the app and for `bench/bench_live.py` (slice change on a chunked .ims): the
    time of this call is the time to the first image; ``view.loading.result()`` is the full plane.
    """
    if stack.plane_is_cheap(z, channel, timepoint=timepoint):
        return PlaneView(stack.read_slice(z, channel, timepoint=timepoint), 0, True)
    level = preview_level(stack, max_side)
    if level == 0:  # no coarser level to show: the full plane is the preview
        return PlaneView(stack.read_slice(z, channel, timepoint=timepoint), 0, True)
    image, level = preview_plane(stack, z, max_side, channel, timepoint=timepoint)
    return PlaneView(image, level, False, load_plane(stack, z, channel, timepoint=timepoint))
