"""The z-chunk cache of .ims reads, the chunk decoder, region reads and slice previews.

Files are written by the independent test writer (helpers_io.write_ims) with hand-checkable values
(value = 1000 t + 100 c + 10 z + y + 3 x). Stacks get their own `ZChunkCache(..., min_block_bytes=0)` so
that tiny z-chunks are cached as large ones are in real files.
"""

from __future__ import annotations

import threading

import h5py
import numpy as np
import pytest
import tifffile

import core.io.chunks as chunks
import core.io.ims as ims
from core.errors import StackError
from core.io import open_stack
from core.io.chunks import ZChunkCache, decode_region
from core.io.ims import ImsStack
from core.io.preview import load_plane, preview_level, preview_plane, view_plane
from helpers_io import next_level, ramp_tczyx, write_ims


def _cache(max_bytes: int = 1 << 30) -> ZChunkCache:
    return ZChunkCache(max_bytes, min_block_bytes=0)


@pytest.fixture
def ramp(tmp_path):
    """(T=1, C=2, Z=10, Y=40, X=50) uint16 in (4, 16, 16) chunks: z-chunks {0..3}, {4..7}, {8, 9}; 2 levels."""
    data = ramp_tczyx(1, 2, 10, 40, 50)
    return write_ims(tmp_path / "ramp.ims", data, chunks=(4, 16, 16), n_levels=2), data


# ---- ZChunkCache -------------------------------------------------------------------------------------


def test_cache_keeps_least_recently_used_within_the_byte_bound():
    cache = ZChunkCache(300, min_block_bytes=10)
    a, b, c = (np.zeros(100, np.uint8) for _ in range(3))
    cache.put(("s", "a"), a)
    cache.put(("s", "b"), b)
    assert cache.get(("s", "a")) is a  # a becomes the most recent
    cache.put(("s", "c"), c)
    cache.put(("s", "d"), np.zeros(100, np.uint8))  # 400 bytes > 300: the least recent (b) goes
    assert ("s", "b") not in cache and ("s", "a") in cache and cache.nbytes == 300 and len(cache) == 3
    assert not a.flags.writeable  # cached arrays are shared, so read-only
    cache.put(("s", "huge"), np.zeros(301, np.uint8))  # alone larger than the bound: not kept
    assert ("s", "huge") not in cache and cache.nbytes == 300
    cache.max_bytes = 150
    assert cache.nbytes == 100 and len(cache) == 1
    assert cache.worth_caching(10) and cache.worth_caching(150)
    assert not cache.worth_caching(9) and not cache.worth_caching(151)
    assert not ZChunkCache(0).worth_caching(0)
    cache.put(("t", "x"), np.zeros(20, np.uint8))
    cache.discard("s")
    assert len(cache) == 1 and ("t", "x") in cache and cache.nbytes == 20


def test_default_cache_bound_is_768_mib_or_the_environment(monkeypatch):
    monkeypatch.setattr(chunks, "_default_cache", None)
    monkeypatch.delenv(chunks.CACHE_ENV, raising=False)
    assert chunks.default_chunk_cache().max_bytes == 768 * 2**20
    assert chunks.default_chunk_cache() is chunks.default_chunk_cache()
    monkeypatch.setattr(chunks, "_default_cache", None)
    monkeypatch.setenv(chunks.CACHE_ENV, "64")
    assert chunks.default_chunk_cache().max_bytes == 64 * 2**20
    monkeypatch.setattr(chunks, "_default_cache", None)  # the next test gets a fresh default


# ---- reading through the cache -----------------------------------------------------------------------


def test_a_plane_read_decodes_its_z_chunk_and_its_neighbours_are_free(ramp, monkeypatch):
    path, data = ramp
    with ImsStack(path, chunk_cache=_cache()) as stack:
        assert not stack.plane_is_cheap(5, 1)
        plane = stack.read_slice(5, 1)
        np.testing.assert_array_equal(plane, data[0, 1, 5])
        assert plane[0, 0] == 100 + 50 and plane[39, 49] == 100 + 50 + 39 + 147
        assert stack.chunk_cache.nbytes == 4 * 40 * 50 * 2  # z 4..7 of channel 1, unpadded
        assert stack.plane_is_cheap(7, 1) and not stack.plane_is_cheap(7, 0) and not stack.plane_is_cheap(8, 1)

        def no_reading(*args, **kwargs):
            raise AssertionError("a decoded z-chunk must not be read again")

        monkeypatch.setattr(ims, "decode_region", no_reading)
        monkeypatch.setattr(h5py.Dataset, "__getitem__", no_reading)
        for z in (4, 6, 7):
            np.testing.assert_array_equal(stack.read_slice(z, 1), data[0, 1, z])
        got = dict(stack.read_slices([7, 4], 1))
        np.testing.assert_array_equal(got[4], data[0, 1, 4])
        np.testing.assert_array_equal(stack.read_region(6, 1, rows=(3, 20), cols=(10, 11)), data[0, 1, 6, 3:20, 10:11])
        plane[:] = 0  # what a caller gets is its own
        np.testing.assert_array_equal(stack.read_slice(5, 1), data[0, 1, 5])


