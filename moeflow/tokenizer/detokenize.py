"""Incremental detokenisation: IncrementalDetokenizer turns output ids into text deltas that never
split a UTF-8 character, decoding each token once; OutputText, one per request, adds stop strings
and the hold-back of text that could still become one (vLLM v1's detokenizer.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moeflow.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns a stream of output ids into text deltas that never split a UTF-8 character.

    Decodes only the window ids[prefix_offset:] each step (O(1) per token): prefix_offset..
    read_offset is context already emitted, read_offset.. is new. A delta is withheld while the
    window's text ends in U+FFFD (an incomplete character); `flush()` emits what is left.
    NOTE: the window starts at the first output id, not inside the prompt, and every delta ends
    on a whole character, so the deltas plus `flush()` are exactly decode(output_ids): a prompt
    ending inside a character does not leak into the output, and a SentencePiece vocabulary's
    first token loses its leading space as in a full decode.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._read_offset = 0
        self._prefix_offset = 0

    def add(self, token_ids: list[int]) -> str:
        """Append output ids; return the text they complete ("" while a character is partial)."""
        self._ids.extend(token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (a trailing incomplete character decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if len(self._ids) == self._read_offset:
            return ""
        decode = self._tokenizer.decode
        window = self._ids[self._prefix_offset :]
        read = self._read_offset - self._prefix_offset
        prefix_text = decode(window[:read], self._skip_special_tokens)
        new_text = decode(window, self._skip_special_tokens)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return ""
        delta = new_text[len(prefix_text) :]
        # Slide the window: drop everything before the old read offset.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset > 4096:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta


class OutputText:
    """One request's output text. Fed the request's new token ids after each engine step, it
    decodes each token once, finds stop strings, and hands out text deltas (`next_delta`).

    A stop string ends the text right before it; the ids after the token that completed it are
    not taken (`num_ids` counts those taken). Otherwise the request's end calls `finish`, which
    flushes the detokenizer, so the text equals decode(output_ids).
    NOTE: while the request runs, `next_delta` holds back the last max(len(stop)) - 1
    characters: a stop string could still complete there, and text once sent is never taken
    back. So the concatenated deltas always equal the final text."""

    def __init__(
        self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._stop = tuple(stop)
        longest = max((len(s) for s in self._stop), default=0)
        self._hold = max(longest - 1, 0)
        self._sent: list[str] = []  # text handed out by next_delta
        self._unsent: list[str] = []  # text taken in and not handed out: the held-back tail
        self._num_unsent = 0  # characters in _unsent
        self._tail = ""  # the last _hold characters taken in (where a stop string may begin)
        self.num_ids = 0
        self.stop_string: str | None = None
        self.finished = False

    @property
    def text(self) -> str:
        """The text so far (the held-back tail included); once finished, the final text."""
        return "".join(self._sent) + "".join(self._unsent)

    def update(self, new_ids: Sequence[int], stop_token: bool = False) -> str | None:
        """Take the ids sampled since the last call, one token at a time; returns the stop string
        that one of them completed (and takes no id after it), or None. `stop_token`: the last
        id is the eos or stop token id that ended the request; its id is taken, its text never
        (vLLM's detokenizer: even with skip_special_tokens=False, "<|im_end|>" is no output)."""
        for i, token in enumerate(new_ids):
            if self.finished:
                break
            self.num_ids += 1
            if stop_token and i == len(new_ids) - 1:
                break
            delta = self._detok.add([token])
            if delta:
                self._take(delta)
        return self.stop_string

    def finish(self) -> None:
        """The request ended without a stop string: flush what the detokenizer holds (a trailing
        incomplete character becomes U+FFFD, as in a full decode)."""
        if self.finished:
            return
        rest = self._detok.flush()
        if rest:
            self._unsent.append(rest)
            self._num_unsent += len(rest)
        self.finished = True

    def next_delta(self) -> str:
        """The text not handed out yet: while running, all but the held-back tail; once
        finished, all of it."""
        keep = 0 if self.finished else self._hold
        if self._num_unsent <= keep:
            return ""
        unsent = "".join(self._unsent)
        cut = len(unsent) - keep
        delta, rest = unsent[:cut], unsent[cut:]
        self._sent.append(delta)
        self._unsent = [rest] if rest else []
        self._num_unsent = len(rest)
        return delta

    def _take(self, delta: str) -> None:
        """Append one token's text, unless it completes a stop string: then cut the text right
        before the earliest one and finish."""
        if not self._stop:
            self._unsent.append(delta)
            self._num_unsent += len(delta)
            return
        # Only the tail and the new text can hold a stop string not seen before.
        window = self._tail + delta
        hits = [(i, s) for s in self._stop if (i := window.find(s)) >= 0]
        if not hits:
            self._unsent.append(delta)
            self._num_unsent += len(delta)
            self._tail = window[len(window) - min(len(window), self._hold) :]
            return
        index, self.stop_string = min(hits)
        # The hold-back keeps the tail unsent, so the cut falls inside the unsent text.
        keep = self._num_unsent - len(self._tail) + index
        unsent = ("".join(self._unsent) + delta)[:keep]
        self._unsent = [unsent] if unsent else []
        self._num_unsent = len(unsent)
        self.finished = True
