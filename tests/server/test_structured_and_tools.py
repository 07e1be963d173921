"""Structured output and tool calls through a real server with the default model (SmolLM2-135M)
and the `openai` client: every json_schema answer validates against its schema, streamed ==
non-streamed; bad constraints answer 400 naming the field; forced calls are valid; the second
turn of an agent loop answers; and the same through LangChain (langchain-openai)."""

from __future__ import annotations

import json
import operator
from collections.abc import Iterator
from functools import reduce
from typing import Any, Literal

import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field, SecretStr

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


# ---- tool calls ----------------------------------------------------------------------------------
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather of a city",
            "parameters": WEATHER_PARAMS,
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "The current time", "parameters": None},
    },
]
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _calls_both(client: openai.OpenAI, **kwargs: Any) -> tuple[Any, list[tuple[str, str]]]:
    """(the response, the streamed calls as (name, arguments) assembled from their deltas)."""
    resp = client.chat.completions.create(model="default", temperature=0, **kwargs)
    stream = client.chat.completions.create(model="default", temperature=0, stream=True, **kwargs)
    calls: dict[int, list[str]] = {}
    content, finish = "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or ():
            entry = calls.setdefault(tc.index, ["", ""])
            if tc.function and tc.function.name:
                assert tc.id and tc.id.startswith("call_")
                entry[0] += tc.function.name
            if tc.function and tc.function.arguments:
                entry[1] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == resp.choices[0].finish_reason
    assert content == (resp.choices[0].message.content or "")
    assert "<tool_call>" not in content
    return resp, [(name, args) for _, (name, args) in sorted(calls.items())]


@pytest.mark.parametrize("tool_choice", ["required", "get_weather", "get_time"])
def test_forced_tool_call(client: openai.OpenAI, tool_choice: str) -> None:
    choice: Any = tool_choice
    if tool_choice != "required":
        choice = {"type": "function", "function": {"name": tool_choice}}
    resp, streamed = _calls_both(
        client, messages=WEATHER_ASK, tools=TOOLS, tool_choice=choice, max_tokens=120,
        parallel_tool_calls=False,
    )  # fmt: skip
    c = resp.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if tool_choice != "required":
        assert call.function.name == tool_choice
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        jsonschema.validate(args, WEATHER_PARAMS)
    else:
        assert call.function.name == "get_time" and isinstance(args, dict)
    assert streamed == [(call.function.name, call.function.arguments)]


def test_agent_loop_second_turn(client: openai.OpenAI) -> None:
    """The tool result goes back in the history (assistant content null + tool_calls, then a
    tool message): the model answers."""
    first = client.chat.completions.create(
        model="default", messages=WEATHER_ASK, tools=TOOLS, tool_choice="required",
        max_tokens=120, temperature=0,
    )  # fmt: skip
    msg = first.choices[0].message
    assert msg.tool_calls
    history = [
        *WEATHER_ASK,
        msg.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}),
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"temp_c": 21}'},
    ]
    assert history[1].get("content") is None
    for tool_choice in ("auto", "none"):
        resp = client.chat.completions.create(
            model="default", messages=history, tools=TOOLS, tool_choice=tool_choice,
            max_tokens=30, temperature=0,
        )  # fmt: skip
        c = resp.choices[0]
        assert c.finish_reason in ("stop", "length", "tool_calls")
        assert c.message.content or c.message.tool_calls
        if tool_choice == "none":
            assert not c.message.tool_calls


def test_tool_errors(server: Server) -> None:
    base = {"model": "default", "messages": WEATHER_ASK, "max_tokens": 5}
    cases = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
         "tools[0].function.name"),
    ]  # fmt: skip
    for extra, param in cases:
        status, _, raw = server.request("POST", "/v1/chat/completions", {**base, **extra})
        assert status == 400, raw
        assert json.loads(raw)["error"]["param"] == param, raw


@pytest.mark.parametrize("with_tools", [False, True])
def test_eos_text_never_in_content(client: openai.OpenAI, with_tools: bool) -> None:
    """skip_special_tokens false keeps special tokens the model writes, but never the text of
    the eos that ends the answer (vLLM), with or without tools; streamed == non-streamed."""
    extra: dict[str, Any] = {"tools": TOOLS, "tool_choice": "none"} if with_tools else {}
    resp, streamed = _both(
        client, messages=[{"role": "user", "content": "Say hello."}], max_tokens=60,
        temperature=0, extra_body={"skip_special_tokens": False}, **extra,
    )  # fmt: skip
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"  # the model ended on its eos
    assert choice.message.content and "<|im_end|>" not in choice.message.content
    assert streamed == [choice.message.content]


# ---- LangChain (langchain-openai), as an agent framework uses the server -------------------------
class City(BaseModel):
    city: str = Field(max_length=30)
    population: int = Field(ge=0)
    coastal: bool


class GetWeather(BaseModel):
    """The current weather of a city."""

    model_config = ConfigDict(extra="forbid")  # bounded, as WEATHER_PARAMS: a small model ends
    city: str = Field(max_length=20)
    unit: Literal["C", "F"]


@pytest.fixture(scope="module")
def chat(server: Server) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=server.base_url, api_key=SecretStr("x"), model="default", temperature=0,
        max_completion_tokens=120, max_retries=0,
    )  # fmt: skip


def test_langchain_structured_output(chat: ChatOpenAI) -> None:
    ask = "Tell me about Paris as JSON."
    city = chat.with_structured_output(City, method="json_schema", strict=True).invoke(ask)
    assert isinstance(city, City)
    raw = chat.with_structured_output(SCHEMA | {"title": "city"}, method="json_schema")
    jsonschema.validate(raw.invoke(ask), SCHEMA)


@pytest.mark.parametrize("tool_choice", ["required", "GetWeather"])
def test_langchain_bind_tools(chat: ChatOpenAI, tool_choice: str) -> None:
    """A forced call: a valid one, the same streamed (chunks summed) as invoked."""
    bound = chat.bind_tools([GetWeather], tool_choice=tool_choice, parallel_tool_calls=False)
    msg = bound.invoke("What is the weather in Paris?")
    (call,) = msg.tool_calls
    assert call["name"] == "GetWeather" and call["id"]
    GetWeather.model_validate(call["args"])
    chunks = list(bound.stream("What is the weather in Paris?"))
    streamed = reduce(operator.add, chunks)
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(call["name"], call["args"])]


def test_langchain_agent_loop(chat: ChatOpenAI) -> None:
    """Call, run the tool, hand its result back (a ToolMessage): the second turn answers."""
    history: list[BaseMessage] = [HumanMessage("What is the weather in Paris?")]
    first = chat.bind_tools([GetWeather], tool_choice="required").invoke(history)
    assert isinstance(first, AIMessage) and first.tool_calls
    history.append(first)
    for call in first.tool_calls:
        args = GetWeather.model_validate(call["args"])
        result = f"21 {args.unit} in {args.city}"
        history.append(ToolMessage(result, tool_call_id=call["id"]))
    second = chat.bind_tools([GetWeather]).invoke(history)  # tool_choice auto
    assert second.content or second.tool_calls  # type: ignore[union-attr]
    answer = chat.bind_tools([GetWeather], tool_choice="none").invoke(history)
    assert isinstance(answer.content, str) and answer.content.strip()
    assert not answer.tool_calls  # type: ignore[union-attr]
