"""Each slice is embedded once per run (SliceEmbedder's in-memory memo), with or without the disk cache.

A counting backbone (the real filter bank, its forward pass wrapped) records which model inputs it embedded;
the model inputs of the stack's slices tell which slice each run was for.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter

import numpy as np
import pytest
import tifffile

from core.cli.main import main
from core.demo import make_demo
from core.features.backbones import FilterBankBackbone, load_backbone
from core.features.embedding import MEMO_BYTES, SliceEmbedder
from core.features.embedding_cache import EmbeddingCache
from core.io import open_stack
from core.preprocess import PreprocessConfig

#: (2, 2, 49) float32 embeddings at 28 px: 2 x 2 patches of 14 px, 1 + 8 x 6 filter-bank features, 4 bytes each.
SMALL = PreprocessConfig(image_size=28)
SMALL_NBYTES = 2 * 2 * 49 * 4


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()


@pytest.fixture
def forward_counts(monkeypatch):
    """Counter of the filter bank's forward passes, by digest of the (H, W) model input embedded."""
    counts: Counter = Counter()
    original = FilterBankBackbone._embed_images

    def counting(self, images01):
        for image in images01:
            counts[_digest(image)] += 1
        if getattr(counts, "delay_s", 0):
            time.sleep(counts.delay_s)  # widen the window in which a second thread could start the same slice
        return original(self, images01)

    monkeypatch.setattr(FilterBankBackbone, "_embed_images", counting)
    return counts


def runs_per_slice(counts: Counter, path, preprocess: PreprocessConfig) -> dict[int, int]:
    """{z: backbone runs} of the slices of channel 0 of `path` that were embedded (each input must be a slice)."""
    with open_stack(path) as stack:
        inputs = SliceEmbedder(stack, 0, load_backbone("filterbank"), preprocess, memo_bytes=0)
        slice_of = {_digest(inputs.model_input(z)): z for z in range(stack.shape[0])}
    assert len(slice_of) == stack.shape[0]  # every slice has its own model input
    assert set(counts) <= set(slice_of)
    return {slice_of[d]: n for d, n in sorted(counts.items(), key=lambda item: slice_of[item[0]])}


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory):
    """6 slices of 96 x 96 px (ZCYX TIFF: channel 0 image, channel 1 ground truth) and clicked points on z=2."""
    folder = tmp_path_factory.mktemp("embed_once")
    image, mask = make_demo(shape=(6, 96, 96), seed=3)
    path = folder / "small.tif"
    tifffile.imwrite(path, np.stack([image, mask.astype(np.uint16)], axis=1), imagej=True,
                     metadata={"axes": "ZCYX"})
    rows, cols = np.nonzero(mask[2])
    back_rows, back_cols = np.nonzero(mask[2] == 0)
    pick, pick_back = np.linspace(0, len(rows) - 1, 4).astype(int), np.linspace(0, len(back_rows) - 1, 4).astype(int)
    points = {"positive": [[int(cols[i]), int(rows[i]), 2] for i in pick],
              "negative": [[int(back_cols[i]), int(back_rows[i]), 2] for i in pick_back]}
    (folder / "points.json").write_text(json.dumps(points))
    return path


# ---- the CLI ------------------------------------------------------------------------------------------


def _prototype(stack, out, *cache_args) -> None:
    assert main(["prototype", str(stack), "--points", str(stack.parent / "points.json"), "--out", str(out),
                 "--channel", "0", "--backbone", "filterbank", "--mode", "thesis", "--option", "image_size=98",
                 *cache_args]) == 0


def test_apply_without_cache_embeds_each_slice_once(demo_stack, tmp_path, forward_counts, capsys):
    preprocess = PreprocessConfig(image_size=98)
    proto = tmp_path / "proto.npz"
    _prototype(demo_stack, proto, "--no-cache")
    assert runs_per_slice(forward_counts, demo_stack, preprocess) == {2: 1}  # the clicked slice
    forward_counts.clear()
    # z_sigma=1 smooths over z +- 2: slices 1 and 2 need 0..4, each embedded in the embed phase and read
    # back from memory by the mask phase
    assert main(["apply", str(demo_stack), "--prototype", str(proto), "--out", str(tmp_path / "masks.tif"),
                 "--channel", "0", "--z", "1,2", "--option", "z_sigma=1", "--no-cache"]) == 0
    assert runs_per_slice(forward_counts, demo_stack, preprocess) == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1}
    with tifffile.TiffFile(tmp_path / "masks.tif") as tif:
        assert tif.series[0].shape == (2, 96, 96)


def test_apply_with_cache_embeds_each_slice_once_then_never(demo_stack, tmp_path, forward_counts, capsys):
    preprocess = PreprocessConfig(image_size=98)
    cache = ["--cache", str(tmp_path / "cache")]
    proto = tmp_path / "proto.npz"
    _prototype(demo_stack, proto, *cache)
    apply = ["apply", str(demo_stack), "--prototype", str(proto), "--channel", "0", "--z", "0:6", *cache]
    assert main([*apply, "--out", str(tmp_path / "first.tif")]) == 0
    assert runs_per_slice(forward_counts, demo_stack, preprocess) == {z: 1 for z in range(6)}
    forward_counts.clear()
    assert main([*apply, "--out", str(tmp_path / "second.tif")]) == 0  # a new process would read the cache too
    assert forward_counts == {}
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "first.tif"), tifffile.imread(tmp_path / "second.tif"))