def test_last_partial_z_chunk_and_other_levels(ramp):
    path, data = ramp
    with ImsStack(path, chunk_cache=_cache()) as stack:
        np.testing.assert_array_equal(stack.read_slice(9, 0), data[0, 0, 9])
        np.testing.assert_array_equal(stack.read_slice(8, 0), data[0, 0, 8])
        level1 = next_level(data[0, 0])  # (5, 20, 25)
        for z in range(5):
            np.testing.assert_array_equal(stack.read_slice(z, 0, level=1), level1[z])
        assert stack.plane_is_cheap(4, 0, level=1)


def test_z_chunks_below_the_minimum_or_above_the_bound_are_read_plane_by_plane(ramp):
    path, data = ramp
    small = ZChunkCache(1 << 30)  # default minimum 8 MiB: these 16 kB z-chunks are not worth it
    with ImsStack(path, chunk_cache=small) as stack:
        np.testing.assert_array_equal(stack.read_slice(5, 0), data[0, 0, 5])
        assert len(small) == 0 and stack.plane_is_cheap(5, 0)
    bounded = ZChunkCache(1000, min_block_bytes=0)  # a z-chunk (16 kB) is larger than the bound
    with ImsStack(path, chunk_cache=bounded) as stack:
        np.testing.assert_array_equal(stack.read_slice(5, 0), data[0, 0, 5])
        assert len(bounded) == 0 and not stack.plane_is_cheap(5, 0)


def test_closing_a_stack_drops_its_z_chunks_from_a_shared_cache(ramp):
    path, _ = ramp
    shared = _cache()
    first, second = ImsStack(path, chunk_cache=shared), ImsStack(path, chunk_cache=shared)
    first.read_slice(0)
    second.read_slice(0)
    assert len(shared) == 2  # one per stack: keys carry the stack's own token
    first.close()
    assert len(shared) == 1 and second.plane_is_cheap(1)
    second.close()
    assert len(shared) == 0


def test_two_threads_wanting_one_z_chunk_decode_it_once(ramp, monkeypatch):
    path, data = ramp
    calls = []
    started = threading.Event()
    real = ims.decode_region

    def slow_decode(*args, **kwargs):
        calls.append(args[1])
        started.set()
        threading.Event().wait(0.2)  # the other thread asks meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(ims, "decode_region", slow_decode)
    with ImsStack(path, chunk_cache=_cache()) as stack:
        results = {}
        first = threading.Thread(target=lambda: results.setdefault(1, stack.read_slice(1)))
        first.start()
        started.wait(5)
        results[2] = stack.read_slice(2)
        first.join(5)
    assert calls == [(0, 0, 0)]
    np.testing.assert_array_equal(results[1], data[0, 0, 1])
    np.testing.assert_array_equal(results[2], data[0, 0, 2])


