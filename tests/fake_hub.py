"""A local stand-in for the Hugging Face hub's file API, for tests of the real download path (no internet).

``FakeHub(files)`` serves one model repository from a dict {filename: bytes} on 127.0.0.1 (a free port),
speaking the endpoints ``huggingface_hub`` 1.x/2.x uses:

- ``GET /api/models/{repo}[/revision/{rev}]``: the repo info JSON (``id``, ``sha``, ``siblings``; sizes,
  blob ids and LFS info with ``?blobs=true``).
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing (``snapshot_download``).
- ``HEAD|GET /{repo}/resolve/{rev}/{filename}`` with ``rev`` 'main' or the commit: small files answer
  200 with ``ETag`` (the git blob sha1), ``Content-Length`` and ``X-Repo-Commit``; LFS files
  (``*.safetensors``, ``*.bin``) answer 302 to a CDN address on another origin (``http://localhost:PORT``,
  not ``127.0.0.1``, exactly as the hub redirects to its CDN) with ``X-Linked-Etag`` (the sha256),
  ``X-Linked-Size`` and ``X-Repo-Commit``. Missing files: 404 with ``X-Error-Code: EntryNotFound``;
  another repo: 401 ``RepoNotFound``; another revision: 404 ``RevisionNotFound``.
- ``GET /cdn/{sha256}`` (on either origin): the LFS file's bytes, with ``Range`` support (206) so that
  ``huggingface_hub`` can resume an interrupted download.

Every request is logged in ``hub.requests`` as ``Request(method, path, status, sent)`` (bytes of body sent).
``hub.truncate(filename, times, keep, mode)`` damages the next ``times`` GETs of a file's bytes:
``mode='cut'`` announces the full ``Content-Length`` but sends only ``keep`` bytes and closes the
connection (a dropped connection); ``mode='short'`` announces and sends only ``keep`` bytes (a proxy that
cut the file; the size in the HEAD answer stays the true one).

``tiny_dinov2_files(folder)`` saves a tiny random DINOv2 (width 32, 2 blocks, 2 heads, 518 px, patch 14)
with ``save_pretrained`` and returns the repo's files, the way ``facebook/dinov2-small`` holds them.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "e4c89a4e05589de9b3e188688a303d0f3c04d0f0"  # 40 hex digits, like a real hub commit
LFS_SUFFIXES = (".safetensors", ".bin", ".pth")


@dataclass(frozen=True)
class Request:
    method: str  # 'HEAD' | 'GET'
    path: str  # URL path without the query
    status: int
    sent: int  # body bytes written


@dataclass
class _Damage:
    times: int
    keep: int
    mode: str  # 'cut' | 'short'


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's bytes (what the hub sends as ETag for a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file the repo's git tree holds for an LFS file."""
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


