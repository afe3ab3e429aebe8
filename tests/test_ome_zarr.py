"""The OME-Zarr mask output (core.io.ome_zarr): NGFF metadata that ome-zarr-py and zarr read back with the voxel
sizes, the pyramid, per-block marks, the identity check of a rerun, and the export to TIFF / OME-TIFF / Imaris."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from core.errors import OutputError, StackError
from core.io import VoxelSize, open_stack
from core.io.ome_zarr import (
    MaskStore,
    chunk_slices_for,
    export_masks,
    identity_differences,
    is_mask_store,
    pyramid_shapes,
)
from helpers_io import ramp_tczyx, write_ims

PROJECT = Path(__file__).resolve().parents[1]
IDENTITY = {"stack": "a.tif (100 bytes)", "prototype": "abc", "settings": {"z_sigma": 0.0, "mode": "best"}}


def make_store(path: Path, shape=(10, 300, 200), block_slices=4, voxel=VoxelSize(0.5, 0.25, 2.0), **kw) -> MaskStore:
    return MaskStore.create(path, shape_zyx=shape, block_slices=block_slices, identity=kw.pop("identity", IDENTITY),
                            settings={"z_values": list(range(shape[0]))}, voxel_size=voxel,
                            channel_name="Protoscope mask of CD31", blobs={"prototype": b"\x00\x01npz"}, **kw)


def test_pyramid_and_chunk_rules_by_hand():
    assert pyramid_shapes((300, 200)) == [(300, 200), (150, 100), (75, 50)]
    assert pyramid_shapes((100, 64)) == [(100, 64)]
    assert pyramid_shapes((2048, 1725))[-1] == (128, 108)
    assert [chunk_slices_for(n) for n in (1, 4, 10, 16, 32, 7, 9)] == [1, 4, 5, 8, 8, 7, 3]


def test_store_reads_back_through_ome_zarr_with_voxel_sizes_and_channel_name(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    store = make_store(tmp_path / "m.ome.zarr")
    masks = np.random.default_rng(0).random((4, 300, 200)) < 0.3
    store.write_slices(4, masks)  # block 1: slices 4..7
    node = next(iter(Reader(parse_url(str(tmp_path / "m.ome.zarr")))()))
    assert [axis["name"] for axis in node.metadata["axes"]] == ["c", "z", "y", "x"]
    assert node.metadata["axes"][1]["unit"] == "micrometer"
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    # z stays 2 µm at every level; y and x double: 0.25, 0.5, 1.0 and 0.5, 1.0, 2.0
    assert scales == [[1.0, 2.0, 0.25, 0.5], [1.0, 2.0, 0.5, 1.0], [1.0, 2.0, 1.0, 2.0]]
    assert node.metadata["channel_names"] == ["Protoscope mask of CD31"]
    assert [tuple(level.shape) for level in node.data] == [(1, 10, 300, 200), (1, 10, 150, 100), (1, 10, 75, 50)]
    level0 = np.asarray(node.data[0].compute(scheduler="synchronous"))[0]  # not a Client an earlier test left as default
    assert level0.dtype == np.uint8 and np.array_equal(level0[4:8] == 255, masks)
    assert not level0[:4].any() and not level0[8:].any()  # never written: zeros
    # level 2 is every 4th pixel of level 0
    assert np.array_equal(np.asarray(node.data[2].compute(scheduler="synchronous"))[0, 4:8], level0[4:8, ::4, ::4])
    # plain zarr: NGFF 0.4 is zarr format 2 with '/' chunk keys; chunks of 4 slices, 512-px tiles clipped
    group = zarr.open_group(str(tmp_path / "m.ome.zarr"), mode="r")
    assert group.attrs["multiscales"][0]["version"] == "0.4"
    assert group["0"].chunks == (1, 4, 300, 200) and json.loads((tmp_path / "m.ome.zarr/0/.zarray").read_text())[
        "dimension_separator"] == "/"
    again = MaskStore.open(tmp_path / "m.ome.zarr")
    assert again.voxel_size == VoxelSize(0.5, 0.25, 2.0) and again.read_blob("prototype") == b"\x00\x01npz"


def test_writes_must_be_whole_chunks_and_match_the_slice_size(tmp_path):
    store = make_store(tmp_path / "m.ome.zarr")
    with pytest.raises(ValueError, match="whole chunks"):
        store.write_slices(2, np.zeros((4, 300, 200), bool))
    with pytest.raises(ValueError, match="px"):
        store.write_slices(0, np.zeros((4, 30, 20), bool))
    store.write_slices(8, np.ones((2, 300, 200), bool))  # the last, short chunk reaches the end of the stack
    assert int(np.asarray(store.level(0)[8:10]).sum()) == 2 * 300 * 200 * 255


def test_block_marks_results_failures_and_run_record(tmp_path):
    store = make_store(tmp_path / "m.ome.zarr")
    assert store.layout.n_blocks == 3 and store.layout.block_range(2) == (8, 10)
    assert store.finished_blocks() == set() and store.run_state() == {}
    store.write_block_results(1, [5, -1, 7, 0], [0.5, np.nan, 0.25, 0.125])
    store.record_failure(1, "StackError: chunk 3 is corrupt")
    assert store.failures() == {1: "StackError: chunk 3 is corrupt"}
    store.mark_started(1, when=100.0)
    store.mark_finished(1, when=160.0)
    assert store.finished_blocks() == {1} and store.failures() == {}
    started, finished = store.block_times()
    assert started.tolist() == [0.0, 100.0, 0.0] and finished.tolist() == [0.0, 160.0, 0.0]
    area, threshold = store.areas()
    assert area.tolist() == [-1, -1, -1, -1, 5, -1, 7, 0, -1, -1]
    assert threshold[6] == 0.25 and np.isnan(threshold[5]) and np.isnan(threshold[0])
    store.set_run_state(run_id="r1", cancel=True, stack_path="/data/a.tif")
    assert store.set_run_state(cancel=None) == {"run_id": "r1", "stack_path": "/data/a.tif"}
    assert MaskStore.open(store.path).run_state() == {"run_id": "r1", "stack_path": "/data/a.tif"}


def test_resume_returns_the_same_run_and_refuses_another_naming_what_differs(tmp_path):
    out = tmp_path / "m.ome.zarr"
    assert MaskStore.resume(out, identity=IDENTITY, shape_zyx=(10, 300, 200)) is None  # nothing to resume
    store = make_store(out)
    (out / "0" / "0" / "0" / "0" / "0.abc.partial").parent.mkdir(parents=True, exist_ok=True)
    (out / "0" / "0" / "0" / "0" / "0.abc.partial").write_bytes(b"half a chunk")
    resumed = MaskStore.resume(out, identity=json.loads(json.dumps(IDENTITY)), shape_zyx=(10, 300, 200))
    assert resumed is not None and resumed.uid == store.uid
    assert not list(out.rglob("*.partial"))  # a killed writer's temp file is gone
    other = {**IDENTITY, "prototype": "def", "settings": {"z_sigma": 1.0, "mode": "best"}}
    with pytest.raises(OutputError) as refused:
        MaskStore.resume(out, identity=other, shape_zyx=(10, 300, 200))
    message = str(refused.value)
    assert "m.ome.zarr" in message and "prototype is abc there, def in this run" in message
    assert "settings z_sigma is 0.0 there, 1.0 in this run" in message and "--overwrite" in message
    with pytest.raises(OutputError, match=r"shape \(Z, Y, X\) is \[10, 300, 200\] there, \[12, 300, 200\]"):
        MaskStore.resume(out, identity=IDENTITY, shape_zyx=(12, 300, 200))
    assert MaskStore.resume(out, identity=other, shape_zyx=(10, 300, 200), overwrite=True) is None
    with pytest.raises(OutputError, match="already exists"):
        make_store(out)
    replaced = make_store(out, identity=other, overwrite=True)
    assert replaced.identity == other and replaced.finished_blocks() == set() and replaced.uid != store.uid


def test_a_folder_that_is_not_ours_is_never_replaced(tmp_path):
    folder = tmp_path / "results.ome.zarr"
    folder.mkdir()
    (folder / "keep.txt").write_text("data")
    assert not is_mask_store(folder)
    with pytest.raises(OutputError, match="not a Protoscope mask output"):
        make_store(folder, overwrite=True)
    with pytest.raises(OutputError, match="not a Protoscope mask output"):
        MaskStore.resume(folder, identity=IDENTITY, shape_zyx=(10, 300, 200))
    with pytest.raises(StackError, match="not a Protoscope"):
        MaskStore.open(folder)
    assert (folder / "keep.txt").read_text() == "data"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".~protoscope")]  # no temp folder left


def test_identity_differences_by_hand():
    assert identity_differences({"a": 1, "b": {"c": [1, 2]}}, {"a": 1, "b": {"c": (1, 2)}}) == []
    assert identity_differences({"a": 1}, {"a": 2, "n": "x"}) == ["a is 1 there, 2 in this run",
                                                                 'n is null there, x in this run']


def test_export_to_tiff_ome_tiff_and_an_imaris_copy(tmp_path):
    data = ramp_tczyx(1, 2, 9, 21, 34)
    source = write_ims(tmp_path / "src.ims", data, voxel_size_xyz=(0.5, 0.25, 2.0))
    store = MaskStore.create(tmp_path / "m.ome.zarr", shape_zyx=(9, 21, 34), block_slices=3, identity=IDENTITY,
                             voxel_size=VoxelSize(0.5, 0.25, 2.0), channel_name="Protoscope mask of Synthetic 0")
    masks = np.random.default_rng(1).random((9, 21, 34)) < 0.4
    store.write_slices(0, masks)
    tif = export_masks(store.path, tmp_path / "m.tif")
    with tifffile.TiffFile(tif) as handle:
        assert np.array_equal(handle.asarray() == 255, masks)
        assert handle.imagej_metadata["spacing"] == 2.0 and handle.pages[0].resolution == (2.0, 4.0)
    ome = export_masks(store.path, tmp_path / "m.ome.tif")
    with tifffile.TiffFile(ome) as handle:
        assert 'PhysicalSizeZ="2.0"' in handle.ome_metadata
        assert "Protoscope mask of Synthetic 0" in handle.ome_metadata
    copy = export_masks(store.path, tmp_path / "copy.ims", source_ims=source)
    with open_stack(copy) as stack:
        assert stack.shape == (9, 3, 21, 34) and stack.channel_names[2] == "Protoscope mask of Synthetic 0"
        assert np.array_equal(np.stack([stack.read_slice(z, 2) for z in range(9)]) == 255, masks)
    with pytest.raises(OutputError, match="already exists"):
        export_masks(store.path, tmp_path / "m.tif")


def test_cli_export_of_masks_and_its_refusals(tmp_path, capsys):
    from core.cli.main import main

    store = make_store(tmp_path / "m.ome.zarr", shape=(4, 40, 30), block_slices=2)
    diagonal = np.eye(40, 30, dtype=bool)[None].repeat(4, 0)
    store.write_slices(0, diagonal)
    done = subprocess.run([sys.executable, "-m", "core", "export", str(tmp_path / "m.ome.zarr"), "--out",
                           str(tmp_path / "m.h5")], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "4 slice(s) of 30x40" in done.stdout
    with h5py.File(tmp_path / "m.h5", "r") as handle:
        assert np.array_equal(handle["mask"][()] == 255, diagonal)
        assert handle["mask"].attrs["element_size_um"].tolist() == [2.0, 0.25, 0.5]
    for extra, expected in ((["--z", "0:2"], "exported whole"), (["--out", tmp_path / "c.ims"], "--source-ims"),
                            (["--out", tmp_path / "m.png"], "unknown extension")):
        args = [tmp_path / "m.ome.zarr", *(["--out", tmp_path / "x.tif"] if "--out" not in extra else []), *extra]
        assert main(["export", *map(str, args)]) == 2
        stderr = capsys.readouterr().err
        assert expected in stderr and len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
