"""The thesis's evaluation protocol (§3.8, docs/spec/PIPELINE.md A.3 and C), for any backbone and pipeline variant.

For every stack: pick evenly spaced slices (100, skipping 40 at each end, when the stack is deep enough);
for every slice and seed, sample positive and negative points from the ground truth (margin from the
boundary), build prototypes on that slice and score:

- ``same-slice``: the slice the points came from;
- ``same-file``:  one reference slice per stack and seed (chosen at random, seeded), applied to every other
                  evaluated slice of the same stack;
- ``cross-file``: the same reference prototypes applied to every evaluated slice of every other stack
                  (the transfer matrix, thesis Fig. 4.9 / Table B.1);
- ``adapt``:      quick adapt (not in the thesis; not run unless asked): each reference prototype of stack A plus
                  ``adapt_points`` positive and negative points (3 + 3) sampled on one slice of every other stack
                  B (B's own reference slice of that seed, ``reference_slice``), by ``core.pipeline.adapt_scorer``,
                  applied to every other evaluated slice of B. Same-file (25 + 25 points on B) and cross-file (no
                  point on B) bracket it; the intensity baseline's adapt is its threshold from B's points alone.

Methods are pipeline variants (``thesis``, ``best`` and any options on top) and two baselines a user
could script without us: ``otsu`` (Otsu's threshold of the raw slice) and ``intensity`` (Gaussian-smoothed
intensity, sigma 2 px; the mean smoothed intensity at the positive and at the negative points; threshold
halfway between them — transferred as that raw intensity value).

``score_prototype`` scores a user's own prototype the same way (same truth reader, metrics and score window), with
no points sampled: its masks on chosen slices against the ground truth.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from core.config import PipelineConfig
from core.features.embedding import SliceEmbedder
from core.features.embedding_cache import EmbeddingCache
from core.errors import PrototypeError, ProtoscopeError, StackError
from core.io import Stack, open_stack, stack_label
from core.metrics import segmentation_scores, summarize
from core.pipeline import Scorer, adapt_scorer, build_scorer
from core.prototypes import PointSet, Prototype
from core.sampling import sample_points
from core.thresholds import ThresholdSpec
from core.window import ScoreWindow

BASELINES = ("otsu", "intensity")
SETTINGS = ("same-slice", "same-file", "cross-file")  # the thesis's settings: the default
ADAPT = "adapt"
ALL_SETTINGS = (*SETTINGS, ADAPT)
ADAPT_POINTS = 3  # positive and negative points per class that adapt samples on the target
NO_CACHE_MEMO_BYTES = 2 << 30  # per stack, when evaluating without a disk cache (bytes)


@dataclass(frozen=True)
class EvalStack:
    """One stack with ground truth: the image channel, and the truth as a channel or a separate file."""

    image_path: Path
    image_channel: int
    mask_channel: int | None = None
    mask_path: Path | None = None
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or stack_label(self.image_path)


@dataclass(frozen=True)
class Method:
    """A named pipeline variant, or a baseline (config None)."""

    name: str
    config: PipelineConfig | None = None

    @property
    def is_otsu_baseline(self) -> bool:
        return self.config is None and self.name == "otsu"


@dataclass(frozen=True)
class ProtocolSettings:
    n_points: int = 25
    seeds: tuple[int, ...] = (0, 1, 2)
    n_slices: int = 100
    skip_ends: int = 40
    margin_px: int | None = None  # None: half a patch in original pixels
    settings: tuple[str, ...] = SETTINGS
    z_values: tuple[int, ...] | None = None  # explicit slices (every stack) instead of n_slices/skip_ends
    adapt_points: int = ADAPT_POINTS  # points per class on the target in the adapt setting

    def __post_init__(self) -> None:
        if isinstance(self.adapt_points, bool) or not isinstance(self.adapt_points, (int, np.integer)) \
                or self.adapt_points < 1:
            raise ProtoscopeError(f"adapt needs at least 1 point per class on the target, got {self.adapt_points!r}")


@dataclass
class EvaluationResult:
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stacks: list[str] = field(default_factory=list)
    slices: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> list[dict]:
        """Mean ± std of Dice, IoU and HD95 per (method, backbone, setting)."""
        groups: dict[tuple[str, str, str], list[dict]] = {}
        for row in self.rows:
            groups.setdefault((row["method"], row["backbone"], row["setting"]), []).append(row)
        table = []
        for (method, backbone, setting), rows in groups.items():
            entry = {"method": method, "backbone": backbone, "setting": setting, "n": len(rows)}
            for metric in ("dice", "iou", "hd95_px", "hd95_um"):
                values = [r[metric] for r in rows if r.get(metric) is not None]
                mean, std = summarize(values) if values else (float("nan"), float("nan"))
                entry[metric] = mean
                entry[f"{metric}_std"] = std
            table.append(entry)
        return table

    def transfer_matrix(self, method: str, backbone: str,
                        settings: tuple[str, ...] = ("same-file", "cross-file")) -> dict:
        """Mean Dice by (reference stack, target stack): same-file on the diagonal, cross-file elsewhere
        (``settings=("adapt",)``: the adapted references, off the diagonal). Cells without rows are (nan, nan)."""
        cells: dict[tuple[str, str], list[float]] = {}
        for row in self.rows:
            if row["method"] != method or row["backbone"] != backbone or row["setting"] not in settings:
                continue
            cells.setdefault((row["ref_stack"], row["stack"]), []).append(row["dice"])
        matrix = {}
        for ref in self.stacks:
            matrix[ref] = {}
            for target in self.stacks:
                values = cells.get((ref, target), [])
                matrix[ref][target] = summarize(values) if values else (float("nan"), float("nan"))
        return matrix


# ---- slices and truth ---------------------------------------------------------------------------------

def select_slices(n_z: int, n_slices: int = 100, skip_ends: int = 40) -> tuple[list[int], str | None]:
    """Evenly spaced slices between ``skip_ends`` and ``n_z - 1 - skip_ends`` (thesis: 100, skipping 40).

    When the stack is too shallow to skip that many, the skip shrinks (and a note says so).
    Returns (sorted z list, note or None).
    """
    note = None
    skip = skip_ends
    if n_z - 2 * skip < 1:
        skip = max(0, (n_z - min(n_slices, n_z)) // 2)
        note = f"stack has {n_z} slices: skipping {skip} (not {skip_ends}) at each end"
    first, last = skip, n_z - 1 - skip
    count = min(n_slices, last - first + 1)
    z_values = np.unique(np.linspace(first, last, count).round().astype(int))
    return [int(z) for z in z_values], note


class TruthReader:
    """Ground-truth masks of one EvalStack: (Y, X) bool, truth = value > 0."""

    def __init__(self, spec: EvalStack, image: Stack) -> None:
        self.spec = spec
        if spec.mask_path is not None:
            self.stack = open_stack(spec.mask_path)
            self.channel = 0
            if self.stack.shape[0] != image.shape[0] or self.stack.shape[2:] != image.shape[2:]:
                raise StackError(
                    f"{spec.mask_path}: mask stack is {self.stack.shape[0]} x {self.stack.shape[2]} x {self.stack.shape[3]} "
                    f"(Z x Y x X) but {spec.image_path} is {image.shape[0]} x {image.shape[2]} x {image.shape[3]}"
                )
            self._owns = True
        elif spec.mask_channel is not None:
            self.stack = image
            self.channel = image.resolve_channel(spec.mask_channel)
            self._owns = False
        else:
            raise ProtoscopeError(f"{spec.image_path}: give a mask channel or a mask file for the ground truth")

    def __call__(self, z: int) -> np.ndarray:
        return np.asarray(self.stack.read_slice(z, self.channel)) > 0

    def close(self) -> None:
        if self._owns:
            self.stack.close()


# ---- baselines ----------------------------------------------------------------------------------------

def smoothed(raw: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(np.asarray(raw, dtype=np.float32), 2.0)


def intensity_baseline_threshold(raw: np.ndarray, points: PointSet, z: int) -> float:
    """Halfway between the mean smoothed intensity at the positive and at the negative points."""
    image = smoothed(raw)
    pos, neg = points.on_slice(z)
    high = float(image[pos[:, 1], pos[:, 0]].mean())
    low = float(image[neg[:, 1], neg[:, 0]].mean()) if len(neg) else float(image.min())
    return (high + low) / 2


def intensity_baseline_mask(raw: np.ndarray, threshold: float, bright_structure: bool) -> np.ndarray:
    image = smoothed(raw)
    return image >= threshold if bright_structure else image <= threshold


def otsu_mask(raw: np.ndarray) -> np.ndarray:
    data = np.asarray(raw, dtype=np.float32)
    if data.min() == data.max():
        return np.zeros(data.shape, bool)
    return data > threshold_otsu(data)


def mask_scores(mask: np.ndarray, truth_mask: np.ndarray, image: Stack) -> dict:
    """Dice, IoU, HD95 (pixels, and µm when ``image`` knows its voxel size) and the covered shares of one slice's
    (Y, X) bool mask against its ground truth: the metric columns of every result row."""
    pixel = (image.voxel_size.y, image.voxel_size.x) if image.voxel_size is not None else None
    scores = segmentation_scores(mask, truth_mask, pixel_size_um=pixel)
    return {"dice": scores.dice, "iou": scores.iou, "hd95_px": scores.hd95_px, "hd95_um": scores.hd95_um,
            "mask_fraction": float(mask.mean()), "truth_fraction": float(truth_mask.mean())}


# ---- the runner ---------------------------------------------------------------------------------------

def protocol_points(truth: np.ndarray, z: int, seed: int, n_points: int, margin_px: int) -> PointSet:
    """The points the protocol samples on slice z for a seed: n_points positive and negative (x, y, z) rows
    from the (Y, X) bool ground truth, with a boundary margin (core.sampling). Same inputs, same points."""
    sampled = sample_points(truth, n_points, n_points, margin_px=margin_px, seed=seed * 100_003 + z)
    return PointSet(
        np.column_stack([sampled.positive_xy, np.full(len(sampled.positive_xy), z)]),
        np.column_stack([sampled.negative_xy, np.full(len(sampled.negative_xy), z)]),
    )


def reference_slice(z_values: Sequence[int], seed: int) -> int:
    """The reference slice of a stack for a seed: one of its evaluated slices ``z_values`` (sorted), drawn with the
    seed. Same-file applies the prototype made there to the stack's other slices; adapt clicks its points there."""
    return int(z_values[np.random.default_rng(10_000 + seed).integers(len(z_values))])


