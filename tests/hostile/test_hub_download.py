"""The 'hub' weights path for real: download, cache, offline reuse and broken downloads, against a local server
that speaks the Hugging Face hub's file API (tests/fake_hub.py) and serves a tiny random DINOv2
(width 32, 2 blocks) as ``facebook/dinov2-small``. Nothing leaves 127.0.0.1.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, so every load runs the product's
own ``load_backbone('dinov2_vits14', 'hub')`` in a fresh interpreter with the environment a user would set.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from core.features.backbones import load_backbone
from core.features.registry import (
    cached_snapshot,
    default_backbone_name,
    get_spec,
    weights_file_problem,
    weights_status,
)
from fake_hub import COMMIT, FakeHub, tiny_dinov2_files

ROOT = Path(__file__).resolve().parents[2]
NAME = "dinov2_vits14"
REPO = get_spec(NAME).hf_repo  # 'facebook/dinov2-small'
WEIGHTS = "model.safetensors"

#: Runs in a fresh interpreter: weights_status before, load_backbone(..., 'hub'), embeddings of a fixed
#: (28, 42) image into an .npy, weights_status after; one JSON line. A BackboneError is reported in the JSON;
#: any other exception is a traceback and a non-zero exit, which the tests refuse.
LOADER = r"""
import json, sys
import numpy as np
from core.errors import BackboneError
from core.features.backbones import load_backbone
from core.features.registry import weights_status

name, out = sys.argv[1], sys.argv[2]
result = {"before": weights_status(name)}
try:
    backbone = load_backbone(name, "hub", device="cpu", precision="fp32")
except BackboneError as error:
    result["error"] = str(error)
else:
    np.save(out, backbone.embed(np.random.default_rng(0).random((28, 42), dtype=np.float32)))
    result["weights_id"] = backbone.weights_id
result["after"] = weights_status(name)
print(json.dumps(result))
"""


def _image() -> np.ndarray:
    return np.random.default_rng(0).random((28, 42), dtype=np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, dict[str, bytes], np.ndarray]:
    """(saved folder, the repo's files, the folder's embeddings of the fixed image loaded locally)."""
    folder = tmp_path_factory.mktemp("tiny_dinov2")
    files = tiny_dinov2_files(folder)
    reference = load_backbone(NAME, str(folder), device="cpu", precision="fp32").embed(_image())
    assert reference.shape == (2, 3, 32)
    return folder, files, reference


@pytest.fixture
def hub(model):
    with FakeHub(model[1], repo=REPO) as server:
        yield server


def run_loader(tmp_path: Path, endpoint: str, offline: bool = False) -> tuple[dict, np.ndarray | None]:
    """The product's hub loader in a fresh interpreter with HF_HOME=tmp_path/hf; (JSON result, embeddings or None)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint, NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    out = tmp_path / "embeddings.npy"
    out.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-c", LOADER, NAME, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), (np.load(out) if out.exists() else None)


def repo_cache(tmp_path: Path) -> Path:
    return tmp_path / "hf" / "hub" / "models--facebook--dinov2-small"


def leftovers(tmp_path: Path) -> list[str]:
    """Temporary download files left anywhere in the cache."""
    return sorted(p.name for p in (tmp_path / "hf").rglob("*") if p.name.endswith(".incomplete"))


