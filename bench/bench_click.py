"""Click latency with cached embeddings, per slice size: best mode's live step and forest refinement, the patch
preview, and thesis mode; server-side medians in ms.

What a click costs once the slice's embeddings are cached (and, in best mode, its pixel features memoised: the
once-per-slice preparation is timed apart). Per slice size (default 1024², 2048², 3050 x 2933) and backbone
(the filter bank, and a ViT-S/14 stand-in whose random 384-D embeddings sit in a real cache: the cost does not
depend on their values), one click adds one point (positives and negatives alternately, 3 + 3 to start):

- ``live``: ``core.live.live_click`` (linear classifier on the memoised features, threshold calibrated on the
  points, mask at full size), plus ``image``: the overlay the Segment page draws (``ui.segment.overlay_jpeg``).
- ``forest``: ``core.live.refine_click`` (``build_scorer`` + ``Scorer.segment``: the forest, exact), the refinement.
- ``uncached``: the same forest click with nothing kept between clicks (features, PCA basis recomputed), as a
  click cost before the per-slice memo; interleaved with the others, so ``forest``/``uncached`` and
  ``live``/``uncached`` are ratios within one run.
- ``preview``: the patch-grid cosine preview (as the Segment page: ``ui.segment.preview_config``, no calibration);
  ``thesis``: thesis mode's click.
- ``dice``: Dice of the live mask against the forest's, per click.

The slice is the vesselNN slice burgess2014_bbbDisruption z=5 tiled to the size (points from its labels) when
../shared/data is present, else a synthetic pattern with random points.

    .venv/bin/python bench/bench_click.py [--sizes 1024 2048 3050x2933] [--clicks 7] [--quick]

Prints a table and writes bench/results/click.json (every click's timings, the medians).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import Cleanup, PipelineConfig, Upsampling  # noqa: E402
from core.features.backbones import load_backbone  # noqa: E402
from core.features.embedding import SliceEmbedder  # noqa: E402
from core.features.embedding_cache import EmbeddingCache  # noqa: E402
from core.io import open_stack  # noqa: E402
from core.io.atomic import write_text  # noqa: E402
from core.live import live_click, prepare_slice, refine_click  # noqa: E402
from core.metrics import dice  # noqa: E402
from core.pipeline import build_scorer  # noqa: E402
from core.prototypes import PointSet  # noqa: E402
from core.thresholds import ThresholdSpec  # noqa: E402
from ui import render  # noqa: E402
from ui.segment import overlay_jpeg  # noqa: E402

VESSELS = ROOT / ".." / "shared" / "data" / "vesselnn"
SOURCE = ("burgess2014_bbbDisruption", 5)  # (stack, z) tiled to each size
VIT_DIM = 384


@dataclass(frozen=True)
class _Spec:
    name: str
    family: str = "bench"
    patch_size: int = 14


class CachedOnly:
    """A backbone stand-in whose embeddings are pre-filled in the cache; embedding is never called."""

    is_random = True
    patch_size = 14

    def __init__(self, name: str, dim: int) -> None:
        self.spec = _Spec(name)
        self.embed_dim = dim
        self.weights_id = "bench"

    def label(self) -> str:
        return f"{self.spec.name} (cached random embeddings)"

    def signature(self) -> str:
        return f"bench:{self.spec.name}"

    def embed(self, image01):  # pragma: no cover - the cache must serve every slice
        raise AssertionError("the benchmark expects cached embeddings")


def parse_size(text: str) -> tuple[int, int]:
    """'1024' -> (1024, 1024); '3050x2933' -> (3050, 2933) (Y x X)."""
    rows, _, cols = text.lower().partition("x")
    return int(rows), int(cols or rows)


def size_label(size: tuple[int, int]) -> str:
    return f"{size[0]}²" if size[0] == size[1] else f"{size[0]}x{size[1]}"


def source_slice(size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """(Y, X) uint16 image and (Y, X) bool truth (None when synthetic) of the benchmark slice."""
    image_path = VESSELS / "images" / f"{SOURCE[0]}.tif"
    if image_path.is_file():
        plane = tifffile.imread(image_path)[SOURCE[1]]
        truth = tifffile.imread(VESSELS / "labels" / f"{SOURCE[0]}.tif")[SOURCE[1]] > 0
        reps = (-(-size[0] // plane.shape[0]), -(-size[1] // plane.shape[1]))
        crop = (slice(0, size[0]), slice(0, size[1]))
        return (np.tile(plane, reps)[crop].astype(np.uint16) * 8 + 300), np.tile(truth, reps)[crop]
    xx = np.arange(size[1])[None, :]
    image = 1000 + 800 * (np.sin(xx / 25.0) > 0.6) + rng.normal(0, 50, size)
    return image.astype(np.uint16), None


def click_sequence(truth: np.ndarray | None, size: tuple[int, int], clicks: int, rng: np.random.Generator) -> list[PointSet]:
    """Point sets of successive clicks on slice 0: 3 + 3 points, then one more per click (alternating labels)."""
    if truth is None:
        pool_pos = pool_neg = np.column_stack([rng.integers(0, size[1], 64), rng.integers(0, size[0], 64)])
    else:
        pool_pos = np.argwhere(truth)[:, ::-1]
        pool_neg = np.argwhere(~truth)[:, ::-1]
    positive = pool_pos[rng.choice(len(pool_pos), 3 + clicks, replace=False)]
    negative = pool_neg[rng.choice(len(pool_neg), 3 + clicks, replace=False)]
    sets = []
    for click in range(clicks):
        n_pos, n_neg = 3 + (click + 1) // 2, 3 + click // 2
        with_z = lambda xy: np.column_stack([xy, np.zeros(len(xy), int)])  # noqa: E731
        sets.append(PointSet(with_z(positive[:n_pos]), with_z(negative[:n_neg])))
    return sets


def preview_config(config: PipelineConfig) -> PipelineConfig:
    """The patch-level preview (mirrors ui.segment.preview_config)."""
    return dataclasses.replace(config, pixel_classifier="none", patch_components=0, upsampling=Upsampling.NEAREST,
                               threshold=ThresholdSpec("top", 10.0), z_sigma=0.0, cleanup=Cleanup())


def timed(call):
    start = time.perf_counter()
    value = call()
    return value, (time.perf_counter() - start) * 1e3


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def bench_backbone(stack, cache, backbone, size, points_per_click, args, rng) -> dict:
    """Every click of one backbone on one slice size: best mode's steps and thesis mode, interleaved."""
    best = PipelineConfig.best()
    embedder = SliceEmbedder(stack, 0, backbone, best.preprocess, cache=cache)
    if isinstance(backbone, CachedOnly):
        cache.put(embedder.cache_key, 0, rng.normal(size=(70, 70, VIT_DIM)).astype(np.float32))
    embedder.embed(0)
    _, stats_ms = timed(lambda: embedder.pixel_statistics(best.pixel_max_side))
    _, prepare_ms = timed(lambda: prepare_slice(embedder, 0, best))
    display = render.display_size(embedder.slice_shape)
    grey = np.clip(render.resize_float(embedder.normalized(0), display), 0, 1)  # the page memoises it per slice
    uncached = SliceEmbedder(stack, 0, backbone, best.preprocess, cache=cache, stack_range=embedder.stack_range)
    uncached.pixel_feature_memo_bytes = 0
    uncached.pixel_statistics = embedder.pixel_statistics  # once per stack either way
    uncached.pixel_filters(0, best.pixel_max_side)  # raw filters were kept per slice before the memo too
    thesis = PipelineConfig.thesis()
    thesis_embedder = SliceEmbedder(stack, 0, backbone, thesis.preprocess, cache=cache)
    if isinstance(backbone, CachedOnly):
        cache.put(thesis_embedder.cache_key, 0, rng.normal(size=(70, 70, VIT_DIM)).astype(np.float32))
    clicks = []
    for index, points in enumerate(points_per_click):
        live, live_ms = timed(lambda: live_click(embedder, points, best, 0))
        _, image_ms = timed(lambda: overlay_jpeg(grey, display, live.segmentation.score_map, live.mask))
        forest, forest_ms = timed(lambda: refine_click(embedder, points, best, 0))
        row = {"click": index, "points": int(len(points.positive) + len(points.negative)), "live_ms": live_ms,
               "live_steps_ms": live.timings, "image_ms": image_ms, "forest_ms": forest_ms,
               "forest_steps_ms": forest.timings, "dice_live_forest": dice(live.mask, forest.mask)}
        if index < args.uncached_clicks:
            uncached._patch_bases.clear()  # no basis kept: a PCA fit per click, as before the memo
            uncached._stack_bases.clear()
            old, row["uncached_ms"] = timed(lambda: build_scorer(uncached, points, best).segment(uncached, 0))
            row["uncached_equals_forest"] = bool(np.array_equal(old.mask, forest.mask))
        _, row["preview_ms"] = timed(lambda: build_scorer(embedder, points, preview_config(best), calibrate=False)
                                     .score_map(embedder, 0))
        _, row["thesis_ms"] = timed(lambda: build_scorer(thesis_embedder, points, thesis).segment(thesis_embedder, 0))
        clicks.append(row)
    summary = {key: median(c.get(key) for c in clicks)
               for key in ("live_ms", "image_ms", "forest_ms", "uncached_ms", "preview_ms", "thesis_ms", "dice_live_forest")}
    summary["live_with_image_ms"] = median(c["live_ms"] + c["image_ms"] for c in clicks)
    return {"size": size_label(size), "backbone": backbone.spec.name, "stats_ms": stats_ms,
            "prepare_slice_ms": prepare_ms, "medians": summary, "clicks": clicks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1024", "2048", "3050x2933"])
    parser.add_argument("--clicks", type=int, default=7)
    parser.add_argument("--uncached-clicks", type=int, default=3, help="clicks also timed without the memo")
    parser.add_argument("--quick", action="store_true", help="3 clicks, 1 uncached, sizes 1024 and 3050x2933")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "click.json"))
    args = parser.parse_args()
    if args.quick:
        args.clicks, args.uncached_clicks, args.sizes = 3, 1, ["1024", "3050x2933"]
    rng = np.random.default_rng(0)
    results = []
    print(f"{'size':>10} {'backbone':14} {'live':>6} {'+image':>7} {'forest':>7} {'uncached':>9} {'preview':>8} "
          f"{'thesis':>7} {'dice':>5}   (server-side medians, ms; prepare once per slice)", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        cache = EmbeddingCache(Path(folder) / "cache")
        for text in args.sizes:
            size = parse_size(text)
            image, truth = source_slice(size, rng)
            path = Path(folder) / f"slice_{size[0]}x{size[1]}.tif"
            tifffile.imwrite(path, image[None], photometric="minisblack")
            points = click_sequence(truth, size, args.clicks, rng)
            with open_stack(path) as stack:
                for backbone in (load_backbone("filterbank"), CachedOnly("dinov2_vits14", VIT_DIM)):
                    result = bench_backbone(stack, cache, backbone, size, points, args, rng)
                    results.append(result)
                    m = result["medians"]
                    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
                    print(f"{result['size']:>10} {result['backbone']:14} {fmt(m['live_ms']):>6} "
                          f"{fmt(m['live_with_image_ms']):>7} {fmt(m['forest_ms']):>7} {fmt(m['uncached_ms']):>9} "
                          f"{fmt(m['preview_ms']):>8} {fmt(m['thesis_ms']):>7} {m['dice_live_forest']:5.2f}   "
                          f"(stats {result['stats_ms']:.0f}, prepare {result['prepare_slice_ms']:.0f})", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    note = ("server-side ms with cached embeddings; best mode's per-slice features prepared once (prepare_slice_ms); "
            "live = core.live.live_click, image = ui.render overlay + JPEG, forest = core.live.refine_click, "
            "uncached = build_scorer + segment without the memo (features and PCA per click)")
    write_text(out, json.dumps({"results": results, "note": note}, indent=1, default=float), overwrite=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
