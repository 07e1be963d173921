"""OpenAIServing: what the chat and completion endpoints share (vLLM's OpenAIServing shape):
submitting n x prompts to the AsyncEngine, collecting their updates into choices, the SSE stream,
usage with the cost of the query and one log line per request; and the small endpoints
(/v1/models, /tokenize, /detokenize). serving_chat.py and serving_completion.py subclass it with
their endpoint's prompt, chunks and response. Never imports torch."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from moeflow.engine.async_engine import AsyncEngine, QueueFullError
from moeflow.engine.cost import CostSnapshot, usage_cost
from moeflow.engine.output_processor import RequestUpdate
from moeflow.errors import EngineDeadError, RequestError
from moeflow.sampling_params import SamplingParams
from moeflow.server import protocol, responses, wire
from moeflow.server.metrics import ServerMetrics
from moeflow.tokenizer import ReasoningSplitter
from moeflow.tokenizer.tool_parsers import ToolParser

logger = logging.getLogger("moeflow")

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_HEADER_BYTES = 32 * 1024
THINK_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class ServerConfig:
    """What `moeflow serve` was asked for (the engine's own settings are its EngineConfig)."""

    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no authentication
    max_waiting: int = 256  # requests waiting for admission; more are refused with 503
    reasoning: str = "auto"  # auto | on | off: split <think>...</think> into reasoning_content
    # SamplingParams fields a request leaves unset take these (generation_config.json's, and
    # --override-generation-config's); then SamplingParams' own defaults.
    default_sampling: dict[str, Any] = field(default_factory=dict)
    allowed_origins: tuple[str, ...] = ()  # CORS: none by default
    tool_call_parser: str = "auto"  # auto (from the chat template) or one of KNOWN_TOOL_PARSERS
    max_body_bytes: int = MAX_BODY_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES
    retry_after_s: int = 1
    drain_timeout_s: float = 20.0
    price_per_hour: float | None = None  # the machine's price: usage.cost.usd


class ApiError(Exception):
    """Answered as the OpenAI error envelope with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_
        self.param, self.code = param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = wire.error_body(self.message, self.type, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass(slots=True)
class Choice:
    """One of the n generations of a request, as the server turns it into text."""

    index: int
    prompt_idx: int  # which of the request's prompts this generates from
    splitter: ReasoningSplitter | None
    tool_parser: ToolParser | None = None  # when the request offers tools
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    text_pieces: list[str] = field(default_factory=list)  # the text deltas so far
    finish_reason: str | None = None
    final_text: str = ""
    num_cached_tokens: int = 0
    cost: CostSnapshot | None = None  # with the last update
    next_text_offset: int = 0  # legacy logprobs: where the next token's text starts


@dataclass(slots=True)
class Job:
    """One HTTP request's engine requests (n per prompt), from submission to the last chunk."""

    rid: str
    created: int
    arrival: float  # time.monotonic() at submission, for the latency histograms
    choices: list[Choice]
    updates: AsyncGenerator[tuple[int, RequestUpdate], None]  # (choice index, update)
    prompt_tokens: int
    chat: bool
    want_logprobs: bool
    include_usage: bool
    ttft: float | None = None  # seconds from submission to the first update


# Builds the SSE chunk of one update of one choice (None: nothing to send); the delta is the
# choice's new text.
ChunkBuilder = Callable[[Job, Choice, RequestUpdate, str, int], dict[str, Any] | None]


class OpenAIServing:
    """The endpoints' shared work over one AsyncEngine. Each request's updates arrive through
    the engine's per-request queues; nothing here blocks the event loop but the logprob token
    texts (single-token decodes)."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self._think_end_id = self.tokenizer.token_to_id(THINK_END)

    # ---- endpoints -----------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        """The /v1/models list: the one model served."""
        card = {
            "id": self.config.served_model_name,
            "object": "model",
            "created": 0,
            "owned_by": "moeflow",
            "max_model_len": self.engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    async def tokenize(
        self, req: protocol.TokenizeCompletionRequest | protocol.TokenizeChatRequest
    ) -> dict[str, Any]:
        """vLLM's /tokenize: a prompt, or messages through the chat template."""
        self._check_model(req.model)
        tokenizer = self.tokenizer

        def encode() -> tuple[list[int], list[str] | None]:
            if isinstance(req, protocol.TokenizeChatRequest):
                text = tokenizer.apply_chat_template(
                    req.template_messages(),
                    add_generation_prompt=req.add_generation_prompt,
                    **(req.chat_template_kwargs or {}),
                )
            else:
                text = req.prompt
            ids = tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
            if not req.return_token_strs:
                return ids, None
            return ids, [tokenizer.decode([t], skip_special_tokens=False) for t in ids]

        try:
            ids, strs = await asyncio.to_thread(encode)
        except RequestError as e:
            raise ApiError(400, str(e), param=e.param or "messages") from None
        return responses.tokenize_response(ids, self.engine.max_model_len, strs)

    async def detokenize(self, req: protocol.DetokenizeRequest) -> dict[str, Any]:
        """vLLM's /detokenize: token ids back to text (special tokens kept)."""
        self._check_model(req.model)
        vocab_size = self.engine.vocab_size
        if any(t >= vocab_size for t in req.tokens):
            raise ApiError(400, f"tokens must be in [0, {vocab_size})", param="tokens")
        text = await asyncio.to_thread(self.tokenizer.decode, req.tokens, False)
        return {"prompt": text}

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.served_model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves "
                f"{self.config.served_model_name!r}",
                "not_found_error",
                "model",
                "model_not_found",
            )

    async def _submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        new_choice: Callable[[int, int], Choice],
        *,
        chat: bool,
        want_logprobs: bool,
        include_usage: bool,
    ) -> Job:
        """One engine request per prompt and choice (choice i of a seeded request gets seed +
        i); if one is refused, those already submitted are aborted. new_choice(index, prompt
        index) makes each choice's state."""
        if params.kv_transfer is not None and n * len(prompts) != 1:
            raise ApiError(
                400,
                "kv_transfer_params take one prompt and n = 1 (one KV transfer per request)",
                param="kv_transfer_params",
            )
        rid = responses.new_id("chatcmpl" if chat else "cmpl")
        created = responses.now()
        arrival = time.monotonic()
        iterators: list[AsyncIterator[RequestUpdate]] = []
        choices: list[Choice] = []
        try:
            for p_idx, ids in enumerate(prompts):
                for i in range(n):
                    idx = p_idx * n + i
                    p = params
                    if n > 1 and params.seed is not None:
                        p = dataclasses.replace(params, seed=(params.seed + i) % 2**63)
                    iterators.append(await self.engine.generate(ids, p, f"{rid}-{idx}"))
                    choices.append(new_choice(idx, p_idx))
        except BaseException as e:
            for it in iterators:
                await _close(it)
            raise _engine_error(e, self.config.retry_after_s) from None
        prompt_tokens = sum(len(p) for p in prompts)  # once per prompt, whatever n
        self.metrics.prompt_tokens.inc(prompt_tokens)
        return Job(
            rid,
            created,
            arrival,
            choices,
            _merge(iterators),
            prompt_tokens,
            chat,
            want_logprobs,
            include_usage,
        )

    def _absorb(self, choice: Choice, update: RequestUpdate) -> str:
        """Record one update into its choice; returns its text delta (the engine thread
        detokenised it: the final text is the deltas joined)."""
        choice.token_ids.extend(update.new_token_ids)
        choice.logprobs.extend(update.new_logprobs)
        choice.num_cached_tokens = max(choice.num_cached_tokens, update.num_cached_tokens)
        self.metrics.generation_tokens.inc(len(update.new_token_ids))
        choice.text_pieces.append(update.text_delta)
        if update.finish_reason is not None:
            choice.finish_reason = update.finish_reason
            choice.cost = update.cost
            if update.cost is not None:
                reasoning_ns = update.cost.decode_ns_of_first(self._reasoning_tokens(choice))
                self.metrics.reasoning_seconds.inc(reasoning_ns / 1e9)
            choice.final_text = "".join(choice.text_pieces)
        return update.text_delta

    # ---- a full response -----------------------------------------------------------------------
    async def _collect_or_leave(self, request: Request, job: Job) -> bool:
        """Collect every update; False when the client left first (its requests are aborted).
        An engine failure raises ApiError 500."""
        collect = asyncio.ensure_future(self._collect(job))
        watch = asyncio.ensure_future(_watch_disconnect(request))
        try:
            done, _ = await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
            if collect not in done and (watch.cancelled() or watch.exception() is not None):
                # the watcher failed, not the client: never answer 499 to a client still there
                logger.warning("disconnect watch of %s ended without a disconnect", job.rid)
                await asyncio.wait({collect})
                done = {collect}
        finally:
            watch.cancel()
            if not collect.done():
                collect.cancel()
                with contextlib.suppress(BaseException):
                    await collect
                await job.updates.aclose()
        if collect not in done:
            self._log_done(job, "client disconnected")
            return False
        error = collect.result()
        self._log_done(job, error)
        if error is not None:
            raise ApiError(500, error, "server_error")
        return True

    async def _collect(self, job: Job) -> str | None:
        """Absorb every update; returns the engine's error, if one came."""
        first = True
        async for idx, update in job.updates:
            if first:
                job.ttft = time.monotonic() - job.arrival
                self.metrics.ttft.observe(job.ttft)
                first = False
            if update.error is not None:
                return update.error
            self._absorb(job.choices[idx], update)
        self.metrics.e2e.observe(time.monotonic() - job.arrival)
        return None

    async def _sse(
        self, job: Job, head: list[dict[str, Any]], chunk_of: ChunkBuilder
    ) -> AsyncIterator[str]:
        """The event stream: `head`, then `chunk_of` each update, the usage chunk when asked,
        and [DONE]; an engine failure ends it with an error event. Closing it (the client is
        gone) aborts whatever still runs."""
        last = job.arrival
        first = True
        outcome: str | None = "client disconnected"  # until the stream ends otherwise
        try:
            for chunk in head:
                yield _event(chunk)
            async for idx, update in job.updates:
                now = time.monotonic()
                if first:
                    job.ttft = now - job.arrival
                    self.metrics.ttft.observe(job.ttft)
                    first = False
                else:
                    self.metrics.itl.observe(now - last)
                last = now
                if update.error is not None:
                    outcome = update.error
                    yield _event(wire.error_body(update.error, "server_error"))
                    break
                c = job.choices[idx]
                start = len(c.logprobs)  # the update's logprobs are c.logprobs[start:]
                chunk = chunk_of(job, c, update, self._absorb(c, update), start)
                if chunk is not None:
                    yield _event(chunk)
            else:
                self.metrics.e2e.observe(time.monotonic() - job.arrival)
                if job.include_usage:
                    model = self.config.served_model_name
                    usage = responses.usage_chunk(
                        job.rid, job.created, model, self._usage(job), chat=job.chat
                    )
                    yield _event(usage)
                outcome = None
            yield "data: [DONE]\n\n"
        finally:
            self._log_done(job, outcome)
            await job.updates.aclose()  # aborts whatever is still running (client gone)

    def _log_done(self, job: Job, failure: str | None) -> None:
        """One INFO line per request when it ends: id, tokens, TTFT, finish reasons (or why it
        ended without them)."""
        if not logger.isEnabledFor(logging.INFO):
            return
        ttft = "-" if job.ttft is None else f"{job.ttft:.3f}s"
        reasons = ",".join(str(c.finish_reason) for c in job.choices)
        logger.info(
            "%s: prompt_tokens=%d output_tokens=%d ttft=%s e2e=%.3fs finish_reason=%s%s",
            job.rid,
            job.prompt_tokens,
            sum(len(c.token_ids) for c in job.choices),
            ttft,
            time.monotonic() - job.arrival,
            reasons,
            "" if failure is None else f" ({failure})",
        )

    def _usage(self, job: Job) -> dict[str, Any]:
        completion_tokens = sum(len(c.token_ids) for c in job.choices)
        reasoning = [self._reasoning_tokens(c) for c in job.choices]
        # A prompt's cached tokens: those every one of its n generations found in the cache.
        cached: dict[int, int] = {}
        for c in job.choices:
            cached[c.prompt_idx] = min(
                cached.get(c.prompt_idx, c.num_cached_tokens), c.num_cached_tokens
            )
        usage = responses.usage(
            job.prompt_tokens, completion_tokens, sum(reasoning), sum(cached.values())
        )
        parts = [(c.cost, r) for c, r in zip(job.choices, reasoning, strict=True) if c.cost]
        if len(parts) == len(job.choices):
            usage["cost"] = usage_cost(parts, self.config.price_per_hour)
        return usage

    def _reasoning_tokens(self, choice: Choice) -> int:
        """Tokens up to and including </think>; all of them when the prompt opened the block
        and it never closed."""
        if choice.splitter is None:
            return 0
        end_id = self._think_end_id
        if end_id is not None and end_id in choice.token_ids:
            return choice.token_ids.index(end_id) + 1
        return len(choice.token_ids) if choice.splitter.in_reasoning_at_start else 0


