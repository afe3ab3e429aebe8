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

import hashlib
import threading
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from core.errors import CacheError, StackError
from core.features import filterbank
from core.features.embedding_cache import CacheKey, EmbeddingCache, RangeKey, StatisticsKey, file_signature
from core.pixels import (
    PixelFeatureSpace,
    combined_features,
    feature_statistics,
    filter_features,
    fit_projection,
    working_shape,
)
from core.preprocess import (
    PreprocessConfig,
    normalized_slice,
    pooled_intensity_range,
    prepare_slice,
    resize,
    sample_intensity_range,
)

if TYPE_CHECKING:  # pragma: no cover
    from core.features.backbones import Backbone
    from core.io import Stack

#: Slices sampled (evenly over z) to estimate a stack-wide intensity range.
STACK_RANGE_SLICES = 16
#: Slices sampled to estimate the stack's pixel-feature statistics (best mode's pixel branch).
PIXEL_STATS_SLICES = 8
#: Pixel statistics are exact (every pixel of the sampled slices) while those slices hold at most this many
#: pixels at full resolution (4 Mpx: 8 slices of 724 x 724, one image of 2048 x 2048); beyond, a subsample.
EXACT_STATS_PIXELS = 4 << 20
#: Subsampled statistics: this many windows per sampled slice, at distinct positions ...
STATS_WINDOWS_PER_SLICE = 4
#: ... each this many working-resolution pixels on a side ...
STATS_WINDOW = 160
#: ... less this margin (working px) on every side that cuts through the slice, where the filter bank's
#: wide kernels (sigma up to 10 px) see the window's mirrored border instead of the slice.
STATS_MARGIN = 16
#: Default bound of a SliceEmbedder's in-memory memo of recent embeddings, in bytes.
MEMO_BYTES = 256 << 20
#: Default bound of a SliceEmbedder's memo of standardised pixel features (best mode), in bytes: four slices
#: at the 1024 px working resolution with 8 patch components (1024 x 1024 x 57 float32 = 239 MB each).
PIXEL_FEATURE_MEMO_BYTES = 1 << 30
#: Patch-embedding PCA bases kept per embedder (a few kB each).
PATCH_BASES_KEPT = 8
#: Smallest slice side (pixels) the embedder accepts (see check_slice_size).
MIN_SLICE_SIDE = 16


#: The stack-wide intensity range reads the sampled slices whole while they hold at most this many pixels
#: (16 Mpx: 16 slices of 1024 x 1024, 4 of 2048 x 2048); beyond, windows of them (see stack_intensity_range).
EXACT_RANGE_PIXELS = 16 << 20
#: Windows pooled for a large stack's intensity range, spread evenly over the sampled slices ...
RANGE_WINDOWS = 256
#: ... each a cell of a grid of this many full-resolution pixels (Imaris' usual chunk side, so that a window of a
#: chunked .ims decodes one chunk; cells at the slice's far edges are smaller).
RANGE_WINDOW = 128


