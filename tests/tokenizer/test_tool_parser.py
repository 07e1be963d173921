"""The tool-call parsers on hand-written model outputs: calls, content around them, malformed
blocks kept as content or dropped, schema-typed values, and streamed == whole for every split of
the text into two deltas and for one character at a time (arguments arriving in pieces); the
parser choice from templates and --tool-call-parser; the forced-call grammar of every format
compiles, accepts exactly the calls, and what it accepts parses back to them."""

from __future__ import annotations

import json

import llguidance
import pytest

from moeflow.tokenizer.tool_parsers import (
    TOOL_MARKERS,
    TOOL_PARSERS,
    HermesToolParser,
    Llama3JsonToolParser,
    ToolCallDelta,
    ToolParser,
    pick_tool_parser,
    tool_call_grammar,
    typed_value,
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
    ('<tool_call>{"name": "f", "arguments": {bad}}</tool_call>ok', "ok", []),  # streamed: dropped
    ('<tool_call>{"name": "f", "arguments": {}} x</tool_call>', "", []),
    ('<tool_call>{"arguments": {}, "name": "f"}</tool_call>', "", [("f", {})]),  # held whole
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
        got_content, _ = _stream(parser, pieces)
        _check(got_content, parser.calls, content, calls)


def test_hermes_streams_arguments_in_pieces() -> None:
    parser = HermesToolParser()
    content, deltas = _stream(parser, list("Hi " + CALL_A))
    assert content == "Hi" and deltas[0].id and deltas[0].name == "get_weather"
    assert len([d for d in deltas[1:] if d.arguments]) > 1
    assert "".join(d.arguments for d in deltas) == parser.calls[0].arguments
    parser = HermesToolParser()  # arguments as a JSON string: held, one delta at the end
    _, deltas = _stream(parser, list(CALL_B))
    assert len(deltas) == 1 and json.loads(deltas[0].arguments) == {"tz": "CET"}


def _stream(parser: ToolParser, pieces: list[str]) -> tuple[str, list[ToolCallDelta]]:
    content, deltas = "", []
    for piece in pieces:
        c, new = parser.feed(piece)
        content += c
        deltas += new
    c, new = parser.finish()
    return content + c, deltas + new


def test_pick_tool_parser() -> None:
    assert pick_tool_parser("auto", None) == "hermes"  # ChatML fallback: Hermes-style tools
    assert pick_tool_parser("auto", "{{ messages }}") == "hermes"
    assert pick_tool_parser("auto", "{% if tool_calls %}<tool_call>{% endif %}") == "hermes"
    assert pick_tool_parser("auto", "{{ tool_calls }} without a known marker") is None
    assert pick_tool_parser("hermes", "<|tool_calls_section_begin|>") == "hermes"
    assert pick_tool_parser("kimi_k2", None) == "kimi_k2"
    assert pick_tool_parser("auto", "{{ tools }} tool_calls <|python_tag|>") == "llama3_json"
    with pytest.raises(ValueError, match="unknown tool call parser"):
        pick_tool_parser("nope", None)
    # the lines that write a call in each family's own template
    templates = {
        "deepseek_v3": "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + "
        "'<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' }}",
        "deepseek_v31": "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'+ tool['function']['name']"
        " + '<｜tool▁sep｜>' + tool['function']['arguments'] }}",
        "kimi_k2": "<|tool_calls_section_begin|>{% for tc in tool_calls %}<|tool_call_begin|>",
        "glm45": "<tool_call>{{ tc.name }}{% for k, v in args %}<arg_key>{{ k }}</arg_key>",
        "qwen3_coder": "{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}",
        "deepseek_v32": "{{ '<｜DSML｜invoke name=\"' + tool.name + '\">' }}",
        "pythonic": "[func_name1(params_name1=params_value1, params_name2=params_value2...)]",
    }
    for name, template in templates.items():
        assert pick_tool_parser("auto", template) == name
    with pytest.raises(ValueError, match="not implemented for the pythonic call format"):
        tool_call_grammar("pythonic", TOOLS, None, False)


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


# ---- the special-token and key/value formats -----------------------------------------------------
TYPED_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "zip": {"type": "string"},
                    "exact": {"type": ["boolean", "null"]},
                },
            },
        },
    }
]
DS3 = (
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
    '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
)
DS31 = (
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
    '{"city": "a}<｜tool▁call▁end｜>"}<｜tool▁call▁end｜>'
    "<｜tool▁call▁begin｜>now<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
)
KIMI = (
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
    '<|tool_call_argument_begin|>{"city": "Paris", "days": [1, {"x": null}]}<|tool_call_end|>'
    "<|tool_calls_section_end|>"
)
GLM = (
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>zip</arg_key>\n"
    "<arg_value>0042</arg_value>\n</tool_call>"
)
QWEN = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis </parameter> x\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n<parameter=exact>\nTrue\n</parameter>\n</function>\n"
    "</tool_call>"
)
DSML = (
    '<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" '
    'string="true">a </｜DSML｜invoke> b</｜DSML｜parameter>\n<｜DSML｜parameter name="days" '
    'string="false">3</｜DSML｜parameter>\n<｜DSML｜parameter name="zip">0042</｜DSML｜parameter>'
    '\n</｜DSML｜invoke>\n<｜DSML｜invoke name="now"/>\n</｜DSML｜function_calls>'
)
DSML_ARGS = {"city": "a </｜DSML｜invoke> b", "days": 3, "zip": "0042"}
PY = "[get_weather(city='Paris', days=3, exact=None), now()]"
KIMI_ARGS = {"city": "Paris", "days": [1, {"x": None}]}
GLM_ARGS = {"city": "Paris", "days": 3, "zip": "0042"}
QWEN_ARGS = {"city": "Paris </parameter> x", "days": 3, "exact": True}
TCB, TCE, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
# (parser, model output, content, [(name, arguments)])
FORMAT_CASES = [
    ("deepseek_v3", "See." + DS3 + " ok", "See. ok", [("get_weather", {"city": "Paris"})]),
    ("deepseek_v3", DS3.replace('"Paris"}', '"Paris"'), "", []),  # malformed JSON: no call
    ("deepseek_v3", DS3[:90], "", []),  # cut by max_tokens
    ("deepseek_v31", DS31, "", [("get_weather", {"city": "a}<｜tool▁call▁end｜>"}), ("now", {})]),
    ("deepseek_v31", "plain <｜tool▁calls", "plain <｜tool▁calls", []),
    ("kimi_k2", "Hi " + KIMI, "Hi ", [("get_weather", KIMI_ARGS)]),
    ("kimi_k2", KIMI.replace("functions.get_weather:0", "get_weather"), "",
     [("get_weather", KIMI_ARGS)]),
    ("glm45", "Sure.\n" + GLM + "\nDone", "Sure.Done", [("get_weather", GLM_ARGS)]),
    ("glm45", GLM.replace("\n", ""), "", [("get_weather", GLM_ARGS)]),
    ("glm45", "<tool_call>now</tool_call>", "", [("now", {})]),
    ("glm45", GLM[:-len("</tool_call>")], "", []),  # never closed
    ("qwen3_coder", "Sure.\n\n" + QWEN, "Sure.", [("get_weather", QWEN_ARGS)]),
    ("qwen3_coder", QWEN.replace("\n</function>\n</tool_call>", ""), "", []),
    ("qwen3_coder", "<function=now>\n</function>\n</tool_call>", "", [("now", {})]),
    ("qwen3_coder", "a < b <tool", "a < b <tool", []),
    ("deepseek_v32", "Sure.\n\n" + DSML + "\nok", "Sure.ok",
     [("get_weather", DSML_ARGS), ("now", {})]),
    ("deepseek_v32", DSML.replace("｜DSML｜", "｜DSML｜ ").replace("function_calls", "calls"),
     "", [("get_weather", DSML_ARGS | {"city": "a </｜DSML｜ invoke> b"}), ("now", {})]),
    ("deepseek_v32", DSML[:200], "", []),  # cut inside the first call
    ("deepseek_v32", "a <｜DSML｜func", "a <｜DSML｜func", []),
    ("pythonic", PY, "", [("get_weather", {"city": "Paris", "days": 3, "exact": None}),
                          ("now", {})]),
    ("pythonic", "<|python_start|>" + PY + "<|python_end|>", "",
     [("get_weather", {"city": "Paris", "days": 3, "exact": None}), ("now", {})]),
    ("pythonic", "[1, 2] is a list", "[1, 2] is a list", []),
    ("pythonic", "[f(x=__import__('os').system('true'))]",
     "[f(x=__import__('os').system('true'))]", []),  # not a literal: never evaluated
    ("pythonic", "[f(1)]", "[f(1)]", []),  # positional arguments have no name
    ("pythonic", "Hi [f()]", "Hi [f()]", []),
]  # fmt: skip


