"""Tool calls in model output: one parser per family's call format, streamed or whole (base.py),
the formats by family (formats_*.py), vLLM's parser names and auto detection (registry.py), and
the grammar that forces a call in a format's markup (grammar.py). Text only: the server splits
reasoning off first and shapes OpenAI's messages and deltas from what these return."""

from moeflow.tokenizer.tool_parsers.base import BaseToolParser, ToolCall, ToolCallDelta, new_call_id
from moeflow.tokenizer.tool_parsers.formats_dsml import DeepSeekDsmlToolParser
from moeflow.tokenizer.tool_parsers.formats_json import HermesToolParser, Llama3JsonToolParser
from moeflow.tokenizer.tool_parsers.formats_pythonic import PythonicToolParser
from moeflow.tokenizer.tool_parsers.formats_section import (
    DeepSeekV3ToolParser,
    DeepSeekV31ToolParser,
    KimiK2ToolParser,
)
from moeflow.tokenizer.tool_parsers.formats_xml import (
    Glm45ToolParser,
    Qwen3CoderToolParser,
    typed_value,
)
from moeflow.tokenizer.tool_parsers.grammar import TOOL_MARKERS, tool_call_grammar
from moeflow.tokenizer.tool_parsers.registry import (
    KNOWN_TOOL_PARSERS,
    TOOL_PARSERS,
    ToolParser,
    pick_tool_parser,
)

__all__ = [
    "KNOWN_TOOL_PARSERS",
    "TOOL_MARKERS",
    "TOOL_PARSERS",
    "BaseToolParser",
    "DeepSeekDsmlToolParser",
    "DeepSeekV3ToolParser",
    "DeepSeekV31ToolParser",
    "Glm45ToolParser",
    "HermesToolParser",
    "KimiK2ToolParser",
    "Llama3JsonToolParser",
    "PythonicToolParser",
    "Qwen3CoderToolParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "new_call_id",
    "pick_tool_parser",
    "tool_call_grammar",
    "typed_value",
]
