"""The set-up script behind the README's two commands: installs only what is missing."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def make_project(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the set-up script and requirement files, and a stand-in venv whose python logs its calls."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(PROJECT / "scripts" / "setup_env.sh", project / "scripts")
    for name in ("requirements.txt", "requirements-dev.txt"):
        shutil.copy(PROJECT / name, project / name)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    python.chmod(0o755)
    return project, venv, log


def source(project: Path, venv: Path, requirements: str) -> None:
    subprocess.run(["bash", "-c", f"source scripts/setup_env.sh {requirements}"], cwd=project, check=True,
                   env={"PATH": "/usr/bin:/bin", "PROTOSCOPE_VENV": str(venv), "PYTHON": "python3"},
                   capture_output=True)


def test_app_setup_reuses_a_current_test_install(tmp_path):
    project, venv, log = make_project(tmp_path)
    digest = hashlib.sha256((project / "requirements.txt").read_bytes()
                            + (project / "requirements-dev.txt").read_bytes()).hexdigest()
    (venv / ".installed-requirements-dev.txt").write_text(digest + "\n")
    source(project, venv, "requirements.txt")
    assert not log.exists()  # no pip run: the test install is a superset


def test_app_setup_installs_when_nothing_is_installed(tmp_path):
    project, venv, log = make_project(tmp_path)
    source(project, venv, "requirements.txt")
    calls = log.read_text()
    assert "pip install --quiet torch==2.13.0" in calls
    assert f"-r {project}/requirements.txt" in calls
    # and the second run finds its own stamp
    log.unlink()
    source(project, venv, "requirements.txt")
    assert not log.exists()
