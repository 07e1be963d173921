"""A rank killed while `moeflow serve --tensor-parallel-size 2` runs: /health stops reporting
healthy and the server exits non-zero within seconds (never hangs on the dead group)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.helpers.server import start_server


def _rank_processes(pid: int) -> list[int]:
    """The server's children that run a rank (not, e.g., a kernel build's probe)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"moeflow.engine.executor" in cmdline:
                found.append(int(child))
    return found


def test_killed_rank_ends_the_server(tmp_path: Path) -> None:
    model = make_tiny_checkpoint("qwen3_moe", tmp_path / "qwen3_moe")
    server = start_server(
        str(model),
        tmp_path,
        *("--dtype", "float32", "--device", "cpu", "--max-model-len", "128"),
        *("--tensor-parallel-size", "2", "--served-model-name", "tiny"),
        wait_s=240,
    )
    try:
        status = server.request(
            "POST",
            "/v1/completions",
            {"model": "tiny", "prompt": "abc", "max_tokens": 3, "temperature": 0},
            timeout=300,  # a first forward may wait for the CPU kernels' build
        )[0]
        assert status == 200  # the group serves
        ranks = _rank_processes(server.proc.pid)
        assert len(ranks) == 1, ranks  # rank 1
        killed_at = time.monotonic()
        os.kill(ranks[0], signal.SIGKILL)
        time.sleep(0.3)  # the monitor polls every 0.1 s
        try:
            health = server.request("GET", "/health", timeout=2)[0]
        except OSError:
            health = None  # already gone
        assert health != 200
        code = server.proc.wait(timeout=10)
        assert time.monotonic() - killed_at < 10
        assert code != 0, server.log.read_text()[-2000:]
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            pytest.fail(f"the server outlived its dead rank: {server.log.read_text()[-2000:]}")
