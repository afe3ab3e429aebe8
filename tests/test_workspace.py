"""Workspaces (core.workspace, ui.workspace): the work on a sample saved as JSON + npz + safetensors, restored after
a reload, moved as one .zip, and never overwritten by a second session."""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import re
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import tifffile
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

import core.workspace as cw
import ui.workspace as uw
from core.batch import BatchResult
from core.config import PipelineConfig
from core.demo import make_demo
from core.features.backbones import load_backbone
from core.features.embedding import SliceEmbedder
from core.io import open_stack
from core.pipeline import build_prototype
from core.prototypes import PointSet, prototype_to_bytes
from core.workspace import (
    BatchRecord,
    SampleRef,
    Settings,
    StoredModel,
    StoredPrototype,
    Workspace,
    WorkspaceConflict,
    WorkspaceError,
    acquire_lease,
    export_workspace,
    find_workspaces,
    import_workspace,
    load_workspace,
    read_lease,
    release_lease,
    repoint_sample,
    save_workspace,
)
from ui.batch import BatchOutputs
from ui.refine import TrainedModel
from ui import testing
from ui.state import BackboneChoice, Sample, SavedPrototype, Truth, stack_id


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-slice 64 x 64 ZCYX TIFF (channel 0 image, 1 truth) and a real filterbank prototype from 2 clicks on z=1."""
    folder = tmp_path_factory.mktemp("ws_sample")
    image, mask = make_demo(shape=(3, 64, 64), seed=3)
    path = folder / "tiny.tif"
    tifffile.imwrite(path, np.stack([image, mask.astype(np.uint16)], axis=1), imagej=True, metadata={"axes": "ZCYX"})
    ys, xs = np.nonzero(mask[1])
    yn, xn = np.nonzero(mask[1] == 0)
    points = PointSet(np.array([[xs[0], ys[0], 1]]), np.array([[xn[0], yn[0], 1]]))
    config = PipelineConfig.thesis().with_options(image_size=98)
    with open_stack(path) as stack:
        prototype = build_prototype(SliceEmbedder(stack, 0, load_backbone("filterbank"), config.preprocess), points,
                                    config)
    return path, prototype, prototype_to_bytes(prototype)


MODEL_WEIGHTS = np.arange(6, dtype=np.float32).reshape(2, 3)
MODEL_BYTES = save_safetensors({"w": MODEL_WEIGHTS}, metadata={"protoscope.refiner": "{}"})


def work(tiny, ws_id="a1b2c3d4e5f60718", **changes) -> Workspace:
    path, _, data = tiny
    ws = Workspace(
        id=ws_id,
        sample=SampleRef.of(path, name="tiny.tif", channel=0, truth_channel=1),
        settings=Settings("thesis", {"negative_weight": 0.5}, {"name": "filterbank", "weights": "hub", "seed": 0},
                          {"segment.th_top": 5.0}),
        points={0: {1: [[10, 12, 1], [40, 41, -1]], 2: [[3, 4, 1]]}},
        prototypes=(StoredPrototype("vessels", data, "sid0"),),
        models=(StoredModel("unet", MODEL_BYTES, {"summary": "1 epoch", "input_set": "raw"}),),
        batch=BatchRecord("tiny.tif", BatchResult([1, 2], [10, 20], [0.5, 0.25], 0.25, 2.0), "/out",
                          {"csv": "/out/a.csv"}, "top:10"),
    )
    return dataclasses.replace(ws, **changes)


# ---- save and load ------------------------------------------------------------------------------------------


def test_round_trip_keeps_every_part_of_the_work(tmp_path, tiny):
    _, prototype, data = tiny
    saved = save_workspace(work(tiny), tmp_path, now=1000.0)
    assert (saved.revision, saved.created, saved.modified) == (1, 1000.0, 1000.0)
    folder = tmp_path / saved.id
    sha = saved.prototypes[0].sha256
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        f"models/{saved.models[0].sha256}.safetensors", f"prototypes/{sha}.npz", "workspace.json"]
    document = json.loads((folder / "workspace.json").read_text())
    assert document["schema_version"] == 1 and document["points"] == {"0": {"1": [[10, 12, 1], [40, 41, -1]],
                                                                             "2": [[3, 4, 1]]}}

    back = load_workspace(tmp_path, saved.id)
    assert back.revision == 1 and back.sample == saved.sample and back.settings == saved.settings
    assert back.points == {0: {1: ((10, 12, 1), (40, 41, -1)), 2: ((3, 4, 1),)}}
    points = back.point_set(0)
    assert points.positive.tolist() == [[10, 12, 1], [3, 4, 2]] and points.negative.tolist() == [[40, 41, 1]]
    restored = back.prototypes[0].prototype()
    np.testing.assert_array_equal(restored.positive_examples, prototype.positive_examples)
    assert restored.calibrated_threshold == prototype.calibrated_threshold and back.prototypes[0].data == data
    np.testing.assert_array_equal(load_safetensors(back.models[0].data)["w"], MODEL_WEIGHTS)
    assert back.models[0].metadata == {"summary": "1 epoch", "input_set": "raw"}
    assert back.batch.result.rows() == saved.batch.result.rows()
    assert back.batch.result.volume_um3 == (10 + 20) * 0.25 * 2.0  # 15 µm³
    assert back.batch.files == {"csv": "/out/a.csv"} and back.sample_status == "ok"


def test_saves_are_incremental_and_files_of_deleted_work_go(tmp_path, tiny, monkeypatch):
    saved = save_workspace(work(tiny), tmp_path)
    written = []
    original = cw.write_bytes
    monkeypatch.setattr(cw, "write_bytes", lambda path, data, **kw: written.append(path.name) or original(path, data,
                                                                                                          **kw))
    more = dataclasses.replace(saved, points={0: {1: [[1, 1, 1]]}})
    saved = save_workspace(more, tmp_path)
    assert written == []  # the prototype and the model files were already there: only workspace.json changed
    assert load_workspace(tmp_path, saved.id).points == {0: {1: ((1, 1, 1),)}}
    saved = save_workspace(dataclasses.replace(saved, prototypes=()), tmp_path)
    assert list((tmp_path / saved.id / "prototypes").iterdir()) == []


def test_a_crash_mid_save_leaves_the_previous_workspace(tmp_path, tiny, monkeypatch):
    saved = save_workspace(work(tiny), tmp_path)
    before = (tmp_path / saved.id / "workspace.json").read_text()
    real = pathlib.Path.write_bytes

    def power_cut(self, data):
        if self.name.endswith("workspace.json"):
            real(self, data[: len(data) // 2])  # half the new text reaches the disk
            raise KeyboardInterrupt("power cut")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", power_cut)
    with pytest.raises(KeyboardInterrupt):
        save_workspace(dataclasses.replace(saved, points={}), tmp_path)
    monkeypatch.undo()
    assert (tmp_path / saved.id / "workspace.json").read_text() == before
    assert [p.name for p in (tmp_path / saved.id).iterdir() if p.name.startswith(".")] == []  # no temp left
    assert load_workspace(tmp_path, saved.id).points[0][2] == ((3, 4, 1),)


@pytest.mark.parametrize("content, phrase", [
    ("{not json", "is not valid JSON"),
    ('{"format": "something-else", "schema_version": 1}', "is not a Protoscope workspace"),
    ('{"format": "protoscope-workspace", "schema_version": 99}', "newer Protoscope (workspace schema 99"),
    ('{"format": "protoscope-workspace", "schema_version": 1, "id": "a1b2c3d4e5f60718", "prototypes": [{}]}',
     "is damaged (missing 'file')"),
])
def test_a_bad_workspace_json_is_a_clear_error_naming_the_file(tmp_path, content, phrase):
    (tmp_path / "a1b2c3d4e5f60718").mkdir()
    (tmp_path / "a1b2c3d4e5f60718" / "workspace.json").write_text(content)
    with pytest.raises(WorkspaceError, match=re.escape(phrase)) as info:
        load_workspace(tmp_path, "a1b2c3d4e5f60718")
    assert "a1b2c3d4e5f60718/workspace.json" in str(info.value)


def test_unknown_ids_damaged_files_and_newer_schemas_are_refused(tmp_path, tiny):
    with pytest.raises(WorkspaceError, match="does not exist"):
        load_workspace(tmp_path, "0123456789abcdef")
    with pytest.raises(WorkspaceError, match="not a workspace id"):
        load_workspace(tmp_path, "../../etc")
    saved = save_workspace(work(tiny), tmp_path)
    npz = tmp_path / saved.id / "prototypes" / f"{saved.prototypes[0].sha256}.npz"
    npz.write_bytes(npz.read_bytes()[:-1] + b"!")
    with pytest.raises(WorkspaceError, match="does not match its recorded SHA-256"):
        load_workspace(tmp_path, saved.id)
    newer = tmp_path / saved.id / "workspace.json"
    newer.write_text(json.dumps({**json.loads(newer.read_text()), "schema_version": 2}))
    text = newer.read_text()
    with pytest.raises(WorkspaceError, match="newer Protoscope"):
        save_workspace(saved, tmp_path)  # never overwrites what a newer version wrote
    assert newer.read_text() == text


def test_find_workspaces_lists_a_samples_work_newest_first(tmp_path, tiny):
    older = save_workspace(work(tiny, "aaaaaaaa00000001"), tmp_path, now=100.0)
    newer = save_workspace(work(tiny, "aaaaaaaa00000002", points={0: {0: [[1, 2, 1]]}}), tmp_path, now=200.0)
    other = tmp_path / "other.tif"
    other.write_bytes(b"x")
    save_workspace(work(tiny, "aaaaaaaa00000003", sample=SampleRef.of(other)), tmp_path, now=300.0)
    found = find_workspaces(tmp_path, tiny[0])
    assert [(f.id, f.modified) for f in found] == [(newer.id, 200.0), (older.id, 100.0)]
    assert found[1].summary == "tiny.tif · 3 points on 2 slices · 1 prototype · 1 model · batch of 2 slices"
    assert found[0].summary.startswith("tiny.tif · 1 point on 1 slice")


# ---- export and import --------------------------------------------------------------------------------------


def test_export_import_moves_the_work_under_a_new_id(tmp_path, tiny):
    ws = save_workspace(work(tiny), tmp_path / "here")
    data = export_workspace(ws)
    assert data == export_workspace(ws)  # the same work exports to the same bytes
    assert sorted(zipfile.ZipFile(io.BytesIO(data)).namelist()) == sorted(
        ["workspace.json", f"prototypes/{ws.prototypes[0].sha256}.npz", f"models/{ws.models[0].sha256}.safetensors"])
    there = import_workspace(data, tmp_path / "there")
    assert there.id != ws.id and there.revision == 1 and (tmp_path / "there" / there.id / "workspace.json").is_file()
    assert there.points == ws.points and there.prototypes[0].data == ws.prototypes[0].data
    assert there.models[0].data == MODEL_BYTES and there.sample_status == "ok"


def test_an_imported_sample_that_is_elsewhere_is_flagged_and_repointed(tmp_path, tiny):
    moved = work(tiny, sample=SampleRef("/nowhere/on/this/machine/tiny.tif", "tiny.tif", size=5, mtime_ns=1))
    there = import_workspace(export_workspace(moved), tmp_path)
    assert there.sample_status == "missing"
    repointed = repoint_sample(there, tiny[0])
    assert repointed.sample_status == "ok" and repointed.sample.path == str(tiny[0].resolve())
    assert repointed.sample.channel == 0 and repointed.points == there.points


def _archive(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _members(ws: Workspace) -> dict[str, bytes]:
    archive = zipfile.ZipFile(io.BytesIO(export_workspace(ws)))
    return {name: archive.read(name) for name in archive.namelist()}


class _Touch:
    """Unpickling this creates the file ``path``: proof that a pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_hostile_archives_are_refused_with_clear_errors(tmp_path, tiny):
    ws = work(tiny)
    good = _members(ws)
    document = json.loads(good["workspace.json"])
    root = tmp_path / "root"

    def refused(members: dict[str, bytes], phrase: str, **kw) -> None:
        with pytest.raises(WorkspaceError, match=phrase):
            import_workspace(_archive(members), root, name="'evil.zip'", **kw)

    refused({**good, "../x": b"escape"}, r"'evil.zip': member '\.\./x' points outside the workspace")
    refused({**good, "/etc/x": b"escape"}, "points outside the workspace")
    refused({**good, "notes.txt": b"hi"}, "unexpected member 'notes.txt'")
    refused({k: v for k, v in good.items() if k != "workspace.json"}, "no workspace.json inside")
    newer = {**document, "schema_version": 7}
    refused({**good, "workspace.json": json.dumps(newer).encode()}, "newer Protoscope")
    refused({**good, "workspace.json": b'{"format": "other"}'}, "is not a Protoscope workspace")
    npz_name = f"prototypes/{ws.prototypes[0].sha256}.npz"
    refused(good, f"member '{npz_name}' is .* over the 0.0 MB limit", max_member_bytes=len(good[npz_name]) - 1)

    marker = tmp_path / "pickle-ran"
    arrays = dict(np.load(io.BytesIO(tiny[2])))
    arrays["points_positive"] = np.array([_Touch(marker)], dtype=object)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    evil = StoredPrototype("vessels", buffer.getvalue())
    members = _members(dataclasses.replace(ws, prototypes=(evil,)))
    refused(members, "holds Python objects \\(a pickle\\)")
    assert not marker.exists()
    with pytest.raises(WorkspaceError, match="not a workspace file \\(not a .zip\\)"):
        import_workspace(b"PK not really", root)
    assert not root.exists() or list(root.iterdir()) == []  # nothing refused was written


