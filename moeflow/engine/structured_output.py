"""Structured output: a request's constraint (SamplingParams.structured_outputs) compiled by
llguidance into a matcher over the model's vocabulary, and the per-step token mask of a batch.
Compiled grammars are cached by constraint; each request gets a copy of the cached matcher. A
reasoning model reasons freely: the constraint starts after its </think>."""

from __future__ import annotations

import collections
import functools
import json
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moeflow.errors import RequestError
from moeflow.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import llguidance

    from moeflow.tokenizer import Tokenizer

logger = logging.getLogger("moeflow")

# Shapes: N rows in the batch, V the logits' vocabulary, W = ceil(V / 32) mask words.

MAX_CACHED_GRAMMARS = 256
THINK_START, THINK_END = "<think>", "</think>"


@dataclass(slots=True)
class GrammarState:
    """One request's constraint. phase: "maybe_think" (first token: a reasoning model may open a
    think block, or start the constrained text), "reasoning" (inside the block: no mask) or
    "constrained"."""

    matcher: llguidance.LLMatcher
    phase: str


class StructuredOutputs:
    """The engine's compiler and mask builder. The llguidance tokenizer (about a second to build)
    is made on first use, so engines that never see a constraint never pay for it."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int], pin_memory: bool = False
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's)
        self._eos_ids = eos_ids
        # On a GPU the masks are built in pinned memory: their copy to the device is then
        # queued without waiting (utils/device.py).
        self._pin_memory = pin_memory
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None  # computes a batch's masks
        self._cache: collections.OrderedDict[str, llguidance.LLMatcher] = collections.OrderedDict()
        self._lock = threading.Lock()
        start, end = tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)
        self.think_ids = (start, end) if start is not None and end is not None else None

    # ---- compile ---------------------------------------------------------------------------
    def new_state(self, spec: StructuredOutputsParams, prompt_ids: list[int]) -> GrammarState:
        """A fresh matcher for one request. Raises RequestError naming spec.param when the
        schema, regex or grammar is invalid."""
        key = spec.key()
        with self._lock:
            matcher = self._cache.get(key)
            if matcher is not None:
                self._cache.move_to_end(key)
        if matcher is None:
            matcher = self._compile(spec)
            with self._lock:
                self._cache[key] = matcher
                while len(self._cache) > MAX_CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
        phase = "constrained"
        if self.think_ids is not None:
            start, end = self.think_ids
            last_start = _rindex(prompt_ids, start)
            phase = "reasoning" if last_start > _rindex(prompt_ids, end) else "maybe_think"
        return GrammarState(matcher.deep_copy(), phase)

    def _compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        import llguidance

        grammar = _grammar_of(spec)
        tokenizer = self._llg_tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise RequestError(f"{spec.param}: {_first_line(messages)}", param=spec.param)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"{spec.param}: {matcher.get_error()}", param=spec.param)
        return matcher

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(),
                    n_vocab=self.vocab_size,
                    eos_token=self._eos_ids[0] if self._eos_ids else None,
                )
            return self._ll_tokenizer

    # ---- per step --------------------------------------------------------------------------
    def fill_bitmask(self, states: list[GrammarState | None]) -> torch.Tensor | None:
        """The allowed tokens of each row, as a host int32 bitmask [N, W] (bit t % 32 of word
        t // 32; all ones for an unconstrained row); None when no row is constrained."""
        if all(s is None or s.phase == "reasoning" for s in states):
            return None
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full(  # [N, W]
            (len(states), words), -1, dtype=torch.int32, pin_memory=self._pin_memory
        )
        rows = [
            (state.matcher, i)
            for i, state in enumerate(states)
            if state is not None and state.phase != "reasoning"
        ]
        if len(rows) == 1:
            matcher, i = rows[0]
            matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), words * 4)
        else:  # the rows in parallel, on llguidance's own threads (the GIL dropped)
            self._llg_executor().unsafe_compute_mask_ptr(
                rows, bitmask.data_ptr(), words * 4, len(states)
            )
        for i, state in enumerate(states):
            if state is not None and state.phase == "maybe_think" and self.think_ids is not None:
                start = self.think_ids[0]
                bitmask[i, start // 32] |= _bit(start % 32)
        return bitmask

    def _llg_executor(self) -> llguidance.LLExecutor:
        with self._lock:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor()
            return self._executor

    def advance(self, state: GrammarState, token: int) -> bool:
        """Feed one sampled token; False when the matcher rejects it. The mask only admits
        tokens the matcher takes, save where llguidance breaks that promise: an added token
        that looks special ("<ok>", not marked special) is admitted where its text fits and
        then rejected as a special token (tests/server/test_tool_formats.py), and a matcher in
        error admits eos alone, which it then rejects. The engine then ends the request before
        the token (vLLM logs such a failure and goes on; never an error to the client)."""
        if state.phase == "reasoning":
            if self.think_ids is not None and token == self.think_ids[1]:
                state.phase = "constrained"
            return True
        if state.phase == "maybe_think":
            if self.think_ids is not None and token == self.think_ids[0]:
                state.phase = "reasoning"
                return True
            state.phase = "constrained"
        if state.matcher.is_stopped():
            return True  # only eos was allowed: the engine's stop check ends the request
        if state.matcher.consume_token(token):
            return True
        logger.warning(
            "structured output: the grammar rejected token %d (%s); the request ends before it",
            token,
            _first_line([state.matcher.get_error() or "no error"]),
        )
        return False


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [N, V] float -> copy with the tokens bitmask [N, W] (host int32) forbids at -inf.
    Each byte of the mask picks its 8 tokens' row of a [256, 8] table of 0 / -inf, added to
    the logits: one gather and one add (a fifth of the CPU time of unpacking 32 shifts per
    word, masked_fill after). The logits are finite, so an allowed one stays exactly as it
    was. The bytes of an int32 word are read low first (every supported device is
    little-endian): byte k of word w holds tokens 32 w + 8 k ... + 7."""
    num_rows, vocab_size = logits.shape
    words = bitmask.to(logits.device, non_blocking=True)  # [N, W]
    mask_bytes = words.view(torch.uint8).reshape(-1).long()  # [N * 4W]
    table = _byte_table(logits.device, logits.dtype)  # [256, 8]
    add = table.index_select(0, mask_bytes).view(num_rows, -1)  # [N, 32W]
    return logits + add[:, :vocab_size]


@functools.cache
def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: row b holds 0 where bit j of b is set (token allowed), else -inf."""
    bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    zeros = torch.zeros(256, 8, dtype=dtype, device=device)
    return zeros.masked_fill(bits == 0, float("-inf"))


def _grammar_of(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar text for the constraint; a bad schema is a RequestError."""
    import llguidance

    try:
        if spec.json is not None:
            schema: Any = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be an object")
            return llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False}
            )
        if spec.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, defaults={"whitespace_flexible": False}
            )
        if spec.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            alternatives = " | ".join(json.dumps(c) for c in spec.choice)
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return llguidance.LLMatcher.grammar_from_lark(str(spec.grammar))
    except ValueError as e:
        raise RequestError(f"{spec.param}: {e}", param=spec.param) from None


def _bit(i: int) -> int:
    """Bit i of an int32 word as a Python int that fits int32 (bit 31 is the sign)."""
    return -(2**31) if i == 31 else 1 << i


def _rindex(ids: list[int], token: int) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    return -1


def _first_line(messages: list[str]) -> str:
    return (messages[0] if messages else "invalid grammar").strip().splitlines()[0]
