"""The call formats by vLLM's --tool-call-parser names, and the one a model's chat template
writes (auto detection)."""

from __future__ import annotations

import re

from moeflow.tokenizer.tool_parsers.base import BaseToolParser
from moeflow.tokenizer.tool_parsers.formats_dsml import DeepSeekDsmlToolParser
from moeflow.tokenizer.tool_parsers.formats_json import HermesToolParser, Llama3JsonToolParser
from moeflow.tokenizer.tool_parsers.formats_pythonic import PythonicToolParser
from moeflow.tokenizer.tool_parsers.formats_section import (
    DeepSeekV3ToolParser,
    DeepSeekV31ToolParser,
    KimiK2ToolParser,
)
from moeflow.tokenizer.tool_parsers.formats_xml import Glm45ToolParser, Qwen3CoderToolParser

# vLLM's --tool-call-parser names; all are implemented (TOOL_PARSERS).
KNOWN_TOOL_PARSERS = (
    "hermes",
    "deepseek_v3",
    "deepseek_v31",
    "kimi_k2",
    "glm45",
    "qwen3_coder",
    "llama3_json",
    "deepseek_v32",
    "pythonic",
    "llama4_pythonic",
)

# What each format looks like in a chat template, most specific first (auto detection). V3.1
# writes the function's name right after <｜tool▁call▁begin｜>, V3/R1 its type ("function").
_TEMPLATE_MARKERS = (
    ("deepseek_v32", re.compile(re.escape("｜DSML｜"))),
    ("deepseek_v31", re.compile(r"<｜tool▁call▁begin｜>[^<]{0,80}name[^<]{0,40}<｜tool▁sep｜>")),
    ("deepseek_v3", re.compile(re.escape("<｜tool▁calls▁begin｜>"))),
    ("kimi_k2", re.compile(re.escape("<|tool_calls_section_begin|>"))),
    ("glm45", re.compile(re.escape("<arg_key>"))),
    ("qwen3_coder", re.compile(re.escape("<function="))),
    ("hermes", re.compile(re.escape("<tool_call>"))),
    ("llama3_json", re.compile(re.escape("<|python_tag|>"))),
    ("pythonic", re.compile(re.escape("[func_name1("))),  # Llama 3.2's and vLLM's templates
)

ToolParser = BaseToolParser
TOOL_PARSERS: dict[str, type[BaseToolParser]] = {
    "hermes": HermesToolParser,
    "deepseek_v3": DeepSeekV3ToolParser,
    "deepseek_v31": DeepSeekV31ToolParser,
    "kimi_k2": KimiK2ToolParser,
    "glm45": Glm45ToolParser,
    "qwen3_coder": Qwen3CoderToolParser,
    "llama3_json": Llama3JsonToolParser,
    "deepseek_v32": DeepSeekDsmlToolParser,
    "pythonic": PythonicToolParser,
    "llama4_pythonic": PythonicToolParser,
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
