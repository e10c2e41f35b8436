"""Fixtures shared by unit test modules."""

from __future__ import annotations

import json
import shutil

import pytest

from .flex_helpers import SAMPLE


@pytest.fixture
def sample(tmp_path, monkeypatch):
    """The sample driver installed in a plugin dir, with its log and state in tmp."""
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    shutil.copytree(SAMPLE, plugin_dir / SAMPLE.name)
    log = tmp_path / "driver.log"
    monkeypatch.setenv("VOLPLANE_DEMO_DISK_LOG", str(log))
    monkeypatch.setenv("VOLPLANE_DEMO_DISK_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("VOLPLANE_DEMO_DISK_DIR", str(tmp_path / "disks"))

    class S:
        dir = plugin_dir
        state = tmp_path / "state"

        @staticmethod
        def calls(command=None):
            if not log.exists():
                return []
            out = [json.loads(line) for line in log.read_text().splitlines()]
            return [c for c in out if command is None or c["command"] == command]

    return S