def evaluated_slices(spec: EvalStack, image: Stack, truth: "TruthReader", settings: ProtocolSettings) -> tuple[list[int], list[str]]:
    """The slices the protocol evaluates on one stack, and notes about what it had to change or skip.

    Explicit ``settings.z_values``, else evenly spaced slices (``select_slices``); slices whose ground
    truth lacks structure or background are skipped.
    """
    notes: list[str] = []
    if settings.z_values is not None:
        bad = [z for z in settings.z_values if not 0 <= z < image.shape[0]]
        if bad:
            raise StackError(f"{spec.image_path}: slice {bad[0]} requested, but the stack has slices 0-{image.shape[0] - 1}")
        z_values = sorted(set(settings.z_values))
    else:
        z_values, note = select_slices(image.shape[0], settings.n_slices, settings.skip_ends)
        if note:
            notes.append(f"{spec.label}: {note}")
    keep = [z for z in z_values if 0 < (plane := truth(z)).sum() < plane.size]  # one read per slice
    if len(keep) < len(z_values):
        notes.append(f"{spec.label}: {len(z_values) - len(keep)} slices without both structure and background skipped")
    if not keep:
        raise ProtoscopeError(f"{spec.image_path}: no evaluated slice has both structure and background in its ground truth")
    return keep, notes