def test_evaluate_without_cache_embeds_each_slice_once(demo_stack, tmp_path, forward_counts, capsys):
    """Two seeds, same-slice and transfer: every evaluated slice is embedded once in all (before: 3 x per seed)."""
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(demo_stack), "--image-channel", "0", "--mask-channel", "1", "--backbone", "filterbank",
                 "--mode", "thesis", "--points", "5", "--seeds", "2", "--slices", "3", "--skip-ends", "1",
                 "--option", "image_size=98", "--no-cache", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    evaluated = payload["slices"]["small"]
    assert len(evaluated) == 3 and {"same-slice", "same-file"} <= {e["setting"] for e in payload["summary"]}
    assert runs_per_slice(forward_counts, demo_stack, PreprocessConfig(image_size=98)) == {z: 1 for z in evaluated}


# ---- the memo -----------------------------------------------------------------------------------------


def _small_embedder(path, **kwargs) -> SliceEmbedder:
    return SliceEmbedder(open_stack(path), 0, load_backbone("filterbank"), SMALL, **kwargs)


def test_memo_keeps_recent_slices_up_to_its_bytes(demo_stack, forward_counts):
    embedder = _small_embedder(demo_stack, memo_bytes=2 * SMALL_NBYTES)  # room for two slices
    first = embedder.embed(0)
    assert first.shape == (2, 2, 49) and first.nbytes == SMALL_NBYTES == embedder.embedding_nbytes
    embedder.embed(1)
    assert embedder.memo_slices() == [0, 1]
    assert embedder.embed(0) is first  # from memory, and now the most recently used
    assert embedder.memo_slices() == [1, 0]
    embedder.embed(2)  # a third slice: the least recently used (1) goes
    assert embedder.memo_slices() == [0, 2]
    assert runs_per_slice(forward_counts, demo_stack, SMALL) == {0: 1, 1: 1, 2: 1}
    embedder.embed(1)  # forgotten: embedded again
    assert runs_per_slice(forward_counts, demo_stack, SMALL) == {0: 1, 1: 2, 2: 1}
    assert embedder.memo_slices() == [2, 1]
    embedder.clear_memo()
    assert embedder.memo_slices() == [] and not embedder.is_cached(1)


def test_memo_one_byte_short_keeps_only_the_newest_and_zero_keeps_none(demo_stack, forward_counts):
    tight = _small_embedder(demo_stack, memo_bytes=2 * SMALL_NBYTES - 1)
    tight.embed(0)
    tight.embed(1)
    assert tight.memo_slices() == [1]
    tiny = _small_embedder(demo_stack, memo_bytes=1)  # smaller than one slice: the newest is still kept
    tiny.embed(3)
    assert tiny.memo_slices() == [3]
    off = _small_embedder(demo_stack, memo_bytes=0)
    off.embed(4)
    off.embed(4)
    assert off.memo_slices() == [] and not off.is_cached(4)
    assert runs_per_slice(forward_counts, demo_stack, SMALL) == {0: 1, 1: 1, 3: 1, 4: 2}
    assert _small_embedder(demo_stack).memo_bytes == MEMO_BYTES == 256 * 1024 * 1024
    with pytest.raises(ValueError, match="memo_bytes"):
        _small_embedder(demo_stack, memo_bytes=-1)


def test_embeddings_are_read_only_with_and_without_cache(demo_stack, tmp_path, forward_counts):
    plain = _small_embedder(demo_stack)
    assert not plain.is_cached(0)
    embedding = plain.embed(0)
    assert not embedding.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        embedding[0, 0, 0] = 1.0
    assert plain.is_cached(0)  # in memory, though there is no disk cache
    cached = _small_embedder(demo_stack, cache=EmbeddingCache(tmp_path / "cache"))
    fresh = cached.embed(0)
    assert not fresh.flags.writeable
    np.testing.assert_array_equal(fresh, embedding.astype(np.float16).astype(np.float32))  # as the cache returns it
    again = _small_embedder(demo_stack, cache=EmbeddingCache(tmp_path / "cache"))
    assert again.is_cached(0) and again.memo_slices() == []  # on disk only
    from_disk = again.embed(0)
    assert not from_disk.flags.writeable and np.array_equal(from_disk, fresh)
    assert runs_per_slice(forward_counts, demo_stack, SMALL) == {0: 2}  # once without, once into the cache


def test_two_threads_asking_for_one_slice_embed_it_once(demo_stack, forward_counts):
    embedder = _small_embedder(demo_stack)
    forward_counts.delay_s = 0.3
    barrier = threading.Barrier(2)
    results = []

    def ask():
        barrier.wait()
        results.append(embedder.embed(5))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runs_per_slice(forward_counts, demo_stack, SMALL) == {5: 1}
    assert results[0] is results[1]


def test_pixel_warm_up_runs_once_in_the_background(demo_stack):
    embedder = _small_embedder(demo_stack)
    assert embedder.warm_up_pixels(48) is True
    assert embedder.warm_up_pixels(48) is False  # already started
    mean, std = embedder.pixel_statistics(48)  # waits for the warm-up thread, then reuses its result
    assert embedder.pixel_statistics(48)[0] is mean
    assert mean.shape == std.shape == (49,) and np.all(std >= 0)
