"""Whole z-chunks of chunked HDF5 data: a fast decoder, and a byte-bounded cache of decoded ones.

An Imaris file stores each (Z, Y, X) volume in chunks such as (32, 128, 128), compressed one by one. Reading
one plane decompresses every chunk under it, 32 planes deep: one plane of a 3050 x 2933 slice costs as much
as 32 (3.3 s on a 2-core CPU). Two things make that bearable:

- `decode_region` decompresses the chunks itself (libdeflate through imagecodecs, in threads; the HDF5
  shuffle filter undone with numpy), about twice as fast as HDF5's own zlib path; data with another filter
  (LZ4, Blosc, ...) is read through h5py as before.
- `ZChunkCache` keeps recently decoded *z-chunks* (one chunk-deep slab ``(Zc, Y, X)`` of one resolution
  level, time point and channel) within a byte bound, so that every other plane of that slab is free.
  `core.io.ims.ImsStack` uses one cache shared by all open stacks (`default_chunk_cache`): 768 MiB unless
  ``$PROTOSCOPE_IMS_CACHE_MB`` says otherwise, enough for one z-chunk of the thesis's largest slices
  (32 x 3050 x 2933 uint16 = 573 MB) plus a pyramid level's.

Keys are tuples ``(owner, level, timepoint, channel, chunk_index)``; `owner` is a token of the stack.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Hashable

import h5py
import numpy as np

from core.errors import StackError

__all__ = [
    "CACHE_ENV",
    "DEFAULT_CACHE_BYTES",
    "MIN_CACHED_BYTES",
    "ZChunkCache",
    "decode_region",
    "default_chunk_cache",
]

#: Default bound of the shared cache of decoded z-chunks, in bytes (768 MiB).
DEFAULT_CACHE_BYTES = 768 << 20
#: Z-chunks smaller than this (8 MiB) are not cached: they decode in milliseconds, and planes are read alone.
MIN_CACHED_BYTES = 8 << 20
#: Environment variable that sets the shared cache's bound in MiB (0 turns caching off).
CACHE_ENV = "PROTOSCOPE_IMS_CACHE_MB"

_DEFLATE, _SHUFFLE = 1, 2  # HDF5 filter ids this module decodes itself
_DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))


class ZChunkCache:
    """Least-recently-used decoded z-chunks, at most `max_bytes` bytes in all (thread-safe).

    max_bytes : bound of the arrays held; 0 disables caching.
    min_block_bytes : smaller z-chunks are not worth caching (see `worth_caching`).
    Cached arrays are read-only; callers copy what they hand out.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, *, min_block_bytes: int = MIN_CACHED_BYTES) -> None:
        if max_bytes < 0 or min_block_bytes < 0:
            raise ValueError(f"cache bounds must be >= 0 bytes, got max_bytes={max_bytes}, "
                             f"min_block_bytes={min_block_bytes}")
        self._max_bytes = int(max_bytes)
        self.min_block_bytes = int(min_block_bytes)
        self._blocks: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        """A new bound; z-chunks beyond it are dropped at once."""
        if value < 0:
            raise ValueError(f"max_bytes must be >= 0 bytes, got {value}")
        with self._lock:
            self._max_bytes = int(value)
            self._evict(0)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._blocks

    def worth_caching(self, nbytes: int) -> bool:
        """Whether a z-chunk of `nbytes` is cached: at least `min_block_bytes` and at most `max_bytes`."""
        return self.min_block_bytes <= nbytes <= self._max_bytes and self._max_bytes > 0

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
            return block

    def make_room(self, nbytes: int) -> None:
        """Drop least recently used z-chunks until `nbytes` more fit (called before decoding one, so that the
        memory held stays near the bound while it is decoded)."""
        with self._lock:
            self._evict(nbytes)

    def put(self, key: Hashable, block: np.ndarray) -> None:
        """Keep `block` (made read-only) unless it alone exceeds `max_bytes`; older z-chunks make room."""
        if block.nbytes > self._max_bytes:
            return
        block.flags.writeable = False
        with self._lock:
            previous = self._blocks.pop(key, None)
            if previous is not None:
                self._nbytes -= previous.nbytes
            self._evict(block.nbytes)
            self._blocks[key] = block
            self._nbytes += block.nbytes

    def discard(self, owner: Hashable) -> None:
        """Forget every z-chunk whose key starts with `owner` (a stack being closed)."""
        with self._lock:
            for key in [k for k in self._blocks if isinstance(k, tuple) and k and k[0] == owner]:
                self._nbytes -= self._blocks.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._nbytes = 0

    def _evict(self, incoming: int) -> None:
        while self._blocks and self._nbytes + incoming > self._max_bytes:
            _, dropped = self._blocks.popitem(last=False)
            self._nbytes -= dropped.nbytes


_default_cache: ZChunkCache | None = None
_default_lock = threading.Lock()


