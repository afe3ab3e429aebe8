"""The session's work kept as a workspace (core.workspace): restored after a reload or restart, saved as it changes.

Wiring (app.py): ``workspace.restore_on_start()`` right after ``state.init()`` (before any widget is drawn: a
restore sets bound widget values), and ``workspace.autosave()`` after ``navigation.run()``. Each browser tab
keeps its workspace id in the URL (``?ws=<id>``), so a reload finds its work again; opening a sample resumes
that sample's newest workspace no other live session holds. A workspace open in another tab is never written:
the user chooses to open it read-only, take it over, or start a new workspace. See docs/workspace.md.

Every function takes the session as a mapping (``st.session_state`` by default) and the query parameters as a
mapping (``st.query_params`` by default), so the logic runs under plain dicts in tests.

Keys (this module's own): workspace.id, workspace.revision (of the last save or load), workspace.digest (of the
last saved snapshot), workspace.sample (path of the sample the workspace belongs to), workspace.mode ('owner',
'read-only', 'blocked': the URL's workspace is held elsewhere and the user has not chosen yet, 'lost': another
session took it over), workspace.conflict (message), workspace.notice (a message for the panel),
workspace.owner (this session's lease token), workspace.saved_at, workspace.heartbeat, workspace.hashes.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import streamlit as st
from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

from core.errors import ProtoscopeError
from core.workspace import (
    LEASE_TTL_S,
    BatchRecord,
    Lease,
    SampleRef,
    Settings,
    StoredModel,
    StoredPrototype,
    Workspace,
    WorkspaceConflict,
    WorkspaceError,
    acquire_lease,
    check_id,
    default_root,
    export_workspace,
    file_signature,
    find_workspaces,
    import_workspace,
    load_workspace,
    new_id,
    read_lease,
    release_lease,
    repoint_sample,
    save_workspace,
    summarize,
    workspace_digest,
)
from ui import settings as app_settings
from ui.batch import BatchOutputs
from ui.refine import TrainedModel
from ui.state import BackboneChoice, Sample, SavedPrototype, Truth, stack_id

#: Channels searched to map a session stack id (path, channel) back to its channel.
MAX_CHANNELS = 256
#: Bound settings never restored (they describe how a sample was opened, not the work on it).
NOT_RESTORED = ("home.source",)
#: The sample's own bound settings, restored when a sample's workspace is resumed into a running session.
SAMPLE_SETTINGS = ("home.channel", "home.truth_kind", "home.truth_channel")
#: Widget keys that are not '_w.' + their setting (ui.state.widget(..., widget_key=...): a setting with a widget on
#: several pages) -> the setting they are bound to. A setting whose page-own widget was never drawn in this
#: session (the slice chosen only on Feature space) is saved through these.
CUSTOM_WIDGET_KEYS = {"_w.sidebar.mode": "home.mode", "_w.features.z": "segment.z"}
#: Seconds the first run of a reloaded tab waits for its previous session (same server) to disconnect.
RELOAD_GRACE_S = 1.5

Session = MutableMapping[str, Any]


def _session(session: Session | None) -> Session:
    return st.session_state if session is None else session


def _params(params: MutableMapping[str, str] | None) -> MutableMapping[str, str]:
    return st.query_params if params is None else params


def _root(root: str | Path | None) -> Path | None:
    return Path(root) if root is not None else default_root()


def _owner(s: Session) -> str:
    """This session's lease token: its Streamlit session id (so a live tab can be told from a closed one)."""
    if "workspace.owner" not in s:
        ctx = get_script_run_ctx(suppress_warning=True)
        s["workspace.owner"] = ctx.session_id if ctx is not None else uuid.uuid4().hex
    return s["workspace.owner"]


def session_alive(lease: Lease) -> bool | None:
    """Whether the lease's owner is a connected session of this server (None: another server, or no server)."""
    if lease.host != socket.gethostname() or lease.pid != os.getpid() or not Runtime.exists():
        return None
    return Runtime.instance().is_active_session(lease.owner)


def _set_bound(s: Session, key: str, value: Any) -> None:
    s[key] = value
    s["_w." + key] = value


# ---- session <-> workspace ----------------------------------------------------------------------------------