def test_first_use_downloads_and_caches_then_second_use_needs_no_network(hub, model, tmp_path, monkeypatch):
    folder, files, reference = model
    result, embeddings = run_loader(tmp_path, hub.endpoint)
    assert result == {"before": "not cached", "weights_id": f"hub:{REPO}@{COMMIT}", "after": "cached"}
    assert np.array_equal(embeddings, reference)  # bit-identical to from_pretrained on the saved folder
    # one GET each for the config and the weights (the weights through the CDN redirect), all bytes sent
    assert [r.sent for r in hub.gets("config.json")] == [len(files["config.json"])]
    assert [r.sent for r in hub.gets(WEIGHTS)] == [len(files[WEIGHTS])]
    # the standard cache layout: refs/main -> snapshots/<commit> -> blobs/<sha256 of the weights>
    cache = repo_cache(tmp_path)
    assert (cache / "refs" / "main").read_text() == COMMIT
    blob = cache / "blobs" / hashlib.sha256(files[WEIGHTS]).hexdigest()
    assert blob.read_bytes() == files[WEIGHTS]
    assert (cache / "snapshots" / COMMIT / WEIGHTS).resolve() == blob.resolve()
    assert leftovers(tmp_path) == []

    # weights_status and the default rule in this process see the same cache
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    assert weights_status(NAME) == "cached" and default_backbone_name() == NAME

    # second use, hub still up and HF_HUB_OFFLINE unset: loaded from the cache without a single request
    hub.clear_log()
    result, embeddings = run_loader(tmp_path, hub.endpoint)
    assert result == {"before": "cached", "weights_id": f"hub:{REPO}@{COMMIT}", "after": "cached"}
    assert hub.requests == [] and np.array_equal(embeddings, reference)

    # third use with no hub at all and HF_HUB_OFFLINE=1
    hub.stop()
    result, embeddings = run_loader(tmp_path, hub.endpoint, offline=True)
    assert result["weights_id"] == f"hub:{REPO}@{COMMIT}" and np.array_equal(embeddings, reference)


def test_interrupted_downloads_of_sharded_weights_are_retried(model, tmp_path_factory, tmp_path):
    """Sharded weights (an index and two shards) with two broken answers: a dropped connection (half of
    shard 1, then the socket closes) is resumed by huggingface_hub; a complete-looking but short answer
    (half the config, with a matching Content-Length) fails the size check against the HEAD's size and is
    fetched once more by the loader. The result is the same model as the single-file folder."""
    _, _, reference = model
    files = tiny_dinov2_files(tmp_path_factory.mktemp("sharded"), max_shard_size="150KB")
    shard = "model-00001-of-00002.safetensors"
    assert {shard, "model-00002-of-00002.safetensors", "model.safetensors.index.json"} < set(files)
    assert WEIGHTS not in files
    with FakeHub(files, repo=REPO) as hub:
        hub.truncate(shard, times=1, mode="cut")
        hub.truncate("config.json", times=1, mode="short")
        result, embeddings = run_loader(tmp_path, hub.endpoint)
    assert result == {"before": "not cached", "weights_id": f"hub:{REPO}@{COMMIT}", "after": "cached"}
    assert np.array_equal(embeddings, reference)
    size, half = len(files[shard]), len(files[shard]) // 2
    assert [r.sent for r in hub.gets(shard)] in ([half, size], [half, size - half])  # again, or the rest by Range
    assert [r.sent for r in hub.gets("config.json")] == [len(files["config.json"]) // 2, len(files["config.json"])]
    for name in ("model-00002-of-00002.safetensors", "model.safetensors.index.json"):
        assert [r.sent for r in hub.gets(name)] == [len(files[name])]
    assert leftovers(tmp_path) == []


def test_a_download_that_stays_short_is_refused_and_nothing_partial_is_cached(hub, model, tmp_path):
    folder, files, reference = model
    size, half = len(files[WEIGHTS]), len(files[WEIGHTS]) // 2
    hub.truncate(WEIGHTS, times=2, mode="short")
    result, embeddings = run_loader(tmp_path, hub.endpoint)
    assert embeddings is None and result["before"] == result["after"] == "not cached"
    message = result["error"]
    assert f"downloading {WEIGHTS} of {REPO} from {hub.endpoint} failed twice" in message
    assert f"should be of size {size} but has size {half}" in message
    assert "nothing incomplete was kept" in message and "running the same command again retries" in message
    assert "(3) --weights random" in message
    assert [r.sent for r in hub.gets(WEIGHTS)] == [half, half]
    sha = hashlib.sha256(files[WEIGHTS]).hexdigest()
    assert not (repo_cache(tmp_path) / "blobs" / sha).exists() and leftovers(tmp_path) == []
    assert not (repo_cache(tmp_path) / "snapshots" / COMMIT / WEIGHTS).exists()

    # as the message says: the same command again (the hub now answers whole) downloads and loads
    result, embeddings = run_loader(tmp_path, hub.endpoint)
    assert result == {"before": "not cached", "weights_id": f"hub:{REPO}@{COMMIT}", "after": "cached"}
    assert np.array_equal(embeddings, reference)


def _cache_with_cut_weights(tmp_path: Path, files: dict[str, bytes], keep: int) -> Path:
    """The cache layout huggingface_hub writes, with the weights blob cut to ``keep`` bytes (a disk that filled
    up, a cache copied while it was written); returns the blob."""
    cache = repo_cache(tmp_path)
    snapshot = cache / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (cache / "blobs").mkdir()
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(COMMIT)
    for name, data, blob_name in (("config.json", files["config.json"], "c0ffee"),
                                  (WEIGHTS, files[WEIGHTS][:keep], hashlib.sha256(files[WEIGHTS]).hexdigest())):
        (cache / "blobs" / blob_name).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob_name))
    return cache / "blobs" / hashlib.sha256(files[WEIGHTS]).hexdigest()