def stack_intensity_range(
    stack: "Stack",
    channel: int,
    percentiles: tuple[float, float] = (5.0, 95.0),
    *,
    timepoint: int = 0,
    max_slices: int = STACK_RANGE_SLICES,
    cache: EmbeddingCache | None = None,
    exact_pixels: int = EXACT_RANGE_PIXELS,
) -> tuple[float, float]:
    """(low, high) intensities at `percentiles` (%) of one channel, pooled over up to `max_slices` evenly
    spaced slices: best mode's stack-wide normalisation.

    The rule (`range_method`): while the sampled slices hold at most `exact_pixels` pixels (EXACT_RANGE_PIXELS =
    16 Mpx, e.g. 16 slices of 1024 x 1024; every stack of docs/RESULTS.md) the range is what it always was,
    `core.preprocess.pooled_intensity_range` of the whole sampled slices (read grouped, `Stack.read_slices`).
    Larger stacks pool RANGE_WINDOWS windows, spread evenly over the sampled slices: cells of a
    RANGE_WINDOW-px grid chosen by `range_cells` (every pixel equally likely, so dim borders are not
    under-sampled), read with `Stack.read_region` (an .ims decodes one chunk per window instead of every chunk
    under 16 planes) or cut from the whole plane when that is cheap (`Stack.plane_is_cheap`: TIFF, a decoded
    z-chunk), all of their 4 Mpx used (`core.preprocess.sample_intensity_range`). On a synthetic
    64 x 3050 x 2933 .ims (bench/bench_io.py): 0.76 CPU s instead of 5.7 (1.3 s instead of 10 s wall on a
    loaded 2-core machine), the high end 0.5 % of the range above the whole slices', the low end equal; the
    best-mode masks made with either range agree to Dice 1.000 (forest) and 0.998 (linear classifier). The
    Imaris pyramid is not used: its binning averages noise away, which lifts the 5th percentile by 6 % of the
    range at level 1. Windows that hold no finite value fall back to the whole slices.

    cache : when given, the range is kept on disk under the stack's identity, channel, time point,
        percentiles and method (`RangeKey`, ``<digest>.range.json``) and read back on the next call; the
        result is the same with or without it.
    Raises StackError for unreadable data or a channel without finite values.
    """
    n_slices = int(stack.shape[0])
    count = min(int(max_slices), n_slices)
    method = range_method(n_slices, (int(stack.shape[2]), int(stack.shape[3])), exact_pixels, max_slices)
    key = None
    if cache is not None:
        key = RangeKey(file_signature(stack.path), stack.resolve_channel(channel), int(timepoint),
                       (float(percentiles[0]), float(percentiles[1])), method)
        found = cache.get_range(key)
        if found is not None:
            return found
    z_values = [int(z) for z in np.unique(np.linspace(0, n_slices - 1, count).round().astype(int))]
    found = None
    if method.startswith("windows"):
        try:
            found = _windows_range(stack, channel, z_values, percentiles, timepoint)
        except StackError:
            found = None  # no finite value in the windows: the whole slices decide (and raise when they hold none)
    if found is None:
        slices = [plane for _, plane in stack.read_slices(z_values, channel, timepoint=timepoint)]
        found = pooled_intensity_range(slices, percentiles)
    if key is not None:
        try:
            cache.put_range(key, *found)
        except CacheError:
            pass  # a full or read-only cache folder costs the next session a recomputation, no more
    return found


def range_method(n_slices: int, slice_shape: tuple[int, int], exact_pixels: int = EXACT_RANGE_PIXELS,
                 max_slices: int = STACK_RANGE_SLICES) -> str:
    """How `stack_intensity_range` samples a stack of `n_slices` (Y, X) slices: 'exact-v1:n16' while its
    sampled slices hold at most `exact_pixels` pixels, else 'windows-v1:...' (with its parameters).

    >>> range_method(25, (512, 512)), range_method(64, (3050, 2933))
    ('exact-v1:n16', 'windows-v1:n16:k256:w128')
    """
    count = min(int(max_slices), int(n_slices))
    if count * int(slice_shape[0]) * int(slice_shape[1]) <= exact_pixels:
        return f"exact-v1:n{count}"
    return f"windows-v1:n{count}:k{RANGE_WINDOWS}:w{RANGE_WINDOW}"