def _sha(s: Session, data: bytes) -> str:
    """SHA-256 of a file's bytes, memoised by object (the session keeps the same bytes object across runs)."""
    memo = s.setdefault("workspace.hashes", {})
    hit = memo.get(id(data))
    if hit is None or hit[0] is not data:
        hit = (data, StoredPrototype("", data).sha256)
        memo[id(data)] = hit
    return hit[1]


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def bound_settings(session: Session | None = None) -> dict[str, Any]:
    """The bound widget settings whose values JSON can hold: the stored keys (``home.mode``, ``segment.z``), never
    the widgets' own keys, which ``ui.state.bind`` re-seeds from them (ui.state.widget: '_w.' + the setting, or a
    key of CUSTOM_WIDGET_KEYS)."""
    s = _session(session)
    widget_keys = [k for k in list(s.keys()) if isinstance(k, str) and k.startswith("_w.")]
    keys = {CUSTOM_WIDGET_KEYS.get(k, k[3:]) for k in widget_keys}
    return {k: s[k] for k in sorted(keys)
            if k in s and not k.startswith("workspace.") and k not in NOT_RESTORED and _jsonable(s[k])}


def _channel_of(sid: str, path: str) -> int | None:
    return next((c for c in range(MAX_CHANNELS) if stack_id(path, c) == sid), None)


def snapshot_from_session(session: Session | None = None, workspace_id: str | None = None) -> Workspace:
    """The session's work as a Workspace (id: ``workspace_id`` or the session's; revision: of the last save)."""
    s = _session(session)
    sample: Sample | None = s.get("home.sample")
    truth: Truth | None = s.get("home.truth")
    ref, points = None, {}
    if sample is not None:
        signature = file_signature(sample.path) or (None, None)
        ref = SampleRef(sample.path, sample.name, sample.origin, signature[0], signature[1],
                        int(s.get("home.channel") or 0), truth.channel if truth is not None else None,
                        truth.path if truth is not None else None)
        for sid, per_slice in (s.get("segment.points") or {}).items():
            channel = _channel_of(sid, sample.path)
            if channel is not None and per_slice:
                points[channel] = per_slice
    choice: BackboneChoice | None = s.get("home.backbone")
    options = {k: v for k, v in (s.get("home.options") or {}).items() if _jsonable(v)}
    backbone = {"name": choice.name, "weights": choice.weights, "seed": int(choice.seed)} if choice else None
    prototypes = tuple(StoredPrototype(p.name, p.data, p.stack_id, _sha(s, p.data))
                       for p in s.get("segment.prototypes") or [])
    models = tuple(StoredModel(m.name, m.data, {"summary": m.summary, "input_set": m.input_set}, _sha(s, m.data))
                   for m in s.get("refine.models") or [])
    memo = s.get("workspace.hashes") or {}
    for key in set(memo) - {id(item.data) for item in (*prototypes, *models)}:
        memo.pop(key)  # forget deleted prototypes and models
    outputs: BatchOutputs | None = s.get("batch.result")
    batch = None if outputs is None else BatchRecord(outputs.stack_name, outputs.result, outputs.folder,
                                                     dict(outputs.files), outputs.threshold)
    return Workspace(
        id=workspace_id or s.get("workspace.id") or new_id(),
        sample=ref,
        settings=Settings(str(s.get("home.mode") or "best"), options, backbone, bound_settings(s)),
        points=points,
        prototypes=prototypes,
        models=models,
        batch=batch,
        revision=int(s.get("workspace.revision") or 0),
        batch_job=s.get("batch.job"),
    )


def _unique(name: str, taken: set[str]) -> str:
    candidate, index = name, 2
    while candidate in taken:
        candidate, index = f"{name}-{index}", index + 1
    return candidate


