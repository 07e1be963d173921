"""End to end, as a user runs it: `moeflow serve --role prefill`, `moeflow serve --role decode`
(two processes, a gloo pair on loopback) and `moeflow router` in front, on a tiny deepseek_v3
(MLA's latent cache). Through the router, answers (whole and streamed, with logprobs) equal the
decode instance's own colocated answers; when the prefill instance goes away the router answers
502 in the OpenAI shape, and the decode instance recomputes what it no longer receives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.helpers.server import Server, free_port, stop_server

FLAGS = ("--dtype", "float32", "--max-model-len", "256", "--served-model-name", "tiny")


def _spawn(tmp: Path, name: str, *args: str) -> Server:
    port = free_port()
    log = tmp / f"{name}.log"
    with open(log, "wb") as f:
        cmd = [sys.executable, "-m", "moeflow", *args, "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    return Server("127.0.0.1", port, proc, log)


def _wait_healthy(server: Server, wait_s: float = 300) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"exited {server.proc.returncode}: {server.log.read_text()}")
        try:
            if server.request("GET", "/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    server.proc.kill()
    raise RuntimeError(f"not healthy: {server.log.read_text()}")


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("pd")
    model = str(make_tiny_checkpoint("deepseek_v3", tmp / "m"))
    addr = f"127.0.0.1:{free_port()}"
    servers: dict[str, Server] = {}
    try:
        for role in ("prefill", "decode"):
            servers[role] = _spawn(
                tmp, role, "serve", model, *FLAGS, "--role", role, "--kv-transfer-addr", addr
            )
        for role in ("prefill", "decode"):
            _wait_healthy(servers[role])
        servers["router"] = _spawn(
            tmp,
            "router",
            "router",
            "--prefill",
            f"http://127.0.0.1:{servers['prefill'].port}",
            "--decode",
            f"http://127.0.0.1:{servers['decode'].port}",
        )
        _wait_healthy(servers["router"], 60)
        yield servers
    finally:
        for server in servers.values():
            if server.proc.poll() is None:
                server.proc.kill()


def _post(server: Server, path: str, body: dict) -> tuple[int, dict]:
    status, _, data = server.request("POST", path, body)
    return status, json.loads(data)


def _stream_text(server: Server, path: str, body: dict) -> str:
    status, _, data = server.request("POST", path, {**body, "stream": True})
    assert status == 200
    lines = [ln.removeprefix("data: ") for ln in data.decode().splitlines() if ln]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(ln) for ln in lines[:-1]]
    assert not any("error" in c for c in chunks), chunks
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


CHATS = [
    {"messages": [{"role": "user", "content": text}], "max_tokens": n, "temperature": 0}
    for text, n in (("hello there", 8), ("a longer question about the weather " * 3, 12))
]


def test_router_answers_equal_the_colocated_ones(pd: dict[str, Server]) -> None:
    router, decode = pd["router"], pd["decode"]
    for chat in CHATS:
        body = {**chat, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
        status, want = _post(decode, "/v1/chat/completions", body)  # colocated, one instance
        assert status == 200
        status, got = _post(router, "/v1/chat/completions", body)
        assert status == 200, got
        (g,), (w,) = got["choices"], want["choices"]
        assert g["message"]["content"] == w["message"]["content"]
        assert g["finish_reason"] == w["finish_reason"] == "length"
        assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]
        g_lps, w_lps = g["logprobs"]["content"], w["logprobs"]["content"]
        assert [e["token"] for e in g_lps] == [e["token"] for e in w_lps]
        for ge, we in zip(g_lps, w_lps, strict=True):
            assert ge["logprob"] == pytest.approx(we["logprob"], abs=1e-4)
        assert _stream_text(router, "/v1/chat/completions", body) == w["message"]["content"]
    status, _, models = router.request("GET", "/v1/models")
    assert status == 200 and json.loads(models)["data"][0]["id"] == "tiny"
    # What an instance refuses: one transfer per request, and its own role only.
    kv = {"transfer_id": "x", "do_remote_prefill": True}
    status, body = _post(
        decode, "/v1/chat/completions", {**CHATS[0], "n": 2, "kv_transfer_params": kv}
    )
    assert status == 400 and body["error"]["param"] == "kv_transfer_params"
    kv = {"transfer_id": "x", "do_remote_decode": True}
    status, body = _post(decode, "/v1/chat/completions", {**CHATS[0], "kv_transfer_params": kv})
    assert status == 400 and "--role decode" in body["error"]["message"]
    log = decode.log.read_text()
    assert "recomputing" not in log and "failed" not in log  # every prompt's KV was received


def test_without_the_prefill_instance(pd: dict[str, Server]) -> None:
    router, decode, prefill = pd["router"], pd["decode"], pd["prefill"]
    chat = {**CHATS[0], "ignore_eos": True}
    status, want = _post(decode, "/v1/chat/completions", chat)
    assert status == 200
    assert stop_server(prefill) == 0, prefill.log.read_text()  # drained, said goodbye
    status, body = _post(router, "/v1/chat/completions", chat)
    assert status == 502 and "prefill instance did not answer" in body["error"]["message"]
    assert router.request("GET", "/health")[0] == 503
    # The decode instance alone: a transfer that can no longer come is recomputed.
    kv = {"transfer_id": "lost-1", "do_remote_prefill": True}
    status, got = _post(decode, "/v1/chat/completions", {**chat, "kv_transfer_params": kv})
    assert status == 200 and got["choices"][0]["message"] == want["choices"][0]["message"]
    assert "recomputing" in decode.log.read_text()
    for name in ("router", "decode"):
        pd[name].proc.send_signal(signal.SIGTERM)
        assert pd[name].proc.wait(timeout=60) == 0, pd[name].log.read_text()