# ---- helpers -------------------------------------------------------------------------------------
def request_sampling_params(kwargs: dict[str, Any], defaults: dict[str, Any]) -> SamplingParams:
    """The request's fields over the server's defaults (a field the request left None takes
    the default)."""
    merged = {**defaults, **{k: v for k, v in kwargs.items() if v is not None or k not in defaults}}
    try:
        return SamplingParams(**merged)
    except RequestError as e:
        raise ApiError(400, str(e), param=e.param) from None


def _engine_error(e: BaseException, retry_after_s: int) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(
            503, str(e), "server_overloaded", headers={"Retry-After": str(retry_after_s)}
        )
    if isinstance(e, EngineDeadError):
        return ApiError(503, str(e), "server_error")
    if isinstance(e, RequestError):
        return ApiError(400, str(e), param=e.param, code=e.code)
    logger.exception("request failed", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}", "server_error")


async def _close(it: AsyncIterator[RequestUpdate]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        await aclose()


async def _merge(
    iterators: list[AsyncIterator[RequestUpdate]],
) -> AsyncGenerator[tuple[int, RequestUpdate], None]:
    """Updates of several requests as (index, update), in arrival order; closing this closes
    (and so aborts) every request still open."""
    if len(iterators) == 1:
        try:
            async for u in iterators[0]:
                yield 0, u
        finally:
            await _close(iterators[0])
        return
    merged: asyncio.Queue[tuple[int, RequestUpdate] | None] = asyncio.Queue()

    async def pump(i: int, it: AsyncIterator[RequestUpdate]) -> None:
        try:
            async for u in it:
                await merged.put((i, u))
        finally:
            await _close(it)
            await merged.put(None)

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await merged.get()
            if item is None:
                remaining -= 1
                continue
            yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _watch_disconnect(request: Request) -> None:
    """Return once the client has gone. The body has been read, so the server's next ASGI
    message is `http.disconnect` (when the connection drops or the response is complete):
    wait for it, as Starlette's StreamingResponse does, rather than poll `is_disconnected`
    (its cancel-scope trick). A stray `http.request` message is skipped."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