def restore_into_session(ws: Workspace, session: Session | None = None, *, merge: bool = False) -> None:
    """Put a workspace's work into the session (before any widget of this run is drawn).

    merge=False (a fresh session): everything, replacing what is there. merge=True (a sample's workspace resumed
    in a running session): the sample with its channel and ground truth, its points where the session has none,
    the prototypes and models the session lacks (by content), the batch result and the cluster batch if the session
    has none; the session's mode, options and backbone stay.
    """
    s = _session(session)
    sample = ws.sample
    if sample is not None and sample.status != "missing":
        s["home.sample"] = Sample(sample.path, sample.origin, sample.name or Path(sample.path).name)
        s["home.truth"] = (Truth(channel=sample.truth_channel) if sample.truth_channel is not None
                           else Truth(path=sample.truth_path) if sample.truth_path else None)
        _set_bound(s, "home.channel", int(sample.channel))
    ui_settings = dict(ws.settings.ui)
    for key in SAMPLE_SETTINGS if merge else list(ui_settings):
        if key in ui_settings and key not in NOT_RESTORED:
            _set_bound(s, key, ui_settings[key])
    if not merge:
        _set_bound(s, "home.mode", ws.settings.mode)
        s["home.options_mode"] = ws.settings.mode  # else the home page resets λ and scoring to the mode's defaults
        s["home.options"] = dict(ws.settings.options)
        if ws.settings.backbone:
            b = ws.settings.backbone
            s["home.backbone"] = BackboneChoice(str(b["name"]), str(b.get("weights", "hub")), int(b.get("seed", 0)))
    if sample is not None:
        all_points = s.setdefault("segment.points", {})
        if not merge:
            all_points.clear()
        for channel, per_slice in ws.points.items():
            sid = stack_id(sample.path, channel)
            if merge and all_points.get(sid):
                continue
            all_points[sid] = {z: [list(p) for p in pts] for z, pts in per_slice.items()}
        s["segment.generation"] = int(s.get("segment.generation") or 0) + 1  # canvases start from the restored points
    saved = [] if not merge else list(s.get("segment.prototypes") or [])
    known = {_sha(s, p.data) for p in saved}
    for item in ws.prototypes:
        if item.sha256 not in known:
            saved.append(SavedPrototype(_unique(item.name, {p.name for p in saved}), item.prototype(), item.data,
                                        item.tag))
    s["segment.prototypes"] = saved
    models = [] if not merge else list(s.get("refine.models") or [])
    known = {_sha(s, m.data) for m in models}
    for item in ws.models:
        if item.sha256 not in known:
            models.append(TrainedModel(_unique(item.name, {m.name for m in models}), item.data,
                                       str(item.metadata.get("summary", "")), str(item.metadata.get("input_set", ""))))
    s["refine.models"] = models
    if ws.batch is not None and (not merge or s.get("batch.result") is None):
        b = ws.batch
        s["batch.result"] = BatchOutputs(b.stack_name, b.result, b.folder, dict(b.files), b"", b.threshold)
    elif not merge:
        s["batch.result"] = None
    if not merge or s.get("batch.job") is None:  # a batch running on a cluster (ui.cluster) is followed again
        s["batch.job"] = ws.batch_job


def _adopt(s: Session, params: MutableMapping[str, str], ws: Workspace, *, merge: bool, mode: str = "owner") -> None:
    """Make ``ws`` this session's workspace: restore it and remember its id, revision and sample."""
    restore_into_session(ws, s, merge=merge)
    s["workspace.id"] = ws.id
    s["workspace.revision"] = ws.revision
    s["workspace.sample"] = ws.sample.path if ws.sample is not None else None
    s["workspace.mode"] = mode
    s["workspace.digest"] = None  # the next autosave compares against the restored work
    params["ws"] = ws.id


# ---- the two calls -----------------------------------------------------------------------------------------


def current_workspace_id(session: Session | None = None, params: MutableMapping[str, str] | None = None) -> str:
    """This tab's workspace id: the session's, else the URL's ``?ws=`` (when valid), else a new one; the URL is
    (re)set to it (page switches clear query parameters)."""
    s, q = _session(session), _params(params)
    ws_id = s.get("workspace.id")
    if ws_id is None:
        candidate = q.get("ws")
        try:
            ws_id = check_id(candidate) if candidate else new_id()
        except WorkspaceError:
            ws_id = new_id()
        s["workspace.id"] = ws_id
    if q.get("ws") != ws_id:
        q["ws"] = ws_id
    return ws_id


