"""OpenAIServing: the work behind the chat and completion routes (vLLM's OpenAIServingChat
shape). It renders and encodes prompts, submits n x prompts to the AsyncEngine, then streams SSE
chunks or collects one response, with logprobs, usage and the <think> split. Never imports torch."""

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
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moeflow.engine.async_engine import AsyncEngine, QueueFullError
from moeflow.engine.cost import CostSnapshot, usage_cost
from moeflow.engine.output_processor import RequestUpdate
from moeflow.errors import EngineDeadError, RequestError
from moeflow.sampling_params import SamplingParams, StructuredOutputsParams
from moeflow.server import protocol
from moeflow.server.metrics import ServerMetrics
from moeflow.tokenizer import ReasoningSplitter, prompt_opens_reasoning
from moeflow.tokenizer.tool_parsers import (
    KNOWN_TOOL_PARSERS,
    TOOL_MARKERS,
    TOOL_PARSERS,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    pick_tool_parser,
    tool_call_grammar,
)

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
        body = protocol.error_body(self.message, self.type, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass(slots=True)
class _Choice:
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
class _Job:
    """One HTTP request's engine requests (n per prompt), from submission to the last chunk."""

    rid: str
    created: int
    arrival: float  # time.monotonic() at submission, for the latency histograms
    choices: list[_Choice]
    updates: AsyncGenerator[tuple[int, RequestUpdate], None]  # (choice index, update)
    prompt_tokens: int
    chat: bool
    want_logprobs: bool
    include_usage: bool
    ttft: float | None = None  # seconds from submission to the first update


# Builds the SSE chunk of one update of one choice (None: nothing to send); the delta is the
# choice's new text.
_ChunkBuilder = Callable[[_Job, _Choice, RequestUpdate, str, int], dict[str, Any] | None]


class OpenAIServing:
    """The chat and completion endpoints over one AsyncEngine. Each request's updates arrive
    through the engine's per-request queues; nothing here blocks the event loop but the logprob
    token texts (single-token decodes)."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self._think_end_id = self.tokenizer.token_to_id(THINK_END)
        self.use_reasoning = config.reasoning == "on" or (
            config.reasoning == "auto"
            and self.tokenizer.token_to_id(THINK_START) is not None
            and self._think_end_id is not None
        )
        self.tool_parser = pick_tool_parser(config.tool_call_parser, self.tokenizer.chat_template)
        # Tool markers this tokenizer holds as special tokens would vanish from decoded text:
        # tool requests then keep special tokens (as vLLM does for these parsers).
        self._keep_special_for_tools = any(
            (tid := self.tokenizer.token_to_id(m)) is not None
            and self.tokenizer.decode([tid], skip_special_tokens=True) == ""
            for m in TOOL_MARKERS
        )

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
        return protocol.tokenize_response(ids, self.engine.max_model_len, strs)

    async def detokenize(self, req: protocol.DetokenizeRequest) -> dict[str, Any]:
        """vLLM's /detokenize: token ids back to text (special tokens kept)."""
        self._check_model(req.model)
        vocab_size = self.engine.vocab_size
        if any(t >= vocab_size for t in req.tokens):
            raise ApiError(400, f"tokens must be in [0, {vocab_size})", param="tokens")
        text = await asyncio.to_thread(self.tokenizer.decode, req.tokens, False)
        return {"prompt": text}

    async def create_chat_completion(
        self, request: Request, req: protocol.ChatCompletionRequest
    ) -> Response:
        self._check_model(req.model)
        kwargs = dict(req.chat_template_kwargs or {})
        sampling = req.sampling_kwargs()
        tools = req.template_tools()
        if tools is not None:
            kwargs["tools"] = tools
            self._constrain_tool_call(req, tools, sampling)
            if self._keep_special_for_tools and sampling.get("skip_special_tokens", True):
                sampling["skip_special_tokens"] = False
        messages = req.template_messages()
        tokenizer = self.tokenizer

        def render() -> tuple[str, list[int]]:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
            return text, tokenizer.encode(text, add_special_tokens=False)

        try:
            prompt_text, prompt_ids = await asyncio.to_thread(render)
        except RequestError as e:
            raise ApiError(400, str(e), param=e.param or "messages") from None
        in_reasoning = self.use_reasoning and prompt_opens_reasoning(
            prompt_text, THINK_START, THINK_END
        )
        job = await self._submit(
            [prompt_ids],
            _sampling_params(sampling, self.config.default_sampling),
            req.n,
            chat=True,
            want_logprobs=req.logprobs,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            reasoning=self.use_reasoning,
            in_reasoning=in_reasoning,
            tool_parser=self.tool_parser if tools is not None else None,
            tools=tools,
        )
        if req.stream:
            return _event_stream(self._sse(job, self._role_chunks(job), self._chat_chunk))
        if not await self._collect_or_leave(request, job):
            return Response(status_code=499)  # the client is gone; nothing reads this
        return JSONResponse(self._chat_response(job))

    async def create_completion(
        self, request: Request, req: protocol.CompletionRequest
    ) -> Response:
        self._check_model(req.model)
        vocab_size = self.engine.vocab_size
        ids: list[list[int]] = []
        for i, p in enumerate(req.prompt_list()):
            if isinstance(p, str):
                ids.append(await asyncio.to_thread(self.tokenizer.encode, p, True))
            else:
                if any(t >= vocab_size for t in p):
                    raise ApiError(400, f"token ids must be < {vocab_size}", param=f"prompt[{i}]")
                ids.append(list(p))
        job = await self._submit(
            ids,
            _sampling_params(req.sampling_kwargs(), self.config.default_sampling),
            req.n,
            chat=False,
            want_logprobs=req.logprobs is not None,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            reasoning=False,
            in_reasoning=False,
        )
        if req.stream:
            return _event_stream(self._sse(job, [], self._completion_chunk))
        if not await self._collect_or_leave(request, job):
            return Response(status_code=499)
        return JSONResponse(self._completion_response(job))

    def _constrain_tool_call(
        self, req: protocol.ChatCompletionRequest, tools: list[dict[str, Any]], sampling: dict
    ) -> None:
        """Check that this model's call format is parsed; for tool_choice "required" or a named
        function, constrain the output to such calls (arguments valid against the tools'
        schemas), so that even a small model calls."""
        if self.tool_parser is None:
            raise ApiError(
                400,
                "this model's chat template writes tool calls in a format not known here "
                '(tool_choice "none" works; `moeflow serve --tool-call-parser` picks one of: '
                f"{', '.join(KNOWN_TOOL_PARSERS)})",
                param="tools",
            )
        choice = req.effective_tool_choice
        if choice == "auto":
            return
        if "structured_outputs" in sampling:
            raise ApiError(
                400,
                'tool_choice "required" or a named function cannot be combined with '
                "response_format or another output constraint",
                param="tool_choice",
            )
        name = None if isinstance(choice, str) else choice.function.name
        try:
            grammar = tool_call_grammar(
                self.tool_parser, tools, name, req.parallel_tool_calls, self.tokenizer.token_to_id
            )
        except ValueError as e:
            raise ApiError(400, str(e), param="tool_choice") from None
        sampling["structured_outputs"] = StructuredOutputsParams(grammar=grammar, param="tools")

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

    # ---- one request: submit n x prompts, then collect or stream ------------------------------
    async def _submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        *,
        chat: bool,
        want_logprobs: bool,
        include_usage: bool,
        reasoning: bool,
        in_reasoning: bool,
        tool_parser: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> _Job:
        """One engine request per prompt and choice (choice i of a seeded request gets seed +
        i); if one is refused, those already submitted are aborted."""
        if params.kv_transfer is not None and n * len(prompts) != 1:
            raise ApiError(
                400,
                "kv_transfer_params take one prompt and n = 1 (one KV transfer per request)",
                param="kv_transfer_params",
            )
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        created = protocol.now()
        arrival = time.monotonic()
        iterators: list[AsyncIterator[RequestUpdate]] = []
        choices: list[_Choice] = []
        try:
            for p_idx, ids in enumerate(prompts):
                for i in range(n):
                    idx = p_idx * n + i
                    p = params
                    if n > 1 and params.seed is not None:
                        p = dataclasses.replace(params, seed=(params.seed + i) % 2**63)
                    iterators.append(await self.engine.generate(ids, p, f"{rid}-{idx}"))
                    parser = TOOL_PARSERS[tool_parser](tools) if tool_parser is not None else None
                    call_tags = parser.call_tags if parser is not None else ()
                    splitter = ReasoningSplitter(THINK_START, THINK_END, in_reasoning, call_tags)
                    choices.append(_Choice(idx, p_idx, splitter if reasoning else None, parser))
        except BaseException as e:
            for it in iterators:
                await _close(it)
            raise _engine_error(e, self.config.retry_after_s) from None
        prompt_tokens = sum(len(p) for p in prompts)  # once per prompt, whatever n
        self.metrics.prompt_tokens.inc(prompt_tokens)
        return _Job(
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

    def _absorb(self, choice: _Choice, update: RequestUpdate) -> str:
        """Record one update into its choice; returns its text delta (the engine thread
        detokenised it: the final text is the deltas joined)."""
        choice.token_ids.extend(update.new_token_ids)
        choice.logprobs.extend(update.new_logprobs)
        choice.num_cached_tokens = max(choice.num_cached_tokens, update.num_cached_tokens)
        self.metrics.generation_tokens.inc(len(update.new_token_ids))
        text_delta = update.text_delta  # an eos or stop token's text is never in it
        choice.text_pieces.append(text_delta)
        if update.finish_reason is not None:
            choice.finish_reason = update.finish_reason
            choice.cost = update.cost
            if update.cost is not None:
                reasoning_ns = update.cost.decode_ns_of_first(self._reasoning_tokens(choice))
                self.metrics.reasoning_seconds.inc(reasoning_ns / 1e9)
            choice.final_text = "".join(choice.text_pieces)
        return text_delta

    # ---- a full response -----------------------------------------------------------------------
    async def _collect_or_leave(self, request: Request, job: _Job) -> bool:
        """Collect every update; False when the client left first (its requests are aborted).
        An engine failure raises ApiError 500."""
        collect = asyncio.ensure_future(self._collect(job))
        watch = asyncio.ensure_future(_watch_disconnect(request))
        try:
            done, _ = await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
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

    async def _collect(self, job: _Job) -> str | None:
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

    def _chat_response(self, job: _Job) -> dict[str, Any]:
        choices = []
        for c in job.choices:
            reasoning, content = (
                c.splitter.split(c.final_text) if c.splitter else (None, c.final_text)
            )
            calls: list[ToolCall] = []
            if c.tool_parser is not None:
                content, calls = c.tool_parser.parse(content)
            logprobs = None
            if job.want_logprobs:
                logprobs = protocol.chat_logprobs(self._logprob_entries(c, 0, len(c.logprobs)))
            finish = _finish_reason(c.finish_reason, bool(calls))
            choices.append(
                (c.index, content, reasoning, logprobs, finish, [t.to_openai() for t in calls])
            )
        model = self.config.served_model_name
        return protocol.chat_completion_response(
            job.rid, job.created, model, choices, self._usage(job)
        )

    def _completion_response(self, job: _Job) -> dict[str, Any]:
        choices = []
        for c in job.choices:
            logprobs = self._legacy_logprobs(c) if job.want_logprobs else None
            choices.append((c.index, c.final_text, logprobs, c.finish_reason))
        model = self.config.served_model_name
        return protocol.completion_response(job.rid, job.created, model, choices, self._usage(job))

    # ---- streaming -----------------------------------------------------------------------------
    async def _sse(
        self, job: _Job, head: list[dict[str, Any]], chunk_of: _ChunkBuilder
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
                    yield _event(protocol.error_body(update.error, "server_error"))
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
                    usage = protocol.usage_chunk(
                        job.rid, job.created, model, self._usage(job), chat=job.chat
                    )
                    yield _event(usage)
                outcome = None
            yield "data: [DONE]\n\n"
        finally:
            self._log_done(job, outcome)
            await job.updates.aclose()  # aborts whatever is still running (client gone)

    def _role_chunks(self, job: _Job) -> list[dict[str, Any]]:
        """Chat streams open with each choice's role, as OpenAI's do."""
        model = self.config.served_model_name
        delta = {"role": "assistant", "content": ""}
        return [
            protocol.chat_completion_chunk(job.rid, job.created, model, c.index, delta)
            for c in job.choices
        ]

    def _chat_chunk(
        self, job: _Job, c: _Choice, update: RequestUpdate, delta: str, start: int
    ) -> dict[str, Any] | None:
        entries = self._logprob_entries(c, start, len(c.logprobs)) if job.want_logprobs else None
        finish = update.finish_reason
        reasoning_delta, content_delta = c.splitter.feed(delta) if c.splitter else ("", delta)
        if finish is not None and c.splitter is not None:
            reasoning_tail, content_tail = c.splitter.finish()
            reasoning_delta += reasoning_tail
            content_delta += content_tail
        call_deltas: list[ToolCallDelta] = []  # OpenAI's: id and name first, then arguments
        if c.tool_parser is not None:
            content_delta, call_deltas = c.tool_parser.feed(content_delta)
            if finish is not None:
                content_tail, tail_deltas = c.tool_parser.finish()
                content_delta += content_tail
                call_deltas += tail_deltas
            finish = _finish_reason(finish, bool(c.tool_parser.calls))
        payload: dict[str, Any] = {}
        if content_delta:
            payload["content"] = content_delta
        if reasoning_delta:
            payload["reasoning_content"] = reasoning_delta
        if call_deltas:
            payload["tool_calls"] = [d.to_openai() for d in call_deltas]
        if not (payload or finish is not None or entries):
            return None
        logprobs = protocol.chat_logprobs(entries) if entries else None
        model = self.config.served_model_name
        return protocol.chat_completion_chunk(
            job.rid, job.created, model, c.index, payload, finish, logprobs
        )

    def _completion_chunk(
        self, job: _Job, c: _Choice, update: RequestUpdate, delta: str, start: int
    ) -> dict[str, Any] | None:
        finish = update.finish_reason
        if not (delta or finish is not None or (job.want_logprobs and update.new_logprobs)):
            return None
        logprobs = self._legacy_logprobs(c, start) if job.want_logprobs else None
        model = self.config.served_model_name
        return protocol.completion_chunk(
            job.rid, job.created, model, c.index, delta, finish, logprobs
        )

    def _log_done(self, job: _Job, failure: str | None) -> None:
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

    # ---- logprobs and usage --------------------------------------------------------------------
    def _logprob_entries(self, choice: _Choice, start: int, end: int) -> list[dict[str, Any]]:
        """Chat logprobs entries of choice.logprobs[start:end]."""
        decode = self.tokenizer.decode
        out = []
        for lp in choice.logprobs[start:end]:
            text = decode([lp.token_id], skip_special_tokens=False)
            top = [(decode([t], skip_special_tokens=False), v) for t, v in lp.top.items()]
            out.append(protocol.logprobs_content_entry(text, lp.logprob, top))
        return out

    def _legacy_logprobs(self, choice: _Choice, start: int = 0) -> dict[str, Any]:
        """The completions-API logprobs of choice.logprobs[start:]; each call continues the text
        offsets where the previous one stopped, so a stream decodes every token once."""
        decode = self.tokenizer.decode
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in choice.logprobs[start:]:
            text = decode([lp.token_id], skip_special_tokens=False)
            tokens.append(text)
            token_lps.append(lp.logprob)
            tops.append({decode([t], skip_special_tokens=False): v for t, v in lp.top.items()})
            offsets.append(choice.next_text_offset)
            choice.next_text_offset += len(text)
        return protocol.legacy_logprobs(tokens, token_lps, tops, offsets)

    def _usage(self, job: _Job) -> dict[str, Any]:
        completion_tokens = sum(len(c.token_ids) for c in job.choices)
        reasoning = [self._reasoning_tokens(c) for c in job.choices]
        # A prompt's cached tokens: those every one of its n generations found in the cache.
        cached: dict[int, int] = {}
        for c in job.choices:
            cached[c.prompt_idx] = min(
                cached.get(c.prompt_idx, c.num_cached_tokens), c.num_cached_tokens
            )
        usage = protocol.usage(
            job.prompt_tokens, completion_tokens, sum(reasoning), sum(cached.values())
        )
        parts = [(c.cost, r) for c, r in zip(job.choices, reasoning, strict=True) if c.cost]
        if len(parts) == len(job.choices):
            usage["cost"] = usage_cost(parts, self.config.price_per_hour)
        return usage

    def _reasoning_tokens(self, choice: _Choice) -> int:
        """Tokens up to and including </think>; all of them when the prompt opened the block
        and it never closed."""
        if choice.splitter is None:
            return 0
        end_id = self._think_end_id
        if end_id is not None and end_id in choice.token_ids:
            return choice.token_ids.index(end_id) + 1
        return len(choice.token_ids) if choice.splitter.in_reasoning_at_start else 0


# ---- helpers -------------------------------------------------------------------------------------
def _finish_reason(finish: str | None, has_calls: bool) -> str | None:
    """OpenAI's "tool_calls" when the model stopped after calling tools."""
    return "tool_calls" if finish == "stop" and has_calls else finish


def _sampling_params(kwargs: dict[str, Any], defaults: dict[str, Any]) -> SamplingParams:
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
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
