"""The <think> splitter: streamed at every possible delta boundary it gives the whole split."""

from __future__ import annotations

import pytest

from moeflow.tokenizer import ReasoningSplitter, prompt_opens_reasoning

# (output text, prompt opened the block, (reasoning, content))
CASES = [
    ("<think>\nplan a\n</think>\n\nanswer", False, ("plan a", "answer")),
    ("plan b</think>answer", True, ("plan b", "answer")),
    ("\nplan c\n\n</think>\n\nanswer\n", True, ("plan c", "answer\n")),
    ("a\n\nb\n</think>", True, ("a\n\nb", "")),  # newlines inside the reasoning stay
    ("no block at all", False, (None, "no block at all")),
    ("a < b and c </ d <thin", False, (None, "a < b and c </ d <thin")),
    ("<think>never closes", False, ("never closes", "")),
    ("still thinking <thi", True, ("still thinking <thi", "")),
    ("unclosed with newlines\n\n</thin", True, ("unclosed with newlines\n\n</thin", "")),
    (" \n<think>r</think>post <think>x</think>", False, ("r", "post <think>x</think>")),
    (" \n ", False, (None, " \n ")),
    ("pre<think>r</think>post", False, (None, "pre<think>r</think>post")),  # text first
    ('<tool_call>{"a": "<think>"}', True, ('<tool_call>{"a": "<think>"}', "")),
    ("<think></think>", False, ("", "")),
    ("", True, ("", "")),
    ("", False, (None, "")),
    ("</think>stray end tag", False, (None, "</think>stray end tag")),
]


@pytest.mark.parametrize(("text", "opened", "expected"), CASES)
def test_whole_split(text: str, opened: bool, expected: tuple[str | None, str]) -> None:
    assert ReasoningSplitter(in_reasoning=opened).split(text) == expected


def _stream(splitter: ReasoningSplitter, pieces: list[str]) -> tuple[str, str]:
    # NOTE: emitted text is never taken back, so a stream equal to the whole split never showed
    # part of a consumed tag.
    reasoning, content = "", ""
    for piece in pieces:
        r, c = splitter.feed(piece)
        reasoning += r
        content += c
    r, c = splitter.finish()
    return reasoning + r, content + c


@pytest.mark.parametrize(("text", "opened", "expected"), CASES)
def test_streaming_matches_whole_at_every_boundary(
    text: str, opened: bool, expected: tuple[str | None, str]
) -> None:
    whole = (expected[0] or "", expected[1])
    for step in (1, 2, 3, 5):
        pieces = [text[i : i + step] for i in range(0, len(text), step)]
        assert _stream(ReasoningSplitter(in_reasoning=opened), pieces) == whole
    for a in range(len(text) + 1):  # every two-cut split, empty deltas included
        for b in range(a, len(text) + 1):
            pieces = [text[:a], text[a:b], text[b:]]
            assert _stream(ReasoningSplitter(in_reasoning=opened), pieces) == whole


def test_no_partial_tag_is_emitted() -> None:
    s = ReasoningSplitter()
    assert s.feed(" \n<th") == ("", "")
    assert s.feed("ink>deep") == ("deep", "")
    assert s.feed(" thought\n</thi") == (" thought", "")  # "\n</thi" waits
    assert s.feed("nk>\nok") == ("", "ok")
    assert s.finish() == ("", "")


def test_custom_tags_and_split_leaves_state() -> None:
    s = ReasoningSplitter("[R]", "[/R]")
    assert s.split("[R]x[/R]y") == ("x", "y")
    assert s.feed("plain") == ("", "plain")  # split did not move this splitter
    assert not s.has_reasoning


def test_prompt_opens_reasoning() -> None:
    assert prompt_opens_reasoning("<s>assistant\n<think>\n", "<think>", "</think>")
    assert not prompt_opens_reasoning("<think>\n\n</think>\n\n", "<think>", "</think>")
    assert not prompt_opens_reasoning("plain", "<think>", "</think>")
    assert prompt_opens_reasoning("<think>a</think> then <think>", "<think>", "</think>")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plan\n<tool_call>{}</tool_call>", ("plan", "<tool_call>{}</tool_call>")),
        ("plan</think>\n<tool_call>x", ("plan", "<tool_call>x")),
        ("plan <tool_cal", ("plan <tool_cal", "")),  # never completed: still reasoning
    ],
)
def test_a_tool_call_ends_an_open_block(text: str, expected: tuple[str, str]) -> None:
    """With tools offered, a call the model starts inside an unclosed think block ends it."""
    splitter = ReasoningSplitter(in_reasoning=True, call_tags=("<tool_call>",))
    assert splitter.split(text) == expected
    for step in (1, 2, 3):
        pieces = [text[i : i + step] for i in range(0, len(text), step)]
        s = ReasoningSplitter(in_reasoning=True, call_tags=("<tool_call>",))
        assert _stream(s, pieces) == expected
