"""Fixtures for the code blocks of README.md and docs/ (run by `pytest --markdown-docs`)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the block in a fresh folder: no example writes into the checkout."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
