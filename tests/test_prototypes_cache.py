import json
import multiprocessing
import os

import numpy as np
import pytest

from core.config import PipelineConfig, Scoring
from core.features.embedding_cache import CacheKey, EmbeddingCache, file_signature
from core.errors import PrototypeError
from core.prototypes import (
    PointSet,
    Prototype,
    build_references,
    collect_examples,
    load_prototype,
    prototype_to_bytes,
    save_prototype,
)


def _prototype(dim=4, backbone="filterbank") -> Prototype:
    pos = np.eye(dim, dtype=np.float32)[:2]
    neg = np.eye(dim, dtype=np.float32)[2:3]
    return Prototype(
        positive_references=pos[:1],
        negative_references=neg,
        positive_examples=pos,
        negative_examples=neg,
        config=PipelineConfig.best(),
        backbone=backbone,
        weights_id="none",
        embed_dim=dim,
        points=PointSet(np.array([[1, 2, 0], [3, 4, 1]]), np.array([[5, 6, 0]])),
        source_file="/data/a.ims",
        channel=3,
        calibrated_threshold=0.125,
        intensity_range=(10.0, 200.0),
        created="2026-11-25T12:00:00",
    )


def test_points_json(tmp_path):
    path = tmp_path / "points.json"
    path.write_text(json.dumps({"positive": [[10, 20, 3], [11, 21, 4]], "negative": [[1, 2, 3]]}))
    points = PointSet.load(path)
    assert points.positive.tolist() == [[10, 20, 3], [11, 21, 4]]
    assert points.slices == [3, 4]
    pos, neg = points.on_slice(3)
    assert pos.tolist() == [[10, 20]] and neg.tolist() == [[1, 2]]


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not a readable JSON"),
        ('{"negative": [[1, 2, 3]]}', "'positive'"),
        ('{"positive": [[1, 2]]}', r"\[x, y, z\]"),
        ('{"positive": []}', "at least one positive"),
    ],
)
def test_points_json_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PrototypeError, match=message) as info:
        PointSet.load(path)
    assert "bad.json" in str(info.value)


def test_collect_examples_picks_the_clicked_patches():
    grid = np.zeros((2, 3, 3), np.float32)
    grid[0, 2] = [0, 0, 5]  # patch (row 0, col 2)
    grid[1, 0] = [0, 2, 0]
    points = PointSet(np.array([[25, 3, 0]]), np.array([[1, 12, 0]]))  # 30 x 20 slice, 10-px patches
    pos, neg = collect_examples(points, lambda z: grid, (20, 30))
    assert pos.tolist() == [[0, 0, 1]] and neg.tolist() == [[0, 1, 0]]


def test_collect_examples_rejects_points_outside():
    points = PointSet(np.array([[30, 3, 0]]))
    with pytest.raises(PrototypeError, match="outside the 30 x 20 slice"):
        collect_examples(points, lambda z: np.zeros((2, 3, 3)), (20, 30))


def test_references_by_scoring_method():
    examples = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    assert build_references(examples, PipelineConfig()).shape == (1, 2)
    assert build_references(examples, PipelineConfig().with_options(scoring="knn")).shape == (3, 2)
    assert build_references(examples, PipelineConfig().with_options(scoring="multi", n_prototypes=2)).shape == (2, 2)


def test_prototype_file_round_trip(tmp_path):
    proto = _prototype()
    path = save_prototype(proto, tmp_path / "p.npz")
    loaded = load_prototype(path, backbone="filterbank", embed_dim=4)
    assert np.array_equal(loaded.positive_examples, proto.positive_examples)
    assert np.array_equal(loaded.negative_references, proto.negative_references)
    assert loaded.points.positive.tolist() == [[1, 2, 0], [3, 4, 1]]
    assert loaded.config == proto.config
    assert loaded.calibrated_threshold == 0.125 and loaded.intensity_range == (10.0, 200.0)
    assert loaded.channel == 3 and loaded.source_file == "/data/a.ims"
    # The archive holds no pickled objects: numpy can read it with pickles disabled.
    with np.load(path, allow_pickle=False) as archive:
        assert json.loads(str(archive["metadata_json"]))["format_version"] == 1
    assert load_prototype(prototype_to_bytes(proto)).embed_dim == 4


