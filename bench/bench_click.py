"""Click-to-heatmap latency with cached embeddings, per embedding dimension, slice size and mode.

What a click costs once the slice's embeddings are in the on-disk cache: read the embeddings, build the
prototypes from the points (and, in best mode, fit the pixel classifier), score the slice and threshold
it at full resolution. Embeddings are random arrays of each backbone's dimension written into a real
cache (the cost does not depend on their values); the slice is synthetic.

    .venv/bin/python bench/bench_click.py [--sizes 512 1024 3000] [--repeats 5]

Prints a table and writes bench/results/click.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import PipelineConfig  # noqa: E402
from core.features.embedding import SliceEmbedder  # noqa: E402
from core.features.embedding_cache import EmbeddingCache  # noqa: E402
from core.io import open_stack  # noqa: E402
from core.io.atomic import write_text  # noqa: E402
from core.pipeline import Scorer, build_prototype  # noqa: E402
from core.prototypes import PointSet  # noqa: E402

DIMS = {"dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024, "dinov2_vitg14": 1536, "filterbank": 49}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 3000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "click.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        cache = EmbeddingCache(Path(folder) / "cache")
        for size in args.sizes:
            path = Path(folder) / f"slice{size}.tif"
            yy, xx = np.mgrid[:size, :size]
            image = (1000 + 800 * (np.sin(xx / 25.0) > 0.6) + rng.normal(0, 50, (size, size))).astype(np.uint16)
            tifffile.imwrite(path, image[None])
            stack = open_stack(path)
            points = PointSet(
                np.column_stack([rng.integers(0, size, (5, 2)), np.zeros(5, int)]),
                np.column_stack([rng.integers(0, size, (5, 2)), np.zeros(5, int)]),
            )
            for name, dim in DIMS.items():
                for mode in ("thesis", "best"):
                    if mode == "best" and name != "filterbank" and size > 1024:
                        continue  # the pixel branch cost does not depend on the backbone
                    config = PipelineConfig.for_mode(mode)
                    backbone = CachedOnly(name, dim)
                    embedder = SliceEmbedder(stack, 0, backbone, config.preprocess, cache=cache)
                    cache.put(embedder.cache_key, 0, rng.normal(size=(70, 70, dim)).astype(np.float32))
                    if config.uses_pixels:
                        embedder.pixel_statistics(config.pixel_max_side)  # once per stack, not per click
                        embedder.pixel_filters(0, config.pixel_max_side)  # once per slice, not per click
                    times = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        prototype = build_prototype(embedder, points, config)
                        Scorer(prototype).segment(embedder, 0)
                        times.append(time.perf_counter() - start)
                    row = {"size": size, "backbone": name, "dim": dim, "mode": mode,
                           "median_ms": 1000 * float(np.median(times)), "min_ms": 1000 * float(np.min(times))}
                    rows.append(row)
                    print(f"{size:5d} px  {name:15s} D={dim:5d}  {mode:6s}  click->mask {row['median_ms']:8.1f} ms (min {row['min_ms']:.1f})",
                          flush=True)
            stack.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps({"rows": rows, "note": "cached embeddings; best mode includes fitting the pixel "
                                          "classifier; filter features of the slice and stack statistics precomputed"},
                                         indent=1), overwrite=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
