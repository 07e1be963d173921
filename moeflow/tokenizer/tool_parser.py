"""Tool calls in model output: one parser per family's call format, streamed (`feed` each
content delta, then `finish`) or whole (`parse`, the same machine fed once), so streamed and
whole output always agree. Text only: the server splits reasoning off first and shapes OpenAI's
messages and deltas from what this returns. Also picks a model's format and writes the grammar
that forces a call (tool_choice "required" or a named function)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

# vLLM's --tool-call-parser names; only those in TOOL_PARSERS are implemented.
KNOWN_TOOL_PARSERS = (
    "hermes",
    "deepseek_v3",
    "deepseek_v31",
    "kimi_k2",
    "glm45",
    "qwen3_coder",
    "llama3_json",
)
# Markers of each format in a chat template, most specific first (auto detection).
_TEMPLATE_MARKERS = (
    ("deepseek_v31", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{{"),
    ("deepseek_v3", "<｜tool▁calls▁begin｜>"),
    ("kimi_k2", "<|tool_calls_section_begin|>"),
    ("glm45", "<arg_key>"),
    ("qwen3_coder", "<function="),
    ("hermes", "<tool_call>"),
    ("llama3_json", "<|python_tag|>"),
)


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


class HermesToolParser:
    """Hermes / Qwen2.5 / Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
    one block per call. A block whose JSON is not a call stays content, verbatim. Whitespace
    between content and a block, and between blocks, is dropped.
    NOTE: streaming never emits part of a tag: a tail that could still become `<tool_call>` and
    trailing whitespace (which a block may follow) are held until the next delta or `finish`."""

    start_tag, end_tag = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._in_block = False
        self._held = ""  # outside a block: a tail that may start the tag, or trailing space
        self._block = ""  # inside a block: its text so far
        self._strip = False  # drop whitespace at the start of the next content (after a block)

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """(content delta, calls completed by this delta)."""
        text = self._held + delta
        self._held = ""
        content: list[str] = []
        new_calls: list[ToolCall] = []
        while text:
            if self._in_block:
                buf = self._block + text
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
                self._in_block, self._block = True, ""
                text = text[i + len(self.start_tag) :]
                continue
            cut = len(text) - _partial_suffix(text, self.start_tag)
            body = text[:cut].rstrip()
            content.append(body)
            self._held = text[len(body) :]
            break
        return "".join(content), new_calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Flush what `feed` held: the output ended. An unclosed block is a call if its JSON is
        one, else dropped (a call cut by max_tokens is markup, not content)."""
        content: list[str] = []
        new_calls: list[ToolCall] = []
        if self._in_block:
            self._close_block(self._block, content, new_calls, closed=False)
        elif not self._strip:
            content.append(self._held)
        self._held = ""
        return "".join(content), new_calls

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """Whole output -> (content, calls), with a fresh parser."""
        p = type(self)()
        c1, calls1 = p.feed(text)
        c2, calls2 = p.finish()
        return c1 + c2, calls1 + calls2

    def _close_block(
        self, body: str, content: list[str], calls: list[ToolCall], closed: bool = True
    ) -> None:
        self._in_block, self._block = False, ""
        call = _json_call(body)
        if call is None:
            if closed:  # a closed block that is not a call is the model's text
                content.append(f"{self.start_tag}{body}{self.end_tag}")
            return
        self.calls.append(call)
        calls.append(call)
        self._strip = True


class Llama3JsonToolParser:
    """Llama 3.1-3.3 JSON calls: `{"name": ..., "parameters": {...}}` (or several joined by
    ";") as the whole output, or after <|python_tag|> (content may precede the tag). From a
    leading "{" or the tag, the output is held to the end, then is calls if it all parses as
    calls, else content verbatim."""

    tag = "<|python_tag|>"

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._text = ""  # held text
        self._mode = "undecided"  # only whitespace so far -> "content" | "held" (to the end)

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
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

    def finish(self) -> tuple[str, list[ToolCall]]:
        text, self._text = self._text, ""
        if self._mode != "held":
            return text, []
        calls = _json_calls(text.strip().removeprefix(self.tag))
        if not calls:
            return text, []
        self.calls.extend(calls)
        return "", calls

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        p = type(self)()
        c1, calls1 = p.feed(text)
        c2, calls2 = p.finish()
        return c1 + c2, calls1 + calls2


ToolParser = HermesToolParser | Llama3JsonToolParser
TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}


def pick_tool_parser(requested: str, chat_template: str | None) -> str | None:
    """The parser for a model: `requested` unless "auto", else the format its chat template
    writes; a template that knows no tool calls gets hermes (chat_template.py renders tools and
    calls Hermes-style for it). None: a format not implemented yet."""
    if requested != "auto":
        if requested not in KNOWN_TOOL_PARSERS:
            raise ValueError(
                f"unknown tool call parser {requested!r}; known: {', '.join(KNOWN_TOOL_PARSERS)}"
            )
        return requested if requested in TOOL_PARSERS else None
    template = chat_template or ""
    for name, marker in _TEMPLATE_MARKERS:
        if marker in template:
            return name if name in TOOL_PARSERS else None
    return "hermes" if "tool_calls" not in template else None


def tool_call_grammar(
    parser: str, tools: list[dict[str, Any]], name: str | None, parallel: bool
) -> str:
    """A Lark grammar (llguidance's dialect) that forces `parser`'s call format: one call (or
    several when `parallel`) of the tool `name`, or of any tool when None, with arguments valid
    against the tool's JSON schema."""
    if parser not in TOOL_PARSERS:
        raise ValueError(f"forced tool calls are not implemented for {parser!r}")
    options = []
    for tool in tools:
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        # no parameters: the empty object (OpenAI's reading), closed so a call ends
        parameters = function.get("parameters") or {
            "type": "object",
            "properties": {},
            "additionalProperties": False,
        }
        key = "parameters" if parser == "llama3_json" else "arguments"
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, key: parameters},
                "required": ["name", key],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}  # compact: no space loops
    if parser == "llama3_json":
        call = "%json " + json.dumps(schema)
        more = ' ("; " call)*' if parallel else ""
        return f"start: call{more}\ncall: {call}\n"
    call = '"<tool_call>\\n" %json ' + json.dumps(schema) + ' "\\n</tool_call>"'
    more = ' ("\\n" call)*' if parallel else ""
    return f"start: call{more}\ncall: {call}\n"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


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
