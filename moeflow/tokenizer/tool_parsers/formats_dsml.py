"""DeepSeek's DSML calls (vLLM's `deepseek_v32`): V3.2 writes

    <｜DSML｜function_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜function_calls>

V4 names the section `tool_calls`, V4.1 `calls` with a space after every `｜DSML｜`; all three
are read. A parameter with string="true" is its text verbatim, string="false" its JSON."""

from __future__ import annotations

import json
import re
from typing import Any

from moeflow.tokenizer.tool_parsers.base import (
    MAX_HEAD_CHARS,
    NOT_JSON,
    ScanningToolParser,
    ToolCallDelta,
    json_value,
    property_schema,
)
from moeflow.tokenizer.tool_parsers.formats_xml import typed_value

SECTION_STARTS = ("<｜DSML｜function_calls>", "<｜DSML｜tool_calls>", "<｜DSML｜ calls>")
_SECTION_END = re.compile(r"</｜DSML｜ ?(?:function_calls|tool_calls|calls)>")
_INVOKE = re.compile(r'<｜DSML｜ ?invoke\s+name="([^"<>]{1,256})"\s*(/?)>')
_INVOKE_END = re.compile(r"</｜DSML｜ ?invoke>")
_PARAMETER = re.compile(
    r'<｜DSML｜ ?parameter\s+name="([^"<>]{1,256})"(?:\s+string="(true|false)")?\s*>'
)
_PARAMETER_END = re.compile(r"</｜DSML｜ ?parameter>")


class DeepSeekDsmlToolParser(ScanningToolParser):
    """Text outside the section is content (whitespace around it dropped); in the section,
    each invoke is a call, streamed one finished parameter at a time as GLM's; anything else
    there is dropped. A call the output never closes (</｜DSML｜invoke>) is no call. A tag's
    text inside a parameter's value is text: a value ends only at its </｜DSML｜parameter>."""

    strip_around = True
    call_tags = SECTION_STARTS

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._key = ""
        self._is_string: bool | None = None  # the parameter's string="..." (None: not given)

    def _on_text(self, final: bool, content: list[str], _: list[ToolCallDelta]) -> bool:
        if not self._content(content, final, SECTION_STARTS):
            return False
        start = next(s for s in SECTION_STARTS if self._buf.startswith(s))
        self._buf, self._state = self._buf[len(start) :], "section"
        return True

    def _on_section(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        rest = self._buf.lstrip()
        tag = self._tag(rest, final)
        if tag is None:
            return False
        if m := _INVOKE.fullmatch(tag):
            self._open_call(m.group(1), deltas)
            if m.group(2):  # <｜DSML｜invoke name="f"/>: no parameters
                self._add_args("{}", deltas)
                self._close_call()
            else:
                self._state = "params"
        elif _SECTION_END.fullmatch(tag):
            self._state, self._strip = "text", True
        self._buf = rest[len(tag) :]  # any other text in the section is dropped
        return True

    def _on_params(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        rest = self._buf.lstrip()
        tag = self._tag(rest, final)
        if tag is None:
            if final:
                self._drop_call()
            return False
        self._buf = rest[len(tag) :]
        if m := _PARAMETER.fullmatch(tag):
            self._key, self._state = m.group(1), "value"
            self._is_string = None if m.group(2) is None else m.group(2) == "true"
        elif _INVOKE_END.fullmatch(tag):
            self._add_args("}" if self._args else "{}", deltas)
            self._close_call()
            self._state = "section"
        else:  # malformed: the call is dropped through its </｜DSML｜invoke>
            self._drop_call()
            self._buf, self._state = rest, "skip"
        return True

    def _on_value(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        m = _PARAMETER_END.search(self._buf)
        if m is None:
            if final:
                self._drop_call()
                self._buf = ""
            return False
        self._add_param(self._buf[: m.start()], deltas)
        self._buf, self._state = self._buf[m.end() :], "params"
        return True

    def _on_skip(self, final: bool, _: list[str], __: list[ToolCallDelta]) -> bool:
        m = _INVOKE_END.search(self._buf)
        if m is not None:
            self._buf, self._state = self._buf[m.end() :], "section"
            return True
        if final:
            self._buf = ""
        return False

    def _tag(self, rest: str, final: bool) -> str | None:
        """The tag `rest` starts with, through its ">"; None while it is incomplete (the buffer
        then holds `rest`). Text up to the next "<", and a "<" no ">" closes within
        MAX_HEAD_CHARS, come back as non-tags (dropped), so that a stream decides as the whole
        text does."""
        if not rest:
            self._buf = rest
            return None
        if not rest.startswith("<"):
            i = rest.find("<")
            return rest if i < 0 else rest[:i]
        end = rest.find(">", 0, MAX_HEAD_CHARS)
        if end >= 0:
            return rest[: end + 1]
        if len(rest) >= MAX_HEAD_CHARS:  # too long for a tag: the "<" is text
            return rest[0]
        if final:
            return rest
        self._buf = rest
        return None

    def _add_param(self, text: str, deltas: list[ToolCallDelta]) -> None:
        assert self._call is not None
        value: Any = text
        if self._is_string is not True:
            value = json_value(text.strip()) if self._is_string is False else NOT_JSON
            if value is NOT_JSON:
                value = typed_value(text, property_schema(self.tools, self._call[2], self._key))
        head = ", " if self._args else "{"
        piece = f"{head}{json.dumps(self._key, ensure_ascii=False)}: "
        self._add_args(piece + json.dumps(value, ensure_ascii=False), deltas)
