"""protocol.py against docs/RELIABILITY.md's bad-input table: every field bounded, strict JSON,
errors that name the field; valid requests give the right SamplingParams keyword arguments."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from moeflow.sampling_params import SamplingParams
from moeflow.server import protocol as P
from moeflow.server import responses, wire

MSG = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSG, **fields}


def bad(model: type[P.ChatCompletionRequest] | type[P.CompletionRequest], body: Any) -> str:
    """Validate `body`, expect a 400; return the param the error names."""
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    message, param = P.validation_error_to_param(e.value)
    assert "\n" not in message and message.startswith(param)
    return param


def _top(param: str) -> str:
    """The top-level field of a param path: "logit_bias" of 'logit_bias["x"]'."""
    return param.split("[")[0].split(".")[0]


# ---- the body ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        b'{"temperature": NaN}',
        b'{"temperature": Infinity}',
        b'{"temperature": -Infinity}',
        b'{"temperature": 1e999}',  # overflows to inf
        b'{"a": "\xff"}',  # invalid UTF-8
        b'{"a": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8
        b'{"a": "\\ud800"}',  # a lone surrogate escape
        b'{"\\udfff": 1}',  # ... in a key
        b'{"a": 1',  # truncated
        b"",
        b"\xef\xbb\xbf{}",  # a BOM
        b'{"a": ' + b"9" * 5000 + b"}",  # more digits than Python converts
        b"[" * 100 + b"]" * 100,  # deeper than 64
        b"[" * 100_000,  # deeper than the parser's recursion limit
    ],
)
def test_bad_bodies(raw: bytes) -> None:
    with pytest.raises(wire.BadRequestBody):
        wire.parse_json_body(raw)


def test_body_parsing() -> None:
    assert wire.parse_json_body(b'{"a": 1, "a": 2}') == {"a": 2}  # last duplicate wins
    assert wire.parse_json_body('{"t": "\\ud83d\\ude00 é"}'.encode()) == {"t": "\U0001f600 é"}
    assert wire.parse_json_body(b"[" * 64 + b"]" * 64) is not None  # 64 deep is fine
    for not_object in (b"[]", b'"s"', b"1", b"null"):
        with pytest.raises(wire.BadRequestBody):
            wire.require_object(wire.parse_json_body(not_object))
    assert wire.require_object(wire.parse_json_body(b"{}")) == {}


def test_error_body() -> None:
    assert wire.error_body("bad", param="n") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
    }


# ---- messages and prompts ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hi", "messages"),
        (None, "messages"),
        ([{"role": "user", "content": "x"}] * 4097, "messages"),
        (["hi"], "messages[0]"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "bob", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0]"),
        ([{"role": "user", "content": None}], "messages[0]"),
        (
            [{"role": "user", "content": None, "tool_calls": [{}]}],
            "messages[0].tool_calls[0].function",
        ),
        (
            [{"role": "user", "content": None, "tool_calls": [{"function": {"name": "f"}}]}],
            "messages[0]",
        ),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": {"text": "x"}}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
        (
            [{"role": "user", "content": [{"type": "text", "text": 1}]}],
            "messages[0].content[0].text",
        ),
        ([MSG[0], {"role": "user", "content": "x" * 1_000_001}], "messages[1].content"),
        ([{"role": "user", "content": "x", "name": 3}], "messages[0].name"),
    ],
)
def test_bad_messages(messages: Any, param: str) -> None:
    assert bad(P.ChatCompletionRequest, {"messages": messages}) == param


def test_good_messages() -> None:
    req = P.ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "system", "content": "s", "extra": 1},
                {
                    "role": "developer",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "tool", "content": "r", "tool_call_id": "1"},
                {"role": "user", "content": "", "name": "u"},
            ]
        }
    )
    msgs = req.template_messages()
    assert msgs[0] == {"role": "system", "content": "s"}
    assert msgs[1]["content"] == "ab"
    assert msgs[2] == {
        "role": "assistant",
        "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    assert msgs[4] == {"role": "user", "content": "", "name": "u"}


@pytest.mark.parametrize(
    ("prompt", "param"),
    [
        ("", "prompt"),
        ([], "prompt"),
        ([[]], "prompt[0]"),
        (5, "prompt"),
        (None, "prompt"),
        ({"a": 1}, "prompt"),
        ([1, -2], "prompt[1]"),
        ([[1], [2, -3]], "prompt[1][1]"),
        ([1, 2.0], "prompt[1]"),
        ([1, "2"], "prompt[1]"),
        ([True], "prompt[0]"),
        (["a", ""], "prompt[1]"),
        (["a", 1], "prompt[1]"),
        (["a"] * 65, "prompt"),
        ([[1]] * 65, "prompt"),
        ("x" * 1_000_001, "prompt"),
    ],
)
def test_bad_prompts(prompt: Any, param: str) -> None:
    assert bad(P.CompletionRequest, {"prompt": prompt}) == param


def test_missing_prompt() -> None:
    assert bad(P.CompletionRequest, {"model": "m"}) == "prompt"


@pytest.mark.parametrize(
    ("prompt", "listed"),
    [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([0, 5, 2**40], [[0, 5, 2**40]]),  # the vocab bound is the server's check
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_good_prompts(prompt: Any, listed: list[Any]) -> None:
    assert P.CompletionRequest.model_validate({"prompt": prompt}).prompt_list() == listed


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [("echo", True, "echo"), ("suffix", "x", "suffix"), ("suffix", "", "suffix")],
)
def test_unsupported_completion_fields(field: str, value: Any, needle: str) -> None:
    with pytest.raises(ValidationError, match=f"{needle} is not supported"):
        P.CompletionRequest.model_validate({"prompt": "a", field: value})


# ---- sampling fields -----------------------------------------------------------------------------
BAD_SAMPLING = [
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("max_tokens", 1.5),
    ("max_tokens", 5.0),
    ("max_tokens", "5"),
    ("max_tokens", True),
    ("temperature", -0.1),
    ("temperature", 2.01),
    ("temperature", "1"),
    ("temperature", True),
    ("top_p", 0),
    ("top_p", 1.01),
    ("top_p", -1),
    ("top_k", -2),
    ("top_k", 1_000_001),
    ("top_k", 1.0),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("presence_penalty", -2.01),
    ("presence_penalty", 2.01),
    ("frequency_penalty", -3),
    ("frequency_penalty", 3),
    ("repetition_penalty", 0),
    ("repetition_penalty", 10.5),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 1.0),
    ("n", 0),
    ("n", 17),
    ("n", 2.0),
    ("stop", ""),
    ("stop", [""]),
    ("stop", ["a"] * 17),
    ("stop", ["x" * 1025]),
    ("stop", 5),
    ("stop", [5]),
    ("logit_bias", {"5": 101}),
    ("logit_bias", {"5": -100.5}),
    ("logit_bias", {"5": "1"}),
    ("logit_bias", {"-5": 1}),
    ("logit_bias", {"abc": 1}),
    ("logit_bias", {"1.5": 1}),
    ("logit_bias", {"\u00b2": 1}),  # str.isdigit() says yes; int() says no
    ("logit_bias", {"9" * 5000: 1}),
    ("logit_bias", {str(i): 1 for i in range(1025)}),
    ("logit_bias", [1]),
    ("stream", 1),
    ("stream", "true"),
    ("stream_options", {"include_usage": 1}),
    ("ignore_eos", "yes"),
    ("skip_special_tokens", 0),
    ("model", 5),
    ("model", "m" * 257),
    ("user", "u" * 257),
]


@pytest.mark.parametrize(("field", "value"), BAD_SAMPLING)
def test_bad_sampling_fields_chat(field: str, value: Any) -> None:
    assert _top(bad(P.ChatCompletionRequest, chat(**{field: value}))) == field


@pytest.mark.parametrize(("field", "value"), BAD_SAMPLING)
def test_bad_sampling_fields_completion(field: str, value: Any) -> None:
    body = {"prompt": "a", field: value}
    assert _top(bad(P.CompletionRequest, body)) == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_completion_tokens", 0),
        ("max_completion_tokens", 2.0),
        ("logprobs", 1),
        ("logprobs", "true"),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
        ("response_format", {"type": "xml"}),
        ("response_format", "text"),
        ("chat_template_kwargs", {"enable_thinking": "yes"}),
        ("chat_template_kwargs", {"reasoning_effort": 3}),
        ("chat_template_kwargs", [1]),
    ],
)
def test_bad_chat_fields(field: str, value: Any) -> None:
    assert _top(bad(P.ChatCompletionRequest, chat(**{field: value}))) == field


@pytest.mark.parametrize("value", [-1, 21, True, 1.0, "1"])
def test_bad_completion_logprobs(value: Any) -> None:
    assert bad(P.CompletionRequest, {"prompt": "a", "logprobs": value}) == "logprobs"


def test_top_logprobs_needs_logprobs() -> None:
    with pytest.raises(ValidationError, match="top_logprobs needs logprobs"):
        P.ChatCompletionRequest.model_validate(chat(top_logprobs=3))


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"guided_regex": "a+"}, "guided_regex"),
        ({"guided_choice": ["a", "b"]}, "guided_choice"),
        ({"guided_grammar": "start: 'a'"}, "guided_grammar"),
        ({"structured_outputs": {"json": {"type": "object"}}}, "structured_outputs.json"),
        ({"structured_outputs": {"choice": ["a"]}}, "structured_outputs.choice"),
    ],
)
def test_structured_output_fields(extra: dict[str, Any], param: str) -> None:
    params = P.ChatCompletionRequest.model_validate(chat(**extra)).sampling_kwargs()
    spec = params["structured_outputs"]
    assert spec is not None and spec.param == param
    assert (
        "structured_outputs" not in P.ChatCompletionRequest.model_validate(chat()).sampling_kwargs()
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
         "response_format.json_schema.name"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "body"),
        ({"guided_choice": []}, "guided_choice"),
    ],
)  # fmt: skip
def test_bad_structured_output_fields(extra: dict[str, Any], param: str) -> None:
    assert bad(P.ChatCompletionRequest, chat(**extra)) == param


def test_unknown_fields_ignored() -> None:
    body = chat(frobnicate=1, tools=[], parallel_tool_calls=True, metadata={"a": "b"})
    req = P.ChatCompletionRequest.model_validate(body)
    assert not hasattr(req, "frobnicate")
    P.CompletionRequest.model_validate({"prompt": "a", "best_of": 3, "whatever": None})


def test_edges_accepted() -> None:
    P.ChatCompletionRequest.model_validate(
        chat(
            temperature=0,
            top_p=1,
            top_k=-1,
            min_p=1,
            presence_penalty=-2,
            frequency_penalty=2,
            repetition_penalty=10,
            seed=2**63 - 1,
            n=16,
            stop=["x" * 1024] * 16,
            logit_bias={str(i): -100 for i in range(1024)},
            logprobs=True,
            top_logprobs=20,
            max_tokens=1,
            response_format={"type": "text"},
            stream=True,
            stream_options={"include_usage": True},
            user="u",
        )
    )


# ---- sampling_kwargs -----------------------------------------------------------------------------
def test_chat_defaults() -> None:
    req = P.ChatCompletionRequest.model_validate({"messages": MSG})
    kw = req.sampling_kwargs()
    assert kw == {
        "max_tokens": None,
        "logprobs": None,
        "ignore_eos": False,
        "skip_special_tokens": True,
    }
    assert SamplingParams(**kw).max_tokens is None  # absent: the rest of the context
    assert (req.n, req.stream, req.stream_options, req.chat_template_kwargs) == (
        1,
        False,
        None,
        None,
    )


def test_chat_sampling_kwargs() -> None:
    req = P.ChatCompletionRequest.model_validate(
        chat(
            max_tokens=7,
            max_completion_tokens=9,
            temperature=1,  # an int is a fine float
            top_p=0.5,
            top_k=40,
            min_p=0.1,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            repetition_penalty=1.1,
            seed=123,
            stop="END",
            logprobs=True,
            top_logprobs=5,
            logit_bias={"42": 5, "7": -100},
            ignore_eos=True,
            skip_special_tokens=False,
            chat_template_kwargs={"enable_thinking": False, "tools": "dropped", "x": 1},
        )
    )
    kw = req.sampling_kwargs()
    assert kw == {
        "max_tokens": 9,  # max_completion_tokens wins
        "temperature": 1.0,
        "top_p": 0.5,
        "top_k": 40,
        "min_p": 0.1,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.1,
        "seed": 123,
        "stop": ["END"],
        "logprobs": 5,
        "logit_bias": {42: 5.0, 7: -100.0},
        "ignore_eos": True,
        "skip_special_tokens": False,
    }
    assert isinstance(kw["temperature"], float)
    params = SamplingParams(**kw)
    assert params.logit_bias == {42: 5.0, 7: -100.0} and params.stop == ["END"]
    assert req.chat_template_kwargs == {"enable_thinking": False}


def test_chat_logprobs_without_top() -> None:
    assert (
        P.ChatCompletionRequest.model_validate(chat(logprobs=True)).sampling_kwargs()["logprobs"]
        == 0
    )
    assert (
        P.ChatCompletionRequest.model_validate(chat(logprobs=False)).sampling_kwargs()["logprobs"]
        is None
    )


def test_empty_logit_bias_left_out() -> None:
    kw = P.ChatCompletionRequest.model_validate(chat(logit_bias={})).sampling_kwargs()
    assert "logit_bias" not in kw


def test_completion_sampling_kwargs() -> None:
    req = P.CompletionRequest.model_validate(
        {"prompt": [1, 2], "max_tokens": 3, "logprobs": 2, "stop": ["a", "b"], "n": 2}
    )
    kw = req.sampling_kwargs()
    assert kw["max_tokens"] == 3 and kw["logprobs"] == 2 and kw["stop"] == ["a", "b"]
    SamplingParams(**kw)
    assert P.CompletionRequest.model_validate({"prompt": "a"}).sampling_kwargs()["logprobs"] is None
    assert (
        P.CompletionRequest.model_validate({"prompt": "a", "logprobs": 0}).sampling_kwargs()[
            "logprobs"
        ]
        == 0
    )


# ---- responses -----------------------------------------------------------------------------------
def test_response_shapes() -> None:
    u = responses.usage(10, 5, reasoning_tokens=3, cached_tokens=8)
    assert u == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 8},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    rid = responses.new_id("chatcmpl")
    assert rid.startswith("chatcmpl-")
    entry = responses.logprobs_content_entry("é", -0.5, [("é", -0.5), ("a", -1.0)])
    assert entry == {
        "token": "é",
        "logprob": -0.5,
        "bytes": [0xC3, 0xA9],
        "top_logprobs": [
            {"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9]},
            {"token": "a", "logprob": -1.0, "bytes": [0x61]},
        ],
    }
    resp = responses.chat_completion_response(
        rid, 1, "m", [(0, "hi", "think", responses.chat_logprobs([entry]), "stop", [])], u
    )
    assert resp["object"] == "chat.completion"
    choice = resp["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "hi", "reasoning_content": "think"}
    assert choice["logprobs"] == {"content": [entry]} and choice["finish_reason"] == "stop"
    no_reasoning = responses.chat_completion_response(
        rid, 1, "m", [(0, "hi", None, None, "length", [])], u
    )
    assert "reasoning_content" not in no_reasoning["choices"][0]["message"]
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    calls = responses.chat_completion_response(
        rid, 1, "m", [(0, "", None, None, "tool_calls", [call])], u
    )
    assert calls["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [call],
    }
    chunk = responses.chat_completion_chunk(rid, 1, "m", 0, {"content": "h"})
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"] == [
        {"index": 0, "delta": {"content": "h"}, "logprobs": None, "finish_reason": None}
    ]
    legacy = responses.legacy_logprobs(["a", "b"], [-0.1, -0.2], [{"a": -0.1}, {"b": -0.2}], [0, 1])
    assert set(legacy) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    text = responses.completion_response("cmpl-1", 1, "m", [(0, "ab", legacy, "stop")], u)
    assert text["object"] == "text_completion"
    assert text["choices"][0] == {
        "index": 0,
        "text": "ab",
        "logprobs": legacy,
        "finish_reason": "stop",
    }
    tchunk = responses.completion_chunk("cmpl-1", 1, "m", 1, "b", "length")
    assert tchunk["choices"][0]["finish_reason"] == "length"
    last = responses.usage_chunk(rid, 1, "m", u)
    assert last["choices"] == [] and last["usage"] == u
    assert responses.usage_chunk("cmpl-1", 1, "m", u, chat=False)["object"] == "text_completion"
    json.dumps([resp, chunk, text, tchunk, last], allow_nan=False)  # plain JSON all through


def test_template_kwargs_the_edge_accepts_reach_the_template() -> None:
    """The HTTP edge keeps exactly the typed names of the renderer's one table (so it never
    passes a key the renderer drops) and drops the in-process-only ones."""
    from moeflow.tokenizer import CHAT_TEMPLATE_KWARGS as RENDERED

    typed = {k: t for k, t in RENDERED.items() if t is not None}
    assert typed and len(typed) < len(RENDERED)
    sample = {bool: True, str: "low"}
    body = {k: sample[t] if t is not None else [] for k, t in RENDERED.items()}
    req = P.ChatCompletionRequest.model_validate(chat(chat_template_kwargs=body))
    assert req.chat_template_kwargs == {k: sample[t] for k, t in typed.items()}
