"""Texts and conversations the tokenizer tests share: scripts, emoji, code, whitespace runs,
special-token look-alikes."""

from __future__ import annotations

from typing import Any

TEXTS = [
    "Hello world",
    "Hello, world! How are you today?",
    "",
    " ",
    "   ",
    "a  b   c    d",
    " leading space",
    "trailing space ",
    "line one\nline two\n\nline four\r\nwindows",
    "\n\n\n",
    "\ttabs\t\tand\tmore",
    "a 123 4567 89",
    "1234567890 3.14159 -42 1e-9 0x1F",
    "It's we'll they're I'M YOU'D",
    "日本語のテキストです。",
    "中文测试：你好，世界！",
    "한국어 텍스트",
    "emoji 😀👍🏽 🇫🇷 👨‍👩‍👧‍👦",
    "ÀÉÎõü ñ ß Ωμέγα кириллица",
    "العربية עברית",
    "def f(x):\n    return x ** 2  # square\n",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after",
    "<|im_start|><|im_start|>",
    "<repo_name>foo<file_sep>bar",
    "snake_case camelCase PascalCase kebab-case",
    "https://example.com/path?query=1&b=2#frag",
    "$$\\int_0^1 x^2 dx = \\frac{1}{3}$$",
    "...!!!???---___***",
    "\u200b zero width \u00a0 nbsp",
    "x" * 500,
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 日本語 😀"},
    ],
    [{"role": "user", "content": "line1\nline2\n\n  indented"}],
]
