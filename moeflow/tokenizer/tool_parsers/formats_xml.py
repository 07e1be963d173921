"""Key/value formats: each argument a tagged key and a text value, typed by the tool's JSON
schema (`typed_value`): GLM-4.5 and Qwen3-Coder."""

from __future__ import annotations

import json
import re
from typing import Any

from moeflow.tokenizer.tool_parsers.base import (
    MAX_HEAD_CHARS,
    NOT_JSON,
    ScanningToolParser,
    ToolCallDelta,
    json_type,
    json_value,
    partial_suffix,
    property_schema,
    schema_types,
)

_NAME = re.compile(r"[A-Za-z0-9_.\-:/]{1,256}")
_QWEN_VALUE_END = re.compile(r"</parameter>|\n<parameter=|\n</function>")
_QWEN_AFTER_VALUE = ("<parameter=", "</function>", "</tool_call>")


class Glm45ToolParser(ScanningToolParser):
    """GLM-4.5 / 4.6 / 4.7: `<tool_call>NAME\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>
    ...</tool_call>` (4.7 without the newlines). Values are text, typed by the tool's schema
    (`typed_value`); each finished key/value pair is streamed as one arguments piece. A value
    missing its </arg_value> ends at the call's </tool_call> (known only at the end)."""

    strip_around = True
    start = "<tool_call>"
    call_tags = ("<tool_call>",)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._key = ""

    def _on_text(self, final: bool, content: list[str], _: list[ToolCallDelta]) -> bool:
        if not self._content(content, final, (self.start,)):
            return False
        self._buf, self._state = self._buf[len(self.start) :], "name"
        return True

    def _on_name(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        rest = self._buf.lstrip()
        i = rest.find("<")
        if i < 0:
            if final or len(rest) > MAX_HEAD_CHARS:
                return self._skip(final)
            return False
        name = rest[:i].strip()
        if not _NAME.fullmatch(name):
            return self._skip(final)
        self._open_call(name, deltas)
        self._buf, self._state = rest[i:], "params"
        return True

    def _on_params(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        rest = self._buf.lstrip()
        if rest.startswith("<arg_key>"):
            end = rest.find("</arg_key>")
            if end < 0:
                return self._wait_or_drop(final)
            self._key = rest[len("<arg_key>") : end].strip()
            self._buf, self._state = rest[end + len("</arg_key>") :], "value"
            return True
        if rest.startswith("</tool_call>"):
            self._add_args("}" if self._args else "{}", deltas)
            self._close_call()
            self._buf, self._state, self._strip = rest[len("</tool_call>") :], "text", True
            return True
        if any(tag.startswith(rest) for tag in ("<arg_key>", "</tool_call>")):
            return self._wait_or_drop(final)
        return self._skip(final)

    def _on_value(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        rest = self._buf.lstrip()
        if not rest.startswith("<arg_value>"):
            if "<arg_value>".startswith(rest):
                return self._wait_or_drop(final)
            return self._skip(final)
        body = rest[len("<arg_value>") :]
        end, skip = body.find("</arg_value>"), len("</arg_value>")
        if end < 0:
            if not final:
                return False
            end, skip = body.find("</tool_call>"), 0  # a value missing its close tag
            if end < 0:
                return self._wait_or_drop(final)
        self._add_param(self._key, body[:end], deltas)
        self._buf, self._state = body[end + skip :], "params"
        return True

    def _on_skip(self, final: bool, _: list[str], __: list[ToolCallDelta]) -> bool:
        i = self._buf.find("</tool_call>")
        if i >= 0:
            self._buf = self._buf[i + len("</tool_call>") :]
            self._state, self._strip = "text", True
            return True
        keep = partial_suffix(self._buf, "</tool_call>")
        self._buf = "" if final else self._buf[len(self._buf) - keep :]
        return False

    def _add_param(self, key: str, text: str, deltas: list[ToolCallDelta]) -> None:
        assert self._call is not None
        value = typed_value(text, property_schema(self.tools, self._call[2], key))
        head = ", " if self._args else "{"
        piece = f"{head}{json.dumps(key, ensure_ascii=False)}: "
        self._add_args(piece + json.dumps(value, ensure_ascii=False), deltas)

    def _wait_or_drop(self, final: bool) -> bool:
        if final:  # the output ended inside the call: never a call
            self._drop_call()
            self._buf = ""
        return False

    def _skip(self, final: bool) -> bool:
        """A malformed call: dropped through its </tool_call>."""
        self._drop_call()
        self._state = "skip"
        return not final or bool(self._buf)


class Qwen3CoderToolParser(Glm45ToolParser):
    """Qwen3-Coder / Qwen3.5+: `<tool_call>\\n<function=NAME>\\n<parameter=k>\\nv\\n</parameter>
    \\n</function>\\n</tool_call>`; values typed by the schema as GLM's (one newline at each end
    of a value is markup). A value ends at a </parameter> that the next parameter, </function>
    or </tool_call> follows (so the tag may appear inside a value), or, when its close tag is
    missing, at a line that opens the next parameter or closes the function. A bare
    `<function=...>` (no <tool_call>) is a call too."""

    start = "<tool_call>"

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._bare = False

    def _on_text(self, final: bool, content: list[str], _: list[ToolCallDelta]) -> bool:
        if not self._content(content, final, (self.start, "<function=")):
            return False
        self._bare = self._buf.startswith("<function=")
        if not self._bare:
            self._buf = self._buf[len(self.start) :]
        self._state = "name"
        return True

    def _on_name(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        rest = self._buf.lstrip()
        if not rest.startswith("<function="):
            if "<function=".startswith(rest):
                return self._wait_or_drop(final)
            return self._skip(final)
        end = rest.find(">")
        if end < 0:
            if final or len(rest) > MAX_HEAD_CHARS:
                return self._skip(final)
            return False
        name = rest[len("<function=") : end].strip()
        if not _NAME.fullmatch(name):
            return self._skip(final)
        self._open_call(name, deltas)
        self._buf, self._state = rest[end + 1 :], "params"
        return True

    def _on_params(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        rest = self._buf.lstrip()
        if rest.startswith("<parameter="):
            end = rest.find(">")
            if end < 0:
                return self._wait_or_drop(final)
            self._key = rest[len("<parameter=") : end].strip()
            self._buf, self._state = rest[end + 1 :], "value"
            return True
        if rest.startswith("</function>"):
            self._buf, self._state = rest[len("</function>") :], "close"
            return True
        if any(tag.startswith(rest) for tag in ("<parameter=", "</function>")):
            return self._wait_or_drop(final)
        return self._skip(final)

    def _on_value(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        buf = self._buf
        for m in _QWEN_VALUE_END.finditer(buf):
            if m.group() != "</parameter>":  # the close tag is missing: the marker stays
                self._add_param(self._key, _trim_newline(buf[: m.start()]), deltas)
                self._buf, self._state = buf[m.start() :], "params"
                return True
            after = buf[m.end() :].lstrip()
            if after.startswith(_QWEN_AFTER_VALUE) or (final and not after):
                self._add_param(self._key, _trim_newline(buf[: m.start()]), deltas)
                self._buf, self._state = buf[m.end() :], "params"
                return True
            if not after or any(tag.startswith(after) for tag in _QWEN_AFTER_VALUE):
                return self._wait_or_drop(final)  # what follows decides
        return self._wait_or_drop(final)

    def _on_close(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        rest = self._buf.lstrip()
        end = "</tool_call>"
        if rest.startswith(end):
            rest = rest[len(end) :]
        elif not final and end.startswith(rest):
            return False
        elif not self._bare and end.startswith(rest):  # cut before </tool_call>: not a call
            return self._wait_or_drop(final)
        self._add_args("}" if self._args else "{}", deltas)
        self._close_call()
        self._buf, self._state, self._strip = rest, "text", True
        return True


def typed_value(text: str, schema: dict[str, Any] | None) -> Any:
    """A key/value format's value text -> the JSON value the tool's property schema asks for:
    the text itself for a string property; else its JSON (or Python's True/False/None) when
    that has a type the schema allows; else the text when strings are allowed. No schema: its
    JSON if it parses, else the text."""
    types = schema_types(schema) if schema else set()
    if types == {"string"}:
        return text
    value = json_value(text.strip())
    if value is NOT_JSON and types & {"boolean", "null"}:
        value = {"True": True, "False": False, "None": None}.get(text.strip(), NOT_JSON)
    if value is NOT_JSON:
        return text
    if (
        not types
        or json_type(value) in types
        or ("number" in types and json_type(value) == "integer")
    ):
        return value
    return text if "string" in types else value


def _trim_newline(text: str) -> str:
    """One newline at each end of a Qwen3-Coder value is markup."""
    text = text[1:] if text.startswith("\n") else text
    return text[:-1] if text.endswith("\n") else text