@dataclass
class _Reference:
    """A reference made on one slice: a prototype (pipeline methods) or an intensity threshold (baseline)."""

    stack: str
    z: int
    seed: int
    prototype: Prototype | None = None
    intensity: tuple[float, bool] | None = None
    scorer: Scorer | None = field(default=None, compare=False, repr=False)  # fitted once, reused for every target


def default_margin(slice_shape: tuple[int, int], config: PipelineConfig, patch_size: int = 14) -> int:
    """Half a model patch in original pixels (so that a point's patch is not a boundary patch); at least 2."""
    scale = max(slice_shape) / config.preprocess.image_size
    return max(2, int(math.ceil(patch_size / 2 * scale)))


@dataclass
class OpenedStack:
    """One EvalStack opened for the protocol.

    image : the image stack; truth : its ground truth, (Y, X) bool per slice; channel : the image channel
    resolved (e.g. -2 -> 4); z_values : the evaluated slices, sorted; notes : what the slice choice changed
    or skipped (see ``evaluated_slices``).
    """

    spec: EvalStack
    image: Stack
    truth: TruthReader
    channel: int
    z_values: list[int]
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.spec.label

    def margin(self, settings: ProtocolSettings, config: PipelineConfig) -> int:
        """The points' boundary margin in pixels: ``settings.margin_px``, else half a patch (``default_margin``)."""
        if settings.margin_px is not None:
            return settings.margin_px
        return default_margin((self.image.shape[2], self.image.shape[3]), config)