# ---- leases ---------------------------------------------------------------------------------------------------


def test_a_second_owner_gets_a_conflict_until_the_lease_is_stale(tmp_path):
    ws_id = "b1b2b3b4b5b6b7b8"
    first = acquire_lease(tmp_path, ws_id, "tab-A", now=1000.0, ttl_s=30)
    assert (first.owner, first.since) == ("tab-A", 1000.0)
    with pytest.raises(WorkspaceConflict) as info:
        acquire_lease(tmp_path, ws_id, "tab-B", now=1020.0, ttl_s=30)
    since = time.strftime("%H:%M", time.localtime(1000.0))
    assert str(info.value) == (f"workspace {ws_id} is open in another tab or session since {since}; open it "
                               "read-only, take it over, or start a new workspace")
    assert info.value.lease.owner == "tab-A"
    renewed = acquire_lease(tmp_path, ws_id, "tab-A", now=1025.0)
    assert (renewed.heartbeat, renewed.since) == (1025.0, 1000.0)
    taken = acquire_lease(tmp_path, ws_id, "tab-B", now=1025.0 + 31, ttl_s=30)  # A's heartbeat is 31 s old
    assert read_lease(tmp_path, ws_id).owner == "tab-B" and taken.since == 1056.0
    # a liveness probe overrides the heartbeat both ways
    with pytest.raises(WorkspaceConflict):
        acquire_lease(tmp_path, ws_id, "tab-C", now=5000.0, is_alive=lambda lease: True)
    acquire_lease(tmp_path, ws_id, "tab-C", now=1057.0, is_alive=lambda lease: False)
    assert acquire_lease(tmp_path, ws_id, "tab-D", now=1058.0, take_over=True).owner == "tab-D"
    assert not release_lease(tmp_path, ws_id, "tab-C") and release_lease(tmp_path, ws_id, "tab-D")
    assert read_lease(tmp_path, ws_id) is None


