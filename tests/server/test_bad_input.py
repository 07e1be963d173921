"""Every row of docs/RELIABILITY.md's bad-input table, as raw HTTP: the status, the OpenAI error
envelope, and a good request still answered afterwards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.server import Server, tiny_server_running

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _good(**over: object) -> dict:
    return {**GOOD, **over}


def _comp(**over: object) -> dict:
    return {"model": "tiny", "prompt": "hi", "max_tokens": 2, **over}


# (id, path, body, headers, expected status, text the message or param must mention)
CASES: list[tuple[str, str, object, dict[str, str], int, str]] = [
    ("not-json", CHAT, b"{not json", {}, 400, ""),
    ("truncated", CHAT, json.dumps(GOOD)[:-5].encode(), {}, 400, ""),
    ("not-object", CHAT, b"[1, 2]", {}, 400, "object"),
    (
        "nan",
        CHAT,
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        {},
        400,
        "",
    ),
    (
        "infinity",
        CHAT,
        b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
        {},
        400,
        "",
    ),
    ("bad-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', {}, 400, ""),
    (
        "lone-surrogate",
        CHAT,
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        {},
        400,
        "",
    ),
    ("content-type", CHAT, json.dumps(GOOD).encode(), {"Content-Type": "text/plain"}, 415, ""),
    ("body-too-big", COMP, json.dumps(_comp(prompt="a" * (9 << 20))).encode(), {}, 413, ""),
    ("headers-too-big", CHAT, GOOD, {"X-Big": "a" * 40_000}, 431, ""),
    ("unknown-model", CHAT, _good(model="gpt-9"), {}, 404, "model"),
    ("empty-messages", CHAT, _good(messages=[]), {}, 400, "messages"),
    ("malformed-message", CHAT, _good(messages=[{"content": "x"}]), {}, 400, "messages"),
    ("bad-role", CHAT, _good(messages=[{"role": "wizard", "content": "x"}]), {}, 400, "messages"),
    ("empty-prompt", COMP, _comp(prompt=""), {}, 400, "prompt"),
    ("empty-prompt-list", COMP, _comp(prompt=[]), {}, 400, "prompt"),
    ("negative-token", COMP, _comp(prompt=[1, -2]), {}, 400, "prompt"),
    ("token-over-vocab", COMP, _comp(prompt=[1, 100_000]), {}, 400, "prompt"),
    ("context-exceeded", COMP, _comp(prompt=[1] * 300), {}, 400, "context_length_exceeded"),
    ("max-tokens-0", CHAT, _good(max_tokens=0), {}, 400, "max_tokens"),
    ("max-tokens-neg", CHAT, _good(max_tokens=-1), {}, 400, "max_tokens"),
    ("max-tokens-float", CHAT, _good(max_tokens=1.5), {}, 400, "max_tokens"),
    ("max-tokens-string", CHAT, _good(max_tokens="5"), {}, 400, "max_tokens"),
    ("max-tokens-over-context", COMP, _comp(max_tokens=1000), {}, 400, "max_tokens"),
    ("n-cap", CHAT, _good(n=1000), {}, 400, "n"),
    ("top-logprobs-cap", CHAT, _good(logprobs=True, top_logprobs=99), {}, 400, "top_logprobs"),
    ("stop-cap", CHAT, _good(stop=[str(i) for i in range(50)]), {}, 400, "stop"),
    (
        "logit-bias-cap",
        CHAT,
        _good(logit_bias={str(i): 1 for i in range(5000)}),
        {},
        400,
        "logit_bias",
    ),
    ("logit-bias-range", CHAT, _good(logit_bias={"1": 500}), {}, 400, "logit_bias"),
    ("temperature", CHAT, _good(temperature=-0.5), {}, 400, "temperature"),
    ("top-p", CHAT, _good(top_p=0), {}, 400, "top_p"),
    ("top-k", CHAT, _good(top_k=-5), {}, 400, "top_k"),
    ("min-p", CHAT, _good(min_p=1.5), {}, 400, "min_p"),
    ("presence", CHAT, _good(presence_penalty=3), {}, 400, "presence_penalty"),
    ("frequency", CHAT, _good(frequency_penalty=-3), {}, 400, "frequency_penalty"),
    ("repetition", CHAT, _good(repetition_penalty=0), {}, 400, "repetition_penalty"),
    ("seed", CHAT, _good(seed=-1), {}, 400, "seed"),
    (
        "json-schema-without-schema",
        CHAT,
        _good(response_format={"type": "json_schema"}),
        {},
        400,
        "response_format",
    ),
]


def _assert_envelope(status: int, body: bytes, expected: int, needle: str) -> None:
    assert status == expected, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if needle:
        assert needle in json.dumps(err), err


def _assert_good(server: Server) -> None:
    status, _, body = server.request("POST", CHAT, GOOD)
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "needle"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_bad_input(
    tiny_server: Server, path: str, body: object, headers: dict[str, str], status: int, needle: str
) -> None:
    got, _, resp = tiny_server.request("POST", path, body, headers)  # type: ignore[arg-type]
    _assert_envelope(got, resp, status, needle)
    _assert_good(tiny_server)


def test_context_exceeded_names_both_numbers(tiny_server: Server) -> None:
    _, _, body = tiny_server.request("POST", COMP, _comp(prompt=[1] * 300))
    message = json.loads(body)["error"]["message"]
    assert "300" in message and "256" in message


def test_unknown_fields_are_ignored(tiny_server: Server) -> None:
    status, _, body = tiny_server.request("POST", CHAT, _good(frobnicate=True, user="u"))
    assert status == 200, body


def test_unknown_route_is_404_envelope(tiny_server: Server) -> None:
    status, _, body = tiny_server.request("GET", "/v1/nothing")
    _assert_envelope(status, body, 404, "")


@pytest.fixture(scope="module")
def keyed_server(
    tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    yield from tiny_server_running(tiny_checkpoints, tmp_path_factory, "--api-key", "s3cret")


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", CHAT, {}),
        ("POST", CHAT, {"Authorization": "Bearer wrong"}),
        ("POST", CHAT, {"Authorization": "s3cret"}),
        ("GET", "/v1/models", {}),
        ("GET", "/metrics", {}),
        ("GET", "//v1/models", {}),
        ("GET", "/v1%2Fmodels", {}),
        ("GET", "/health/../v1/models", {}),
        ("GET", "/v1/models", {"Host": "localhost"}),
    ],
)
def test_auth(keyed_server: Server, method: str, path: str, headers: dict[str, str]) -> None:
    body = GOOD if method == "POST" else None
    status, _, resp = keyed_server.request(method, path, body, headers)  # type: ignore[arg-type]
    _assert_envelope(status, resp, 401, "")
    status, _, _ = keyed_server.request("GET", "/health")
    assert status == 200
    ok, _, resp = keyed_server.request("POST", CHAT, GOOD, {"Authorization": "Bearer s3cret"})
    assert ok == 200, resp
