"""Reasoning output: the <think>...</think> splitter for streamed and whole text, and whether a
rendered prompt already opened the block. Text only; knows nothing of tokens."""

from __future__ import annotations


class ReasoningSplitter:
    """Splits a reasoning model's output into reasoning (inside <think>...</think>) and content,
    streamed (`feed` each delta, then `finish`) or whole (`split`); both give the same text.

    As vLLM's deepseek_r1 / qwen3 parsers: text inside the block is reasoning, text after the
    end tag content; a block opens only at the start of the output (whitespace before it is
    dropped), so a start tag after other text is plain content (a second block, or "<think>"
    in a tool call's argument); a block that never closes is all reasoning, unless one of
    `call_tags` (the start of a tool call, when the request offers tools) ends it: the call is
    content.
    `in_reasoning=True` when the prompt already opened the block (see `prompt_opens_reasoning`):
    the output starts as reasoning. Newlines at the start and end of the reasoning and at the
    start of the content after the end tag are dropped (templates write
    "<think>\n...\n</think>\n\n"); an unclosed block keeps its trailing newlines.
    NOTE: streaming never emits part of a tag: a tail that could still become a tag (and, inside
    the block, the newlines before it) is held until the next delta or `finish`."""

    def __init__(
        self,
        start_tag: str = "<think>",
        end_tag: str = "</think>",
        in_reasoning: bool = False,
        call_tags: tuple[str, ...] = (),
    ) -> None:
        if not start_tag or not end_tag or not all(call_tags):
            raise ValueError("reasoning tags must be non-empty")
        self.start_tag, self.end_tag = start_tag, end_tag
        self.call_tags = call_tags
        self.in_reasoning_at_start = in_reasoning
        self._mode = "reasoning" if in_reasoning else "before"  # -> "reasoning" -> "after"
        self._strip = in_reasoning  # drop newlines at the start of the next text
        self._held = ""  # a tail that may be the start of the tag looked for
        self._held_newlines = 0  # inside the block: newlines that may precede the end tag
        self._opened = in_reasoning  # a think block was opened (by the prompt or the output)

    @property
    def has_reasoning(self) -> bool:
        """Whether a think block was opened (by the prompt or the output)."""
        return self._opened

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning delta, content delta) for the next piece of output text."""
        text = self._held + delta
        self._held = ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            if self._strip:
                text = text.lstrip("\n")
                if not text:
                    break
                self._strip = False
            if self._mode == "after":
                content.append(text)
                break
            if self._mode == "before":  # a block opens only at the start (after whitespace)
                head = text.lstrip()
                if head.startswith(self.start_tag) or self.start_tag.startswith(head):
                    if not head.startswith(self.start_tag):
                        self._held = text  # may still become the tag (or stay whitespace)
                        break
                    self._mode, self._strip, self._opened = "reasoning", True, True
                    text = head[len(self.start_tag) :]
                    continue
                self._mode = "after"  # text first: a tag later is text (say, in an argument)
                continue
            ends = [(i, t) for t in (self.end_tag, *self.call_tags) if (i := text.find(t)) >= 0]
            if ends:  # newlines before the end tag are dropped
                i, tag = min(ends)
                self._emit_reasoning(reasoning, text[:i])
                self._held_newlines = 0
                self._mode = "after"
                if tag == self.end_tag:
                    self._strip, text = True, text[i + len(tag) :]
                else:  # a tool call ends the block unclosed; the call is content
                    text = text[i:]
                continue
            cut = len(text) - max(_partial_suffix(text, t) for t in (self.end_tag, *self.call_tags))
            self._emit_reasoning(reasoning, text[:cut])
            self._held = text[cut:]
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Flush what `feed` held back: the output ended, so no tag can complete."""
        held, self._held = self._held, ""
        if self._mode != "reasoning":
            return "", held
        newlines, self._held_newlines = self._held_newlines, 0
        return "\n" * newlines + held, ""

    def _emit_reasoning(self, out: list[str], text: str) -> None:
        """Append `text` minus its trailing newlines, which are counted (not rescanned: a run
        of newlines costs O(1) per delta) and written before the next other character."""
        body = text.rstrip("\n")
        if body:
            out.append("\n" * self._held_newlines + body)
            self._held_newlines = 0
        self._held_newlines += len(text) - len(body)

    def split(self, text: str) -> tuple[str | None, str]:
        """Whole output -> (reasoning, or None when no think block was opened; content).
        Uses a fresh splitter with this one's settings; this one's state is untouched."""
        s = ReasoningSplitter(
            self.start_tag, self.end_tag, self.in_reasoning_at_start, self.call_tags
        )
        r1, c1 = s.feed(text)
        r2, c2 = s.finish()
        return (r1 + r2 if s.has_reasoning else None), c1 + c2


def prompt_opens_reasoning(
    prompt_text: str, start_tag: str = "<think>", end_tag: str = "</think>"
) -> bool:
    """True when the prompt's last start tag comes after its last end tag: the template opened
    the think block, so the output starts inside it."""
    start = prompt_text.rfind(start_tag)
    return start >= 0 and start > prompt_text.rfind(end_tag)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