def test_a_lease_of_a_server_that_stopped_is_free_at_once(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    acquire_lease(tmp_path, "c1c2c3c4c5c6c7c8", "old-server-tab", now=time.time())
    lease_file = tmp_path / "c1c2c3c4c5c6c7c8" / "lease.json"
    lease_file.write_text(json.dumps({**json.loads(lease_file.read_text()), "pid": dead_pid}))
    assert acquire_lease(tmp_path, "c1c2c3c4c5c6c7c8", "new-tab").owner == "new-tab"


def test_a_session_that_lost_its_lease_cannot_save(tmp_path, tiny):
    mine = save_workspace(work(tiny), tmp_path, owner="tab-A")
    acquire_lease(tmp_path, mine.id, "tab-B", take_over=True)
    text = (tmp_path / mine.id / "workspace.json").read_text()
    with pytest.raises(WorkspaceConflict, match="open in another tab or session"):
        save_workspace(dataclasses.replace(mine, points={}), tmp_path, owner="tab-A")
    theirs = save_workspace(dataclasses.replace(load_workspace(tmp_path, mine.id), points={0: {0: [[9, 9, 1]]}}),
                            tmp_path, owner="tab-B")
    release_lease(tmp_path, mine.id, "tab-B")
    with pytest.raises(WorkspaceConflict, match=r"saved by another tab or session since .* \(revision 2, this session "
                                                r"has 1\)"):
        save_workspace(dataclasses.replace(mine, points={}), tmp_path, owner="tab-A")  # the lease is free, but stale
    assert load_workspace(tmp_path, mine.id).points == theirs.points
    assert text != (tmp_path / mine.id / "workspace.json").read_text()


# ---- the app's session <-> workspace (plain dicts for st.session_state and st.query_params) -------------------


@pytest.fixture
def session(tiny):
    path, prototype, data = tiny
    sample = str(path.resolve())
    result = BatchResult([1], [7], [0.5], 0.25, 2.0)
    return {
        "home.sample": Sample(sample, "path", "tiny.tif"),
        "home.channel": 0, "_w.home.channel": 0,
        "home.truth": Truth(channel=1), "home.truth_kind": "A channel of this stack",
        "_w.home.truth_kind": "A channel of this stack", "home.truth_channel": 1, "_w.home.truth_channel": 1,
        "home.mode": "thesis", "_w.home.mode": "thesis", "home.source": "Synthetic demo", "_w.home.source": "x",
        "home.options": {"negative_weight": 0.5, "threshold": None},
        "home.backbone": BackboneChoice("filterbank"),
        "segment.points": {stack_id(sample, 0): {1: [[5, 6, 1], [7, 8, -1]]}, stack_id("/other.tif", 0): {0: [[1, 1, 1]]}},
        "segment.th_top": 5.0, "_w.segment.th_top": 5.0,
        "segment.prototypes": [SavedPrototype("vessels", prototype, data, stack_id(sample, 0))],
        "refine.models": [TrainedModel("unet", MODEL_BYTES, "1 epoch", "raw")],
        "batch.result": BatchOutputs("tiny.tif", result, "/out", {"csv": "/out/a.csv"}, b"png", "top:10"),
        "segment.generation": 0,
    }


def test_snapshot_takes_the_samples_work_from_the_session(session):
    ws = uw.snapshot_from_session(session, "d1d2d3d4d5d6d7d8")
    assert ws.sample.path == session["home.sample"].path and (ws.sample.channel, ws.sample.truth_channel) == (0, 1)
    assert ws.points == {0: {1: ((5, 6, 1), (7, 8, -1))}}  # not the other stack's points
    assert ws.settings.mode == "thesis" and ws.settings.options == {"negative_weight": 0.5, "threshold": None}
    assert ws.settings.ui == {"home.channel": 0, "home.mode": "thesis", "home.truth_channel": 1,
                              "home.truth_kind": "A channel of this stack", "segment.th_top": 5.0}
    assert ws.settings.backbone == {"name": "filterbank", "weights": "hub", "seed": 0}
    assert [p.name for p in ws.prototypes] == ["vessels"] and ws.models[0].metadata["input_set"] == "raw"
    assert ws.batch.result.area_px == [7] and ws.batch.files == {"csv": "/out/a.csv"}


def test_autosave_then_a_reload_restores_the_work(tmp_path, session, monkeypatch):
    params = {}
    assert uw.restore_on_start(session, params, tmp_path) == "new"
    ws_id = params["ws"]
    assert uw.autosave(session, params, tmp_path) == "saved"
    assert uw.autosave(session, params, tmp_path) == "unchanged"  # same digest: nothing written
    session["segment.points"][stack_id(session["home.sample"].path, 0)][2] = [[30, 31, 1]]
    assert uw.autosave(session, params, tmp_path) == "saved" and load_workspace(tmp_path, ws_id).revision == 2

    # the reload: a new, empty session with the URL's ?ws=; the old session has disconnected
    monkeypatch.setattr(uw, "session_alive", lambda lease: False if lease.owner == session["workspace.owner"] else None)
    fresh, url = {}, {"ws": ws_id}
    assert uw.restore_on_start(fresh, url, tmp_path) == "restored"
    assert fresh["workspace.id"] == ws_id and fresh["workspace.revision"] == 2 and url == {"ws": ws_id}
    assert fresh["home.sample"] == session["home.sample"] and fresh["home.truth"] == Truth(channel=1)
    sid = stack_id(session["home.sample"].path, 0)
    assert fresh["segment.points"] == {sid: {1: [[5, 6, 1], [7, 8, -1]], 2: [[30, 31, 1]]}}
    assert fresh["segment.generation"] == 1  # the canvases are drawn afresh with the restored points
    assert (fresh["_w.segment.th_top"], fresh["_w.home.mode"], fresh["home.options_mode"]) == (5.0, "thesis", "thesis")
    assert "_w.home.source" not in fresh and fresh["home.options"] == {"negative_weight": 0.5, "threshold": None}
    restored = fresh["segment.prototypes"][0]
    assert restored.name == "vessels" and restored.data == session["segment.prototypes"][0].data
    np.testing.assert_array_equal(restored.prototype.positive_examples,
                                  session["segment.prototypes"][0].prototype.positive_examples)
    assert fresh["refine.models"][0] == TrainedModel("unet", MODEL_BYTES, "1 epoch", "raw")
    assert fresh["batch.result"].result.area_px == [7] and fresh["batch.result"].files == {"csv": "/out/a.csv"}
    assert fresh["home.backbone"] == BackboneChoice("filterbank")
    assert uw.autosave(fresh, url, tmp_path) == "saved"  # its own first save (same work, fresh digest)


def test_a_second_tab_on_the_same_workspace_is_asked_and_never_overwrites(tmp_path, session):
    params = {}
    uw.restore_on_start(session, params, tmp_path)
    uw.autosave(session, params, tmp_path)
    other, url = {}, dict(params)
    assert uw.restore_on_start(other, url, tmp_path) == "blocked"  # the first tab is live
    assert "is open in another tab or session since" in other["workspace.conflict"]
    assert other.get("home.sample") is None and uw.autosave(other, url, tmp_path) == "blocked"

    uw.take_over(other, url, tmp_path)  # the second tab loads the saved work and holds it
    assert other["workspace.mode"] == "owner" and other["segment.prototypes"][0].name == "vessels"
    other["segment.points"][stack_id(other["home.sample"].path, 0)] = {0: [[2, 2, 1]]}
    assert uw.autosave(other, url, tmp_path) == "saved"
    session["segment.points"][stack_id(session["home.sample"].path, 0)] = {}
    assert uw.autosave(session, params, tmp_path) == "conflict"  # the first tab lost it: nothing written
    assert load_workspace(tmp_path, params["ws"]).points == {0: {0: ((2, 2, 1),)}}
    uw.start_new(session, params, tmp_path)  # the first tab keeps its own work under a new id
    assert params["ws"] != url["ws"] and uw.autosave(session, params, tmp_path) == "saved"
    assert load_workspace(tmp_path, params["ws"]).points == {}


def test_opening_a_sample_again_resumes_its_workspace(tmp_path, session, tiny):
    params = {}
    uw.restore_on_start(session, params, tmp_path)
    uw.autosave(session, params, tmp_path)
    first_id = params["ws"]
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, np.zeros((2, 8, 8), np.uint16))
    session["home.sample"] = Sample(str(other), "path", "other.tif")  # the tab opens another stack
    assert uw.restore_on_start(session, params, tmp_path) == "new" and params["ws"] != first_id
    assert read_lease(tmp_path, first_id) is None  # the first sample's workspace is free for others now

    later, url = {"home.sample": Sample(str(tiny[0].resolve()), "path", "tiny.tif"), "home.channel": 2}, {}
    assert uw.restore_on_start(later, url, tmp_path) == "resumed"  # a new tab opens the first sample again
    assert url["ws"] == first_id and later["home.channel"] == 0 and later["home.truth"] == Truth(channel=1)
    assert later["segment.points"][stack_id(str(tiny[0].resolve()), 0)] == {1: [[5, 6, 1], [7, 8, -1]]}
    assert [p.name for p in later["segment.prototypes"]] == ["vessels"]