# ---- the decoder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("compression", ["gzip", "shuffle+gzip", "lz4", "none"])
def test_decoded_regions_equal_the_data(tmp_path, dtype, compression):
    data = ramp_tczyx(1, 1, 9, 37, 45, dtype=dtype)
    path = write_ims(tmp_path / "d.ims", data, chunks=(4, 16, 16), compression=compression)
    with h5py.File(path, "r") as f:
        dataset = f["DataSet/ResolutionLevel 0/TimePoint 0/Channel 0/Data"]
        for start, stop in [((0, 0, 0), (9, 37, 45)), ((3, 5, 17), (6, 33, 18)), ((8, 36, 44), (9, 37, 45))]:
            region = decode_region(dataset, start, stop, lock=threading.Lock(), what="test")
            expected = data[0, 0, start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
            assert region.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(region, expected)


def test_big_endian_data_and_chunks_never_written(tmp_path):
    path = tmp_path / "sparse.h5"
    with h5py.File(path, "w") as f:
        dataset = f.create_dataset("d", shape=(8, 32, 32), chunks=(4, 16, 16), dtype=">u2", compression="gzip",
                                   shuffle=True, fillvalue=7)
        dataset[0:4, 0:16, 0:16] = np.arange(4 * 16 * 16).reshape(4, 16, 16)
    with h5py.File(path, "r") as f:
        region = decode_region(f["d"], (2, 10, 10), (6, 20, 20), lock=threading.Lock(), what="test")
    assert region.dtype == np.dtype(">u2")
    expected = np.full((4, 10, 10), 7)
    expected[:2, :6, :6] = np.arange(4 * 16 * 16).reshape(4, 16, 16)[2:4, 10:16, 10:16]
    np.testing.assert_array_equal(region, expected)


def test_a_corrupt_chunk_names_the_file_and_the_planes(tmp_path):
    data = ramp_tczyx(1, 1, 8, 32, 32)
    path = write_ims(tmp_path / "bad.ims", data, chunks=(4, 32, 32))
    with h5py.File(path, "r") as f:
        offset = f["DataSet/ResolutionLevel 0/TimePoint 0/Channel 0/Data"].id.get_chunk_info_by_coord((4, 0, 0)).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    with ImsStack(path, chunk_cache=_cache()) as stack:
        np.testing.assert_array_equal(stack.read_slice(1), data[0, 0, 1])
        with pytest.raises(StackError, match=r"cannot read z=4\.\.7, channel 0, time point 0, level 0 of 'bad\.ims': "
                                             r"the file is truncated or corrupt"):
            stack.read_slice(5)
        with pytest.raises(StackError, match=r"cannot read z=6, channel 0, time point 0, level 0 of 'bad\.ims': the "
                                             r"file is truncated or corrupt"):
            stack.read_region(6, rows=(0, 4), cols=(0, 4))


# ---- region reads -----------------------------------------------------------------------------------


def test_region_reads_and_their_errors(ramp, tmp_path):
    path, data = ramp
    with ImsStack(path, chunk_cache=ZChunkCache(0)) as stack:  # no cache: only the chunks under the region
        region = stack.read_region(3, 1, rows=(15, 17), cols=(30, 33))
        np.testing.assert_array_equal(region, [[100 + 30 + 15 + 90, 100 + 30 + 15 + 93, 100 + 30 + 15 + 96],
                                               [100 + 30 + 16 + 90, 100 + 30 + 16 + 93, 100 + 30 + 16 + 96]])
        np.testing.assert_array_equal(stack.read_region(1, 0, rows=(0, 5), cols=(0, 12), level=1),
                                      next_level(data[0, 0])[1, :5, :12])
        with pytest.raises(StackError, match=r"rows 30\.\.40 requested but 'ramp\.ims' has rows 0\.\.39"):
            stack.read_region(0, rows=(30, 41), cols=(0, 1))
        with pytest.raises(StackError, match=r"columns 5\.\.4 requested but 'ramp\.ims' has columns 0\.\.49"):
            stack.read_region(0, rows=(0, 1), cols=(5, 5))
        with pytest.raises(StackError, match=r"slice z=10 requested but 'ramp\.ims' has z 0\.\.9"):
            stack.read_region(10, rows=(0, 1), cols=(0, 1))
        with pytest.raises(StackError, match=r"rows must be \(start, stop\) pixels, got 3"):
            stack.read_region(0, rows=3, cols=(0, 1))
    tif = tmp_path / "s.tif"
    tifffile.imwrite(tif, data[0, 0])
    with open_stack(tif) as stack:  # formats without chunks crop the plane
        np.testing.assert_array_equal(stack.read_region(7, rows=(2, 9), cols=(40, 50)), data[0, 0, 7, 2:9, 40:50])
        assert stack.plane_is_cheap(7)


# ---- previews ---------------------------------------------------------------------------------------


def test_preview_reads_the_coarsest_level_with_enough_pixels(ramp, tmp_path):
    path, data = ramp
    with ImsStack(path, chunk_cache=_cache()) as stack:  # levels: 40 x 50, 20 x 25
        assert [preview_level(stack, side) for side in (10, 25, 26, 50, 51)] == [1, 1, 0, 0, 0]
        plane, level = preview_plane(stack, 7, 25, 1)
        assert level == 1
        np.testing.assert_array_equal(plane, next_level(data[0, 1])[7 * 5 // 10])
        with pytest.raises(StackError, match=r"slice z=10 requested"):
            preview_plane(stack, 10, 25)
    tif = tmp_path / "s.tif"
    tifffile.imwrite(tif, data[0, 0])
    with open_stack(tif) as stack:
        plane, level = preview_plane(stack, 3, 25)
        assert level == 0
        np.testing.assert_array_equal(plane, data[0, 0, 3])


def test_view_plane_shows_a_preview_then_the_full_plane(ramp):
    path, data = ramp
    with ImsStack(path, chunk_cache=_cache()) as stack:
        view = view_plane(stack, 6, 1, max_side=20)
        assert not view.full and view.level == 1 and view.image.shape == (20, 25)
        np.testing.assert_array_equal(view.image, next_level(data[0, 1])[3])
        np.testing.assert_array_equal(view.loading.result(timeout=30), data[0, 1, 6])
        assert stack.plane_is_cheap(6, 1)
        again = view_plane(stack, 6, 1, max_side=20)
        assert again.full and again.level == 0 and again.loading is None
        np.testing.assert_array_equal(again.image, data[0, 1, 6])
        full = view_plane(stack, 1, 1, max_side=40)  # no coarser level has 40 px: the full plane at once
        assert full.full and full.level == 0
        np.testing.assert_array_equal(full.image, data[0, 1, 1])


def test_load_plane_returns_the_pending_request_and_checks_indices(ramp):
    path, data = ramp
    with ImsStack(path, chunk_cache=_cache()) as stack:
        with pytest.raises(StackError, match=r"channel 2 requested"):
            load_plane(stack, 0, 2)
        first = load_plane(stack, 9, 0)
        assert load_plane(stack, 9, 0) is first or first.done()
        np.testing.assert_array_equal(first.result(timeout=30), data[0, 0, 9])
