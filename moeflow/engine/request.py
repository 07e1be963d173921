"""Request: one generation's state from admission to finish (tokens, blocks, status, the
finish reason). Owned by the engine thread, which checks its stop ids, eos and length; stop
strings are engine/output_processor.py's. Imports only leaf modules and engine/cost.py (torch
only for the sampling generator)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moeflow.engine.cost import RequestCost
from moeflow.sampling_params import FinishReason, SamplingParams

if TYPE_CHECKING:
    import torch

    from moeflow.engine.structured_output import GrammarState


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # not admitted yet, or preempted and waiting for recompute
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True)
class Request:
    # Set by the caller.
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens or the rest of the context
    # Set by the scheduler and block manager.
    status: RequestStatus = RequestStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache
    num_cached_tokens: int = 0  # of those, found in the prefix cache at admission
    num_hashed_blocks: int = 0  # leading full blocks already registered in the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    dp_replica: int | None = None  # the replica holding its KV (engine/data_parallel.py)
    # Set by the engine after each sampled token.
    output_ids: list[int] = field(default_factory=list)  # tokens that reached the host
    # Tokens sampled on the device whose ids the host has not read yet: with the overlap
    # schedule, the next step is launched before the host reads this step's token (0 or 1
    # between steps; 2 for a moment inside one, between its launch and the read of the last).
    num_pending: int = 0
    output_logprobs: list[Any] = field(default_factory=list)
    generator: torch.Generator | None = None
    grammar: GrammarState | None = None  # params.structured_outputs' matcher
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    error: str | None = None  # set when the engine had to fail this request
    # Set by the engine: time.monotonic() stamps (vLLM's request phases) and the booked cost.
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    cost: RequestCost = field(default_factory=RequestCost)

    @property
    def num_tokens(self) -> int:
        """Prompt, output and pending tokens: what the next step computes up to."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def reached_max_tokens(self) -> bool:
        """The tokens sampled so far, pending ones included, reach max_tokens: nothing more is
        computed for this request, whatever its pending token turns out to be."""
        return len(self.output_ids) + self.num_pending >= self.max_tokens

    def tokens_slice(self, start: int, end: int) -> list[int]:
        """Token ids start..end-1 the host knows (pending ones are not: end stops before them)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
