"""TextStream: a request's growing token ids -> text deltas for streaming. Never splits a UTF-8
character, holds back text that could still turn into a stop string, and ends exactly on the
engine's final text (so the concatenated deltas equal the non-streamed answer)."""

from __future__ import annotations

from moeflow.sampling_params import SamplingParams
from moeflow.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._sent = 0
        self.text = ""  # everything yielded so far

    def update(self, new_ids: list[int], final_text: str | None = None) -> str:
        """Feed the tokens sampled since the last call; `final_text` (the request's text once it
        finished) closes the stream. Returns the new text to send, possibly empty."""
        if new_ids:
            self._detok.add(new_ids)
        if final_text is not None:
            full, end = final_text, len(final_text)
        else:
            full = self._detok.text
            end = len(full) - self._hold
        if end <= self._sent:
            return ""
        delta = full[self._sent : end]
        self._sent = end
        self.text += delta
        return delta
