"""`moeflow router` against scripted backends (httpx.MockTransport): what it sends to the
prefill and the decode instance, streaming passthrough, and every failure as an OpenAI error
body (a backend's own 4xx/5xx passed on, an unreachable or broken backend 502)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from moeflow.disagg.router import RouterConfig, create_router_app

PREFILL, DECODE = "http://prefill:1", "http://decode:2"
Handler = Callable[[httpx.Request], httpx.Response]


def _client(prefill: Handler, decode: Handler) -> TestClient:
    def route(request: httpx.Request) -> httpx.Response:
        return prefill(request) if request.url.host == "prefill" else decode(request)

    config = RouterConfig(PREFILL, DECODE, timeout_s=5)
    return TestClient(create_router_app(config, httpx.MockTransport(route)))


def _ok(body: dict[str, Any]) -> Handler:
    return lambda request: httpx.Response(200, json=body)


def _error(status: int, message: str) -> Handler:
    body = {"error": {"message": message, "type": "x", "param": None, "code": None}}
    return lambda request: httpx.Response(status, json=body)


def _unreachable(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def _assert_openai_error(resp: httpx.Response, status: int, words: str) -> None:
    assert resp.status_code == status
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"]


def test_prefill_then_decode_with_one_transfer_id() -> None:
    seen: list[tuple[str, dict[str, Any], str | None]] = []

    def record(answer: dict[str, Any]) -> Handler:
        def handler(request: httpx.Request) -> httpx.Response:
            body = json.loads(request.content)
            seen.append((request.url.host, body, request.headers.get("authorization")))
            return httpx.Response(200, json=answer)

        return handler

    final = {"id": "chatcmpl-1", "choices": [{"message": {"content": "hi"}}]}
    client = _client(record({"id": "p"}), record(final))
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 7,
        "max_completion_tokens": 6,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }
    resp = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"})
    assert resp.status_code == 200 and resp.json() == final
    (p_host, p_body, p_auth), (d_host, d_body, d_auth) = seen
    assert (p_host, d_host) == ("prefill", "decode") and p_auth == d_auth == "Bearer k"
    transfer_id = p_body["kv_transfer_params"]["transfer_id"]
    assert p_body == {
        **{k: v for k, v in body.items() if k != "stream_options"},
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "stream": False,
        "kv_transfer_params": {"transfer_id": transfer_id, "do_remote_decode": True},
    }
    assert d_body == {
        **body,
        "kv_transfer_params": {"transfer_id": transfer_id, "do_remote_prefill": True},
    }


def test_streams_pass_through() -> None:
    events = b'data: {"choices": [{"text": "a"}]}\n\ndata: {"choices": [{"text": "b"}]}\n\n'
    events += b"data: [DONE]\n\n"

    def decode(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        return httpx.Response(200, content=events, headers={"content-type": "text/event-stream"})

    client = _client(_ok({}), decode)
    with client.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.read() == events


class _Broken(httpx.AsyncByteStream):
    async def __aiter__(self):  # noqa: ANN204
        yield b'data: {"choices": [{"text": "a"}]}\n\n'
        raise httpx.ReadError("connection reset")


def test_a_broken_stream_ends_with_an_error_event() -> None:
    client = _client(_ok({}), lambda request: httpx.Response(200, stream=_Broken()))
    with client.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as resp:
        events = [line for line in resp.iter_lines() if line]
    assert events[0] == 'data: {"choices": [{"text": "a"}]}'
    error = json.loads(events[1].removeprefix("data: "))["error"]
    assert "stream broke" in error["message"] and error["type"] == "server_error"
    assert events[2:] == ["data: [DONE]"]


@pytest.mark.parametrize("stream", [False, True])
def test_failures_are_openai_errors(stream: bool) -> None:
    body = {"prompt": "x", "stream": stream}
    ok = _ok({"id": "p"})
    cases = [
        (_unreachable, ok, 502, "prefill instance did not answer"),
        (_error(500, "boom"), ok, 502, "prefill instance failed: boom"),
        (_error(400, "max_tokens is too large"), ok, 400, "max_tokens is too large"),
        (ok, _unreachable, 502, "decode instance did not answer"),
        (ok, _error(500, "KV transfer t failed: checksum"), 500, "KV transfer t failed"),
        (ok, _error(503, "the KV transfer link is down"), 503, "link is down"),
    ]
    for prefill, decode, status, words in cases:
        _assert_openai_error(
            _client(prefill, decode).post("/v1/completions", json=body), status, words
        )


def test_requests_the_router_cannot_split_are_refused() -> None:
    client = _client(_ok({}), _ok({}))
    chat = {"messages": [{"role": "user", "content": "x"}]}
    _assert_openai_error(client.post("/v1/chat/completions", json={**chat, "n": 2}), 400, "n = 1")
    for prompt in (["a", "b"], [[1, 2], [3]]):
        resp = client.post("/v1/completions", json={"prompt": prompt})
        _assert_openai_error(resp, 400, "one prompt")
    resp = client.post(
        "/v1/completions", content=b"{bad", headers={"content-type": "application/json"}
    )
    _assert_openai_error(resp, 400, "")
    resp = client.post("/v1/completions", content=b"{}", headers={"content-type": "text/plain"})
    _assert_openai_error(resp, 415, "application/json")


def test_health_and_models() -> None:
    models = {"object": "list", "data": [{"id": "tiny"}]}
    client = _client(_ok({"status": "ok"}), _ok(models))
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/v1/models").json() == models
    resp = _client(_unreachable, _ok({})).get("/health")
    assert resp.status_code == 503 and "prefill" in resp.json()["reason"]
    resp = _client(_ok({}), _error(503, "dead")).get("/health")
    assert resp.status_code == 503 and "decode: HTTP 503" in resp.json()["reason"]
    _assert_openai_error(_client(_ok({}), _unreachable).get("/v1/models"), 502, "decode")