@pytest.mark.parametrize(("parser", "text", "content", "calls"), FORMAT_CASES)
def test_formats_streamed_and_whole(parser: str, text: str, content: str, calls: list) -> None:
    cls = TOOL_PARSERS[parser]
    _check(*cls(TYPED_TOOLS).parse(text), content, calls)
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        p = cls(TYPED_TOOLS)
        got_content, deltas = _stream(p, pieces)
        _check(got_content, p.calls, content, calls)
        # OpenAI's delta shape: id and name first, then argument pieces adding up to the call
        assembled: dict[int, list[str]] = {}
        for d in deltas:
            if d.id is not None:
                assembled[d.index] = [d.id, d.name or "", d.arguments]
            else:
                assembled[d.index][2] += d.arguments
        done = [(c.id, c.name, c.arguments) for c in p.calls]
        assert [tuple(a) for a in assembled.values() if a[0] in {c[0] for c in done}] == done
    if calls and calls[0][1] and parser != "pythonic":  # arguments come in pieces
        p = cls(TYPED_TOOLS)
        _, deltas = _stream(p, list(text))
        assert sum(1 for d in deltas if d.id is None and d.index == 0) > 1


@pytest.mark.parametrize(
    ("text", "schema", "value"),
    [
        ("3", {"type": "integer"}, 3),
        ("3", {"type": "string"}, "3"),
        ("0042", {"type": "integer"}, "0042"),  # not JSON: the text
        ("2.5", {"type": "number"}, 2.5),
        ("7", {"type": "number"}, 7),
        ("True", {"type": "boolean"}, True),
        ("True", {"type": "string"}, "True"),
        ("null", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, None),
        ('{"a": 1}', {"type": "object"}, {"a": 1}),
        ('{"a": 1}', {"type": "string"}, '{"a": 1}'),
        ("[1]", None, [1]),
        ("hi there", None, "hi there"),
        ("NaN", {"type": "number"}, "NaN"),
        ("x", {"type": "integer"}, "x"),
        ("5", {"enum": ["5", "6"]}, "5"),
    ],
)
def test_typed_value(text: str, schema: dict | None, value: object) -> None:
    assert typed_value(text, schema) == value


