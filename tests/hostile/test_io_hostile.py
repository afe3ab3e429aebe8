"""Every hostile file of `corpus_io` through the real command line: refused cleanly, or read correctly.

For each file, ``python -m core info FILE`` and ``python -m core export FILE --out OUT.tif`` run in a
subprocess (two at a time). A file marked 'error' must give exit status 2 and exactly one stderr line
``error: ...`` naming the file, no traceback, nothing in the output folder (no output, no temp file),
and an unchanged input. A file marked 'ok' must give exit 0 and an output TIFF holding the same planes.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from core.io import open_stack
from hostile.corpus_io import CORPUS, ERROR, OK, write_corpus

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# about 90 interpreter starts: 25 s on an idle 2-core machine
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Case:
    path: Path
    expectation: str
    sha_before: str
    out_dir: Path
    info: Run
    export: Run


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(*args: str | Path) -> Run:
    done = subprocess.run([sys.executable, "-m", "core", *map(str, args)], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=300)
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("hostile")
    corpus = write_corpus(root / "in")
    shas = {path: _sha256(path) for path, _ in corpus}
    out_dirs = {path: root / "out" / path.name for path, _ in corpus}
    for folder in out_dirs.values():
        folder.mkdir(parents=True)
    jobs = [("info", path, ("info", path)) for path, _ in corpus]
    jobs += [("export", path, ("export", path, "--out", out_dirs[path] / "OUT.tif")) for path, _ in corpus]
    with ThreadPoolExecutor(max_workers=2) as pool:  # the test machine has two cores
        runs = dict(zip(((kind, path) for kind, path, _ in jobs), pool.map(lambda job: _run(*job[2]), jobs)))
    return {
        path.name: Case(path, expectation, shas[path], out_dirs[path], runs[("info", path)], runs[("export", path)])
        for path, expectation in corpus
    }


def test_the_corpus_is_large_and_mixed():
    expectations = [expectation for _, expectation in CORPUS.values()]
    assert len(expectations) >= 25
    assert expectations.count(ERROR) >= 20 and expectations.count(OK) >= 5
    assert {Path(name).suffix for name in CORPUS} == {".ims", ".tif", ".png"}


def _assert_refused(run: Run, case: Case, command: str) -> None:
    lines = run.stderr.splitlines()
    assert run.returncode == 2, (command, run)
    assert "Traceback" not in run.stderr, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), (command, run.stderr)
    assert case.path.name in lines[0], (command, lines[0])


@pytest.mark.parametrize("name", [n for n, (_, e) in CORPUS.items() if e == ERROR])
def test_hostile_file_is_refused_with_one_line(cases, name):
    case = cases[name]
    _assert_refused(case.info, case, "info")
    _assert_refused(case.export, case, "export")
    assert sorted(p.name for p in case.out_dir.iterdir()) == []  # no output and no temp file
    assert _sha256(case.path) == case.sha_before  # the input is never written


@pytest.mark.parametrize("name", [n for n, (_, e) in CORPUS.items() if e == OK])
def test_odd_but_valid_file_is_read_and_exported(cases, name):
    case = cases[name]
    assert case.info.returncode == 0, case.info
    assert "shape:" in case.info.stdout
    assert case.export.returncode == 0, case.export
    assert "Traceback" not in case.export.stderr
    out = case.out_dir / "OUT.tif"
    assert sorted(p.name for p in case.out_dir.iterdir()) == ["OUT.tif"]  # the temp was renamed into place
    with open_stack(case.path) as source, open_stack(out) as exported:
        n_z, _, n_y, n_x = source.shape
        assert exported.shape == (n_z, 1, n_y, n_x)
        assert exported.dtype == source.dtype
        for z in range(n_z):
            np.testing.assert_array_equal(exported.read_slice(z), source.read_slice(z, 0))
    assert _sha256(case.path) == case.sha_before
