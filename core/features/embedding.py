"""Patch embeddings of a stack's slices, through an in-memory memo and the on-disk cache.

``SliceEmbedder`` binds one stack, channel and time point to one backbone and preprocessing. ``embed(z)``
returns the slice's (h, w, D) patch embeddings from memory when recently used, else from the disk cache when
present (a click or a threshold change never re-embeds), and otherwise computes them (and stores them on
disk when a cache is given). So a run embeds each slice once, with or without the disk cache, as long as
the slices it revisits fit in the memo (``memo_bytes``, 256 MiB by default: ~34 slices of ViT-S/14 at
980 px, 70 x 70 x 384 float32).

One embedder may be used from several threads (the app's pages and its warm-up thread): the memo, the
raw-plane memo and the pixel features are guarded by locks, and a slice is never embedded by two threads
at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from core.errors import StackError
from core.features.embedding_cache import CacheKey, EmbeddingCache, file_signature
from core.pixels import feature_statistics, filter_features
from core.preprocess import PreprocessConfig, normalized_slice, pooled_intensity_range, prepare_slice

if TYPE_CHECKING:  # pragma: no cover
    from core.features.backbones import Backbone
    from core.io import Stack

#: Slices sampled (evenly over z) to estimate a stack-wide intensity range.
STACK_RANGE_SLICES = 16
#: Slices sampled to estimate the stack's pixel-feature statistics (best mode's pixel branch).
PIXEL_STATS_SLICES = 8
#: Default bound of a SliceEmbedder's in-memory memo of recent embeddings, in bytes.
MEMO_BYTES = 256 << 20
#: Smallest slice side (pixels) the embedder accepts (see check_slice_size).
MIN_SLICE_SIDE = 16


def stack_intensity_range(
    stack: "Stack",
    channel: int,
    percentiles: tuple[float, float] = (5.0, 95.0),
    *,
    timepoint: int = 0,
    max_slices: int = STACK_RANGE_SLICES,
) -> tuple[float, float]:
    """(low, high) intensity percentiles pooled over up to ``max_slices`` evenly spaced slices."""
    n_slices = stack.shape[0]
    count = min(max_slices, n_slices)
    z_values = np.unique(np.linspace(0, n_slices - 1, count).round().astype(int))
    slices = [stack.read_slice(int(z), channel, timepoint=timepoint) for z in z_values]
    return pooled_intensity_range(slices, percentiles)


def _holds_more_than(plane: np.ndarray) -> bool:
    """Whether ``plane`` is a view that keeps a larger (or unknown) buffer alive.

    The owner may be another array (a z-chunk of an .ims read), ``bytes`` (PIL images through
    ``np.asarray``), a memoryview or an mmap: anything with the buffer protocol is measured by it.
    """
    owner = plane.base
    if owner is None:
        return False
    try:
        owner_bytes = owner.nbytes if isinstance(owner, np.ndarray) else memoryview(owner).nbytes
    except TypeError:  # an owner that exposes no buffer: copy, to be safe
        return True
    return owner_bytes > plane.nbytes


def check_slice_size(shape: Sequence[int], name: str = "the stack") -> None:
    """Refuse slices too small to segment: (Y, X) below MIN_SLICE_SIDE pixels on either side.

    A patch grid needs a few patches of image content; a 1 x 1 or 5 x 300 image has none to click on,
    and upscaling it to the backbone's input size would only make up pixels. Raises StackError.
    """
    height, width = int(shape[-2]), int(shape[-1])
    if min(height, width) < MIN_SLICE_SIDE:
        raise StackError(
            f"{name} has slices of {height} x {width} px (Y x X); Protoscope needs at least "
            f"{MIN_SLICE_SIDE} x {MIN_SLICE_SIDE} px to segment; open a larger image or stack")


class SliceEmbedder:
    """Embeddings (and model inputs) of one channel of one stack: kept in memory, cached on disk when a cache
    is given.

    memo_bytes : bound of the in-memory memo of recent slices' embeddings (least recently used dropped
        first; the newest is always kept); 0 keeps none. Reading a slice back from the HDF5 cache costs
        5-50 ms and one click reads it up to three times (prototype, calibration, score map); without a
        disk cache the memo is what keeps a run from embedding a slice twice.
    Embeddings are returned read-only: callers share them, so nobody may change them in place.
    """

    def __init__(
        self,
        stack: "Stack",
        channel: int,
        backbone: "Backbone",
        preprocess: PreprocessConfig = PreprocessConfig(),
        *,
        cache: EmbeddingCache | None = None,
        timepoint: int = 0,
        stack_range: tuple[float, float] | None = None,
        memo_bytes: int = MEMO_BYTES,
    ) -> None:
        if memo_bytes < 0:
            raise ValueError(f"memo_bytes must be >= 0 bytes, got {memo_bytes}")
        check_slice_size(stack.shape, f"'{stack.name}'")
        self.stack = stack
        self.channel = stack.resolve_channel(channel)
        self.backbone = backbone
        self.preprocess = preprocess
        self.cache = cache
        self.timepoint = timepoint
        if preprocess.normalization == "stack" and stack_range is None:
            stack_range = stack_intensity_range(stack, self.channel, preprocess.clip_percentiles, timepoint=timepoint)
        self.stack_range = stack_range if preprocess.normalization == "stack" else None
        self._key: CacheKey | None = None
        self.memo_bytes = int(memo_bytes)
        self._memo: OrderedDict[int, np.ndarray] = OrderedDict()
        self._memo_nbytes = 0
        self._memo_lock = threading.Lock()
        self._embed_lock = threading.Lock()  # one backbone run at a time, so no slice is embedded twice at once
        # Best mode's pixel features may be computed by the warm-up thread and a page at the same time.
        self._pixel_lock = threading.RLock()
        self._warm_up: threading.Thread | None = None
        # Per-instance memo of recent pixel-feature maps (they are large and not cached on disk).
        self._pixel_memo: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.pixel_memo_slices = 6
        self._pixel_stats: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # Recently read raw planes: one slice is read for its embedding, its pixel features and its guide,
        # and a single-plane read of a chunked .ims decompresses whole z-chunks (see `read_ahead`).
        self._raw_memo: OrderedDict[int, np.ndarray] = OrderedDict()
        self._raw_memo_lock = threading.Lock()  # the app reads slices from a warm-up thread too
        self.raw_memo_slices = 4

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(Y, X) of the original slices."""
        return int(self.stack.shape[2]), int(self.stack.shape[3])

    @property
    def n_slices(self) -> int:
        return int(self.stack.shape[0])

    @property
    def embedding_nbytes(self) -> int:
        """Bytes of one slice's (h, w, D) float32 embedding in memory, e.g. 70 x 70 x 384 x 4 = 7.5 MB for
        ViT-S/14 at 980 px (so ``memo_bytes // embedding_nbytes`` slices fit in the memo)."""
        side = self.preprocess.image_size // self.backbone.patch_size
        return side * side * int(self.backbone.embed_dim) * 4

    @property
    def cache_key(self) -> CacheKey:
        if self._key is None:
            self._key = CacheKey(
                file_signature=file_signature(self.stack.path),
                channel=self.channel,
                timepoint=self.timepoint,
                backbone=self.backbone.signature(),
                preprocess=self.preprocess.signature(self.stack_range),
            )
        return self._key

    def raw(self, z: int) -> np.ndarray:
        """(Y, X) raw slice in the stack's dtype (read-only; memoised for the last few slices)."""
        z = int(z)
        with self._raw_memo_lock:
            plane = self._raw_memo.get(z)
            if plane is not None:
                self._raw_memo.move_to_end(z)
                return plane
        plane = self.stack.read_slice(z, self.channel, timepoint=self.timepoint)
        self._remember_raw(z, plane)
        return plane

    def read_ahead(self, z_values: Sequence[int]) -> Iterator[int]:
        """Yield each z of `z_values` in order, once its raw plane is in memory for `raw(z)`.

        Planes are read with `Stack.read_slices`, which decompresses each .ims z-chunk once for all the
        requested planes it holds (about 8x faster per plane than single reads on 32-slice chunks).
        """
        for z, plane in self.stack.read_slices([int(z) for z in z_values], self.channel, timepoint=self.timepoint):
            self._remember_raw(z, plane)
            yield z

    def plan_reads(self, order: Sequence[int]) -> "PlannedReads":
        """Read the planes of `order` chunk-wise, each just before it is needed (see `PlannedReads`)."""
        return PlannedReads(self, order)

    def _remember_raw(self, z: int, plane: np.ndarray) -> None:
        if _holds_more_than(plane):
            plane = plane.copy()  # a view into a read block would keep the whole block alive
        plane.flags.writeable = False  # shared between callers: nobody may change it in place
        with self._raw_memo_lock:
            self._raw_memo[z] = plane
            self._raw_memo.move_to_end(z)
            while len(self._raw_memo) > self.raw_memo_slices:
                self._raw_memo.popitem(last=False)

    def normalized(self, z: int) -> np.ndarray:
        """(Y, X) float32 in [0, 1]: the slice clipped and rescaled at its original size (for display/guides)."""
        return normalized_slice(self.raw(z), self.preprocess, self.stack_range)

    def model_input(self, z: int) -> np.ndarray:
        """(S, S) float32 in [0, 1]: what the backbone sees."""
        return prepare_slice(self.raw(z), self.preprocess, self.stack_range)

    def is_cached(self, z: int) -> bool:
        """Whether embed(z) needs no backbone run: in memory (asked on every rerun of a page, so without a look
        into the cache file) or on disk."""
        with self._memo_lock:
            if int(z) in self._memo:
                return True
        return self.cache is not None and int(z) in self.cache.cached_slices(self.cache_key)

    def cached_slices(self) -> set[int]:
        """The z indices in the disk cache (one look into the cache file; empty without a cache)."""
        return self.cache.cached_slices(self.cache_key) if self.cache is not None else set()

    def memo_slices(self) -> list[int]:
        """The z indices whose embeddings are in memory, least recently used first."""
        with self._memo_lock:
            return list(self._memo)

    def clear_memo(self) -> None:
        """Forget the in-memory embeddings (the disk cache is kept)."""
        with self._memo_lock:
            self._memo.clear()
            self._memo_nbytes = 0

    def embed(self, z: int) -> np.ndarray:
        """(h, w, D) float32 patch embeddings of slice z, read-only (memory first, then the disk cache).

        A freshly computed embedding is returned as the disk cache gives it back (rounded through float16),
        with or without a cache, so results never depend on whether a slice came from the cache.
        """
        z = int(z)
        embedding = self._recall(z)
        if embedding is not None:
            return embedding
        with self._embed_lock:
            embedding = self._recall(z)  # another thread may have embedded it while this one waited
            if embedding is not None:
                return embedding
            embedding = self.cache.get(self.cache_key, z) if self.cache is not None else None
            if embedding is None:
                embedding = self.backbone.embed(self.model_input(z))
                if self.cache is not None:
                    self.cache.put(self.cache_key, z, embedding)
                embedding = embedding.astype(np.float16).astype(np.float32)
            embedding.flags.writeable = False
            self._remember(z, embedding)
        return embedding

    def _recall(self, z: int) -> np.ndarray | None:
        with self._memo_lock:
            embedding = self._memo.get(z)
            if embedding is not None:
                self._memo.move_to_end(z)
            return embedding

    def _remember(self, z: int, embedding: np.ndarray) -> None:
        """Keep slice z's embedding; drop the least recently used ones while the memo exceeds memo_bytes
        (the newest stays even when it alone exceeds it, unless memo_bytes is 0)."""
        if self.memo_bytes <= 0:
            return
        with self._memo_lock:
            previous = self._memo.pop(z, None)
            if previous is not None:
                self._memo_nbytes -= previous.nbytes
            self._memo[z] = embedding
            self._memo_nbytes += embedding.nbytes
            while len(self._memo) > 1 and self._memo_nbytes > self.memo_bytes:
                _, dropped = self._memo.popitem(last=False)
                self._memo_nbytes -= dropped.nbytes

    def embed_many(
        self,
        z_values: Sequence[int],
        *,
        on_slice: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[int, np.ndarray]:
        """Embeddings of several slices; ``on_slice(done, total)`` after each; stops early when asked."""
        result: dict[int, np.ndarray] = {}
        cached = self.cached_slices() | set(self.memo_slices())
        # Slices still to embed are read chunk-wise; cached ones need no pixels at all.
        reads = self.plan_reads([z for z in z_values if z not in cached])
        for index, z in enumerate(z_values):
            if should_stop is not None and should_stop():
                break
            reads.ready(z)
            result[z] = self.embed(z)
            if on_slice is not None:
                on_slice(index + 1, len(z_values))
        return result

    # ---- pixel branch (best mode) ----------------------------------------------------------------------

    def pixel_filters(self, z: int, max_side: int) -> np.ndarray:
        """(h, w, F) float32 filter-bank features of slice z at the working resolution (memoised)."""
        key = (int(z), int(max_side))
        with self._pixel_lock:
            if key in self._pixel_memo:
                self._pixel_memo.move_to_end(key)
                return self._pixel_memo[key]
            features = filter_features(self.normalized(z), max_side)
            self._pixel_memo[key] = features
            while len(self._pixel_memo) > self.pixel_memo_slices:
                self._pixel_memo.popitem(last=False)
            return features

    def pixel_statistics(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) (F,) of this stack's pixel features, pooled over evenly spaced slices (memoised)."""
        with self._pixel_lock:
            if max_side not in self._pixel_stats:
                count = min(PIXEL_STATS_SLICES, self.n_slices)
                z_values = np.unique(np.linspace(0, self.n_slices - 1, count).round().astype(int))
                self._pixel_stats[max_side] = feature_statistics(
                    [self.pixel_filters(int(z), max_side) for z in z_values])
            return self._pixel_stats[max_side]

    def warm_up_pixels(self, max_side: int) -> bool:
        """Start computing the stack's pixel-feature statistics in a background thread (once per embedder).

        Best mode's first click needs them (filter features of 8 slices: ~5 s on a 256 px demo, more for
        large slices); started when the Segment page opens, they are usually ready before the first
        negative point is clicked. A caller that needs them meanwhile waits on the lock. Returns True when
        a thread was started by this call.
        """
        with self._memo_lock:
            if self._warm_up is not None:
                return False
            self._warm_up = threading.Thread(target=self.pixel_statistics, args=(int(max_side),),
                                             name="protoscope-pixel-warm-up", daemon=True)
        self._warm_up.start()
        return True


class PlannedReads:
    """Raw planes read chunk-wise in a known order, each one made ready just before it is needed.

    Call ``ready(z)`` before the work that needs slice z's pixels: when z is the next slice of the plan,
    its plane (and, on the first plane of an .ims z-chunk, the rest of that chunk's planned planes) is
    read into the embedder's raw-plane memo. Slices off the plan are left to ``SliceEmbedder.raw``, which
    reads one plane; so a plan that turns out wrong costs speed, never correctness.
    """

    def __init__(self, embedder: SliceEmbedder, order: Sequence[int]) -> None:
        self._order = deque(int(z) for z in order)
        self._planes = embedder.read_ahead(list(self._order))

    def ready(self, z: int) -> None:
        if self._order and self._order[0] == int(z):
            self._order.popleft()
            next(self._planes)
