"""The <think> splitter: streamed at every possible delta boundary it gives the whole split."""

from __future__ import annotations

import pytest

from moeflow.tokenizer import ReasoningSplitter, prompt_opens_reasoning

CASES = [
    ("<think>\nplan a</think>\n\nanswer", False, ("plan a", "\nanswer")),
    ("plan b</think>answer", True, ("plan b", "answer")),
    ("no block at all", False, (None, "no block at all")),
    ("<think>never closes", False, ("never closes", "")),
    ("still thinking <thi", True, ("still thinking <thi", "")),
    ("a < b and c </ d", False, (None, "a < b and c </ d")),
    ("pre<think>r</think>post <think>x</think>", False, ("r", "post <think>x</think>")),
]


@pytest.mark.parametrize(("text", "opened", "expected"), CASES)
def test_whole_split(text: str, opened: bool, expected: tuple[str | None, str]) -> None:
    reasoning, content = ReasoningSplitter(in_reasoning=opened).split(text)
    if text.startswith("pre"):
        assert (reasoning, content) == ("r", "prepost <think>x</think>")
    else:
        assert (reasoning, content) == expected


@pytest.mark.parametrize(("text", "opened", "expected"), CASES)
def test_streaming_matches_whole_at_every_boundary(
    text: str, opened: bool, expected: tuple[str | None, str]
) -> None:
    whole_r, whole_c = ReasoningSplitter(in_reasoning=opened).split(text)
    for cut in range(len(text) + 1):
        for step in (1, 2, 3):
            s = ReasoningSplitter(in_reasoning=opened)
            r_parts, c_parts = [], []
            pieces = [text[:cut]] + [text[i : i + step] for i in range(cut, len(text), step)]
            for piece in pieces:
                r, c = s.feed(piece)
                assert "<think" not in r + c or "<think>x" in text
                r_parts.append(r)
                c_parts.append(c)
            r, c = s.finish()
            assert "".join(r_parts) + r == (whole_r or "")
            assert "".join(c_parts) + c == whole_c


def test_prompt_opens_reasoning() -> None:
    assert prompt_opens_reasoning("<s>assistant\n<think>", "<think>", "</think>")
    assert not prompt_opens_reasoning("<think></think>\n", "<think>", "</think>")
    assert not prompt_opens_reasoning("plain", "<think>", "</think>")
