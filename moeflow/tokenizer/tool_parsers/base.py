"""The machinery every call format shares: OpenAI's call and delta shapes, the parser interface
(`feed` each content delta, then `finish`; or `parse`, the same machine fed once, so streamed and
whole output always agree), the scanning state machine most formats run on, and the JSON and
JSON-schema helpers the parsers and the grammars read.

Streaming follows OpenAI's delta shape: a call's first delta carries its index, id and name,
later ones pieces of its `arguments` text as the model writes them (JSON-argument formats: the
raw JSON as it arrives; key/value formats: one `"key": value` piece per finished parameter).
The concatenated pieces are exactly the call's `arguments` in the whole parse.
NOTE: a call that never completes (cut by max_tokens, or malformed after its name) is dropped
from the whole parse, but a stream has already sent its first pieces; the response then ends
with finish_reason "length" (cut) and never counts it as a call."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

MAX_HEAD_CHARS = 512  # a call's markup before its arguments (name, separators)
NOT_JSON = object()


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


class ScanningToolParser(BaseToolParser):
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
        cut = len(self._buf) - max(partial_suffix(self._buf, s) for s in starts)
        body = self._buf[:cut].rstrip() if self.strip_around else self._buf[:cut]
        content.append(body)
        self._buf = self._buf[len(body) :]
        return False


class JsonObjectScan:
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


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def function_parameters(function: dict[str, Any]) -> dict[str, Any]:
    # no parameters: the empty object (OpenAI's reading), closed so a call ends
    return function.get("parameters") or {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }


def property_schema(tools: list[dict[str, Any]], name: str, key: str) -> dict[str, Any] | None:
    for tool in tools:
        function = tool.get("function") or {}
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            schema = properties.get(key)
            return schema if isinstance(schema, dict) else None
    return None


def schema_types(schema: dict[str, Any]) -> set[str]:
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
                types |= schema_types(sub)
    if isinstance(schema.get("enum"), list):
        types.update(json_type(v) for v in schema["enum"])
    if "const" in schema:
        types.add(json_type(schema["const"]))
    return types


def json_type(value: Any) -> str:
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


def json_value(text: str) -> Any:
    """Strict JSON (no NaN or Infinity) -> its value; NOT_JSON otherwise."""
    try:
        return json.loads(text, parse_constant=_reject)
    except ValueError:
        return NOT_JSON


def json_object(text: str) -> dict[str, Any] | None:
    value = json_value(text)
    return value if isinstance(value, dict) else None


def _reject(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_calls(body: str) -> list[ToolCall]:
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


def json_call(body: str) -> ToolCall | None:
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


def in_json_string(text: str) -> bool:
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


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
