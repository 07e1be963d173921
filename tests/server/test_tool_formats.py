"""Each tool-call format end to end: a scripted tiny checkpoint (its greedy output is one call in
the family's markup, the arguments in several tokens) whose chat template writes calls that way,
so the server picks the parser itself, answers the real `openai` client with the call parsed,
and streams it in OpenAI's delta shape (id and name first, then the arguments in pieces) equal
to the whole response, with no markup in the content."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.helpers.checkpoints import make_scripted_checkpoint
from tests.helpers.server import Server, start_server, stop_server

# A template that writes a past call in `call` (a family's own markup; never rendered here: the
# request has no history) and renders `tools`, so no Hermes tools prompt is added.
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% for tc in m['tool_calls'] or [] %}CALL{% endfor %}</s>\n{% endfor %}"
    "{% if tools %}<s>tools\n{{ tools | length }}</s>\n{% endif %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
NAME = "{{ tc['function']['name'] }}"
# family -> (its parser, how its template writes a call, the scripted output, content, arguments)
FAMILIES: dict[str, tuple[str, str, list[str], str | None, dict[str, Any]]] = {
    "deepseek_v3": (
        "deepseek_v3",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{{ tc['type'] }}<｜tool▁sep｜>" + NAME,
        ["Let me check.", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>",
         "function<｜tool▁sep｜>get_weather\n```json\n", '{"city":', '"Paris"}',
         "\n```<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"],
        "Let me check.",
        {"city": "Paris"},
    ),
    "deepseek_v31": (
        "deepseek_v31",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>" + NAME + "<｜tool▁sep｜>",
        ["<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "get_weather", "<｜tool▁sep｜>",
         '{"city":', '"Paris"}', "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"],
        None,
        {"city": "Paris"},
    ),
    "kimi_k2": (
        "kimi_k2",
        "<|tool_calls_section_begin|><|tool_call_begin|>functions." + NAME + ":0",
        ["<|tool_calls_section_begin|>", "<|tool_call_begin|>", "functions.get_weather:0",
         "<|tool_call_argument_begin|>", '{"city":', '"Paris"}', "<|tool_call_end|>",
         "<|tool_calls_section_end|>"],
        None,
        {"city": "Paris"},
    ),
    "glm45": (
        "glm45",
        "<tool_call>" + NAME + "\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>\n</tool_call>",
        ["<tool_call>", "get_weather", "\n<arg_key>city</arg_key>\n<arg_value>", "Paris",
         "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n", "</tool_call>"],
        None,
        {"city": "Paris", "days": 3},  # typed by the schema: days is an integer
    ),
    "qwen3_coder": (
        "qwen3_coder",
        "<tool_call>\n<function=" + NAME + ">\n</function>\n</tool_call>",
        ["<tool_call>\n<function=get_weather>\n", "<parameter=city>\n", "Paris",
         "\n</parameter>\n<parameter=days>\n3\n</parameter>\n", "</function>\n", "</tool_call>"],
        None,
        {"city": "Paris", "days": 3},
    ),
    "deepseek_v32": (
        "deepseek_v32",
        '<｜DSML｜function_calls>\n<｜DSML｜invoke name="' + NAME + '">',
        # no piece is "<...>" whole: llguidance reads such an added token as a special one,
        # which its mask may admit and its matcher then rejects (the request stops cleanly)
        ["<｜DSML｜function_calls>\n", '<｜DSML｜invoke name="get_weather">\n',
         '<｜DSML｜parameter name="city" string="true', '">Paris', "</｜DSML｜parameter>\n",
         '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n',
         "</｜DSML｜invoke>\n", "</｜DSML｜function_calls>"],
        None,
        {"city": "Paris", "days": 3},
    ),
    "pythonic": (  # held whole (one delta with the arguments); Llama 3.2's template names it
        "pythonic",
        "{# [func_name1(params_name1=params_value1)] #}[" + NAME + "()]",
        ["[get_weather(", "city='Paris', ", "days=3)]"],
        None,
        {"city": "Paris", "days": 3},
    ),
}  # fmt: skip
WHOLE = {"pythonic"}  # formats that stream a call as one delta
NOT_FORCED = {"pythonic"}  # tool_choice "required" answers 400 (tool_parsers/grammar.py)
# Kimi's markers are special tokens (skipped when decoding by default): the server keeps them
# for tool requests, and drops the text of the eos token that ends the output.
SPECIAL = {
    "kimi_k2": ("<|tool_calls_section_begin|>", "<|tool_call_begin|>",
                "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|tool_calls_section_end|>"),
}  # fmt: skip
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MARKUP = ("<｜", "<|", "<tool_call>", "<arg_", "<function=", "<parameter=", "```", "</s>")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Server]]:
    name = request.param
    _, call, script, _, _ = FAMILIES[name]
    folder = tmp_path_factory.mktemp(name) / "m"
    make_scripted_checkpoint(folder, script, TEMPLATE.replace("CALL", call), SPECIAL.get(name, ()))
    server = start_server(
        str(folder), tmp_path_factory.mktemp(f"{name}-srv"),
        "--dtype", "float32", "--max-model-len", "256", "--served-model-name", "scripted",
    )  # fmt: skip
    yield name, server
    assert stop_server(server) == 0, server.log.read_text()


def test_tool_call_parsed_and_streamed(family: tuple[str, Server]) -> None:
    name, server = family
    _, _, _, want_content, want_args = FAMILIES[name]
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    kwargs: dict[str, Any] = {
        "model": "scripted", "messages": ASK, "tools": TOOLS, "max_tokens": 40, "temperature": 0,
    }  # fmt: skip
    resp = client.chat.completions.create(**kwargs)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == want_content
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == want_args

    content, finish, pieces = "", None, []
    head: list[tuple[int, str, str]] = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or ():
            assert tc.index == 0
            if tc.id is not None:  # the call's first delta: id and name
                assert tc.function and tc.function.name and not head
                head.append((tc.index, tc.id, tc.function.name))
            if tc.function and tc.function.arguments:
                assert head  # arguments only with or after the name
                pieces.append(tc.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert (content or None) == want_content
    assert not any(m in content for m in MARKUP)
    assert head and head[0][2] == "get_weather" and head[0][1].startswith("call_")
    if name not in WHOLE:
        assert len(pieces) > 1  # the arguments arrived in pieces, as the model wrote them
    assert json.loads("".join(pieces)) == want_args
    assert "".join(pieces) == call.function.arguments  # streamed == whole, text for text


def test_forced_call_in_the_family_markup(family: tuple[str, Server]) -> None:
    """tool_choice "required": the grammar admits only this family's markup (compact JSON), which
    the scripted model writes anyway; the call comes back parsed."""
    name, server = family
    if FAMILIES[name][3] is not None:
        pytest.skip("its script writes content before the call, which a forced call forbids")
    body = {
        "model": "scripted", "messages": ASK, "tools": TOOLS, "tool_choice": "required",
        "max_tokens": 40, "temperature": 0,
    }  # fmt: skip
    status, _, raw = server.request("POST", "/v1/chat/completions", body)
    if name in NOT_FORCED:
        assert status == 400 and json.loads(raw)["error"]["param"] == "tool_choice", raw
        return
    assert status == 200, raw
    choice = json.loads(raw)["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.fixture(scope="module")
def special_looking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A scripted model that writes "<ok>", an added token llguidance reads as a special one."""
    folder = tmp_path_factory.mktemp("special") / "m"
    make_scripted_checkpoint(folder, ["<ok>", "done"])
    server = start_server(
        str(folder), tmp_path_factory.mktemp("special-srv"),
        "--dtype", "float32", "--max-model-len", "256", "--served-model-name", "scripted",
    )  # fmt: skip
    yield server
    assert stop_server(server) == 0, server.log.read_text()


def test_mask_admits_what_the_matcher_rejects(special_looking: Server) -> None:
    """llguidance's mask for the choice "<ok>" admits the token "<ok>", which its matcher then
    rejects: the request stops before it ("stop", no content), never an HTTP 500; streamed the
    same."""
    client = openai.OpenAI(base_url=special_looking.base_url, api_key="x", max_retries=0)
    kwargs: dict[str, Any] = {
        "model": "scripted", "messages": ASK, "max_tokens": 10, "temperature": 0,
        "extra_body": {"guided_choice": ["<ok>"]},
    }  # fmt: skip
    resp = client.chat.completions.create(**kwargs)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content in ("", "<ok>")  # "<ok>" once llguidance agrees
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        resp.choices[0].message.content
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
