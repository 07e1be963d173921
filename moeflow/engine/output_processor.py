"""The engine's output side (vLLM v1's output processor). After each LLMEngine.step(), every
request it returned has its new ids fed to its OutputText (tokenizer/detokenize.py), which decodes
each token once and finds stop strings; a stop string finishes the request through LLMEngine.abort.
Callers (AsyncEngine, api.LLM) read each request's RequestState: ids, logprobs, text, finish."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeflow.engine.cost import CostSnapshot
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.request import Request
from moeflow.engine.sampler import TokenLogprobs
from moeflow.sampling_params import FinishReason, SamplingParams
from moeflow.tokenizer import OutputText


@dataclass(slots=True)
class RequestUpdate:
    """What happened to one request since its previous update, as its caller sees it."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    text_delta: str = ""  # held back while it could still become a stop string
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    error: str | None = None  # the engine failed this request (or died)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    cost: CostSnapshot | None = None  # on the last update: what the request was booked


@dataclass(slots=True)
class RequestState:
    """One request's output: the engine's Request (ids, logprobs) seen through its OutputText,
    which may end the output before the engine did (a stop string)."""

    req: Request
    text: OutputText
    num_sent: int = 0  # output ids already handed out by take_update
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    energy_source: str | None = None  # the engine's meter (CostLedger.energy_source)

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def token_ids(self) -> list[int]:
        """The output ids (after a stop string: up to the token that completed it)."""
        return self.req.output_ids[: self.text.num_ids]

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        """One per output id when the request asked for logprobs, else None."""
        if self.req.params.logprobs is None:
            return None
        return self.req.output_logprobs[: self.text.num_ids]

    def take_update(self) -> RequestUpdate:
        """The ids, logprobs and text since the previous call, and the finish once finished."""
        req = self.req
        start, end = self.num_sent, self.text.num_ids
        self.num_sent = end
        logprobs = req.output_logprobs[start:end] if req.params.logprobs is not None else []
        return RequestUpdate(
            req.request_id,
            req.output_ids[start:end],
            logprobs,
            self.text.next_delta(),
            self.finish_reason,
            self.stop_reason,
            req.error if self.finished else None,
            len(req.prompt_ids),
            req.num_cached_tokens,
            self.cost() if self.finished else None,
        )

    def cost(self) -> CostSnapshot:
        """What the request was booked so far (all of it once finished)."""
        return self.req.cost.snapshot(self.energy_source, self.req.num_cached_tokens)


class OutputProcessor:
    """Owns the RequestState of the requests added through it; the engine core sees ids only."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._states: dict[str, RequestState] = {}  # until finished

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestState:
        """LLMEngine.add_request (RequestError on bad input), then the request's OutputText."""
        req = self.engine.add_request(prompt_ids, params, request_id)
        text = OutputText(self.engine.tokenizer, params.stop, params.skip_special_tokens)
        state = RequestState(req, text, energy_source=self.engine.cost.energy_source)
        self._states[req.request_id] = state
        return state

    def process(self, reqs: list[Request]) -> list[RequestState]:
        """Take what engine.step() returned: feed each request's new ids to its text, finish the
        ones a stop string ended, flush the ones the engine finished. Returns the states that
        changed (requests added elsewhere are skipped); finished ones are dropped from here."""
        changed: list[RequestState] = []
        for req in reqs:
            state = self._states.get(req.request_id)
            if state is None:
                continue
            stop_token = req.finish_reason is FinishReason.STOP and isinstance(req.stop_reason, int)
            stop = state.text.update(req.output_ids[state.text.num_ids :], stop_token)
            if stop is not None:
                # As when the engine checked stop strings itself: the string wins over an eos or
                # max_tokens on the same token. The engine has not finished the request, or has
                # and keeps its own reason (abort returns False).
                self.engine.abort(req.request_id, FinishReason.STOP, stop)
                self._finish(state, FinishReason.STOP.value, stop)
            elif req.is_finished:
                state.text.finish()
                reason = req.finish_reason.value if req.finish_reason is not None else None
                self._finish(state, reason, req.stop_reason)
            changed.append(state)
        return changed

    def state(self, request_id: str) -> RequestState | None:
        """The state of a request still open here."""
        return self._states.get(request_id)

    def abort(self, request_id: str) -> bool:
        """Finish a request now (LLMEngine.abort); False if it had already ended."""
        self._states.pop(request_id, None)
        return self.engine.abort(request_id)

    def _finish(
        self, state: RequestState, reason: str | None, stop_reason: str | int | None
    ) -> None:
        state.finished = True
        state.finish_reason, state.stop_reason = reason, stop_reason
        del self._states[state.request_id]
