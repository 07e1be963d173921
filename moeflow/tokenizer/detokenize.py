"""Incremental detokenisation: output token ids -> text deltas that never split a UTF-8
character, each token decoded once in a small sliding window."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moeflow.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns a stream of output ids into text deltas that never split a UTF-8 character.

    Decodes only the window ids[prefix_offset:] each step (O(1) per token): prefix_offset..
    read_offset is context already emitted, read_offset.. is new. A delta is withheld while the
    window's text ends in U+FFFD (an incomplete character); `flush()` emits what is left.
    NOTE: for SentencePiece (Metaspace) vocabularies the first delta keeps the leading space
    that `decode(output_ids)` strips, because the window starts inside the prompt.
    """

    _CONTEXT_TOKENS = 5

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-(self._CONTEXT_TOKENS + 1) :])
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - self._CONTEXT_TOKENS, 0)
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return "".join(self._pieces)

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
        if delta:
            self._pieces.append(delta)
        return delta
