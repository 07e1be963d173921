"""A real `moeflow serve` subprocess on a free loopback port, stopped with SIGTERM afterwards
(which must exit 0), and the small HTTP client the server tests talk to it with."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Server:
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            if isinstance(body, dict):
                body = json.dumps(body)
            if isinstance(body, str):
                body = body.encode()
            hdrs = {"Content-Type": "application/json"}
            hdrs.update(headers or {})
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        """/metrics through prometheus_client's parser: sample name (with its labels but
        model_name, as `name{k="v"}`) -> value."""
        status, _, body = self.request("GET", "/metrics")
        assert status == 200
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                labels = dict(sample.labels)
                labels.pop("model_name", None)
                inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                out[f"{sample.name}{{{inner}}}" if inner else sample.name] = sample.value
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, tmp: Path, *extra: str, wait_s: float = 180) -> Server:
    port = free_port()
    log = tmp / f"server-{port}.log"
    args = [sys.executable, "-m", "moeflow", "serve", "--port", str(port), *extra]
    if model is not None:
        args += ["--model", model]
    with open(log, "wb") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    server = Server("127.0.0.1", port, proc, log)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()}")
        try:
            if server.request("GET", "/health", timeout=2)[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not become healthy: {log.read_text()}")


def stop_server(server: Server) -> int:
    server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise


def tiny_server_running(
    checkpoints: dict[str, Path], factory: pytest.TempPathFactory, *extra: str
) -> Iterator[Server]:
    """The tiny llama served as "tiny" (fp32, context 256) with `extra` flags; exits 0 on
    SIGTERM afterwards."""
    server = start_server(
        str(checkpoints["llama"]),
        factory.mktemp("srv"),
        *("--dtype", "float32", "--max-model-len", "256", "--served-model-name", "tiny"),
        *extra,
    )
    yield server
    assert stop_server(server) == 0, server.log.read_text()
