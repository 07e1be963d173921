"""Tool calls in model output: one parser per family's call format, streamed (`feed` each
content delta, then `finish`) or whole (`parse`, the same machine fed once), so streamed and
whole output always agree. Text only: the server splits reasoning off first and shapes OpenAI's
messages and deltas from what this returns. Also picks a model's format and writes the grammar
that forces a call (tool_choice "required" or a named function).

Streaming follows OpenAI's delta shape: a call's first delta carries its index, id and name,
later ones pieces of its `arguments` text as the model writes them (JSON-argument formats: the
raw JSON as it arrives; key/value formats: one `"key": value` piece per finished parameter).
The concatenated pieces are exactly the call's `arguments` in the whole parse.
NOTE: a call that never completes (cut by max_tokens, or malformed after its name) is dropped
from the whole parse, but a stream has already sent its first pieces; the response then ends
with finish_reason "length" (cut) and never counts it as a call."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# vLLM's --tool-call-parser names; all are implemented (TOOL_PARSERS).
KNOWN_TOOL_PARSERS = (
    "hermes",
    "deepseek_v3",
    "deepseek_v31",
    "kimi_k2",
    "glm45",
    "qwen3_coder",
    "llama3_json",
)
# What each format looks like in a chat template, most specific first (auto detection). V3.1
# writes the function's name right after <｜tool▁call▁begin｜>, V3/R1 its type ("function").
_TEMPLATE_MARKERS = (
    ("deepseek_v31", re.compile(r"<｜tool▁call▁begin｜>[^<]{0,80}name[^<]{0,40}<｜tool▁sep｜>")),
    ("deepseek_v3", re.compile(re.escape("<｜tool▁calls▁begin｜>"))),
    ("kimi_k2", re.compile(re.escape("<|tool_calls_section_begin|>"))),
    ("glm45", re.compile(re.escape("<arg_key>"))),
    ("qwen3_coder", re.compile(re.escape("<function="))),
    ("hermes", re.compile(re.escape("<tool_call>"))),
    ("llama3_json", re.compile(re.escape("<|python_tag|>"))),
)
_MAX_HEAD_CHARS = 512  # a call's markup before its arguments (name, separators)


@dataclass(slots=True)
class ToolCall:
    """One parsed call; `arguments` is a JSON object as text (OpenAI's shape)."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(slots=True)
class ToolCallDelta:
    """One streamed piece of call `index`: the first carries id and name (arguments ""),
    the later ones only argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


class BaseToolParser:
    """The interface every format implements: `feed` -> (content delta, call deltas),
    `finish` at the end of the output, `parse` for a whole output; `calls` holds the calls
    completed so far, in order. `call_tags`: text that starts a call (it also ends a think block
    the model left open)."""

    call_tags: tuple[str, ...] = ()

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self.tools = tools or []
        self.calls: list[ToolCall] = []
        self._num_started = 0  # stream indices handed out

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """Whole output -> (content, calls), with a fresh parser."""
        p = type(self)(self.tools)
        c1, _ = p.feed(text)
        c2, _ = p.finish()
        return c1 + c2, p.calls

    def _start_call(self, name: str, deltas: list[ToolCallDelta]) -> tuple[int, str]:
        index, call_id = self._num_started, new_call_id()
        self._num_started += 1
        deltas.append(ToolCallDelta(index, call_id, name))
        return index, call_id

    def _whole_calls(self, calls: list[ToolCall]) -> list[ToolCallDelta]:
        """Calls parsed in one piece -> one delta each (id, name and all arguments)."""
        out = []
        for call in calls:
            self.calls.append(call)
            out.append(ToolCallDelta(self._num_started, call.id, call.name, call.arguments))
            self._num_started += 1
        return out


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
        self._scan = _JsonObjectScan()
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
                while i >= 0 and _json_call(buf[:i]) is None and _in_json_string(buf[:i]):
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
            cut = len(text) - _partial_suffix(text, self.start_tag)
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
        name = _json_value(m.group(1))
        if buf[m.end()] != "{" or not isinstance(name, str):
            self._mode = "whole"
            return buf
        index, call_id = self._start_call(name, deltas)
        self._call, self._args = (index, call_id, name), []
        self._mode, self._scan, self._block = "args", _JsonObjectScan(), ""
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
            ok = status == "done" and _json_object("".join(self._args)) is not None
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
        call = _json_call(body)
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
        cut = len(text) - _partial_suffix(text, self.tag)
        self._text = text[cut:]
        return text[:cut], []

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        text, self._text = self._text, ""
        if self._mode != "held":
            return text, []
        calls = _json_calls(text.strip().removeprefix(self.tag))
        if not calls:
            return text, []
        return "", self._whole_calls(calls)


class _ScanningToolParser(BaseToolParser):
    """Formats parsed by a state machine over a buffer of unconsumed text: each state's
    handler consumes what it can decide and returns True to go on, or False to wait for more
    text (at the end, `final`, every handler decides). Streamed and whole parses run the same
    handlers over the same text, so they agree."""

    strip_around = False  # whitespace around a call is dropped (the key/value formats)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._buf = ""
        self._state = "text"
        self._strip = False  # drop whitespace at the start of the next content
        self._call: tuple[int, str, str] | None = None  # (index, id, name) of the open call
        self._args: list[str] = []  # the open call's argument pieces

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        out = self._run(final=True)
        self._buf = ""
        return out

    def _run(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while getattr(self, f"_on_{self._state}")(final, content, deltas):
            pass
        return "".join(content), deltas

    def _open_call(self, name: str, deltas: list[ToolCallDelta]) -> None:
        index, call_id = self._start_call(name, deltas)
        self._call, self._args = (index, call_id, name), []

    def _add_args(self, piece: str, deltas: list[ToolCallDelta]) -> None:
        assert self._call is not None
        if piece:
            self._args.append(piece)
            deltas.append(ToolCallDelta(self._call[0], arguments=piece))

    def _close_call(self) -> None:
        assert self._call is not None
        _, call_id, name = self._call
        self.calls.append(ToolCall(call_id, name, "".join(self._args)))
        self._call, self._args = None, []

    def _drop_call(self) -> None:
        self._call, self._args = None, []

    def _content(self, content: list[str], final: bool, starts: tuple[str, ...]) -> bool:
        """Emit content up to the first of `starts`; True when one is there (the buffer then
        starts with it), False when none is yet (a tail that may begin one is held). With
        `strip_around`, whitespace before a call is dropped (and after one, through `_strip`)."""
        if self._strip:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._strip = False
        hits = [i for i in (self._buf.find(s) for s in starts) if i >= 0]
        if hits:
            i = min(hits)
            body = self._buf[:i]
            content.append(body.rstrip() if self.strip_around else body)
            self._buf = self._buf[i:]
            return True
        if final:
            content.append(self._buf)
            self._buf = ""
            return False
        cut = len(self._buf) - max(_partial_suffix(self._buf, s) for s in starts)
        body = self._buf[:cut].rstrip() if self.strip_around else self._buf[:cut]
        content.append(body)
        self._buf = self._buf[len(body) :]
        return False


class _SectionJsonToolParser(_ScanningToolParser):
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
        self._scan = _JsonObjectScan()

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
        keep = max(_partial_suffix(buf, self.call_start), _partial_suffix(buf, self.section_end))
        self._buf = "" if final else buf[len(buf) - keep :]  # noise in the section is dropped
        return False

    def _on_head(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        buf = self._buf
        i = buf.find("{")
        if i < 0:
            if final:
                self._buf = ""
                return False
            if len(buf) > _MAX_HEAD_CHARS or self.call_end in buf or self.section_end in buf:
                self._state = "skip"
                return True
            return False
        match = self.head.fullmatch(buf[:i])
        if match is None:
            self._state = "skip"
            return True
        self._open_call(match.group(1), deltas)
        self._scan = _JsonObjectScan()
        self._buf, self._state = buf[i:], "args"
        return True

    def _on_args(self, final: bool, _: list[str], deltas: list[ToolCallDelta]) -> bool:
        n, status = self._scan.feed(self._buf)
        self._add_args(self._buf[:n], deltas)
        self._buf = self._buf[n:]
        if status == "done" and _json_object("".join(self._args)) is not None:
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
        keep = _partial_suffix(self._buf, self.call_end)
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


class Glm45ToolParser(_ScanningToolParser):
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
            if final or len(rest) > _MAX_HEAD_CHARS:
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
        keep = _partial_suffix(self._buf, "</tool_call>")
        self._buf = "" if final else self._buf[len(self._buf) - keep :]
        return False

    def _add_param(self, key: str, text: str, deltas: list[ToolCallDelta]) -> None:
        assert self._call is not None
        value = typed_value(text, _property_schema(self.tools, self._call[2], key))
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
            if final or len(rest) > _MAX_HEAD_CHARS:
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


ToolParser = BaseToolParser
TOOL_PARSERS: dict[str, type[BaseToolParser]] = {
    "hermes": HermesToolParser,
    "deepseek_v3": DeepSeekV3ToolParser,
    "deepseek_v31": DeepSeekV31ToolParser,
    "kimi_k2": KimiK2ToolParser,
    "glm45": Glm45ToolParser,
    "qwen3_coder": Qwen3CoderToolParser,
    "llama3_json": Llama3JsonToolParser,
}


def pick_tool_parser(requested: str, chat_template: str | None) -> str | None:
    """The parser for a model: `requested` unless "auto", else the format its chat template
    writes; a template that knows no tool calls gets hermes (chat_template.py renders tools and
    calls Hermes-style for it). None: a template that writes calls in no format known here."""
    if requested != "auto":
        if requested not in KNOWN_TOOL_PARSERS:
            raise ValueError(
                f"unknown tool call parser {requested!r}; known: {', '.join(KNOWN_TOOL_PARSERS)}"
            )
        return requested if requested in TOOL_PARSERS else None
    template = chat_template or ""
    for name, marker in _TEMPLATE_MARKERS:
        if marker.search(template):
            return name if name in TOOL_PARSERS else None
    return "hermes" if "tool_calls" not in template else None


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
    if parser not in TOOL_PARSERS:
        raise ValueError(f"forced tool calls are not implemented for {parser!r}")

    def lit(text: str) -> str:
        return _literal(text, token_id)

    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if parser in ("hermes", "llama3_json"):
        return _json_call_grammar(parser, functions, parallel, lit)
    lines = []
    for i, function in enumerate(functions):
        parameters = _parameters(function)
        fname = function["name"]
        if parser in ("glm45", "qwen3_coder"):
            body, rules = _xml_params_grammar(parser, f"f{i}", parameters, lit)
            lines += rules
            if parser == "glm45":
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
    }.get(parser)
    start = f"call{more}"
    if wrap is not None:
        start = f"{lit(wrap[0])} {start} {lit(wrap[1])}"
    return f"start: {start}\n" + "\n".join(lines) + "\n"


def typed_value(text: str, schema: dict[str, Any] | None) -> Any:
    """A key/value format's value text -> the JSON value the tool's property schema asks for:
    the text itself for a string property; else its JSON (or Python's True/False/None) when
    that has a type the schema allows; else the text when strings are allowed. No schema: its
    JSON if it parses, else the text."""
    types = _schema_types(schema) if schema else set()
    if types == {"string"}:
        return text
    value = _json_value(text.strip())
    if value is _NOT_JSON and types & {"boolean", "null"}:
        value = {"True": True, "False": False, "None": None}.get(text.strip(), _NOT_JSON)
    if value is _NOT_JSON:
        return text
    if (
        not types
        or _json_type(value) in types
        or ("number" in types and _json_type(value) == "integer")
    ):
        return value
    return text if "string" in types else value


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# Every format's markers, which a tokenizer may hold as single (special) tokens.
TOOL_MARKERS = frozenset(
    [
        "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
        "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<|tool_calls_section_begin|>",
        "<|tool_calls_section_end|>", "<|tool_call_begin|>", "<|tool_call_end|>",
        "<|tool_call_argument_begin|>",
    ]
)  # fmt: skip
_MARKER_SPLIT = re.compile(
    "(" + "|".join(re.escape(m) for m in sorted(TOOL_MARKERS, key=len, reverse=True)) + ")"
)
_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\\n]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_NAME = re.compile(r"[A-Za-z0-9_.\-:/]{1,256}")
_QWEN_VALUE_END = re.compile(r"</parameter>|\n<parameter=|\n</function>")
_QWEN_AFTER_VALUE = ("<parameter=", "</function>", "</tool_call>")
_NOT_JSON = object()


class _JsonObjectScan:
    """Scans a JSON object as it arrives: `feed(text)` -> (characters consumed, "more" |
    "done" (the object closed at the last one) | "bad" (the next one cannot be JSON))."""

    _OUTSIDE = frozenset(' \t\r\n{}[],:-+.0123456789eEtrufalsn"')

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = self.escaped = False

    def feed(self, text: str) -> tuple[int, str]:
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                continue
            if ch not in self._OUTSIDE or (self.depth == 0 and ch != "{"):
                return i, "bad"
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1, "done"
        return len(text), "more"


def _json_call_grammar(
    parser: str, functions: list[dict[str, Any]], parallel: bool, lit: Callable[[str], str]
) -> str:
    """Hermes and Llama 3: the call is one JSON object {name, arguments | parameters}."""
    key = "parameters" if parser == "llama3_json" else "arguments"
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, key: _parameters(f)},
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
        else:
            open_, close = f"<parameter={key}>\n", "\n</parameter>\n"
        part = f"{lit(open_)} {value} {lit(close)}"
        parts.append(part if key in required else f"({part})?")
    return (" ".join(parts) or '""'), rules


def _value_grammar(schema: dict[str, Any]) -> str:
    """One property's value as text: strings plain (an enum's members, or text without "<" and
    newlines within the length bounds), anything else its JSON."""
    if "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
        return " | ".join(_lit(v) for v in schema["enum"]) or '""'
    if _schema_types(schema) == {"string"} and "const" not in schema:
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


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    # no parameters: the empty object (OpenAI's reading), closed so a call ends
    return function.get("parameters") or {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }


def _property_schema(tools: list[dict[str, Any]], name: str, key: str) -> dict[str, Any] | None:
    for tool in tools:
        function = tool.get("function") or {}
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            schema = properties.get(key)
            return schema if isinstance(schema, dict) else None
    return None


def _schema_types(schema: dict[str, Any]) -> set[str]:
    """The JSON types a schema allows, as far as its type, enum, const and any/one/allOf say."""
    types: set[str] = set()
    t = schema.get("type")
    if isinstance(t, str):
        types.add(t)
    elif isinstance(t, list):
        types.update(x for x in t if isinstance(x, str))
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key) or ():
            if isinstance(sub, dict):
                types |= _schema_types(sub)
    if isinstance(schema.get("enum"), list):
        types.update(_json_type(v) for v in schema["enum"])
    if "const" in schema:
        types.add(_json_type(schema["const"]))
    return types


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _json_value(text: str) -> Any:
    """Strict JSON (no NaN or Infinity) -> its value; _NOT_JSON otherwise."""
    try:
        return json.loads(text, parse_constant=_reject)
    except ValueError:
        return _NOT_JSON


def _json_object(text: str) -> dict[str, Any] | None:
    value = _json_value(text)
    return value if isinstance(value, dict) else None


def _reject(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _trim_newline(text: str) -> str:
    """One newline at each end of a Qwen3-Coder value is markup."""
    text = text[1:] if text.startswith("\n") else text
    return text[:-1] if text.endswith("\n") else text


def _json_calls(body: str) -> list[ToolCall]:
    """JSON call objects joined by ";" (and whitespace) -> calls; [] unless all of it is."""
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    pos = 0
    while True:
        while pos < len(body) and (body[pos].isspace() or (calls and body[pos] == ";")):
            pos += 1
        if pos == len(body):
            return calls
        try:
            value, pos = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return []
        call = _call_of(value)
        if call is None:
            return []
        calls.append(call)


def _json_call(body: str) -> ToolCall | None:
    """{"name": str, "arguments": object (or its JSON text)} -> a ToolCall; None otherwise."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    return _call_of(value)


def _call_of(value: Any) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


def _in_json_string(text: str) -> bool:
    """Whether `text` (the start of a JSON value) ends inside a string literal."""
    in_string = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and in_string:
            escaped = True
        elif ch == '"':
            in_string = not in_string
    return in_string


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
