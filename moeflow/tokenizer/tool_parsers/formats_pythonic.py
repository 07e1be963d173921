"""Pythonic calls (vLLM's `pythonic` / `llama4_pythonic`; Llama 3.2 and Llama 4): the whole
output is a Python list of calls with keyword arguments, `[f(a=1), g(b="x")]`, on Llama 4
inside <|python_start|> ... <|python_end|>. Read with `ast` and literal values only: nothing
the model writes is ever evaluated."""

from __future__ import annotations

import ast
import json
from typing import Any

from moeflow.tokenizer.tool_parsers.base import BaseToolParser, ToolCall, ToolCallDelta, new_call_id

_START, _END = "<|python_start|>", "<|python_end|>"


class PythonicToolParser(BaseToolParser):
    """From a leading "[" (or <|python_start|>) the output is held to the end, then is calls if
    all of it is a list of calls `name(key=literal, ...)`, else content verbatim. Values are
    Python literals (strings, numbers, True/False/None, lists, dicts, tuples as lists)."""

    call_tags = (_START,)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._text = ""  # held text
        self._mode = "undecided"  # only whitespace so far -> "content" | "held" (to the end)

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        if self._mode == "content":
            return delta, []
        self._text += delta
        if self._mode == "undecided":
            head = self._text.lstrip()
            if head.startswith(("[", _START)):
                self._mode = "held"
            elif head and not _START.startswith(head):
                self._mode = "content"
                text, self._text = self._text, ""
                return text, []
        return "", []

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        text, self._text = self._text, ""
        if self._mode != "held":
            return text, []
        body = text.strip().removeprefix(_START).removesuffix(_END).strip()
        calls = pythonic_calls(body)
        if calls is None:
            return text, []
        return "", self._whole_calls(calls)


def pythonic_calls(text: str) -> list[ToolCall] | None:
    """`[f(a=1), g()]` -> its calls; None unless all of it is such a list (an empty list too)."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a NUL byte
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted_name(node.func)
        if name is None:
            return None
        arguments: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None:  # **kwargs
                return None
            try:
                arguments[kw.arg] = _jsonable(ast.literal_eval(kw.value))
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None
        calls.append(ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False)))
    return calls


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted_name(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _jsonable(value: Any) -> Any:
    """A literal -> its JSON value (tuples and sets as lists); TypeError for what JSON lacks
    (bytes, complex numbers, non-string keys, NaN and infinities)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise TypeError("not a JSON number")
        return value
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v) for k, v in value.items()}
    raise TypeError(f"{type(value).__name__} is not JSON")
