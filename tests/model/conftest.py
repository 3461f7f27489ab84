"""Model-test fixtures: tiny checkpoints are built once per session into one directory."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("ckpts"))
