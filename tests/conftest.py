"""Shared test fixtures: where the developers' real data live, and a skip when they are absent."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (PROJECT_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when the folder is absent (a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (only on the developers' machines)")
    return SHARED_DATA


@pytest.fixture
def one_torch_thread():
    """Tiny nets run faster on one thread, and the 2-core test machine is shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _private_workspaces(tmp_path_factory, monkeypatch):
    """Every test's app sessions save their workspaces in a fresh folder, never in the user's own."""
    monkeypatch.setenv("PROTOSCOPE_WORKSPACES", str(tmp_path_factory.mktemp("workspaces")))