def default_chunk_cache() -> ZChunkCache:
    """The cache shared by every `ImsStack` opened without its own: `DEFAULT_CACHE_BYTES`, or
    ``$PROTOSCOPE_IMS_CACHE_MB`` MiB when set (read once, at first use)."""
    global _default_cache
    with _default_lock:
        if _default_cache is None:
            bound = DEFAULT_CACHE_BYTES
            text = os.environ.get(CACHE_ENV, "").strip()
            if text:
                try:
                    bound = max(0, int(float(text) * (1 << 20)))
                except ValueError:
                    pass  # an unreadable setting keeps the default rather than failing every read
            _default_cache = ZChunkCache(bound)
        return _default_cache


def _filter_codes(data: h5py.Dataset) -> list[int]:
    dcpl = data.id.get_create_plist()
    return [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]


def _decoded_chunk(raw: bytes, filter_mask: int, codes: list[int], chunk_shape: tuple[int, ...],
                   dtype: np.dtype) -> np.ndarray:
    """One stored chunk -> (cz, cy, cx) array in the file's dtype. Filters run in reverse order, skipping
    those the chunk's filter mask marks as not applied (HDF5 stores incompressible chunks raw)."""
    import imagecodecs  # here, not at module top: ~0.5 s to import, and `python -m core info` reads no pixels

    nbytes = math.prod(chunk_shape) * dtype.itemsize
    buffer: bytes | np.ndarray = raw
    for index in reversed(range(len(codes))):
        if filter_mask & (1 << index):
            continue
        if codes[index] == _DEFLATE:
            buffer = imagecodecs.deflate_decode(buffer, out=nbytes)
        else:  # shuffle: the k-th bytes of all values were stored together
            shuffled = np.frombuffer(buffer, np.uint8)
            if shuffled.size != nbytes:
                raise ValueError(f"chunk holds {shuffled.size} bytes, expected {nbytes}")
            buffer = np.ascontiguousarray(shuffled.reshape(dtype.itemsize, -1).T)
    values = np.frombuffer(buffer, dtype)
    if values.nbytes != nbytes:
        raise ValueError(f"chunk holds {values.nbytes} bytes, expected {nbytes}")
    return values.reshape(chunk_shape)


def decode_region(data: h5py.Dataset, start: tuple[int, int, int], stop: tuple[int, int, int], *,
                  lock: threading.Lock, what: str) -> np.ndarray:
    """``data[z0:z1, y0:y1, x0:x1]`` as a new array in the dataset's (file) dtype.

    Chunks stored with deflate and/or shuffle are read raw and decompressed here, in up to 4 threads
    (`lock` is held only while reading raw bytes); any other storage goes through h5py. Chunks never
    written hold the dataset's fill value.
    Raises StackError ``"<what>: the file is truncated or corrupt (...)"`` for data that cannot be decoded.
    """
    (z0, y0, x0), (z1, y1, x1) = start, stop
    out = np.empty((z1 - z0, y1 - y0, x1 - x0), data.dtype)
    codes = _filter_codes(data) if data.chunks is not None else []
    if data.chunks is None or not set(codes) <= {_DEFLATE, _SHUFFLE}:
        with lock:
            try:
                data.read_direct(out, source_sel=np.s_[z0:z1, y0:y1, x0:x1])
            except (OSError, ValueError, RuntimeError) as exc:
                raise StackError(f"{what}: the file is truncated or corrupt ({exc})") from None
        return out

    chunk_shape = tuple(int(c) for c in data.chunks)
    cz, cy, cx = chunk_shape
    origins = [(a, b, c) for a in range(z0 // cz * cz, z1, cz) for b in range(y0 // cy * cy, y1, cy)
               for c in range(x0 // cx * cx, x1, cx)]
    dsid, dtype, fill = data.id, data.dtype, data.fillvalue

    def place(origin: tuple[int, int, int]) -> None:
        with lock:
            try:
                filter_mask, raw = dsid.read_direct_chunk(origin)
            except RuntimeError:
                raw = None  # a chunk never written: HDF5 returns the fill value for it
                if dsid.get_chunk_info_by_coord(origin).byte_offset is not None:
                    raise
        chunk = (np.full(chunk_shape, fill, dtype) if raw is None
                 else _decoded_chunk(raw, filter_mask, codes, chunk_shape, dtype))
        a, b, c = origin
        za, zb = max(z0, a), min(z1, a + cz)
        ya, yb = max(y0, b), min(y1, b + cy)
        xa, xb = max(x0, c), min(x1, c + cx)
        out[za - z0:zb - z0, ya - y0:yb - y0, xa - x0:xb - x0] = chunk[za - a:zb - a, ya - b:yb - b, xa - c:xb - c]

    try:
        if len(origins) > 1 and _DECODE_THREADS > 1:
            with ThreadPoolExecutor(_DECODE_THREADS, thread_name_prefix="protoscope-ims-decode") as pool:
                for _ in pool.map(place, origins):
                    pass
        else:
            for origin in origins:
                place(origin)
    except (OSError, ValueError, RuntimeError) as exc:  # imagecodecs.DeflateError is a RuntimeError
        raise StackError(f"{what}: the file is truncated or corrupt ({exc})") from None
    return out