def test_prototype_file_refuses_overwrite_and_checks_backbone(tmp_path):
    path = save_prototype(_prototype(), tmp_path / "p.npz")
    with pytest.raises(PrototypeError, match="already exists"):
        save_prototype(_prototype(), path)
    save_prototype(_prototype(), path, overwrite=True)
    with pytest.raises(PrototypeError, match="made with backbone 'filterbank' but 'dinov2_vits14'"):
        load_prototype(path, backbone="dinov2_vits14")
    with pytest.raises(PrototypeError, match="4-dimensional embeddings but the selected backbone gives 384"):
        load_prototype(path, embed_dim=384)


def test_prototype_file_rejects_other_files(tmp_path):
    bad = tmp_path / "x.npz"
    np.savez(bad, a=np.zeros(3))
    with pytest.raises(PrototypeError, match="not a Protoscope prototype file"):
        load_prototype(bad)
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PrototypeError, match="g.npz"):
        load_prototype(garbage)
    with pytest.raises(PrototypeError, match="not found"):
        load_prototype(tmp_path / "missing.npz")


def _key(path, backbone="b1"):
    return CacheKey(file_signature(path), channel=0, timepoint=0, backbone=backbone, preprocess="p")


def test_cache_round_trip_and_keys(tmp_path):
    data = tmp_path / "stack.tif"
    data.write_bytes(b"x" * 100)
    cache = EmbeddingCache(tmp_path / "cache")
    embedding = np.random.default_rng(0).normal(size=(5, 6, 8)).astype(np.float32)
    assert cache.get(_key(data), 3) is None
    cache.put(_key(data), 3, embedding)
    got = cache.get(_key(data), 3)
    assert got.dtype == np.float32 and got.shape == (5, 6, 8)
    assert np.array_equal(got, embedding.astype(np.float16).astype(np.float32))
    assert cache.cached_slices(_key(data)) == {3}
    assert cache.get(_key(data, backbone="b2"), 3) is None  # another backbone is another entry


def test_cache_ignores_stale_entries_after_the_file_changes(tmp_path):
    data = tmp_path / "stack.tif"
    data.write_bytes(b"x" * 100)
    cache = EmbeddingCache(tmp_path / "cache")
    old_key = _key(data)
    cache.put(old_key, 0, np.ones((2, 2, 2)))
    data.write_bytes(b"y" * 100)  # same size, new content and mtime
    os.utime(data, ns=(1, 1))
    assert _key(data) != old_key
    assert cache.get(_key(data), 0) is None


def test_cache_never_uses_a_mismatched_file(tmp_path):
    data = tmp_path / "stack.tif"
    data.write_bytes(b"x")
    cache = EmbeddingCache(tmp_path / "cache")
    key = _key(data)
    cache.put(key, 0, np.ones((2, 2, 2)))
    # Simulate a colliding file name holding another key, then a corrupt file.
    import h5py

    path = cache.directory / f"{key.digest()}.h5"
    with h5py.File(path, "a") as handle:
        handle.attrs["key"] = "something else"
    assert cache.get(key, 0) is None
    path.write_bytes(b"garbage")
    assert cache.get(key, 0) is None
    cache.put(key, 1, np.full((2, 2, 2), 2.0))  # replaces the broken file
    assert cache.get(key, 1)[0, 0, 0] == 2.0


def _writer(directory, path, z):
    cache = EmbeddingCache(directory)
    cache.put(_key(path), z, np.full((4, 4, 4), float(z)))


def test_cache_is_safe_with_several_processes(tmp_path):
    data = tmp_path / "stack.tif"
    data.write_bytes(b"x")
    directory = tmp_path / "cache"
    EmbeddingCache(directory)
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_writer, args=(directory, data, z)) for z in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    cache = EmbeddingCache(directory)
    assert cache.cached_slices(_key(data)) == {0, 1, 2, 3}
    assert all(cache.get(_key(data), z)[0, 0, 0] == z for z in range(4))


def test_cache_dir_not_writable(tmp_path):
    from core.errors import CacheError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="cannot create the embedding cache folder"):
        EmbeddingCache(blocker / "sub")