@contextmanager
def open_eval_stacks(stacks: Sequence[EvalStack], settings: ProtocolSettings) -> Iterator[list[OpenedStack]]:
    """Open every stack with its ground truth and choose its evaluated slices (``evaluated_slices``); everything
    opened is closed on exit. ``evaluate`` and the experiments (core.experiments) open their stacks here.

    Raises StackError / ProtoscopeError for an unreadable stack, a bad channel, a ground truth of another shape
    or without usable slices, and ProtoscopeError when two stacks have the same label.
    """
    opened: list[OpenedStack] = []
    try:
        for spec in stacks:
            image = open_stack(spec.image_path)
            try:
                truth = TruthReader(spec, image)
            except BaseException:
                image.close()
                raise
            entry = OpenedStack(spec, image, truth, channel=0, z_values=[])
            opened.append(entry)  # listed before anything else can fail, so that the finally closes it
            entry.channel = image.resolve_channel(spec.image_channel)
            entry.z_values, entry.notes = evaluated_slices(spec, image, truth, settings)
        labels = [entry.label for entry in opened]
        if len(set(labels)) != len(labels):
            raise ProtoscopeError("two stacks have the same name; give them distinct file names")
        yield opened
    finally:
        for entry in opened:
            entry.truth.close()
            entry.image.close()