# ---- in Streamlit (AppTest): the URL keeps the id, a second tab is asked, the panel's buttons work --------------


def _app_script():
    import os

    import streamlit as st

    from ui import home, state, workspace

    state.init()
    workspace.restore_on_start()
    if st.button("Open", key="test.open"):
        home.open_sample(os.environ["WS_TEST_SAMPLE"], "path")
        state.set_slice_points(state.stack_id(state.get("home.sample").path, 0), 1, [[5, 6, 1]])
        st.rerun()
    st.markdown(f"points: {state.point_summary(state.stack_id(state.get('home.sample').path, 0)) if state.get('home.sample') else None}")
    workspace.autosave()


def test_in_streamlit_the_url_keeps_the_workspace_and_a_second_tab_is_asked(tmp_path, tiny, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PROTOSCOPE_WORKSPACES", str(tmp_path / "ws"))
    monkeypatch.setenv("WS_TEST_SAMPLE", str(tiny[0]))
    first = AppTest.from_function(_app_script, default_timeout=60)
    first.session_state["workspace.owner"] = "first-tab"  # AppTest gives every session the same Streamlit id
    first.run()
    ws_id = first.query_params["ws"][0] if isinstance(first.query_params["ws"], list) else first.query_params["ws"]
    first.button(key="test.open").click().run()
    assert not first.exception
    assert (tmp_path / "ws" / ws_id / "workspace.json").is_file()
    assert any("Saved" in c.value for c in first.sidebar.caption)
    assert load_workspace(tmp_path / "ws", ws_id).points == {0: {1: ((5, 6, 1),)}}

    second = AppTest.from_function(_app_script, default_timeout=60)
    second.query_params["ws"] = ws_id
    second.session_state["workspace.owner"] = "second-tab"
    second.run()
    assert not second.exception
    assert any("is open in another tab or session" in w.value for w in second.warning)
    second.button(key="workspace.take_over").click().run()
    assert not second.exception and not second.warning
    assert any("'positive': 1" in m.value for m in second.markdown)  # the first tab's point, restored
    assert read_lease(tmp_path / "ws", ws_id).owner == "second-tab"
    points = first.session_state["segment.points"]
    points[next(iter(points))] = {2: [[9, 9, -1]]}
    first.session_state["segment.points"] = points
    first.run()  # the first tab's next change: it lost the workspace, so nothing is written and it is told so
    assert any("another tab took this workspace over" in c.value for c in first.sidebar.caption)
    assert load_workspace(tmp_path / "ws", ws_id).points == {0: {1: ((5, 6, 1),)}}
    first.run()
    assert any("is open in another tab or session" in w.value for w in first.warning)


# ---- the app (app.py wires restore_on_start and autosave): a reloaded tab gets its work back ------------------
# AppTest runs app.py only on the Open sample page (switch_page runs the page's own file), so these tests come back
# to it to save; the real browser test (tests/test_browser.py) reloads mid-work on the Segment page.


def _reloaded(at, timeout: float = 300):
    """A new AppTest session on app.py with the first one's address (?ws=): what a browser reload makes."""
    from streamlit.testing.v1 import AppTest

    ws = at.query_params["ws"]
    again = AppTest.from_file(str(testing.PROJECT_ROOT / "app.py"), default_timeout=timeout)
    again.query_params["ws"] = ws if isinstance(ws, str) else ws[0]
    return again.run()


def test_the_app_restores_a_reloaded_tab(tmp_path_factory, tmp_path, monkeypatch):
    at = testing.demo_with_saved_prototype(tmp_path_factory.getbasetemp(), tmp_path / "out", monkeypatch, 12)
    testing.set_mode(at, "thesis")
    testing.goto(at, "home")  # app.py's autosave
    assert not at.exception
    assert any(c.value.startswith("Saved ") and "workspace" in c.value for c in at.sidebar.caption)
    assert any(b.label == "Export workspace (.zip)" for b in at.sidebar.get("download_button"))

    again = _reloaded(at)
    assert not again.exception and not again.warning
    assert again.session_state["home.sample"] == at.session_state["home.sample"]
    assert again.radio(key="_w.home.mode").value == "thesis"
    testing.goto(again, "segment")
    assert not again.exception and not again.error
    assert any("2 positive, 2 negative on 1 slice(s)" in m.value for m in again.markdown)
    assert again.slider(key="_w.segment.z").value == 12
    testing.goto(again, "batch")
    assert again.radio(key="_w.batch.source").value == "saved"
    assert again.selectbox(key="batch.saved_name").value == "prototype-1"
    np.testing.assert_array_equal(again.session_state["segment.prototypes"][0].prototype.positive_examples,
                                  at.session_state["segment.prototypes"][0].prototype.positive_examples)


def test_a_slice_chosen_only_on_feature_space_is_restored(tmp_path_factory, monkeypatch):
    """segment.z's widget on Feature space has a key of its own ('_w.features.z'); the setting (the stored key, not
    the widget's) is saved, and the Segment page's slider is re-seeded from it after the reload."""
    for key, value in testing.app_environment(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)
    at = testing.goto(testing.open_demo(testing.new_app(timeout=300)), "features")
    at.slider(key="_w.features.z").set_value(5).run()
    assert at.session_state["segment.z"] == 5
    testing.goto(at, "home")
    again = _reloaded(at)
    assert again.session_state["segment.z"] == 5
    testing.goto(again, "segment")
    assert not again.exception and again.slider(key="_w.segment.z").value == 5


def test_settings_bound_through_a_widget_key_of_their_own_are_saved():
    """ui.state.widget(..., widget_key=...): the sidebar's mode radio and Feature space's slice slider."""
    session = {"_w.sidebar.mode": "thesis", "home.mode": "thesis", "_w.features.z": 5, "segment.z": 5,
               "_w.segment.label": "negative", "segment.label": "negative", "_w.home.source": "x", "home.source": "x"}
    assert uw.bound_settings(session) == {"home.mode": "thesis", "segment.z": 5, "segment.label": "negative"}
