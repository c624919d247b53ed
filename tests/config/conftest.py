from pathlib import Path

import pytest


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory: config paths are relative to it, as for a user's run."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