def _acquire(root: Path, ws_id: str, owner: str, *, take_over: bool = False, grace_s: float = 0.0) -> Lease:
    """acquire_lease with this server's liveness probe; waits up to ``grace_s`` for a same-server owner to leave
    (a reloaded tab's previous session disconnects a moment after the new one starts)."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            return acquire_lease(root, ws_id, owner, take_over=take_over, is_alive=session_alive)
        except WorkspaceConflict as conflict:
            if time.monotonic() >= deadline or conflict.lease is None or session_alive(conflict.lease) is not True:
                raise
            time.sleep(0.1)


def restore_on_start(session: Session | None = None, params: MutableMapping[str, str] | None = None,
                     root: str | Path | None = None, *, draw: bool | None = None) -> str:
    """Call first in every run. Returns what happened: 'off' (no workspace root), 'restored' (a fresh session
    loaded the URL's workspace), 'blocked' (that workspace is open elsewhere: the conflict panel asks what to
    do), 'resumed' (a newly opened sample's workspace was merged in), 'new' (a newly opened sample starts a new
    workspace), or 'kept'. A damaged workspace becomes a notice and a new workspace."""
    s, q, where = _session(session), _params(params), _root(root)
    draw = session is None if draw is None else draw
    if where is None:
        return "off"
    outcome = "kept"
    if "workspace.mode" not in s:  # the first run of this session
        url_id = q.get("ws")
        ws_id = current_workspace_id(s, q)
        s["workspace.mode"] = "owner"
        if url_id == ws_id and (where / ws_id / "workspace.json").is_file():
            outcome = _restore_url_workspace(s, q, where, ws_id)
    else:
        current_workspace_id(s, q)
    if s.get("workspace.mode") in ("owner", "lost") and outcome != "restored":
        outcome = _follow_sample(s, q, where) or outcome
    if draw:
        conflict_panel(s, q, where)
    return outcome


def _restore_url_workspace(s: Session, q: MutableMapping[str, str], root: Path, ws_id: str) -> str:
    try:
        ws = load_workspace(root, ws_id)
        _acquire(root, ws_id, _owner(s), grace_s=RELOAD_GRACE_S)
    except WorkspaceConflict as conflict:
        s["workspace.mode"] = "blocked"
        s["workspace.conflict"] = str(conflict)
        return "blocked"
    except ProtoscopeError as error:
        s["workspace.notice"] = f"{error} — this tab starts a new workspace."
        s["workspace.id"] = new_id()
        q["ws"] = s["workspace.id"]
        return "kept"
    _adopt(s, q, ws, merge=False)
    if ws.sample is not None and ws.sample.status == "missing":
        s["workspace.notice"] = (f"The sample of this workspace, '{ws.sample.path}', is not there any more; its "
                                 "points, prototypes and models are restored: open the stack again (or re-point it "
                                 "under Workspace in the sidebar).")
    elif ws.sample is not None and ws.sample.status == "changed":
        s["workspace.notice"] = f"'{ws.sample.name}' changed on disk since this work was saved (size or date)."
    return "restored"


def _follow_sample(s: Session, q: MutableMapping[str, str], root: Path) -> str | None:
    """When the session's sample is not the workspace's: resume that sample's newest free workspace, or start a new
    one. Returns 'resumed', 'new' or None (nothing to do)."""
    sample: Sample | None = s.get("home.sample")
    marker = s.get("workspace.sample")
    if sample is None or sample.path == marker:
        return None
    owner = _owner(s)
    if marker is not None:  # the tab moves on to another sample: the old workspace becomes free for others
        release_lease(root, s["workspace.id"], owner)
    busy = []
    for info in find_workspaces(root, sample.path):
        try:
            _acquire(root, info.id, owner)
            ws = load_workspace(root, info.id)
        except WorkspaceConflict:
            busy.append(info.id)
            continue
        except ProtoscopeError:
            release_lease(root, info.id, owner)  # damaged: leave it alone
            continue
        _adopt(s, q, ws, merge=True)
        s["workspace.notice"] = f"Resumed your earlier work on {sample.name}: {summarize(ws)}."
        return "resumed"
    if marker is not None or s.get("workspace.mode") == "lost":
        s["workspace.id"] = new_id()
    s["workspace.revision"] = 0
    s["workspace.sample"] = sample.path
    s["workspace.mode"] = "owner"
    s["workspace.digest"] = None
    q["ws"] = s["workspace.id"]
    if busy:
        s["workspace.notice"] = (f"{sample.name} is also open in another tab or session (workspace {busy[0]}); this "
                                 "tab keeps its own workspace, so neither overwrites the other.")
    return "new"


def autosave(session: Session | None = None, params: MutableMapping[str, str] | None = None,
             root: str | Path | None = None, *, draw: bool | None = None) -> str:
    """Call last in every run: save the work when it changed since the last save (a digest comparison), renew the
    lease otherwise. Returns 'off', 'idle' (no sample), 'pending' (a sample was just opened: the next run's
    restore_on_start picks its workspace), 'read-only', 'blocked', 'lost', 'unchanged', 'saved' or 'conflict'
    (another session took the workspace over: nothing was written; the panel asks what to do)."""
    s, q, where = _session(session), _params(params), _root(root)
    draw = session is None if draw is None else draw
    status = _autosave(s, q, where)
    if draw and where is not None:
        sidebar_panel(s, q, where, status)
    return status


def _autosave(s: Session, q: MutableMapping[str, str], root: Path | None) -> str:
    if root is None:
        return "off"
    mode = s.get("workspace.mode", "owner")
    if mode in ("read-only", "blocked", "lost"):
        return mode
    sample: Sample | None = s.get("home.sample")
    if sample is None:
        return "idle"
    if s.get("workspace.sample") != sample.path:
        return "pending"
    ws_id = current_workspace_id(s, q)
    snapshot = snapshot_from_session(s, ws_id)
    digest = workspace_digest(snapshot)
    owner = _owner(s)
    try:
        if digest == s.get("workspace.digest"):
            if time.time() - float(s.get("workspace.heartbeat") or 0) > LEASE_TTL_S / 3:
                _acquire(root, ws_id, owner)
                s["workspace.heartbeat"] = time.time()
            return "unchanged"
        saved = save_workspace(snapshot, root, owner=owner, is_alive=session_alive)
    except WorkspaceConflict as conflict:
        s["workspace.mode"] = "lost"
        s["workspace.conflict"] = str(conflict)
        return "conflict"
    except ProtoscopeError as error:
        s["workspace.notice"] = f"The work could not be saved: {error}"
        return "error"
    s["workspace.revision"] = saved.revision
    s["workspace.digest"] = digest
    s["workspace.saved_at"] = saved.modified
    s["workspace.heartbeat"] = time.time()
    return "saved"


# ---- choices after a conflict, export, import (callbacks: they run before the next run's widgets) ---------------


def open_read_only(s: Session, q: MutableMapping[str, str], root: Path) -> None:
    """Show the workspace without ever saving it (a blocked tab loads it first)."""
    if s.get("workspace.mode") == "blocked":
        _adopt(s, q, load_workspace(root, s["workspace.id"]), merge=False, mode="read-only")
    s["workspace.mode"] = "read-only"
    s.pop("workspace.conflict", None)


def take_over(s: Session, q: MutableMapping[str, str], root: Path) -> None:
    """Hold the workspace from now on and load its latest saved state (the other tab's saves are refused)."""
    ws_id = s["workspace.id"]
    _acquire(root, ws_id, _owner(s), take_over=True)
    _adopt(s, q, load_workspace(root, ws_id), merge=False)
    s.pop("workspace.conflict", None)


def start_new(s: Session, q: MutableMapping[str, str], root: Path) -> None:
    """Continue under a new workspace id: a blocked tab starts from a copy of the workspace, a tab that lost its
    workspace keeps its own work; the other workspace is not touched."""
    if s.get("workspace.mode") == "blocked":
        _adopt(s, q, load_workspace(root, s["workspace.id"]), merge=False)
    s["workspace.id"] = new_id()
    s["workspace.revision"] = 0
    s["workspace.digest"] = None
    s["workspace.mode"] = "owner"
    sample = s.get("home.sample")
    s["workspace.sample"] = sample.path if sample is not None else s.get("workspace.sample")
    q["ws"] = s["workspace.id"]
    s.pop("workspace.conflict", None)


def export_bytes(session: Session | None = None) -> bytes:
    """The session's work as one exported workspace file (.zip)."""
    return export_workspace(snapshot_from_session(_session(session)))


def import_into_session(data: bytes, session: Session | None = None, params: MutableMapping[str, str] | None = None,
                        root: str | Path | None = None, *, name: str = "the workspace file") -> Workspace:
    """Import an exported workspace under a new id and make it this tab's (WorkspaceError for a refused file).

    When its sample is not at the same path here, the work is restored without the sample and
    ``workspace.repoint`` names the workspace, so the panel asks for the stack's new place (``repoint``)."""
    s, q, where = _session(session), _params(params), _root(root)
    if where is None:
        raise WorkspaceError("workspaces are off (PROTOSCOPE_WORKSPACES=off); unset it to import a workspace")
    ws = import_workspace(data, where, name=name)
    owner = _owner(s)
    if s.get("workspace.id") and s.get("workspace.mode") in ("owner", None):
        release_lease(where, s["workspace.id"], owner)
    acquire_lease(where, ws.id, owner, is_alive=session_alive)
    _adopt(s, q, ws, merge=False)
    if ws.sample_status == "missing":
        s["home.sample"] = None
        s["workspace.repoint"] = ws.id
    return ws


def repoint(path_text: str, session: Session | None = None, params: MutableMapping[str, str] | None = None,
            root: str | Path | None = None) -> Workspace:
    """Give the imported workspace's sample its place on this machine (a path inside the data root) and open it."""
    s, q, where = _session(session), _params(params), _root(root)
    path = app_settings.resolve_in_root(path_text)
    ws = repoint_sample(load_workspace(where, s["workspace.id"]), path)
    ws = save_workspace(ws, where, owner=_owner(s), is_alive=session_alive)
    _adopt(s, q, ws, merge=False)
    s.pop("workspace.repoint", None)
    return ws


def _callback(action, *args) -> None:
    """Run a panel action; a problem the user can fix becomes the panel's notice (callbacks must not raise)."""
    try:
        action(*args)
    except ProtoscopeError as error:
        st.session_state["workspace.notice"] = str(error)


def _import_clicked(q: MutableMapping[str, str], root: Path) -> None:
    upload = st.session_state.get("workspace.import_file")
    if upload is None:
        st.session_state["workspace.notice"] = "Choose an exported workspace file (.zip) first."
        return
    ws = import_into_session(upload.getvalue(), None, q, root, name=f"'{upload.name}'")
    st.session_state["workspace.notice"] = f"Imported: {summarize(ws)}."


def _repoint_clicked(q: MutableMapping[str, str], root: Path) -> None:
    repoint(st.session_state.get("workspace.repoint_path", ""), None, q, root)


# ---- drawing ---------------------------------------------------------------------------------------------------


def conflict_panel(s: Session, q: MutableMapping[str, str], root: Path) -> None:
    """The conflict message and its three choices, above the page (only while a conflict is open)."""
    if s.get("workspace.mode") not in ("blocked", "lost") or not s.get("workspace.conflict"):
        return
    st.warning(s["workspace.conflict"], icon=":material/group:")
    c1, c2, c3 = st.columns(3)
    c1.button("Open read-only", key="workspace.read_only", on_click=_callback, args=(open_read_only, s, q, root),
              help="See the work; nothing this tab does is saved")
    c2.button("Take it over", key="workspace.take_over", on_click=_callback, args=(take_over, s, q, root),
              help="Load its latest saved state and save from this tab; the other tab's saves are refused")
    c3.button("Start a new workspace", key="workspace.start_new", on_click=_callback, args=(start_new, s, q, root),
              help="Continue under a new workspace (a copy); the other one is left as it is")


def _status_line(s: Session, status: str) -> str:
    ws_id = s.get("workspace.id", "")
    if status in ("saved", "unchanged") and s.get("workspace.saved_at"):
        return f"Saved {time.strftime('%H:%M:%S', time.localtime(s['workspace.saved_at']))} · workspace `{ws_id}`"
    return {
        "read-only": f"Read-only: changes in this tab are not saved · workspace `{ws_id}`",
        "blocked": "Not saving: the workspace is open elsewhere (choose above)",
        "lost": "Not saving: another tab took this workspace over (choose above)",
        "conflict": "Not saved: another tab took this workspace over (choose above)",
        "idle": "Open a sample: its work is then saved as you go",
        "pending": "Finding this sample's workspace…",
    }.get(status, f"Workspace `{ws_id}`")


def sidebar_panel(s: Session, q: MutableMapping[str, str], root: Path, status: str) -> None:
    """The workspace status, export and import, in the sidebar."""
    with st.sidebar.expander("Workspace", icon=":material/save:"):
        st.caption(_status_line(s, status))
        notice = s.pop("workspace.notice", None)
        if notice:
            st.info(notice)
        if s.get("workspace.repoint"):
            st.text_input("The sample is not on this machine: its path inside the data root", key="workspace.repoint_path")
            st.button("Use this path", key="workspace.repoint_go", on_click=_callback, args=(_repoint_clicked, q, root))
        if s.get("home.sample") is not None:
            st.download_button("Export workspace (.zip)", data=lambda: export_bytes(s),
                               file_name=f"protoscope-workspace-{s.get('workspace.id', 'new')}.zip",
                               mime="application/zip", key="workspace.export", on_click="ignore")
        st.file_uploader("Import a workspace (.zip)", type=["zip"], key="workspace.import_file")
        st.button("Import", key="workspace.import", on_click=_callback, args=(_import_clicked, q, root))


def lease_holder(root: str | Path, workspace_id: str) -> Lease | None:
    """Who holds a workspace now (None when nobody does); for showing 'open in another tab' beside a list."""
    return read_lease(root, workspace_id)
