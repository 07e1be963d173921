"""Tokenisation and text: the Tokenizer (tokenizer.py), the chat-template sandbox
(chat_template.py), incremental detokenisation with stop strings (detokenize.py) and the <think>
splitter (reasoning.py). A leaf package: imports nothing from moeflow but leaf modules."""

from moeflow.tokenizer.chat_template import (
    CHAT_TEMPLATE_KWARGS,
    DEFAULT_CHAT_TEMPLATE,
    MAX_TEMPLATE_OUTPUT_CHARS,
)
from moeflow.tokenizer.detokenize import IncrementalDetokenizer, OutputText
from moeflow.tokenizer.reasoning import ReasoningSplitter, prompt_opens_reasoning
from moeflow.tokenizer.tokenizer import Tokenizer

__all__ = [
    "CHAT_TEMPLATE_KWARGS",
    "DEFAULT_CHAT_TEMPLATE",
    "MAX_TEMPLATE_OUTPUT_CHARS",
    "IncrementalDetokenizer",
    "OutputText",
    "ReasoningSplitter",
    "Tokenizer",
    "prompt_opens_reasoning",
]
