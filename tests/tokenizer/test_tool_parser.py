"""The tool-call parsers on hand-written model outputs: calls, content around them, malformed
blocks kept as content, and streamed == whole for every split of the text into two deltas and
for one character at a time; the parser choice from templates and --tool-call-parser; the
forced-call grammar compiles and accepts exactly the calls."""

from __future__ import annotations

import json

import llguidance
import pytest

from moeflow.tokenizer.tool_parser import (
    HermesToolParser,
    Llama3JsonToolParser,
    ToolParser,
    pick_tool_parser,
    tool_call_grammar,
)

CALL_A = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_B = '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>'

# (model output, content, [(name, arguments)])
CASES = [
    ("Hello there.", "Hello there.", []),
    (CALL_A, "", [("get_weather", {"city": "Paris"})]),
    ("Let me check.\n" + CALL_A, "Let me check.", [("get_weather", {"city": "Paris"})]),
    (
        CALL_A + "\n" + CALL_B + "\n",
        "",
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})],
    ),
    (CALL_A + "\nDone.", "Done.", [("get_weather", {"city": "Paris"})]),
    ("<tool_call>not json</tool_call> x", "<tool_call>not json</tool_call> x", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('<tool_call>\n{"name": "f", "arguments": {}}', "", [("f", {})]),  # unclosed, complete JSON
    ('<tool_call>\n{"name": "f", "argu', "", []),  # cut by max_tokens: markup, dropped
    (
        '<tool_call>{"name": "f", "arguments": {"s": "</tool_call>"}}</tool_call>',
        "",
        [("f", {"s": "</tool_call>"})],
    ),
    ("a < b <tool", "a < b <tool", []),
    ("ends with space  ", "ends with space  ", []),
]


def _check(content: str, calls: list, want_content: str, want_calls: list) -> None:
    assert content == want_content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == want_calls
    assert all(c.id.startswith("call_") for c in calls)


LLAMA_CASES = [
    ("Hello there.", "Hello there.", []),
    ('{"name": "f", "parameters": {"a": 1}}', "", [("f", {"a": 1})]),
    ('<|python_tag|>{"name": "f", "parameters": {}}', "", [("f", {})]),
    (' {"name": "f", "parameters": {"s": "x;y"}}; {"name": "g", "parameters": {}}', "",
     [("f", {"s": "x;y"}), ("g", {})]),
    ('{"name": "f", "parameters": {}} trailing', '{"name": "f", "parameters": {}} trailing', []),
    ('{"a": 1}', '{"a": 1}', []),
    ("<|python", "<|python", []),
    ('Let me check. <|python_tag|>{"name": "f", "parameters": {}}', "Let me check. ", [("f", {})]),
    ("a <|python_tag|>not json", "a <|python_tag|>not json", []),
    ("  ", "  ", []),
]  # fmt: skip
ALL_CASES = [(HermesToolParser, *c) for c in CASES] + [
    (Llama3JsonToolParser, *c) for c in LLAMA_CASES
]


@pytest.mark.parametrize(("cls", "text", "content", "calls"), ALL_CASES)
def test_whole(cls: type[ToolParser], text: str, content: str, calls: list) -> None:
    _check(*cls().parse(text), content, calls)


@pytest.mark.parametrize(("cls", "text", "content", "calls"), ALL_CASES)
def test_streamed_equals_whole(cls: type[ToolParser], text: str, content: str, calls: list) -> None:
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        parser = cls()
        got_content, got_calls = "", []
        for piece in pieces:
            c, new = parser.feed(piece)
            got_content += c
            got_calls += new
        c, new = parser.finish()
        _check(got_content + c, got_calls + new, content, calls)


def test_pick_tool_parser() -> None:
    assert pick_tool_parser("auto", None) == "hermes"  # ChatML fallback: Hermes-style tools
    assert pick_tool_parser("auto", "{{ messages }}") == "hermes"
    assert pick_tool_parser("auto", "{% if tool_calls %}<tool_call>{% endif %}") == "hermes"
    assert pick_tool_parser("auto", "tool_calls <｜tool▁calls▁begin｜>") is None  # not yet
    assert pick_tool_parser("auto", "{{ tool_calls }} without a known marker") is None
    assert pick_tool_parser("hermes", "<|tool_calls_section_begin|>") == "hermes"
    assert pick_tool_parser("kimi_k2", None) is None
    assert pick_tool_parser("auto", "{{ tools }} tool_calls <|python_tag|>") == "llama3_json"
    with pytest.raises(ValueError, match="unknown tool call parser"):
        pick_tool_parser("nope", None)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


def _tc(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


NOW = _tc('{"name":"now","arguments":{}}')
WEATHER = _tc('{"name":"get_weather","arguments":{"city":"X"}}')


@pytest.mark.parametrize(
    ("name", "parallel", "text", "ok"),
    [
        (None, False, NOW, True),
        (None, False, WEATHER, True),
        (None, False, _tc('{"name":"get_weather","arguments":{}}'), False),
        (None, False, _tc('{"name":"other","arguments":{}}'), False),
        ("now", False, WEATHER, False),
        ("get_weather", False, WEATHER, True),
        (None, True, NOW + "\n" + WEATHER, True),
        (None, False, NOW + "\n" + WEATHER, False),
        (None, False, "plain text", False),
    ],
)
def test_forced_call_grammar(name: str | None, parallel: bool, text: str, ok: bool) -> None:
    _check_grammar("hermes", name, parallel, text, ok)


@pytest.mark.parametrize(
    ("name", "parallel", "text", "ok"),
    [
        (None, False, '{"name":"now","parameters":{}}', True),
        ("get_weather", False, '{"name":"get_weather","parameters":{"city":"X"}}', True),
        ("get_weather", False, '{"name":"now","parameters":{}}', False),
        (None, True, '{"name":"now","parameters":{}}; {"name":"now","parameters":{}}', True),
        (None, False, '{"name":"now","parameters":{}}; {"name":"now","parameters":{}}', False),
        (None, False, '{"name":"now","arguments":{}}', False),
    ],
)
def test_forced_call_grammar_llama3(name: str | None, parallel: bool, text: str, ok: bool) -> None:
    _check_grammar("llama3_json", name, parallel, text, ok)
    if ok:
        content, calls = Llama3JsonToolParser().parse(text)
        assert content == "" and len(calls) == (2 if parallel else 1)


def _check_grammar(parser: str, name: str | None, parallel: bool, text: str, ok: bool) -> None:
    grammar = llguidance.LLMatcher.grammar_from_lark(
        tool_call_grammar(parser, TOOLS, name, parallel)
    )
    tokenizer = llguidance.LLTokenizer(_byte_tokenizer_json())
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    accepted = matcher.consume_tokens(tokenizer.tokenize_str(text)) and matcher.is_accepting()
    assert accepted == ok


def _byte_tokenizer_json() -> str:
    from moeflow.tokenizer import Tokenizer

    return Tokenizer.byte_level().backend.to_str()