def _glm(args: str) -> str:
    return f"<tool_call>get_weather\n{args}</tool_call>"


@pytest.mark.parametrize(
    ("parser", "name", "text", "ok"),
    [
        ("deepseek_v3", None, DS3.replace('": "', '":"'), True),  # compact JSON
        ("deepseek_v3", "now", DS3, False),
        ("deepseek_v31", None, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>now<｜tool▁sep｜>{}"
         "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", True),
        ("deepseek_v31", None, f"<｜tool▁calls▁begin｜>{TCB}get_weather{SEP}{{}}{TCE}"
         "<｜tool▁calls▁end｜>", False),  # city is required
        ("kimi_k2", "get_weather", KIMI.replace(', "days": [1, {"x": null}]', "").replace(" ", ""),
         True),
        ("kimi_k2", "get_weather", KIMI, False),  # days is not in the schema
        ("glm45", None, _glm("<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"), True),
        ("glm45", None, _glm(""), False),
        ("glm45", None, "<tool_call>now\n</tool_call>", True),
        ("qwen3_coder", None, "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
         "</parameter>\n</function>\n</tool_call>", True),
        ("qwen3_coder", None, "<tool_call>\n<function=get_weather>\n</function>\n</tool_call>",
         False),
        ("deepseek_v32", None, '<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
         '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
         "</｜DSML｜invoke>\n</｜DSML｜function_calls>", True),
        ("deepseek_v32", None, '<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
         "</｜DSML｜invoke>\n</｜DSML｜function_calls>", False),  # city is required
    ],
)  # fmt: skip
def test_forced_call_grammar_formats(parser: str, name: str | None, text: str, ok: bool) -> None:
    _check_grammar(parser, name, False, text, ok)
    if ok:
        content, calls = TOOL_PARSERS[parser](TOOLS).parse(text)
        assert content == "" and len(calls) == 1


