"""Formats whose call is one JSON object: Hermes / Qwen3 (`<tool_call>` blocks) and Llama 3's
JSON calls (the whole output, or after <|python_tag|>)."""

from __future__ import annotations

import re
from typing import Any

from moeflow.tokenizer.tool_parsers.base import (
    BaseToolParser,
    JsonObjectScan,
    ToolCall,
    ToolCallDelta,
    in_json_string,
    json_call,
    json_calls,
    json_object,
    json_value,
    partial_suffix,
)

_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\\n]|\\.)*")\s*,\s*"arguments"\s*:\s*')


class HermesToolParser(BaseToolParser):
    """Hermes / Qwen2.5 / Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
    one block per call. A block that opens `{"name": "f", "arguments": {` streams: its id and
    name at once, then the arguments object as it arrives (raw JSON, scanned so a tag inside a
    string is text); it is a call if the object and the block close well, else it is dropped.
    Any other block is held whole: a call if its JSON is one ("arguments" first, or as a JSON
    string), else content, verbatim. Whitespace between content and a block, and between
    blocks, is dropped.
    NOTE: streaming never emits part of a tag: a tail that could still become `<tool_call>` and
    trailing whitespace (which a block may follow) are held until the next delta or `finish`."""

    start_tag, end_tag = "<tool_call>", "</tool_call>"
    call_tags = ("<tool_call>",)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._in_block = False
        self._held = ""  # outside a block: a tail that may start the tag, or trailing space
        self._block = ""  # inside a block: its text not consumed yet
        self._strip = False  # drop whitespace at the start of the next content (after a block)
        # inside a block: "head" (undecided) | "whole" (held to its end) | "args" (streaming the
        # arguments) | "after" (they closed; "}" and the tag to come) | "skip" (malformed)
        self._mode = "head"
        self._scan = JsonObjectScan()
        self._call: tuple[int, str, str] | None = None  # the streamed call: index, id, name
        self._args: list[str] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        text = self._held + delta
        self._held = ""
        content: list[str] = []
        new_calls: list[ToolCall] = []
        deltas: list[ToolCallDelta] = []
        while text:
            if self._in_block:
                buf = self._block + text
                if self._mode == "head":
                    buf = self._decide(buf, deltas)
                if self._mode in ("args", "after", "skip"):
                    rest = self._stream_block(buf, deltas)
                    if rest is None:
                        break
                    text = rest
                    continue
                # the tag may straddle deltas: search from where it could start
                i = buf.find(self.end_tag, max(0, len(self._block) - len(self.end_tag) + 1))
                while i >= 0 and json_call(buf[:i]) is None and in_json_string(buf[:i]):
                    i = buf.find(self.end_tag, i + 1)  # the tag is text inside an argument
                if i < 0:
                    self._block = buf
                    break
                self._close_block(buf[:i], content, new_calls)
                text = buf[i + len(self.end_tag) :]
                continue
            if self._strip:
                text = text.lstrip()
                if not text:
                    break
                self._strip = False
            i = text.find(self.start_tag)
            if i >= 0:
                content.append(text[:i].rstrip())  # whitespace before a block is dropped
                self._in_block, self._block, self._mode = True, "", "head"
                text = text[i + len(self.start_tag) :]
                continue
            cut = len(text) - partial_suffix(text, self.start_tag)
            body = text[:cut].rstrip()
            content.append(body)
            self._held = text[len(body) :]
            break
        return "".join(content), deltas + self._whole_calls(new_calls)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """Flush what `feed` held: the output ended. An unclosed block is a call if its JSON is
        one, else dropped (a call cut by max_tokens is markup, not content)."""
        content: list[str] = []
        new_calls: list[ToolCall] = []
        if self._in_block and self._mode in ("args", "after", "skip"):
            if self._mode == "after" and self._block.strip() == "}":
                self._complete()
            self._in_block, self._block, self._call = False, "", None
        elif self._in_block:
            self._close_block(self._block, content, new_calls, closed=False)
        elif not self._strip:
            content.append(self._held)
        self._held = ""
        return "".join(content), self._whole_calls(new_calls)

    def _decide(self, buf: str, deltas: list[ToolCallDelta]) -> str:
        """Whether the block streams: once its head is there, `{"name": "f", "arguments": {`
        streams (returns the text from the arguments on), anything else is held whole."""
        m = _HERMES_HEAD.match(buf)
        if m is None or m.end() == len(buf):
            return buf  # not yet decided (or never: held whole, like "whole")
        name = json_value(m.group(1))
        if buf[m.end()] != "{" or not isinstance(name, str):
            self._mode = "whole"
            return buf
        index, call_id = self._start_call(name, deltas)
        self._call, self._args = (index, call_id, name), []
        self._mode, self._scan, self._block = "args", JsonObjectScan(), ""
        return buf[m.end() :]

    def _stream_block(self, buf: str, deltas: list[ToolCallDelta]) -> str | None:
        """A streaming block's text -> the text after its end tag, or None (still inside)."""
        if self._mode == "args":
            n, status = self._scan.feed(buf)
            if n and self._call is not None:
                self._args.append(buf[:n])
                deltas.append(ToolCallDelta(self._call[0], arguments=buf[:n]))
            buf = buf[n:]
            if status == "more":
                self._block = ""
                return None
            ok = status == "done" and json_object("".join(self._args)) is not None
            self._mode = "after" if ok else "skip"
        i = buf.find(self.end_tag)
        if i < 0:
            self._block = buf
            return None
        if self._mode == "after" and buf[:i].strip() == "}":
            self._complete()
        self._in_block, self._block, self._call = False, "", None
        self._strip = True
        return buf[i + len(self.end_tag) :]

    def _complete(self) -> None:
        assert self._call is not None
        _, call_id, name = self._call
        self.calls.append(ToolCall(call_id, name, "".join(self._args)))
        self._strip = True

    def _close_block(
        self, body: str, content: list[str], calls: list[ToolCall], closed: bool = True
    ) -> None:
        self._in_block, self._block = False, ""
        call = json_call(body)
        if call is None:
            if closed:  # a closed block that is not a call is the model's text
                content.append(f"{self.start_tag}{body}{self.end_tag}")
            return
        calls.append(call)
        self._strip = True


class Llama3JsonToolParser(BaseToolParser):
    """Llama 3.1-3.3 JSON calls: `{"name": ..., "parameters": {...}}` (or several joined by
    ";") as the whole output, or after <|python_tag|> (content may precede the tag). From a
    leading "{" or the tag, the output is held to the end, then is calls if it all parses as
    calls, else content verbatim."""

    tag = "<|python_tag|>"

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._text = ""  # held text
        self._mode = "undecided"  # only whitespace so far -> "content" | "held" (to the end)

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        text = self._text + delta
        if self._mode == "held":
            self._text = text
            return "", []
        self._text = ""
        if self._mode == "undecided":
            head = text.lstrip()
            if not head or self.tag.startswith(head) or head.startswith(("{", self.tag)):
                self._text = text
                self._mode = "held" if head.startswith(("{", self.tag)) else "undecided"
                return "", []
            self._mode = "content"
        i = text.find(self.tag)  # content, then the tag and calls
        if i >= 0:
            self._mode, self._text = "held", text[i:]
            return text[:i], []
        cut = len(text) - partial_suffix(text, self.tag)
        self._text = text[cut:]
        return text[:cut], []

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        text, self._text = self._text, ""
        if self._mode != "held":
            return text, []
        calls = json_calls(text.strip().removeprefix(self.tag))
        if not calls:
            return text, []
        return "", self._whole_calls(calls)
