"""Formats whose calls sit in a section of special tokens, each a head naming the function and
a JSON object of arguments: DeepSeek V3 / R1, DeepSeek V3.1, Kimi K2."""

from __future__ import annotations

import re
from typing import Any

from moeflow.tokenizer.tool_parsers.base import (
    MAX_HEAD_CHARS,
    JsonObjectScan,
    ScanningToolParser,
    ToolCallDelta,
    json_object,
    partial_suffix,
)


class _SectionJsonToolParser(ScanningToolParser):
    """Calls in a section of special tokens, each a head (markup and the name, `head`'s group
    1) then a JSON object, streamed as it arrives, then optional ``` and the call's end:
    `SECTION_START (CALL_START head {json} CALL_END)* SECTION_END`. Text between calls in the
    section is dropped; text outside it is content, verbatim. A marker inside an argument
    string is text: the JSON is scanned, not searched."""

    section_start = section_end = call_start = call_end = ""
    head = re.compile("")
    fence = False  # ``` (from ```json) closes the arguments

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._scan = JsonObjectScan()

    def _on_text(self, final: bool, content: list[str], _: list[ToolCallDelta]) -> bool:
        if not self._content(content, final, (self.section_start,)):
            return False
        self._buf = self._buf[len(self.section_start) :]
        self._state = "section"
        return True

    def _on_section(self, final: bool, _: list[str], __: list[ToolCallDelta]) -> bool:
        buf = self._buf
        i, j = buf.find(self.call_start), buf.find(self.section_end)
        if j >= 0 and (i < 0 or j < i):
            self._buf, self._state = buf[j + len(self.section_end) :], "text"
            return True
        if i >= 0:
            self._buf, self._state = buf[i + len(self.call_start) :], "head"
            return True
        keep = max(partial_suffix(buf, self.call_start), partial_suffix(buf, self.section_end))
        self._buf = "" if final else buf[len(buf) - keep :]  # noise in the section is dropped
        return False

    def _on_head(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        buf = self._buf
        i = buf.find("{")
        if i < 0:
            if final:
                self._buf = ""
                return False
            if len(buf) > MAX_HEAD_CHARS or self.call_end in buf or self.section_end in buf:
                self._state = "skip"
                return True
            return False
        match = self.head.fullmatch(buf[:i])
        if match is None:
            self._state = "skip"
            return True
        self._open_call(match.group(1), deltas)
        self._scan = JsonObjectScan()
        self._buf, self._state = buf[i:], "args"
        return True

    def _on_args(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        n, status = self._scan.feed(self._buf)
        self._add_args(self._buf[:n], deltas)
        self._buf = self._buf[n:]
        if status == "done" and json_object("".join(self._args)) is not None:
            self._state = "tail"
            return True
        if status == "more" and not final:
            return False
        self._drop_call()  # not JSON, or cut: never a call
        self._state = "skip"
        return not final

    def _on_tail(self, final: bool, _: list[str], __: list[ToolCallDelta]) -> bool:
        rest = self._buf.lstrip()
        if self.fence:
            if rest.startswith("```"):
                rest = rest[3:].lstrip()
            elif "```".startswith(rest) and not final:
                return False
        if rest.startswith(self.call_end):
            self._close_call()
            self._buf, self._state = rest[len(self.call_end) :], "section"
            return True
        if self.call_end.startswith(rest) and not final:
            return False
        self._drop_call()  # a call that never closes is not a call
        self._state = "skip"
        return not final

    def _on_skip(self, final: bool, _: list[str], __: list[ToolCallDelta]) -> bool:
        """Markup of a malformed call: dropped through its end."""
        i = self._buf.find(self.call_end)
        if i >= 0:
            self._buf, self._state = self._buf[i + len(self.call_end) :], "section"
            return True
        keep = partial_suffix(self._buf, self.call_end)
        self._buf = "" if final else self._buf[len(self._buf) - keep :]
        return False


class DeepSeekV3ToolParser(_SectionJsonToolParser):
    """DeepSeek V3 / R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    \\n```json\\n{...}\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`."""

    section_start, section_end = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    call_tags = (section_start,)
    call_start, call_end = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
    head = re.compile(r"\s*(?:function)?\s*<｜tool▁sep｜>\s*([^\s<>{}`]+)\s*(?:```(?:json)?\s*)?")
    fence = True


class DeepSeekV31ToolParser(_SectionJsonToolParser):
    """DeepSeek V3.1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}
    <｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`."""

    section_start, section_end = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    call_tags = (section_start,)
    call_start, call_end = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
    head = re.compile(r"\s*([^\s<>{}]+)\s*<｜tool▁sep｜>\s*")


class KimiK2ToolParser(_SectionJsonToolParser):
    """Kimi K2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
    <|tool_call_argument_begin|>{...}<|tool_call_end|>...<|tool_calls_section_end|>`; the call
    id names the function (the `functions.` prefix and `:IDX` are optional)."""

    section_start = "<|tool_calls_section_begin|>"
    section_end = "<|tool_calls_section_end|>"
    call_tags = (section_start,)
    call_start, call_end = "<|tool_call_begin|>", "<|tool_call_end|>"
    head = re.compile(
        r"\s*(?:functions\.)?([^\s:<>{}]+)(?::\d+)?\s*<\|tool_call_argument_begin\|>\s*"
    )