@pytest.mark.parametrize(
    "parser", ["deepseek_v3", "deepseek_v31", "kimi_k2", "glm45", "qwen3_coder", "deepseek_v32"]
)
def test_forced_parallel_calls(parser: str) -> None:
    """Two calls in a row are the grammar's only when parallel, and parse back to two."""
    one = {
        "deepseek_v3": f"{TCB}function{SEP}now\n```json\n{{}}\n```{TCE}",
        "deepseek_v31": f"{TCB}now{SEP}{{}}{TCE}",
        "kimi_k2": "<|tool_call_begin|>functions.now:0<|tool_call_argument_begin|>{}"
        "<|tool_call_end|>",
        "glm45": "<tool_call>now\n</tool_call>",
        "qwen3_coder": "<tool_call>\n<function=now>\n</function>\n</tool_call>",
        "deepseek_v32": '<｜DSML｜invoke name="now">\n</｜DSML｜invoke>\n',
    }[parser]
    wrap = {
        "deepseek_v3": ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
        "deepseek_v31": ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
        "kimi_k2": ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"),
        "deepseek_v32": ("<｜DSML｜function_calls>\n", "</｜DSML｜function_calls>"),
    }.get(parser, ("", ""))
    sep = "\n" if parser in ("glm45", "qwen3_coder") else ""
    text = wrap[0] + one + sep + one + wrap[1]
    _check_grammar(parser, "now", True, text, True)
    _check_grammar(parser, "now", False, text, False)
    assert len(TOOL_PARSERS[parser](TOOLS).parse(text)[1]) == 2


def test_forced_call_grammar_uses_marker_tokens() -> None:
    """Markers the tokenizer holds as one token are forced as that token: llguidance never
    matches a special token to quoted text, so a real model's markers must be named by id."""
    from tokenizers import Tokenizer as HFTokenizer

    from moeflow.tokenizer import Tokenizer

    backend = HFTokenizer.from_str(Tokenizer.byte_level().backend.to_str())
    markers = ["<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>"]
    markers += ["<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"]
    backend.add_tokens(markers)
    ids = {m: backend.token_to_id(m) for m in markers}
    grammar = tool_call_grammar("deepseek_v31", TOOLS, "now", False, ids.get)
    assert all(f"<[{i}]>" in grammar for i in ids.values())
    ll = llguidance.LLTokenizer(backend.to_str())
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    tokens = [ids[markers[0]], ids[markers[1]], *ll.tokenize_str("now"), ids[markers[2]]]
    tokens += [*ll.tokenize_str("{}"), ids[markers[3]], ids[markers[4]]]
    assert matcher.consume_tokens(tokens) and matcher.is_accepting(), matcher.get_error()


@pytest.mark.parametrize("parser", sorted(TOOL_PARSERS))
def test_marker_soup_streams_as_whole(parser: str) -> None:
    """Seeded random texts made of every format's markup pieces: no parser hangs or raises, and
    streaming in random chunks gives exactly the whole parse (content and calls)."""
    import random

    pieces = [
        *sorted(TOOL_MARKERS), "<function=", "get_weather", "</function>", "<parameter=city>",
        "</parameter>", "functions.now:0", "function", "```json", "```", '{"name": "now", ',
        '"arguments": ', '{"city": "P<tool_call>"}', "{", "}", '"', "\\", "\n", " ", "text",
        "<|python_tag|>", "3", "<think>",
    ]  # fmt: skip
    rng = random.Random(parser)
    for _ in range(150):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 25)))
        content, calls = TOOL_PARSERS[parser](TYPED_TOOLS).parse(text)
        whole = (content, [(c.name, c.arguments) for c in calls])
        chunks, i = [], 0
        while i < len(text):
            n = rng.randint(1, 6)
            chunks.append(text[i : i + n])
            i += n
        p = TOOL_PARSERS[parser](TYPED_TOOLS)
        got, _ = _stream(p, chunks)
        assert (got, [(c.name, c.arguments) for c in p.calls]) == whole, text
        for c in calls:
            assert isinstance(json.loads(c.arguments), dict)
