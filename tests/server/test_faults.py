"""Load and faults on loopback, each bounded in time: clients that leave mid-stream, before their
first token or while waiting for a non-streamed answer; a full queue; concurrent seeded requests.
Afterwards every accepted request ended exactly once and every KV block is free."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers.server import Server, tiny_server_running


def _raw_post(server: Server, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection((server.host, server.port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    sock.sendall(head + data)
    return sock


def _settled(server: Server, timeout_s: float = 60) -> dict[str, float]:
    """Wait until nothing runs or waits, every block is free and every accepted request has
    ended exactly once (one accepted but still on its way to the engine thread is neither
    running nor waiting yet); return the metrics. Fails when that never happens: a request
    lost, or ended twice."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = server.metrics()
        idle = m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
        all_ended = m["moeflow:requests_accepted_total"] == _ended(m)
        if idle and all_ended and m["vllm:kv_cache_usage_perc"] == 0:
            return m
        assert time.monotonic() < deadline, f"server never settled: {m}"
        time.sleep(0.1)


def _ended(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("vllm:request_success_total{"))


STREAM = {"model": "tiny", "prompt": "abc", "max_tokens": 200, "temperature": 0, "stream": True}


def test_disconnects_mid_stream_and_before_first_token(tiny_server: Server) -> None:
    before = tiny_server.metrics()

    def leave_after_first_chunk(_: int) -> bool:
        with _raw_post(tiny_server, "/v1/completions", {**STREAM, "ignore_eos": True}) as sock:
            got = b""
            while b"data:" not in got:
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                got += chunk
        return True

    def leave_at_once(_: int) -> None:
        _raw_post(tiny_server, "/v1/completions", {**STREAM, "ignore_eos": True}).close()

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(leave_after_first_chunk, range(50)))
        list(pool.map(leave_at_once, range(50)))
    m = _settled(tiny_server)
    aborted = 'vllm:request_success_total{finished_reason="abort"}'
    assert m.get(aborted, 0) - before.get(aborted, 0) >= 50
    # And it still answers.
    status, _, _ = tiny_server.request("POST", "/v1/completions", {**STREAM, "stream": False})
    assert status == 200


def test_non_streaming_disconnect_aborts(tiny_server: Server) -> None:
    before = tiny_server.metrics()
    body = {**STREAM, "stream": False, "ignore_eos": True, "max_tokens": 240}
    socks = [_raw_post(tiny_server, "/v1/completions", body) for _ in range(5)]
    # Close as soon as the engine has admitted all five (a fixed sleep raced the decode, which
    # finishes 240 tokens of the tiny model in well under a second on the CPU kernels).
    accepted = "moeflow:requests_accepted_total"
    deadline = time.monotonic() + 30
    while tiny_server.metrics().get(accepted, 0) - before.get(accepted, 0) < 5:
        assert time.monotonic() < deadline, "the server never admitted the five requests"
        time.sleep(0.005)
    for s in socks:
        s.close()
    m = _settled(tiny_server)
    aborted = 'vllm:request_success_total{finished_reason="abort"}'
    assert m.get(aborted, 0) - before.get(aborted, 0) == 5


def test_concurrent_seeded_requests_equal_solo(tiny_server: Server) -> None:
    def run(seed: int) -> str:
        body = {"model": "tiny", "prompt": "q", "max_tokens": 16, "temperature": 1.0, "seed": seed}
        status, _, resp = tiny_server.request("POST", "/v1/completions", body)
        assert status == 200
        return json.loads(resp)["choices"][0]["text"]

    solo = [run(s) for s in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, range(8)))
    assert together == solo
    _settled(tiny_server)


@pytest.fixture(scope="module")
def narrow_server(
    tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    yield from tiny_server_running(
        tiny_checkpoints, tmp_path_factory, "--max-num-seqs", "1", "--max-waiting", "2"
    )


def test_queue_full_is_503_quickly(narrow_server: Server) -> None:
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 240, "ignore_eos": True}

    def post(_: int) -> tuple[int, float, dict[str, str]]:
        start = time.monotonic()
        status, headers, _ = narrow_server.request("POST", "/v1/completions", body, timeout=120)
        return status, time.monotonic() - start, headers

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(post, range(8)))
    rejected = [r for r in results if r[0] == 503]
    assert rejected, results
    assert all(r[0] in (200, 503) for r in results)
    assert all("Retry-After" in r[2] or "retry-after" in r[2] for r in rejected)
    # Refusals answer at once (the bound is loose for a loaded 2-core CI machine).
    assert min(r[1] for r in rejected) < 1.0
    _settled(narrow_server)