def tiny_dinov2_files(folder: Path, seed: int = 0, max_shard_size: str | None = None) -> dict[str, bytes]:
    """Save a tiny random ``Dinov2Model`` into ``folder`` (config.json + model.safetensors, or with
    ``max_shard_size`` e.g. '150KB' the shards model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    and return the repo's files {name: bytes}, with a ``.gitattributes`` that marks the weights as LFS like
    the hub's repos. The same seed gives the same weights, sharded or not."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          image_size=518, patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6)
    model = Dinov2Model(config).eval()
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    files = {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}
    files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
    return files


class FakeHub:
    """One repo on a local HTTP server that answers like huggingface.co. Use as a context manager, or
    ``start()`` / ``stop()``; ``endpoint`` is the value for HF_ENDPOINT."""

    def __init__(self, files: dict[str, bytes], repo: str = "facebook/dinov2-small", commit: str = COMMIT):
        self.files = dict(files)
        self.repo = repo
        self.commit = commit
        self.requests: list[Request] = []
        self._damage: dict[str, _Damage] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------------ control
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn(self) -> str:
        return f"http://localhost:{self.port}"  # another origin than the endpoint, as the hub's CDN is

    def start(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket: a later connection is refused, like a machine without network."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def truncate(self, filename: str, times: int = 1, keep: int | None = None, mode: str = "cut") -> None:
        """Damage the next ``times`` GETs of ``filename``'s bytes: send ``keep`` bytes (default: half)."""
        if mode not in ("cut", "short"):
            raise ValueError(f"mode must be 'cut' or 'short', not {mode!r}")
        size = len(self.files[filename])
        with self._lock:
            self._damage[filename] = _Damage(int(times), size // 2 if keep is None else int(keep), mode)

    def gets(self, filename: str) -> list[Request]:
        """The GETs that fetched ``filename``'s bytes (its resolve URL, or its CDN URL for an LFS file)."""
        paths = {f"/{self.repo}/resolve/{rev}/{filename}" for rev in ("main", self.commit)}
        paths.add(f"/cdn/{self.sha256(filename)}")
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path in paths and r.status in (200, 206)]

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # ------------------------------------------------------------------ facts about the files
    def sha256(self, filename: str) -> str:
        return hashlib.sha256(self.files[filename]).hexdigest()

    def is_lfs(self, filename: str) -> bool:
        return filename.endswith(LFS_SUFFIXES)

    def _sibling(self, name: str, blobs: bool) -> dict:
        entry: dict = {"rfilename": name}
        if blobs:
            data = self.files[name]
            pointer = lfs_pointer(data)
            entry.update(size=len(data), blobId=git_blob_sha1(pointer if self.is_lfs(name) else data))
            if self.is_lfs(name):
                entry["lfs"] = {"size": len(data), "sha256": self.sha256(name), "pointerSize": len(pointer)}
        return entry

    def _tree_entry(self, name: str) -> dict:
        data = self.files[name]
        entry: dict = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
        if self.is_lfs(name):
            pointer = lfs_pointer(data)
            entry.update(oid=git_blob_sha1(pointer), lfs={"oid": self.sha256(name), "size": len(data),
                                                          "pointerSize": len(pointer)})
        return entry

    def info(self, blobs: bool) -> dict:
        return {"id": self.repo, "modelId": self.repo, "sha": self.commit, "private": False, "gated": False,
                "disabled": False, "library_name": "transformers", "tags": ["transformers", "dinov2"],
                "lastModified": "2023-09-05T00:00:00.000Z",
                "siblings": [self._sibling(name, blobs) for name in sorted(self.files)]}

    def _take_damage(self, filename: str) -> _Damage | None:
        with self._lock:
            damage = self._damage.get(filename)
            if damage is None or damage.times <= 0:
                return None
            damage.times -= 1
            return damage

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # ------------------------------------------------------------------ routing
    def _route(self, head: bool) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        hub = self.hub
        repo_prefix = f"/api/models/{hub.repo}"
        if path.startswith("/cdn/"):
            return self._cdn(path, path[len("/cdn/"):], head)
        if path.startswith("/api/models/"):
            if not path.startswith(repo_prefix + "/") and path != repo_prefix:
                return self._error(path, head, 401, "RepoNotFound", "Repository Not Found")
            rest = path[len(repo_prefix):]
            if rest in ("", f"/revision/{hub.commit}", "/revision/main"):
                blobs = query.get("blobs", ["false"])[0].lower() == "true"
                return self._json(path, head, hub.info(blobs))
            match = re.fullmatch(r"/tree/([^/]+)(?:/(.*))?", rest)
            if match:
                if match.group(1) not in ("main", hub.commit):
                    return self._error(path, head, 404, "RevisionNotFound", "Invalid rev id")
                prefix = (match.group(2) or "").strip("/")
                if prefix:  # one flat folder: nothing below the root
                    return self._error(path, head, 404, "EntryNotFound", "Entry not found")
                return self._json(path, head, [hub._tree_entry(name) for name in sorted(hub.files)])
            return self._error(path, head, 404, "RevisionNotFound", "Invalid rev id")
        match = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        if match is None:
            return self._error(path, head, 404, None, "Not Found")
        repo, revision, filename = match.groups()
        if repo != hub.repo:
            return self._error(path, head, 401, "RepoNotFound", "Repository Not Found")
        if revision not in ("main", hub.commit):
            return self._error(path, head, 404, "RevisionNotFound", "Invalid rev id")
        if filename not in hub.files:
            return self._error(path, head, 404, "EntryNotFound", "Entry not found")
        if hub.is_lfs(filename):
            return self._redirect_to_cdn(path, filename, head)
        data = hub.files[filename]
        headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": hub.commit,
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        return self._bytes(path, head, filename, data, headers)

    # ------------------------------------------------------------------ answers
    def _send(self, path: str, head: bool, status: int, headers: dict, body: bytes, length: int | None = None,
              close: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        sent = 0
        if not head and body:
            try:
                self.wfile.write(body)
                self.wfile.flush()
                sent = len(body)
            except (BrokenPipeError, ConnectionResetError):
                pass
        if close:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.hub._log(Request("HEAD" if head else "GET", path, status, sent))

    def _json(self, path: str, head: bool, payload) -> None:
        body = json.dumps(payload).encode()
        self._send(path, head, 200, {"Content-Type": "application/json", "X-Repo-Commit": self.hub.commit}, body)

    def _error(self, path: str, head: bool, status: int, code: str | None, message: str) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if code == "EntryNotFound":
            headers["X-Repo-Commit"] = self.hub.commit
        self._send(path, head, status, headers, json.dumps({"error": message}).encode())

    def _redirect_to_cdn(self, path: str, filename: str, head: bool) -> None:
        hub = self.hub
        sha = hub.sha256(filename)
        headers = {"Location": f"{hub.cdn}/cdn/{sha}", "X-Repo-Commit": hub.commit, "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": str(len(hub.files[filename])), "ETag": f'"{git_blob_sha1(lfs_pointer(hub.files[filename]))}"'}
        self._send(path, head, 302, headers, f"Found. Redirecting to {headers['Location']}".encode())

    def _cdn(self, path: str, sha: str, head: bool) -> None:
        names = [name for name in self.hub.files if self.hub.is_lfs(name) and self.hub.sha256(name) == sha]
        if not names:
            return self._error(path, head, 404, None, "Not Found")
        headers = {"ETag": f'"{sha}"', "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        self._bytes(path, head, names[0], self.hub.files[names[0]], headers)

    def _bytes(self, path: str, head: bool, filename: str, data: bytes, headers: dict) -> None:
        status, start, end = 200, 0, len(data)
        match = _RANGE.match(self.headers.get("Range", "").strip())
        if match:
            start = int(match.group(1))
            end = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
            if start >= len(data):
                headers = {**headers, "Content-Range": f"bytes */{len(data)}"}
                return self._send(path, head, 416, headers, b"")
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        body = data[start:end]
        damage = None if head else self.hub._take_damage(filename)
        if damage is None:
            return self._send(path, head, status, headers, body)
        cut = body[:max(0, min(damage.keep - start, len(body) - 1))]
        if damage.mode == "short":  # a consistent, shorter answer: only the size check can tell
            if "Content-Range" in headers:
                headers = {**headers, "Content-Range": f"bytes {start}-{start + len(cut) - 1}/{start + len(cut)}"}
            return self._send(path, head, status, headers, cut)
        self._send(path, head, status, headers, cut, length=len(body), close=True)  # the connection drops
