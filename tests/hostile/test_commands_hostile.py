"""Every case of `corpus_commands` through the real command line (issue #12): refused cleanly, or done.

Each case runs ``python -m core ...`` in its own interpreter, two at a time. A case marked 'error' must give
exit status 2 and exactly one stderr line, ``error: ...``, holding the case's text — nothing before it: the
commands check points, prototype files, options, slices, channels, time points and outputs before they load a
backbone or print progress, so a refused command prints no progress line either —, no traceback, nothing new
in its output folder (no output, no ``.~protoscope-*`` temp, no folder created), and every input file's SHA-256
unchanged. A case marked 'ok' must exit 0 and leave the files it names.

The runs share one HF_HOME without weights (DINOv2 is never available, so the default backbone is the filter
bank everywhere) and one embedding cache folder outside every output folder.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.prototypes import load_prototype
from hostile.corpus_commands import CASES, ERROR, OK, SHAPE, write_inputs

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # seconds per case; the 50k-point case must finish well within it (pixel examples are capped)

# about 230 interpreter starts, most importing torch: ~3 min on the 2-core machine
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Result:
    run: Run
    out: Path
    before: dict[str, str]  # output folder listing before the run: name -> SHA-256 ('' for a folder)
    skipped: str = ""  # why the case could not be set up here (read-only folders when running as root)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _listing(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in folder.iterdir()} if folder.is_dir() else {}


def _read_only_works(folder: Path) -> bool:
    """Whether chmod 555 stops this user writing in `folder` (it does not stop root)."""
    probe = folder / "probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        return True
    probe.unlink()
    return False


def _setup(setup: str, out: Path) -> str:
    """Prepare the case's output folder; returns a reason to skip, or ''."""
    if setup == "existing":
        (out / "exists.tif").write_bytes(b"keep me")
        (out / "exists.npz").write_bytes(b"keep me too")
    elif setup in ("read_only", "read_only_sub"):
        folder = out / "ro" if setup == "read_only_sub" else out
        folder.mkdir(exist_ok=True)
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        if not _read_only_works(folder):
            folder.chmod(0o755)
            return "chmod does not stop this user (root) from writing"
    elif setup:
        raise ValueError(f"unknown setup {setup!r}")
    return ""


def _run(argv: list[str], env: dict[str, str]) -> Run:
    done = subprocess.run([sys.executable, "-m", "core", *argv], capture_output=True, text=True, cwd=PROJECT_ROOT,
                          env=env, timeout=TIMEOUT)
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_commands")
    inputs = root / "in"
    written = write_inputs(inputs)
    hashes = {p.name: _sha256(p) for p in inputs.iterdir()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "PROTOSCOPE_CACHE": str(root / "cache"),
           "PYTHONPATH": str(PROJECT_ROOT)}
    jobs, results = [], {}
    for case in CASES:
        out = root / "out" / case.name
        out.mkdir(parents=True)
        skipped = _setup(case.setup, out)
        results[case.name] = Result(Run(-1, "", ""), out, _listing(out), skipped)
        if not skipped:
            jobs.append((case.name, case.argv(inputs, out)))
    with ThreadPoolExecutor(max_workers=2) as pool:  # the test machine has two cores
        runs = pool.map(lambda job: _run(job[1], env), jobs)
        for (name, _), run in zip(jobs, runs):
            results[name] = Result(run, results[name].out, results[name].before)
    for result in results.values():  # let pytest remove the folders
        for folder in (result.out, result.out / "ro"):
            if folder.is_dir():
                folder.chmod(0o755)
    yield {"inputs": inputs, "written": written, "hashes": hashes, "results": results}


def test_the_corpus_covers_every_command_with_many_cases():
    commands = [case.args[0] for case in CASES]
    assert len(CASES) == len({case.name for case in CASES})  # names are unique
    assert sum(case.expect == ERROR for case in CASES) >= 60
    assert {c: commands.count(c) >= 10 for c in ("prototype", "apply", "evaluate", "export")} == \
        {"prototype": True, "apply": True, "evaluate": True, "export": True}
    assert sum(case.expect == OK for case in CASES) >= 5