def evaluate(
    stacks: Sequence[EvalStack],
    methods: Sequence[Method],
    backbones: Sequence,
    settings: ProtocolSettings = ProtocolSettings(),
    *,
    cache: EmbeddingCache | None = None,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Run the protocol. ``backbones`` are loaded ``core.backbones.Backbone`` objects (pipeline methods run once
    per backbone; baselines once)."""
    started = time.perf_counter()
    log = log or (lambda message: None)
    result = EvaluationResult()
    with open_eval_stacks(stacks, settings) as opened:
        for entry in opened:
            result.notes.extend(entry.notes)
            result.stacks.append(entry.label)
            result.slices[entry.label] = entry.z_values
        embedders: dict[tuple[str, str, str], SliceEmbedder] = {}
        for method in methods:
            for backbone in (backbones if method.config is not None else [None]):
                log(f"[{method.name} / {backbone.spec.name if backbone else 'no backbone'}] evaluating {len(opened)} stack(s)")
                runner = _MethodRun(opened, method, backbone, settings, cache, result, log, embedders)
                runner.run()
    result.seconds = time.perf_counter() - started
    return result


class _MethodRun:
    """One method (and backbone) over all stacks: same-slice first, then transfer target by target."""

    def __init__(self, opened: list[OpenedStack], method: Method, backbone, settings: ProtocolSettings, cache,
                 result: EvaluationResult, log: Callable[[str], None], embedders: dict) -> None:
        self.opened = opened
        self.method = method
        self.settings = settings
        self.result = result
        self.log = log
        self.backbone_name = backbone.spec.name if backbone is not None else "-"
        self.embedders: dict[str, SliceEmbedder] = {}
        if method.config is not None:
            for entry in opened:
                key = (entry.label, method.config.preprocess.signature(), backbone.signature())
                if key not in embedders:
                    embedder = SliceEmbedder(entry.image, entry.spec.image_channel, backbone,
                                             method.config.preprocess, cache=cache)
                    if cache is None:
                        # same-slice and transfer passes walk the slices twice: without a disk cache, keep the
                        # stack's evaluated slices (and their z neighbours) in memory, up to NO_CACHE_MEMO_BYTES
                        needed = len(entry.z_values) + 4 * max(0.0, method.config.z_sigma) + 1
                        embedder.memo_bytes = int(min(NO_CACHE_MEMO_BYTES,
                                                      max(embedder.memo_bytes, needed * embedder.embedding_nbytes)))
                    embedders[key] = embedder
                self.embedders[entry.label] = embedders[key]

    # -- segmentation of one target slice with one reference
    def segment(self, ref: _Reference, window: ScoreWindow | None, image: Stack, channel: int, z: int) -> np.ndarray:
        if ref.intensity is not None:
            threshold, bright = ref.intensity
            return intensity_baseline_mask(image.read_slice(z, channel), threshold, bright)
        assert window is not None
        return window.segment(z).mask

    def window(self, ref: _Reference, label: str) -> ScoreWindow | None:
        """A score window of ``ref``'s fitted scorer over stack ``label`` (None for intensity references)."""
        return ScoreWindow(ref.scorer, self.embedders[label]) if ref.scorer is not None else None

    def record(self, setting: str, ref: _Reference, spec: EvalStack, image: Stack, truth_mask: np.ndarray,
               mask: np.ndarray, z: int) -> None:
        self.result.rows.append(
            {
                "method": self.method.name,
                "backbone": self.backbone_name,
                "setting": setting,
                "ref_stack": ref.stack,
                "ref_z": ref.z,
                "stack": spec.label,
                "z": z,
                "seed": ref.seed,
                **mask_scores(mask, truth_mask, image),
            }
        )

    def make_reference(self, label: str, image: Stack, channel: int, truth_mask: np.ndarray, z: int, seed: int,
                       margin: int) -> _Reference:
        settings = self.settings
        points = protocol_points(truth_mask, z, seed, settings.n_points, margin)
        if self.method.config is None:
            raw = image.read_slice(z, channel)
            threshold = intensity_baseline_threshold(raw, points, z)
            positive_mean = float(smoothed(raw)[points.positive[:, 1], points.positive[:, 0]].mean())
            return _Reference(label, z, seed, intensity=(threshold, positive_mean >= threshold))
        scorer = build_scorer(self.embedders[label], points, self.method.config, seed=seed)
        return _Reference(label, z, seed, prototype=scorer.prototype, scorer=scorer)

    def run(self) -> None:
        method, settings, result = self.method, self.settings, self.result
        references: list[_Reference] = []
        for entry in self.opened:
            spec, image, truth, channel = entry.spec, entry.image, entry.truth, entry.channel
            label = spec.label
            z_values = entry.z_values
            margin = entry.margin(settings, method.config or PipelineConfig())
            reference_z = {seed: reference_slice(z_values, seed) for seed in settings.seeds}
            for z in z_values:
                truth_mask = truth(z)
                for seed in settings.seeds:
                    if method.is_otsu_baseline:
                        if "same-slice" in settings.settings:
                            self.record("same-slice", _Reference(label, z, seed), spec, image, truth_mask,
                                        otsu_mask(image.read_slice(z, channel)), z)
                        continue
                    if "same-slice" not in settings.settings and z != reference_z[seed]:
                        continue  # only the reference slices' prototypes are needed
                    ref = self.make_reference(label, image, channel, truth_mask, z, seed, margin)
                    if "same-slice" in settings.settings:
                        self.record("same-slice", ref, spec, image, truth_mask,
                                    self.segment(ref, self.window(ref, label), image, channel, z), z)
                    if z == reference_z[seed]:
                        references.append(ref)
            done = "same-slice" if "same-slice" in settings.settings else "reference prototypes"
            self.log(f"  {label}: {done} done ({len(z_values)} slices x {len(settings.seeds)} seeds)")
        if method.is_otsu_baseline or not ({"same-file", "cross-file", ADAPT} & set(settings.settings)):
            return
        for entry in self.opened:
            spec, image, truth, channel = entry.spec, entry.image, entry.truth, entry.channel
            # one window per reference on this stack: walking z upwards computes each score map once
            windows = [self.window(ref, spec.label) for ref in references]
            adapted = self.adapted_references(entry, references) if ADAPT in settings.settings else []
            adapted_windows = [self.window(ref, spec.label) for ref, _ in adapted]
            for z in result.slices[spec.label]:
                truth_mask = truth(z)
                for ref, window in zip(references, windows):
                    same = ref.stack == spec.label
                    setting = "same-file" if same else "cross-file"
                    if setting not in settings.settings or (same and z == ref.z):
                        continue
                    self.record(setting, ref, spec, image, truth_mask, self.segment(ref, window, image, channel, z), z)
                for (ref, clicked_z), window in zip(adapted, adapted_windows):
                    if z != clicked_z:  # the clicked slice is never scored: its points came from its truth
                        self.record(ADAPT, ref, spec, image, truth_mask, self.segment(ref, window, image, channel, z), z)
            self.log(f"  {spec.label}: transfer targets done")

    def adapted_references(self, entry: OpenedStack, references: list[_Reference]) -> list[tuple[_Reference, int]]:
        """For target ``entry``, every other stack's reference adapted with ``adapt_points`` + ``adapt_points``
        points sampled on the target's reference slice of the reference's seed: [(adapted reference, clicked z)].

        The adapted reference keeps the source stack's name and slice (rows say where the base came from). Pipeline
        methods: ``adapt_scorer`` (the base's examples plus the new ones); the intensity baseline: the threshold
        halfway between the smoothed intensities at the target's own points (a threshold cannot merge two stacks'
        intensity scales).
        """
        label = entry.label
        margin = entry.margin(self.settings, self.method.config or PipelineConfig())
        adapted = []
        for ref in references:
            if ref.stack == label:
                continue
            clicked_z = reference_slice(entry.z_values, ref.seed)
            points = protocol_points(entry.truth(clicked_z), clicked_z, ref.seed, self.settings.adapt_points, margin)
            if ref.intensity is not None:
                raw = entry.image.read_slice(clicked_z, entry.channel)
                threshold = intensity_baseline_threshold(raw, points, clicked_z)
                positive_mean = float(smoothed(raw)[points.positive[:, 1], points.positive[:, 0]].mean())
                new = _Reference(ref.stack, ref.z, ref.seed, intensity=(threshold, positive_mean >= threshold))
            else:
                scorer = adapt_scorer(ref.prototype, self.embedders[label], points, self.method.config, seed=ref.seed)
                new = _Reference(ref.stack, ref.z, ref.seed, prototype=scorer.prototype, scorer=scorer)
            adapted.append((new, clicked_z))
        return adapted


# ---- a user's own prototype -----------------------------------------------------------------------------

PROTOTYPE_SETTING = "prototype"


def score_prototype(
    prototype: Prototype,
    stack_spec: EvalStack,
    z_values: Sequence[int],
    *,
    backbone,
    config: PipelineConfig | None = None,
    threshold: ThresholdSpec | None = None,
    cache: EmbeddingCache | None = None,
    name: str = "prototype",
) -> EvaluationResult:
    """Score a prototype as it is (no points sampled): its masks on slices ``z_values`` of ``stack_spec`` against
    the ground truth, one row per slice (Dice, IoU, HD95, like ``evaluate``'s; setting 'prototype', method ``name``,
    ref_stack the prototype's source stack). ``summary()`` gives the mean.

    backbone : the loaded backbone that made the prototype. config : the configuration to segment with (default:
    the prototype's); threshold : overrides its threshold. Masks come from a ``ScoreWindow`` (z smoothing as
    configured), exactly as a batch run makes them. Slices whose ground truth lacks structure or background are
    skipped with a note, as in the protocol.

    Raises PrototypeError when the prototype does not fit ``backbone``; StackError / ProtoscopeError for the stack,
    its ground truth or the slices (``open_eval_stacks``).
    """
    started = time.perf_counter()
    _check_backbone(prototype, backbone)
    if not len(z_values):
        raise ProtoscopeError("choose at least one slice to score the prototype on")
    config = config or prototype.config
    scorer = Scorer(prototype, config)
    result = EvaluationResult()
    settings = ProtocolSettings(z_values=tuple(int(z) for z in z_values), settings=(PROTOTYPE_SETTING,))
    with open_eval_stacks([stack_spec], settings) as (entry,):
        result.notes.extend(entry.notes)
        result.stacks.append(entry.label)
        result.slices[entry.label] = entry.z_values
        embedder = SliceEmbedder(entry.image, entry.spec.image_channel, backbone, config.preprocess, cache=cache)
        window = ScoreWindow(scorer, embedder)
        source = stack_label(Path(prototype.source_file)) if prototype.source_file else ""
        for z in entry.z_values:  # increasing z: the window computes every score map once
            mask = window.segment(z, threshold=threshold).mask
            result.rows.append({"method": name, "backbone": backbone.spec.name, "setting": PROTOTYPE_SETTING,
                                "ref_stack": source, "ref_z": None, "stack": entry.label, "z": z, "seed": None,
                                **mask_scores(mask, entry.truth(z), entry.image)})
    result.seconds = time.perf_counter() - started
    return result


def score_adapted(
    prototype: Prototype,
    stack_spec: EvalStack,
    settings: ProtocolSettings,
    *,
    backbone,
    config: PipelineConfig | None = None,
    cache: EmbeddingCache | None = None,
    name: str = "prototype",
) -> EvaluationResult:
    """The adapt setting for a user's own prototype (made on another stack, or loaded from a file): per seed of
    ``settings``, ``settings.adapt_points`` positive and negative points sampled from ``stack_spec``'s ground truth
    on its reference slice (``reference_slice``, the protocol's sampler and margin), ``adapt_scorer``, and its masks
    on every other evaluated slice (setting 'adapt', method '<name> + N+N points'); beside them the prototype as it is
    on the same slices (setting 'prototype', method ``name``), the cross-file analogue.

    config : the configuration to adapt under (default: the prototype's; its mode must be the prototype's).
    Raises PrototypeError when the prototype does not fit ``backbone`` or cannot be adapted (``check_adaptable``);
    StackError / ProtoscopeError for the stack, its ground truth or the slices (``open_eval_stacks``).
    """
    started = time.perf_counter()
    _check_backbone(prototype, backbone)
    config = config or prototype.config
    base = Scorer(prototype, config)
    adapted_name = f"{name} + {settings.adapt_points}+{settings.adapt_points} points"
    result = EvaluationResult()
    with open_eval_stacks([stack_spec], settings) as (entry,):
        result.notes.extend(entry.notes)
        result.stacks.append(entry.label)
        result.slices[entry.label] = entry.z_values
        if len(entry.z_values) < 2:
            result.notes.append("adapt clicks on one slice and scores the others: with one evaluated slice there are none")
        embedder = SliceEmbedder(entry.image, entry.spec.image_channel, backbone, config.preprocess, cache=cache)
        source = stack_label(Path(prototype.source_file)) if prototype.source_file else ""
        margin = entry.margin(settings, config)
        for seed in settings.seeds:
            clicked_z = reference_slice(entry.z_values, seed)
            points = protocol_points(entry.truth(clicked_z), clicked_z, seed, settings.adapt_points, margin)
            adapted = adapt_scorer(prototype, embedder, points, config, seed=seed)
            windows = ((PROTOTYPE_SETTING, name, ScoreWindow(base, embedder)),
                       (ADAPT, adapted_name, ScoreWindow(adapted, embedder)))
            for z in entry.z_values:  # increasing z: each window computes every score map once
                if z == clicked_z:
                    continue
                truth_mask = entry.truth(z)
                for setting, method, window in windows:
                    result.rows.append({"method": method, "backbone": backbone.spec.name, "setting": setting,
                                        "ref_stack": source, "ref_z": clicked_z, "stack": entry.label, "z": z,
                                        "seed": seed, **mask_scores(window.segment(z).mask, truth_mask, entry.image)})
    result.seconds = time.perf_counter() - started
    return result


def _check_backbone(prototype: Prototype, backbone) -> None:
    """PrototypeError unless ``prototype`` was made with ``backbone`` (name and embedding dimension)."""
    if prototype.backbone != backbone.spec.name or prototype.embed_dim != int(backbone.embed_dim):
        raise PrototypeError(
            f"the prototype was made with backbone {prototype.backbone!r} ({prototype.embed_dim}-dimensional) but "
            f"{backbone.spec.name!r} ({backbone.embed_dim}-dimensional) is selected; select {prototype.backbone!r} "
            "to score it"
        )
