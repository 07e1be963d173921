"""The module-scoped tiny server fixture (the server process helpers are in
tests/helpers/server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.server import Server, tiny_server_running


@pytest.fixture(scope="module")
def tiny_server(
    tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    yield from tiny_server_running(tiny_checkpoints, tmp_path_factory, "--max-waiting", "64")
