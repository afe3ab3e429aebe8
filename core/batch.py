"""Apply a prototype to many slices: scores (optionally smoothed along z), masks, areas and volume.

Work happens in two passes so that z-smoothing can see neighbours: first every needed slice is embedded
(through the cache, so an interrupted run resumes where it stopped) and scored on the patch grid; then each
requested slice is thresholded at full resolution and handed to a sink (a TIFF writer, a memory-mapped
volume, ...). Without a disk cache the first pass only pays off when every needed slice stays in the
embedder's memo; otherwise it is skipped and each slice is embedded once, when its score map is made.
Progress callbacks receive (done, total, eta_seconds); ``should_stop`` cancels between slices.

``MaskVolume`` keeps its memory-mapped scratch files in one Protoscope temp folder (``scratch_dir``), named
with the PID of the process that made them, and removes those of dead processes: never in an output folder.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from core.config import PipelineConfig, Upsampling
from core.errors import OptionError
from core.pipeline import Scorer
from core.prototypes import Prototype
from core.thresholds import ThresholdSpec
from core.window import ScoreWindow, neighbourhood

if TYPE_CHECKING:  # pragma: no cover
    from core.features.embedding import SliceEmbedder
    from core.io import VoxelSize

ProgressCallback = Callable[[str, int, int, float | None], None]
"""(phase, done, total, eta_seconds or None); phase is 'embed' or 'mask'."""


@dataclass
class BatchResult:
    """What a batch run produced. Areas are per requested slice, in the order requested."""

    z_values: list[int]
    area_px: list[int] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    pixel_area_um2: float | None = None
    z_step_um: float | None = None
    cancelled: bool = False
    seconds: float = 0.0

    @property
    def area_um2(self) -> list[float] | None:
        if self.pixel_area_um2 is None:
            return None
        return [a * self.pixel_area_um2 for a in self.area_px]

    @property
    def volume_um3(self) -> float | None:
        """Sum of slice areas times the z step (µm³); None without a voxel size."""
        areas = self.area_um2
        if areas is None or self.z_step_um is None:
            return None
        return float(sum(areas) * self.z_step_um)

    @property
    def volume_voxels(self) -> int:
        return int(sum(self.area_px))

    def rows(self) -> list[dict]:
        """Per-slice table rows (z, area_px, area_um2, threshold)."""
        areas_um2 = self.area_um2
        return [
            {
                "z": z,
                "area_px": self.area_px[i],
                "area_um2": areas_um2[i] if areas_um2 is not None else None,
                "threshold": self.thresholds[i],
            }
            for i, z in enumerate(self.z_values[: len(self.area_px)])
        ]

    def to_csv(self) -> str:
        lines = ["z,area_px,area_um2,threshold"]
        for row in self.rows():
            area = "" if row["area_um2"] is None else f"{row['area_um2']:.6g}"
            lines.append(f"{row['z']},{row['area_px']},{area},{row['threshold']:.6g}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class BatchPlan:
    """What a batch run of ``z_values`` will do, decided before it starts (shown by the app, followed by
    ``apply_prototype``).

    z_values : the requested slices, in the order requested.
    needed : (sorted) every slice whose score map the run makes: the requested ones and their z-neighbours
        for ``z_sigma`` smoothing.
    embeds : whether the run reads patch embeddings; not for best mode's pixel classifier without a patch
        projection, which computes its pixel features from the slice itself.
    to_embed : (sorted) the needed slices not yet in the embedding cache (phase 'embed'; empty when not
        ``embeds``). A cancelled run resumes with fewer of them.
    Whether phase 'embed' runs at all is ``embeds_ahead(embedder, plan)``.
    """

    z_values: tuple[int, ...]
    needed: tuple[int, ...]
    embeds: bool
    to_embed: tuple[int, ...]

    @property
    def cached(self) -> int:
        """How many needed slices are already embedded (they are skipped: the resume); 0 when not ``embeds``."""
        return len(self.needed) - len(self.to_embed) if self.embeds else 0


def plan_batch(
    embedder: "SliceEmbedder",
    prototype: Prototype,
    z_values: Sequence[int],
    *,
    config: PipelineConfig | None = None,
) -> BatchPlan:
    """The plan of ``apply_prototype(embedder, prototype, z_values, config=config)`` (one look into the cache).

    Raises OptionError for a slice outside the stack.

    >>> plan_batch(embedder, thesis_prototype, [2], config=config_with_z_sigma_1)   # doctest: +SKIP
    BatchPlan(z_values=(2,), needed=(0, 1, 2, 3, 4), embeds=True, to_embed=(...))
    """
    config = config or prototype.config
    n_slices = embedder.n_slices
    outside = [int(z) for z in z_values if not 0 <= z < n_slices]
    if outside:
        raise OptionError(f"slice z={outside[0]} is outside the stack (0-{n_slices - 1}); choose slices in that range")
    # Scorer(prototype, config) is pixel-level exactly when config.uses_pixels (it refuses otherwise)
    embeds = not config.uses_pixels or prototype.pixel_projection is not None
    needed = tuple(sorted({k for z in z_values for k in neighbourhood(int(z), config.z_sigma, n_slices)}))
    cached = embedder.cached_slices() if embeds else set()  # one look into the cache file (empty without a cache)
    to_embed = tuple(z for z in needed if z not in cached) if embeds else ()
    return BatchPlan(tuple(int(z) for z in z_values), needed, embeds, to_embed)


def embeds_ahead(embedder: "SliceEmbedder", plan: BatchPlan) -> bool:
    """Whether ``apply_prototype`` runs phase 'embed' (embedding every needed slice before the masks).

    Only when the run reads embeddings at all, and then always with a disk cache (the embeddings are read
    back from it), but without one only when every needed slice fits in the embedder's memo
    (``len(needed) * embedding_nbytes <= memo_bytes``): otherwise the first pass's embeddings would be
    dropped before phase 'mask' uses them, so each slice is embedded once, in phase 'mask' (and no 'embed'
    progress is reported).
    """
    if not plan.embeds:
        return False
    return embedder.cache is not None or len(plan.needed) * embedder.embedding_nbytes <= embedder.memo_bytes


def _eta(start: float, done: int, total: int) -> float | None:
    if done == 0:
        return None
    return (time.perf_counter() - start) / done * (total - done)


def _first_needed(z_values: Sequence[int], sigma: float, n_slices: int) -> list[int]:
    """The slices whose score maps `apply_prototype` makes, in the order it first makes them."""
    seen: set[int] = set()
    order = []
    for z in z_values:
        for k in neighbourhood(z, sigma, n_slices):
            if k not in seen:
                seen.add(k)
                order.append(k)
    return order


def apply_prototype(
    embedder: "SliceEmbedder",
    prototype: Prototype,
    z_values: Sequence[int],
    sink: Callable[[int, np.ndarray], None],
    *,
    config: PipelineConfig | None = None,
    threshold: ThresholdSpec | None = None,
    voxel_size: "VoxelSize | None" = None,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    scorer: Scorer | None = None,
) -> BatchResult:
    """Segment ``z_values`` (in that order) with ``prototype`` and pass each (Y, X) bool mask to ``sink(z, mask)``.

    Phase 'embed' embeds (through the cache) every requested slice and its z-neighbours (skipped when they
    would not stay in memory until used, see ``embeds_ahead``); phase 'mask' scores, smooths along z,
    thresholds and hands each mask to the sink. Score maps are kept only for the
    z window that smoothing needs.
    scorer : ``Scorer(prototype, config)`` made once by a caller that runs many batches (core.cluster's block
        writers), so best mode's classifier is not fitted again per batch.
    """
    plan = plan_batch(embedder, prototype, z_values, config=config)
    scorer = scorer if scorer is not None else Scorer(prototype, config)
    config = scorer.config
    started = time.perf_counter()
    result = BatchResult(z_values=list(z_values))
    if voxel_size is not None:
        result.pixel_area_um2 = float(voxel_size.x * voxel_size.y)
        result.z_step_um = float(voxel_size.z)
    if embeds_ahead(embedder, plan):
        todo = list(plan.to_embed)
        start = time.perf_counter()
        reads = embedder.plan_reads(todo)
        for index, z in enumerate(todo):
            if should_stop is not None and should_stop():
                result.cancelled = True
                result.seconds = time.perf_counter() - started
                return result
            reads.ready(z)
            embedder.embed(z)
            if on_progress is not None:
                on_progress("embed", index + 1, len(todo), _eta(start, index + 1, len(todo)))
    start = time.perf_counter()
    # Pixel scores need each slice's pixels when its score map is made (z neighbours first, with z_sigma);
    # patch scores need them only for the guide of guided upsampling. Read them chunk-wise in that order.
    if scorer.pixel_level:
        reads = embedder.plan_reads(_first_needed(z_values, config.z_sigma, embedder.n_slices))
    else:
        reads = embedder.plan_reads(z_values if config.upsampling is Upsampling.GUIDED else [])
    window = ScoreWindow(scorer, embedder, before_map=reads.ready if scorer.pixel_level else None)
    for index, z in enumerate(z_values):
        if should_stop is not None and should_stop():
            result.cancelled = True
            break
        score_map = window.score_map(z)
        if not scorer.pixel_level:
            reads.ready(z)
        segmentation = scorer.segment(embedder, z, score_map, threshold=threshold)
        sink(z, segmentation.mask)
        result.area_px.append(int(segmentation.mask.sum()))
        result.thresholds.append(float(segmentation.threshold))
        if on_progress is not None:
            on_progress("mask", index + 1, len(z_values), _eta(start, index + 1, len(z_values)))
    result.seconds = time.perf_counter() - started
    return result


SCRATCH_PREFIX = "masks-"
_SCRATCH_NAME = re.compile(r"^masks-(\d+)-[0-9a-f]+(-full)?\.npy$")


def scratch_dir() -> Path:
    """The Protoscope temp folder for scratch files (created, private to the user): ``$PROTOSCOPE_TMP`` when
    set, else ``<system temp>/protoscope-<user>``. Output folders never hold scratch files."""
    configured = os.environ.get("PROTOSCOPE_TMP", "").strip()
    if configured:
        folder = Path(configured).expanduser()
    else:
        user = str(os.getuid()) if hasattr(os, "getuid") else re.sub(r"\W+", "_", os.environ.get("USERNAME", "user"))
        folder = Path(tempfile.gettempdir()) / f"protoscope-{user}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a PID reused by another process counts as alive: its files stay until
    that one ends too)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there; never remove what may be in use
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def remove_stale_scratch(folder: str | Path | None = None) -> list[Path]:
    """Delete the MaskVolume scratch files in ``folder`` (default ``scratch_dir()``) whose process has died
    (a crash or kill -9 skips ``close``); return the paths removed."""
    folder = Path(folder) if folder is not None else scratch_dir()
    removed = []
    for path in folder.glob(f"{SCRATCH_PREFIX}*.npy"):
        match = _SCRATCH_NAME.match(path.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:  # another process cleaned it first
            pass
    return removed


class MaskVolume:
    """A (N, Y, X) uint8 0/255 volume in a memory-mapped scratch file, filled slice by slice.

    ``index_of`` maps stack z to the position in the volume. Used by the app's batch page, whose results
    may be larger than RAM. The scratch files live in ``scratch_dir()`` (or ``scratch``), named
    ``masks-<pid>-<token>.npy``; ``close`` removes them, and constructing a MaskVolume removes those a dead
    process left behind. They are scratch, not output: written in place, never through core.io.atomic.

    directory : ignored (the output folder older callers passed); scratch files never go there.
    """

    def __init__(self, z_values: Sequence[int], slice_shape: tuple[int, int], directory: str | Path | None = None,
                 *, scratch: str | Path | None = None) -> None:
        del directory
        folder = Path(scratch) if scratch is not None else scratch_dir()
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(folder)
        self.z_values = list(z_values)
        self.index_of = {z: i for i, z in enumerate(self.z_values)}
        self.path = folder / f"{SCRATCH_PREFIX}{os.getpid()}-{secrets.token_hex(6)}.npy"
        self._paths = [self.path]
        self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.uint8,
                                               shape=(len(self.z_values), *slice_shape))
        self.filled: set[int] = set()

    def __call__(self, z: int, mask: np.ndarray) -> None:
        self.array[self.index_of[z]] = np.where(mask, 255, 0).astype(np.uint8)
        self.filled.add(z)

    def full_stack(self, n_slices: int) -> np.ndarray:
        """(n_slices, Y, X) uint8 memmap with zeros where no slice was segmented (for writing into .ims)."""
        if self.z_values == list(range(n_slices)):
            return self.array
        path = self.path.with_name(self.path.stem + "-full.npy")
        self._paths.append(path)
        full = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n_slices, *self.array.shape[1:]))
        for z, i in self.index_of.items():
            full[z] = self.array[i]
        return full

    def close(self) -> None:
        """Remove the scratch files (arrays handed out before stay readable on POSIX until dropped)."""
        self.__dict__.pop("array", None)
        for path in self._paths:
            path.unlink(missing_ok=True)

    def __enter__(self) -> "MaskVolume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