def test_a_cut_cached_file_is_refused_offline_and_downloaded_again_online(hub, model, tmp_path):
    folder, files, reference = model
    size, keep = len(files[WEIGHTS]), 100_000
    blob = _cache_with_cut_weights(tmp_path, files, keep)
    result, embeddings = run_loader(tmp_path, hub.endpoint, offline=True)
    assert embeddings is None and result["before"] == result["after"] == "cached"  # presence only: see docs
    message = result["error"]
    assert f"{WEIGHTS}: {keep} bytes, but its safetensors header describes {size}" in message
    assert "HF_HUB_OFFLINE is set" in message and f"delete {repo_cache(tmp_path)}" in message
    assert hub.requests == [] and blob.stat().st_size == keep  # offline: nothing fetched, nothing deleted

    result, embeddings = run_loader(tmp_path, hub.endpoint)  # with network: the cut file is replaced
    assert result == {"before": "cached", "weights_id": f"hub:{REPO}@{COMMIT}", "after": "cached"}
    assert np.array_equal(embeddings, reference)
    assert [r.sent for r in hub.gets(WEIGHTS)] == [size] and hub.gets("config.json") == []
    assert blob.read_bytes() == files[WEIGHTS]


def test_weights_file_problem(model, tmp_path):
    """The header check: a safetensors file must be exactly 8 + header + data bytes; a zip .bin needs its end."""
    folder, files, _ = model
    whole = files[WEIGHTS]
    header = 8 + int.from_bytes(whole[:8], "little")
    cases = {"whole": whole, "cut": whole[:1000], "padded": whole + b"\0", "tiny": whole[:5],
             "header_only": whole[:header]}
    for label, data in cases.items():
        (tmp_path / f"{label}.safetensors").write_bytes(data)
    assert weights_file_problem(tmp_path / "whole.safetensors") is None
    assert weights_file_problem(tmp_path / "cut.safetensors") == f"1000 bytes, but its header alone claims {header}"
    assert weights_file_problem(tmp_path / "padded.safetensors") == (
        f"{len(whole) + 1} bytes, but its safetensors header describes {len(whole)}")
    assert weights_file_problem(tmp_path / "tiny.safetensors") == "5 bytes, too short for a safetensors header"
    assert weights_file_problem(tmp_path / "header_only.safetensors") == (
        f"{header} bytes, but its safetensors header describes {len(whole)}")
    assert weights_file_problem(folder / "config.json") is None
    assert weights_file_problem(tmp_path / "missing.safetensors").startswith("unreadable")
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", b"x" * 1000)
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    assert weights_file_problem(tmp_path / "pytorch_model.bin") is None
    (tmp_path / "pytorch_model.bin").write_bytes(data[:600])
    assert weights_file_problem(tmp_path / "pytorch_model.bin") == "a zip archive without its end record (cut short)"


def test_cached_snapshot_names_the_damaged_file(model, tmp_path):
    folder, files, _ = model
    _cache_with_cut_weights(tmp_path, files, 100_000)
    snapshot = cached_snapshot(REPO, tmp_path / "hf" / "hub")
    weights = repo_cache(tmp_path) / "snapshots" / COMMIT / WEIGHTS
    assert (snapshot.commit, snapshot.weights) == (COMMIT, (weights,))
    assert snapshot.damaged == ((weights, f"100000 bytes, but its safetensors header describes {len(files[WEIGHTS])}"),)
    assert cached_snapshot(REPO, tmp_path / "hf" / "hub", check=False).damaged == ()
    assert cached_snapshot(REPO, tmp_path / "elsewhere") is None