def range_cells(count: int, slice_shape: tuple[int, int], window: int = RANGE_WINDOW) -> list[tuple[int, int]]:
    """Top-left (row, col) full-resolution pixels of `count` cells of the `window`-px grid over a (Y, X) slice,
    chosen by the R2 low-discrepancy sequence: spread evenly, and every pixel as likely to be in one (a window
    placed anywhere would favour the middle of the slice)."""
    n_rows, n_cols = -(-int(slice_shape[0]) // window), -(-int(slice_shape[1]) // window)
    cells = []
    for i in range(1, count + 1):
        u = (0.5 + i * 0.7548776662466927) % 1.0  # R2 sequence, as window_origins
        v = (0.5 + i * 0.5698402909980532) % 1.0
        cells.append((int(u * n_rows) * window, int(v * n_cols) * window))
    return cells


def _windows_range(stack: "Stack", channel: int, z_values: list[int], percentiles: tuple[float, float],
                   timepoint: int) -> tuple[float, float]:
    """Percentiles of RANGE_WINDOWS grid cells spread over the slices `z_values` (see stack_intensity_range)."""
    n_y, n_x = int(stack.shape[2]), int(stack.shape[3])
    per_slice = -(-RANGE_WINDOWS // len(z_values))
    cells = range_cells(per_slice * len(z_values), (n_y, n_x))
    parts = []
    for i, z in enumerate(z_values):
        mine = cells[i * per_slice:(i + 1) * per_slice]
        if stack.plane_is_cheap(z, channel, timepoint=timepoint):  # one plane read instead of one per window
            plane = stack.read_slice(z, channel, timepoint=timepoint)
            parts.extend(plane[row:row + RANGE_WINDOW, col:col + RANGE_WINDOW].ravel() for row, col in mine)
        else:
            parts.extend(stack.read_region(z, channel, rows=(row, min(row + RANGE_WINDOW, n_y)),
                                           cols=(col, min(col + RANGE_WINDOW, n_x)), timepoint=timepoint).ravel()
                         for row, col in mine)
    return sample_intensity_range(np.concatenate(parts), percentiles)


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


def _digest(arrays: np.ndarray | Sequence[np.ndarray | None] | None) -> str | None:
    """A short digest of the arrays' dtypes, shapes and values (None for None): memo keys that differ
    whenever the statistics or the basis a feature map was made with differ."""
    if arrays is None:
        return None
    hasher = hashlib.blake2b(digest_size=16)
    for array in ([arrays] if isinstance(arrays, np.ndarray) else arrays):
        if array is None:
            hasher.update(b"none")
            continue
        array = np.ascontiguousarray(array)
        hasher.update(f"{array.dtype.str}{array.shape}".encode())
        hasher.update(array.tobytes())
    return hasher.hexdigest()


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
            stack_range = stack_intensity_range(stack, self.channel, preprocess.clip_percentiles, timepoint=timepoint,
                                                cache=cache)
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
        # Standardised pixel features (what a click's classifier reads), byte-bounded, and the PCA bases of
        # patch embeddings they use: a click computes its slice's features once, not once per click.
        self.pixel_feature_memo_bytes = PIXEL_FEATURE_MEMO_BYTES
        self._feature_memo: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._feature_memo_nbytes = 0
        self._feature_lock = threading.RLock()  # one slice's features are never computed twice at once
        self._feature_memo_lock = threading.Lock()  # reading the memo never waits for a computation
        self._patch_bases: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._stack_bases: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pixel_stats: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        self._stats_lock = threading.Lock()  # statistics are computed once, without holding _pixel_lock
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

    def pixel_feature_map(
        self,
        z: int,
        max_side: int,
        *,
        standardize: str = "stack",
        projection: np.ndarray | None = None,
        projection_mean: np.ndarray | None = None,
    ) -> np.ndarray:
        """(h, w, F [+ k]) float32 standardised pixel features of slice z at the working resolution, read-only.

        ``core.pixels.combined_features`` of the slice's filters (`pixel_filters`) standardised with this stack's
        statistics (`pixel_statistics`; ``standardize="slice"``: the slice's own), followed, when ``projection``
        ((D, k)) is given, by the k principal components of the slice's patch embeddings (``projection_mean``
        (D,) removed first), upsampled bilinearly. Memoised: one click's classifier reads them, so each slice's
        are computed once, not once per click. The memo holds at most ``pixel_feature_memo_bytes`` (least
        recently used dropped first; the newest is always kept unless the bound is 0) and is keyed by the
        slice, the working size and the exact statistics and basis (content digests): a memoised map is the
        array a fresh computation gives.
        """
        if standardize not in ("stack", "slice"):
            raise ValueError(f"standardize must be 'stack' or 'slice', got {standardize!r}")
        z, max_side = int(z), int(max_side)
        statistics = self.pixel_statistics(max_side) if standardize == "stack" else None
        key = (z, max_side, standardize, _digest(statistics),
               _digest(None if projection is None else (projection, projection_mean)))
        found = self._recall_features(key)
        if found is not None:
            return found
        with self._feature_lock:
            found = self._recall_features(key)  # another thread may have computed it while this one waited
            if found is not None:
                return found
            with self._pixel_lock:
                filters = self._pixel_memo.get((z, max_side))
            if filters is None:  # as pixel_filters computes them, but not kept twice: these features replace them
                filters = filter_features(self.normalized(z), max_side)
            mean, std = statistics if statistics is not None else feature_statistics([filters])
            patches = self.embed(z) if projection is not None else None
            features = combined_features(filters, PixelFeatureSpace(mean, std, projection, projection_mean), patches)
            features.flags.writeable = False  # shared by every click and scorer of this slice
            self._remember_features(key, features)
        return features

    def pixel_feature_slices(self, max_side: int | None = None) -> list[int]:
        """The z of the slices whose standardised pixel features are memoised (at working size ``max_side`` when
        given), least recently used first; asking costs nothing (a page asks whether a click will be fast)."""
        with self._feature_memo_lock:
            return [key[0] for key in self._feature_memo if max_side is None or key[1] == int(max_side)]

    def _recall_features(self, key: tuple) -> np.ndarray | None:
        with self._feature_memo_lock:
            found = self._feature_memo.get(key)
            if found is not None:
                self._feature_memo.move_to_end(key)
            return found

    def _remember_features(self, key: tuple, features: np.ndarray) -> None:
        if self.pixel_feature_memo_bytes <= 0:
            return
        with self._feature_memo_lock:
            previous = self._feature_memo.pop(key, None)
            if previous is not None:
                self._feature_memo_nbytes -= previous.nbytes
            self._feature_memo[key] = features
            self._feature_memo_nbytes += features.nbytes
            while len(self._feature_memo) > 1 and self._feature_memo_nbytes > self.pixel_feature_memo_bytes:
                _, dropped = self._feature_memo.popitem(last=False)
                self._feature_memo_nbytes -= dropped.nbytes

    def patch_basis(self, components: int, z_values: Sequence[int], *, per_stack: bool = False,
                    ) -> tuple[np.ndarray, np.ndarray]:
        """PCA basis of patch embeddings: ((D, k) float32 basis, (D,) float32 mean), read-only, memoised.

        ``core.pixels.fit_projection`` of the embeddings of the slices ``z_values``, in that order (what
        ``build_scorer`` fits on the clicked slices).
        per_stack : one basis for the whole stack, fitted on ``z_values`` the first time it is asked for and
            returned for any ``z_values`` afterwards (the app: a click on a new slice then leaves the memoised
            features of the slices clicked before valid, and no click fits a PCA again).
        """
        components = int(components)
        with self._feature_lock:
            found = self._stack_bases.get(components) if per_stack else None
            key = (components, tuple(int(z) for z in z_values))
            if found is None:
                found = self._patch_bases.get(key)
            if found is None:
                embeddings = [self.embed(z) for z in key[1]]
                flat = np.concatenate([e.reshape(-1, e.shape[-1]) for e in embeddings])
                basis, mean = fit_projection(flat, components)
                basis.flags.writeable = False
                mean.flags.writeable = False
                found = (basis, mean)
                self._patch_bases[key] = found
                while len(self._patch_bases) > PATCH_BASES_KEPT:
                    self._patch_bases.popitem(last=False)
            elif key in self._patch_bases:
                self._patch_bases.move_to_end(key)
            if per_stack:
                self._stack_bases.setdefault(components, found)
            return found

    #: Sampled slices holding more pixels than this (full resolution) get subsampled statistics; set it on an
    #: instance to choose (e.g. ``1 << 62`` for always exact, as before subsampling existed).
    exact_stats_pixels = EXACT_STATS_PIXELS

    def pixel_statistics(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std), each (F,) float32: this stack's filter-bank pixel features at the working resolution
        (longer side at most `max_side` px), pooled over PIXEL_STATS_SLICES evenly spaced slices.

        The rule: when the sampled slices hold at most `exact_stats_pixels` pixels (EXACT_STATS_PIXELS = 4 Mpx,
        e.g. 8 slices of 512 x 512 or one 2048 x 2048 image) the statistics are exact: every working-resolution
        pixel of the sampled slices (`pixel_filters`, then `core.pixels.feature_statistics`), as always.
        Larger stacks use a subsample (`window_features`): from each sampled slice STATS_WINDOWS_PER_SLICE
        windows of STATS_WINDOW x STATS_WINDOW working pixels at distinct positions spread over the slice
        (`window_origins`), each read with `Stack.read_region` (an .ims decodes only the chunks under it),
        normalised and resized to the working scale like the whole slice, filtered, less STATS_MARGIN px on
        sides inside the slice. On a 64 x 3050 x 2933 stack (working size 1024 x 985) that filters 0.8 Mpx
        instead of 8 Mpx and reads a fraction of the planes; the means and stds differ from the exact ones by
        a few % of each feature's std (median; bench/bench_io.py measures it and the masks' Dice). With
        slice-wise normalisation a window is clipped at its own percentiles, not its slice's.

        Memoised per max_side, and kept in the embedder's disk cache (when it has one) under the stack's
        identity, channel, time point, preprocessing, max_side, filter bank and rule (`StatisticsKey`).
        Thread-safe: a second caller waits for the first one's result (`warm_up_pixels` starts one early).
        """
        max_side = int(max_side)
        count = min(PIXEL_STATS_SLICES, self.n_slices)
        method = statistics_method(self.n_slices, self.slice_shape, self.exact_stats_pixels)
        exact = method.startswith("exact")
        with self._stats_lock:
            found = self._pixel_stats.get((max_side, method))
            if found is not None:
                return found
            key = StatisticsKey(
                file_signature=self.cache_key.file_signature, channel=self.channel, timepoint=self.timepoint,
                preprocess=self.cache_key.preprocess, max_side=max_side,
                filters=filterbank.FilterBankConfig().signature(), method=method,
            ) if self.cache is not None else None
            found = self.cache.get_statistics(key) if key is not None else None
            if found is None:
                z_values = np.unique(np.linspace(0, self.n_slices - 1, count).round().astype(int))
                if exact:
                    maps = [self.pixel_filters(int(z), max_side) for z in z_values]
                else:
                    per_slice = STATS_WINDOWS_PER_SLICE
                    origins = window_origins(len(z_values) * per_slice, working_shape(self.slice_shape, max_side))
                    maps = [window_features(self.stack, int(z_values[i // per_slice]), self.channel, origin,
                                            max_side, preprocess=self.preprocess, stack_range=self.stack_range,
                                            timepoint=self.timepoint)
                            for i, origin in enumerate(origins)]
                found = feature_statistics(maps)
                if key is not None:
                    try:
                        self.cache.put_statistics(key, *found)
                    except CacheError:
                        pass  # a full or read-only cache folder costs the next session a recomputation, no more
            self._pixel_stats[(max_side, method)] = found
            return found

    def warm_up_pixels(self, max_side: int) -> bool:
        """Start computing the stack's pixel-feature statistics in a background thread (once per embedder).

        Best mode's first click needs them (filter features of 8 slices: ~5 s on a 256 px demo; a subsample of
        windows on large stacks, see `pixel_statistics`; instant from the disk cache on a stack seen before);
        started when the Segment page opens, they are usually ready before the first negative point is
        clicked. A caller that needs them meanwhile waits on the lock. Returns True when a thread was started
        by this call.
        """
        with self._memo_lock:
            if self._warm_up is not None:
                return False
            self._warm_up = threading.Thread(target=self.pixel_statistics, args=(int(max_side),),
                                             name="protoscope-pixel-warm-up", daemon=True)
        self._warm_up.start()
        return True


def statistics_method(n_slices: int, slice_shape: tuple[int, int], exact_pixels: int = EXACT_STATS_PIXELS) -> str:
    """How `SliceEmbedder.pixel_statistics` samples a stack of `n_slices` (Y, X) slices: 'exact-v1:n8' when the
    PIXEL_STATS_SLICES sampled slices hold at most `exact_pixels` pixels, else 'windows-v1:...' (its parameters).

    >>> statistics_method(15, (512, 512)), statistics_method(64, (3050, 2933))[:10]
    ('exact-v1:n8', 'windows-v1')
    """
    count = min(PIXEL_STATS_SLICES, int(n_slices))
    if count * int(slice_shape[0]) * int(slice_shape[1]) <= exact_pixels:
        return f"exact-v1:n{count}"
    return f"windows-v1:n{count}:k{STATS_WINDOWS_PER_SLICE}:w{STATS_WINDOW}:m{STATS_MARGIN}"


def window_origins(count: int, work_shape: tuple[int, int], window: int = STATS_WINDOW) -> list[tuple[int, int]]:
    """Top-left (row, col) working-resolution pixels of `count` windows of side `window` spread over a slice of
    `work_shape` (rows, cols): the R2 low-discrepancy sequence, so any few of them cover the slice evenly."""
    rows, cols = work_shape
    height, width = min(window, rows), min(window, cols)
    origins = []
    for i in range(1, count + 1):
        u = (0.5 + i * 0.7548776662466927) % 1.0  # R2 sequence: 1 / plastic number, and its square
        v = (0.5 + i * 0.5698402909980532) % 1.0
        origins.append((int(round(u * (rows - height))), int(round(v * (cols - width)))))
    return origins


def window_features(
    stack: "Stack",
    z: int,
    channel: int,
    origin: tuple[int, int],
    max_side: int,
    *,
    preprocess: PreprocessConfig = PreprocessConfig(),
    stack_range: tuple[float, float] | None = None,
    timepoint: int = 0,
    window: int = STATS_WINDOW,
    margin: int = STATS_MARGIN,
) -> np.ndarray:
    """(h, w, F) float32 filter-bank features of one window of slice z, as the whole slice's would be there.

    The working resolution is the slice shrunk to a longer side of `max_side` (`core.pixels.working_shape`);
    `origin` (row, col) and `window` are in its pixels. The matching full-resolution region is read
    (`Stack.read_region`), normalised (`normalized_slice`: the stack range when given, else the region's own
    percentiles), resized to the window and filtered (`filter_features`); `margin` px are dropped on every
    side that lies inside the slice, where the filters' wide kernels would see the window's edge.
    """
    n_y, n_x = int(stack.shape[2]), int(stack.shape[3])
    rows, cols = working_shape((n_y, n_x), max_side)
    top, left = origin
    height, width = min(window, rows - top), min(window, cols - left)
    y0, y1 = int(round(top * n_y / rows)), min(n_y, max(1, int(round((top + height) * n_y / rows))))
    x0, x1 = int(round(left * n_x / cols)), min(n_x, max(1, int(round((left + width) * n_x / cols))))
    y0, x0 = min(y0, y1 - 1), min(x0, x1 - 1)
    raw = stack.read_region(z, channel, rows=(y0, y1), cols=(x0, x1), timepoint=timepoint)
    image = resize(normalized_slice(raw, preprocess, stack_range), (height, width))
    features = filter_features(image, max(height, width))
    cut_top = margin if top > 0 and height > 2 * margin else 0
    cut_bottom = margin if top + height < rows and height > 2 * margin else 0
    cut_left = margin if left > 0 and width > 2 * margin else 0
    cut_right = margin if left + width < cols and width > 2 * margin else 0
    return features[cut_top:height - cut_bottom, cut_left:width - cut_right]


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
