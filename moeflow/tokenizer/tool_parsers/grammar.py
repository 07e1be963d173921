"""The grammar that forces a call (tool_choice "required" or a named function) in a format's
own markup, its arguments valid against the tool's JSON schema: a Lark grammar in llguidance's
dialect, compiled by engine/structured_output.py like any other constraint."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from moeflow.tokenizer.tool_parsers.base import function_parameters, schema_types
from moeflow.tokenizer.tool_parsers.registry import TOOL_PARSERS

# Every format's markers, which a tokenizer may hold as single (special) tokens.
TOOL_MARKERS = frozenset(
    [
        "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
        "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<|tool_calls_section_begin|>",
        "<|tool_calls_section_end|>", "<|tool_call_begin|>", "<|tool_call_end|>",
        "<|tool_call_argument_begin|>", "｜DSML｜",
    ]
)  # fmt: skip
# Formats parsed but not forced: a call as Python needs a grammar of Python's literals.
_NOT_FORCED = frozenset(["pythonic", "llama4_pythonic"])

_MARKER_SPLIT = re.compile(
    "(" + "|".join(re.escape(m) for m in sorted(TOOL_MARKERS, key=len, reverse=True)) + ")"
)


def tool_call_grammar(
    parser: str,
    tools: list[dict[str, Any]],
    name: str | None,
    parallel: bool,
    token_id: Callable[[str], int | None] | None = None,
) -> str:
    """A Lark grammar (llguidance's dialect) that forces `parser`'s call format: one call (or
    several when `parallel`) of the tool `name`, or of any tool when None, with arguments valid
    against the tool's JSON schema (key/value formats: each property in schema order, the
    required ones always, strings as plain text). `token_id` (the tokenizer's): a marker that is
    one token is that token (`<[id]>`: llguidance never matches a special token to text)."""
    if parser not in TOOL_PARSERS or parser in _NOT_FORCED:
        raise ValueError(
            f'tool_choice "required" or a named function is not implemented for the {parser} '
            'call format yet ("auto" and "none" work)'
        )

    def lit(text: str) -> str:
        return _literal(text, token_id)

    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if parser in ("hermes", "llama3_json"):
        return _json_call_grammar(parser, functions, parallel, lit)
    lines = []
    for i, function in enumerate(functions):
        parameters = function_parameters(function)
        fname = function["name"]
        if parser in ("glm45", "qwen3_coder", "deepseek_v32"):
            body, rules = _xml_params_grammar(parser, f"f{i}", parameters, lit)
            lines += rules
            if parser == "deepseek_v32":
                head = f'<｜DSML｜invoke name="{fname}">\n'
                call = f"{lit(head)} {body} {lit('</｜DSML｜invoke>' + chr(10))}"
            elif parser == "glm45":
                call = f"{lit('<tool_call>' + fname + chr(10))} {body} {lit('</tool_call>')}"
            else:
                head = f"<tool_call>\n<function={fname}>\n"
                call = f"{lit(head)} {body} {lit('</function>' + chr(10) + '</tool_call>')}"
        else:
            args = "%json " + json.dumps(
                {**parameters, "x-guidance": {"whitespace_flexible": False}}
            )
            if parser == "deepseek_v3":
                head = f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{fname}\n```json\n"
                call = f"{lit(head)} {args} {lit(chr(10) + '```<｜tool▁call▁end｜>')}"
            elif parser == "deepseek_v31":
                head = f"<｜tool▁call▁begin｜>{fname}<｜tool▁sep｜>"
                call = f"{lit(head)} {args} {lit('<｜tool▁call▁end｜>')}"
            else:  # kimi_k2
                call = (
                    f"{lit('<|tool_call_begin|>functions.' + fname + ':')} /[0-9]{{1,3}}/ "
                    f"{lit('<|tool_call_argument_begin|>')} {args} {lit('<|tool_call_end|>')}"
                )
        lines.append(f"call_{i}: {call}")
    calls = " | ".join(f"call_{i}" for i in range(len(functions)))
    lines.append(f"call: {calls}")
    sep = '"\\n" ' if parser in ("glm45", "qwen3_coder") else ""
    more = f" ({sep}call)*" if parallel else ""
    wrap = {
        "deepseek_v3": ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
        "deepseek_v31": ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
        "kimi_k2": ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"),
        "deepseek_v32": ("<｜DSML｜function_calls>\n", "</｜DSML｜function_calls>"),
    }.get(parser)
    start = f"call{more}"
    if wrap is not None:
        start = f"{lit(wrap[0])} {start} {lit(wrap[1])}"
    return f"start: {start}\n" + "\n".join(lines) + "\n"


def _json_call_grammar(
    parser: str, functions: list[dict[str, Any]], parallel: bool, lit: Callable[[str], str]
) -> str:
    """Hermes and Llama 3: the call is one JSON object {name, arguments | parameters}."""
    key = "parameters" if parser == "llama3_json" else "arguments"
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, key: function_parameters(f)},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}  # compact: no space loops
    if parser == "llama3_json":
        call = "%json " + json.dumps(schema)
        more = ' ("; " call)*' if parallel else ""
        return f"start: call{more}\ncall: {call}\n"
    head, tail = lit("<tool_call>" + chr(10)), lit(chr(10) + "</tool_call>")
    call = f"{head} %json {json.dumps(schema)} {tail}"
    more = ' ("\\n" call)*' if parallel else ""
    return f"start: call{more}\ncall: {call}\n"


def _xml_params_grammar(
    parser: str, prefix: str, parameters: dict[str, Any], lit: Callable[[str], str]
) -> tuple[str, list[str]]:
    """The key/value body of one call: each property in schema order (required ones always,
    others optional) -> (the body's expression, its rules)."""
    properties = parameters.get("properties") or {}
    required = set(parameters.get("required") or ())
    parts, rules = [], []
    for j, (key, schema) in enumerate(properties.items()):
        value = f"{prefix}_v{j}"
        rules.append(f"{value}: {_value_grammar(schema if isinstance(schema, dict) else {})}")
        if parser == "glm45":
            open_, close = f"<arg_key>{key}</arg_key>\n<arg_value>", "</arg_value>\n"
        elif parser == "deepseek_v32":
            text = "true" if _is_text(schema if isinstance(schema, dict) else {}) else "false"
            open_ = f'<｜DSML｜parameter name="{key}" string="{text}">'
            close = "</｜DSML｜parameter>\n"
        else:
            open_, close = f"<parameter={key}>\n", "\n</parameter>\n"
        part = f"{lit(open_)} {value} {lit(close)}"
        parts.append(part if key in required else f"({part})?")
    return (" ".join(parts) or '""'), rules


def _is_text(schema: dict[str, Any]) -> bool:
    """Whether `_value_grammar` writes the value as plain text (else as JSON)."""
    if "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
        return True
    return schema_types(schema) == {"string"} and "const" not in schema


def _value_grammar(schema: dict[str, Any]) -> str:
    """One property's value as text: strings plain (an enum's members, or text without "<" and
    newlines within the length bounds), anything else its JSON."""
    if "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
        return " | ".join(_lit(v) for v in schema["enum"]) or '""'
    if _is_text(schema):
        low = int(schema.get("minLength", 0))
        high = schema.get("maxLength")
        return f"/[^<\\n]{{{low},{'' if high is None else int(high)}}}/"
    return "%json " + json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})


def _lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _literal(text: str, token_id: Callable[[str], int | None] | None) -> str:
    """Fixed text as Lark: its markers that are one token as that token, the rest quoted."""
    parts = []
    for piece in _MARKER_SPLIT.split(text):
        if not piece:
            continue
        tid = token_id(piece) if token_id is not None and piece in TOOL_MARKERS else None
        parts.append(f"<[{tid}]>" if tid is not None else _lit(piece))
    return " ".join(parts) or '""'
