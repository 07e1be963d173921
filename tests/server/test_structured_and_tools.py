"""Structured output and tool calls through a real server with the default model (SmolLM2-135M)
and the `openai` client: every json_schema answer validates against its schema, streamed ==
non-streamed; bad constraints answer 400 naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.helpers.server import Server, start_server, stop_server

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 0},
        "coastal": {"type": "boolean"},
    },
    "required": ["city", "population", "coastal"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Tell me about Paris as JSON."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        None, tmp_path_factory.mktemp("agents"), "--max-model-len", "2048",
        "--served-model-name", "default",
    )  # fmt: skip
    yield srv
    assert stop_server(srv) == 0, srv.log.read_text()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)


def _both(client: openai.OpenAI, **kwargs: Any) -> tuple[Any, list[str]]:
    """(the response, each choice's streamed content joined), for the same seeded request."""
    resp = client.chat.completions.create(model="default", **kwargs)
    chunks = client.chat.completions.create(model="default", stream=True, **kwargs)
    streamed = [""] * len(resp.choices)
    for c in chunks:
        for choice in c.choices:
            streamed[choice.index] += choice.delta.content or ""
    return resp, streamed


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_json_schema(client: openai.OpenAI, temperature: float) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    resp, streamed = _both(
        client, messages=ASK, response_format=rf, max_tokens=100, temperature=temperature,
        seed=1, n=2,
    )  # fmt: skip
    for choice in resp.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert streamed == [c.message.content for c in resp.choices]


def test_json_object_and_guided(client: openai.OpenAI) -> None:
    resp, streamed = _both(
        client, messages=ASK, response_format={"type": "json_object"}, max_tokens=100,
        temperature=0,
    )  # fmt: skip
    choice = resp.choices[0]
    if choice.finish_reason == "stop":  # any object: a small model may nest until max_tokens
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    assert streamed == [resp.choices[0].message.content]
    resp = client.chat.completions.create(
        model="default", messages=ASK, max_tokens=10, temperature=0,
        extra_body={"guided_choice": ["yes", "no"]},
    )  # fmt: skip
    assert resp.choices[0].message.content in ("yes", "no")
    resp = client.completions.create(
        model="default", prompt="Number:", max_tokens=10, temperature=0,
        extra_body={"structured_outputs": {"regex": "[0-9]{4}"}},
    )  # fmt: skip
    assert len(resp.choices[0].text) == 4 and resp.choices[0].text.isdigit()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
         "response_format.json_schema.schema"),
        ({"guided_regex": "(("}, "guided_regex"),
        ({"guided_grammar": "start: nothing_here"}, "guided_grammar"),
        ({"structured_outputs": {"json": "{bad"}}, "structured_outputs.json"),
    ],
)  # fmt: skip
def test_bad_constraint_is_400(server: Server, extra: dict[str, Any], param: str) -> None:
    body = {"model": "default", "messages": ASK, "max_tokens": 5, **extra}
    status, _, raw = server.request("POST", "/v1/chat/completions", body)
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert error["param"] == param
    assert error["message"].startswith(param)