@pytest.mark.parametrize("name", [case.name for case in CASES if case.expect == ERROR])
def test_refused_with_one_line_and_nothing_left_behind(corpus, name):
    case = next(c for c in CASES if c.name == name)
    result = corpus["results"][name]
    if result.skipped:
        pytest.skip(result.skipped)
    run = result.run
    lines = run.stderr.splitlines()
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-3000:]
    assert case.says in lines[0], lines[0]
    assert _listing(result.out) == result.before  # no output, no temp, no new folder, the existing file unchanged
    if (result.out / "ro").is_dir():
        assert list((result.out / "ro").iterdir()) == []


def test_no_input_was_changed_and_nothing_was_added_beside_them(corpus):
    inputs = corpus["inputs"]
    assert {p.name: _sha256(p) for p in inputs.iterdir()} == corpus["hashes"]


@pytest.mark.parametrize("name", [case.name for case in CASES if case.expect == OK])
def test_odd_but_valid_case_succeeds(corpus, name):
    case = next(c for c in CASES if c.name == name)
    result = corpus["results"][name]
    run = result.run
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in result.out.iterdir()) == sorted(case.makes)  # the temps were renamed into place


def test_ok_outputs_hold_what_they_should(corpus):
    results = corpus["results"]
    # border points: the corner pixels (0, 0) and (63, 63) select the corner patches of the 8 x 8 grid
    border = load_prototype(results["prototype-ok-border-points"].out / "p.npz")
    assert border.points.positive.tolist() == [[0, 0, 0], [63, 63, 0], [0, 63, 3]]
    assert border.positive_examples.shape == (3, border.embed_dim)
    # 50,000 + 50,000 points: 100,000 points kept, pixel examples capped at 10,000 per class
    many = load_prototype(results["prototype-ok-50k-points"].out / "p.npz")
    assert len(many.points.positive) == 50_000 and len(many.points.negative) == 50_000
    assert many.pixel_positive_examples.shape[0] == 10_000 and many.pixel_negative_examples.shape[0] == 10_000
    one = load_prototype(results["prototype-ok-one-point-each"].out / "p.npz")
    assert one.positive_examples.shape[0] == 1 and one.negative_examples.shape[0] == 1
    assert (results["prototype-ok-into-missing-folder"].out / "new" / "deeper" / "p.npz").is_file()
    # a 2-slice 40 x 48 stack: two pages of its own size, and the areas of both
    with tifffile.TiffFile(results["apply-ok-two-slice-stack"].out / "m.tif") as tif:
        pages = tif.series[0].asarray()
    assert pages.shape == (2, 40, 48) and set(np.unique(pages)) <= {0, 255}
    rows = (results["apply-ok-two-slice-stack"].out / "a.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1"]
    assert [int(row.split(",")[1]) for row in rows[1:]] == [int((page > 0).sum()) for page in pages]
    # --z 1,1,0: slices 1 and 0, the repeat dropped (core.zspec: each slice once, in the order given)
    with tifffile.TiffFile(results["apply-ok-repeated-slices"].out / "m.tif") as tif:
        pages = tif.series[0].asarray()
    assert pages.shape == (2, SHAPE[1], SHAPE[2])
    with tifffile.TiffFile(results["apply-ok-best-one-slice"].out / "m.tif") as tif:
        assert len(tif.pages) == 1 and tif.pages[0].shape == (SHAPE[1], SHAPE[2])
    with tifffile.TiffFile(results["export-ok-ome"].out / "e.ome.tif") as tif:
        exported = tif.series[0].asarray()
    with tifffile.TiffFile(corpus["written"]["stack"]) as tif:
        source = tif.series[0].asarray()  # (Z, C, Y, X)
    np.testing.assert_array_equal(exported, source[[3, 0], 1])
