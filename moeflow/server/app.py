"""The OpenAI-compatible HTTP app: routes, body limits, auth, SSE streaming, abort on disconnect.
Everything a request carries is validated by protocol.py before the engine sees it; the engine
runs in its own thread behind engine/async_engine.py. Never imports torch."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from moeflow.engine.async_engine import AsyncEngine, QueueFullError, RequestUpdate
from moeflow.engine.output import TextStream
from moeflow.errors import EngineDeadError, RequestError
from moeflow.sampling_params import SamplingParams
from moeflow.server import protocol
from moeflow.server.metrics import ServerMetrics
from moeflow.tokenizer import ReasoningSplitter, Tokenizer, prompt_opens_reasoning

logger = logging.getLogger("moeflow")

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_HEADER_BYTES = 32 * 1024
THINK_START, THINK_END = "<think>", "</think>"


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES
    reasoning: str = "auto"  # auto | on | off: split <think>...</think> into reasoning_content
    retry_after_s: int = 1
    drain_timeout_s: float = 20.0


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
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = protocol.error_body(self.message, self.type, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class _Choice:
    """One of the n generations of a request, as the server turns it into text."""

    index: int
    stream: TextStream
    splitter: ReasoningSplitter | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    final_text: str = ""
    num_cached_tokens: int = 0
    next_text_offset: int = 0  # legacy logprobs: where the next token's text starts


def create_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    tokenizer: Tokenizer = engine.engine.tokenizer
    max_model_len = engine.engine.config.max_model_len
    vocab_size = engine.engine.model_config.vocab_size
    metrics = ServerMetrics()
    _bind_metric_sources(metrics, engine)
    use_reasoning = config.reasoning == "on" or (
        config.reasoning == "auto"
        and tokenizer.token_to_id(THINK_START) is not None
        and tokenizer.token_to_id(THINK_END) is not None
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # SIGTERM: uvicorn has stopped accepting connections; finish or abort in-flight work.
        await engine.drain(timeout_s=config.drain_timeout_s)

    app = FastAPI(
        title="moeflow", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.engine = engine
    app.state.metrics = metrics

    app.add_middleware(_Guard, config=config)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    async def read_json(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "Content-Type must be application/json")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            raise ApiError(413, f"request body over {config.max_body_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise ApiError(413, f"request body over {config.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return protocol.require_object(protocol.parse_json_body(b"".join(chunks)))
        except protocol.BadRequestBody as e:
            raise ApiError(400, str(e)) from None

    def check_model(name: str | None) -> None:
        if name is not None and name != config.served_model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves "
                f"{config.served_model_name!r}",
                "not_found_error",
                "model",
                "model_not_found",
            )

    # ---- routes --------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if engine.is_healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "reason": engine.dead_reason}, status_code=503)

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": config.served_model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "moeflow",
                        "max_model_len": max_model_len,
                    }
                ],
            }
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request)
        req = _validate(protocol.ChatCompletionRequest, body)
        check_model(req.model)
        kwargs = req.chat_template_kwargs or {}
        messages = req.template_messages()

        def render() -> tuple[str, list[int]]:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
            return text, tokenizer.encode(text, add_special_tokens=False)

        try:
            prompt_text, prompt_ids = await asyncio.to_thread(render)
        except RequestError as e:
            raise ApiError(400, str(e), param=e.param or "messages") from None
        in_reasoning = use_reasoning and prompt_opens_reasoning(prompt_text, THINK_START, THINK_END)
        return await _serve(
            request,
            kind="chat",
            prompts=[prompt_ids],
            params=_sampling_params(req.sampling_kwargs()),
            n=req.n,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            want_logprobs=req.logprobs,
            reasoning=use_reasoning,
            in_reasoning=in_reasoning,
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request)
        req = _validate(protocol.CompletionRequest, body)
        check_model(req.model)
        prompts = req.prompt_list()
        ids: list[list[int]] = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids.append(await asyncio.to_thread(tokenizer.encode, p, True))
            else:
                if any(t >= vocab_size for t in p):
                    raise ApiError(400, f"token ids must be < {vocab_size}", param=f"prompt[{i}]")
                ids.append(list(p))
        return await _serve(
            request,
            kind="text",
            prompts=ids,
            params=_sampling_params(req.sampling_kwargs()),
            n=req.n,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            want_logprobs=req.logprobs is not None,
            reasoning=False,
            in_reasoning=False,
        )

    # ---- one request: submit n x prompts, then answer or stream ---------------------------------
    async def _serve(
        request: Request,
        *,
        kind: str,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        stream: bool,
        include_usage: bool,
        want_logprobs: bool,
        reasoning: bool,
        in_reasoning: bool,
    ) -> Response:
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        arrival = time.monotonic()
        iterators: list[AsyncIterator[RequestUpdate]] = []
        choices: list[_Choice] = []
        try:
            for p_idx, ids in enumerate(prompts):
                for i in range(n):
                    idx = p_idx * n + i
                    p = params
                    if n > 1 and params.seed is not None:
                        p = _replace_seed(params, params.seed + i)
                    it = await engine.generate(ids, p, f"{rid}-{idx}")
                    iterators.append(it)
                    splitter = ReasoningSplitter(THINK_START, THINK_END, in_reasoning)
                    choices.append(
                        _Choice(idx, TextStream(tokenizer, ids, p), splitter if reasoning else None)
                    )
        except BaseException as e:
            for it in iterators:
                await _close(it)
            raise _engine_error(e, config.retry_after_s) from None
        prompt_tokens = sum(len(p) for p in prompts) * n
        metrics.prompt_tokens.inc(prompt_tokens)
        updates = _merge(iterators)
        if stream:
            return StreamingResponse(
                _sse(
                    updates,
                    choices,
                    kind=kind,
                    rid=rid,
                    created=created,
                    arrival=arrival,
                    prompt_tokens=prompt_tokens,
                    include_usage=include_usage,
                    want_logprobs=want_logprobs,
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        collect = asyncio.ensure_future(_collect(updates, choices, arrival))
        watch = asyncio.ensure_future(_watch_disconnect(request))
        try:
            done, _ = await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not collect.done():
                collect.cancel()
                with contextlib.suppress(BaseException):
                    await collect
                await updates.aclose()
        if collect not in done:
            return Response(status_code=499)  # the client is gone; nothing reads this
        error = collect.result()
        if error is not None:
            raise ApiError(500, error, "server_error")
        return JSONResponse(
            _full_response(kind, rid, created, choices, prompt_tokens, want_logprobs)
        )

    async def _collect(
        updates: AsyncIterator[tuple[int, RequestUpdate]], choices: list[_Choice], arrival: float
    ) -> str | None:
        first = True
        async for idx, update in updates:
            if first:
                metrics.ttft.observe(time.monotonic() - arrival)
                first = False
            if update.error is not None:
                return update.error
            _absorb(choices[idx], update)
        metrics.e2e.observe(time.monotonic() - arrival)
        return None

    def _absorb(choice: _Choice, update: RequestUpdate) -> str:
        """Record one update into its choice; returns the new text delta."""
        choice.token_ids.extend(update.new_token_ids)
        choice.logprobs.extend(update.new_logprobs)
        choice.num_cached_tokens = max(choice.num_cached_tokens, update.num_cached_tokens)
        metrics.generation_tokens.inc(len(update.new_token_ids))
        delta = choice.stream.update(update.new_token_ids, update.text)
        if update.finish_reason is not None:
            choice.finish_reason = update.finish_reason
            choice.final_text = choice.stream.text
        return delta

    def _logprob_entries(choice: _Choice, start: int, end: int) -> list[dict[str, Any]]:
        out = []
        for lp in choice.logprobs[start:end]:
            text = tokenizer.decode([lp.token_id], skip_special_tokens=False)
            top = [(tokenizer.decode([t], skip_special_tokens=False), v) for t, v in lp.top.items()]
            out.append(protocol.logprobs_content_entry(text, lp.token_id, lp.logprob, top))
        return out

    def _reasoning_tokens(choice: _Choice) -> int:
        if choice.splitter is None:
            return 0
        end_id = tokenizer.token_to_id(THINK_END)
        if end_id is not None and end_id in choice.token_ids:
            return choice.token_ids.index(end_id) + 1
        return len(choice.token_ids) if choice.splitter.in_reasoning_at_start else 0

    def _full_response(
        kind: str,
        rid: str,
        created: int,
        choices: list[_Choice],
        prompt_tokens: int,
        want_logprobs: bool,
    ) -> dict[str, Any]:
        completion_tokens = sum(len(c.token_ids) for c in choices)
        reasoning_tokens = sum(_reasoning_tokens(c) for c in choices)
        usage = protocol.usage(prompt_tokens, completion_tokens, reasoning_tokens)
        model = config.served_model_name
        if kind == "chat":
            out_choices = []
            for c in choices:
                reasoning_text, content = (
                    c.splitter.split(c.final_text) if c.splitter else (None, c.final_text)
                )
                lps = (
                    {"content": _logprob_entries(c, 0, len(c.logprobs))} if want_logprobs else None
                )
                out_choices.append((c.index, content, reasoning_text, lps, c.finish_reason))
            return protocol.chat_completion_response(rid, created, model, out_choices, usage)
        text_choices = []
        for c in choices:
            lps = _legacy_logprobs(c) if want_logprobs else None
            text_choices.append((c.index, c.final_text, lps, c.finish_reason))
        return protocol.completion_response(rid, created, model, text_choices, usage)

    def _legacy_logprobs(choice: _Choice, start: int = 0) -> dict[str, Any]:
        """The completions-API logprobs of choice.logprobs[start:]; each call continues the text
        offsets where the previous one stopped, so a stream decodes every token once."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in choice.logprobs[start:]:
            text = tokenizer.decode([lp.token_id], skip_special_tokens=False)
            tokens.append(text)
            token_lps.append(lp.logprob)
            tops.append(
                {tokenizer.decode([t], skip_special_tokens=False): v for t, v in lp.top.items()}
            )
            offsets.append(choice.next_text_offset)
            choice.next_text_offset += len(text)
        return protocol.legacy_logprobs(tokens, token_lps, tops, offsets)

    async def _sse(
        updates: AsyncGenerator[tuple[int, RequestUpdate], None],
        choices: list[_Choice],
        *,
        kind: str,
        rid: str,
        created: int,
        arrival: float,
        prompt_tokens: int,
        include_usage: bool,
        want_logprobs: bool,
    ) -> AsyncIterator[str]:
        model = config.served_model_name
        last = arrival
        first = True
        try:
            if kind == "chat":
                for c in choices:  # the role first, as OpenAI does
                    yield _event(
                        protocol.chat_completion_chunk(
                            rid, created, model, c.index, {"role": "assistant", "content": ""}
                        )
                    )
            async for idx, update in updates:
                now = time.monotonic()
                if first:
                    metrics.ttft.observe(now - arrival)
                    first = False
                else:
                    metrics.itl.observe(now - last)
                last = now
                if update.error is not None:
                    yield _event(protocol.error_body(update.error, "server_error"))
                    break
                c = choices[idx]
                start = len(c.logprobs)
                delta = _absorb(c, update)
                lp_entries = _logprob_entries(c, start, len(c.logprobs)) if want_logprobs else None
                finish = update.finish_reason
                if kind == "chat":
                    reasoning_delta, content_delta = (
                        c.splitter.feed(delta) if c.splitter else ("", delta)
                    )
                    if finish is not None and c.splitter is not None:
                        r_tail, c_tail = c.splitter.finish()
                        reasoning_delta += r_tail
                        content_delta += c_tail
                    payload: dict[str, Any] = {}
                    if content_delta:
                        payload["content"] = content_delta
                    if reasoning_delta:
                        payload["reasoning_content"] = reasoning_delta
                    if payload or finish is not None or lp_entries:
                        yield _event(
                            protocol.chat_completion_chunk(
                                rid,
                                created,
                                model,
                                c.index,
                                payload,
                                finish_reason=finish,
                                logprobs={"content": lp_entries} if lp_entries else None,
                            )
                        )
                elif delta or finish is not None or (want_logprobs and update.new_logprobs):
                    yield _event(
                        protocol.completion_chunk(
                            rid,
                            created,
                            model,
                            c.index,
                            delta,
                            finish_reason=finish,
                            logprobs=_legacy_logprobs(c, start) if want_logprobs else None,
                        )
                    )
            else:
                metrics.e2e.observe(time.monotonic() - arrival)
                if include_usage:
                    completion_tokens = sum(len(c.token_ids) for c in choices)
                    reasoning_tokens = sum(_reasoning_tokens(c) for c in choices)
                    usage = protocol.usage(prompt_tokens, completion_tokens, reasoning_tokens)
                    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
                    yield _event(
                        {
                            "id": rid,
                            "object": obj,
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": usage,
                        }
                    )
            yield "data: [DONE]\n\n"
        finally:
            await updates.aclose()  # aborts whatever is still running (client gone)

    return app


class _Guard:
    """Plain ASGI middleware at the edge: header cap (431) and the API key (401), checked on the
    raw path so that `//v1`, `%2F` or `..` tricks cannot reach a route unauthenticated."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if sum(len(k) + len(v) for k, v in headers) > self.config.max_header_bytes:
            await ApiError(431, "request headers are too large").response()(scope, receive, send)
            return
        key = self.config.api_key
        if key is not None and scope.get("raw_path", b"") != b"/health":
            given = next((v for k, v in headers if k.lower() == b"authorization"), b"")
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):
                error = ApiError(
                    401,
                    "invalid or missing API key",
                    "authentication_error",
                    code="invalid_api_key",
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- helpers -------------------------------------------------------------------------------------
def _validate(
    model: type[protocol.ChatCompletionRequest] | type[protocol.CompletionRequest],
    body: dict[str, Any],
) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, param = protocol.validation_error_to_param(e)
        raise ApiError(400, message, param=param) from None


def _sampling_params(kwargs: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except RequestError as e:
        raise ApiError(400, str(e), param=e.param) from None


def _replace_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return dataclasses.replace(params, seed=seed % 2**63)


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


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _bind_metric_sources(metrics: ServerMetrics, engine: AsyncEngine) -> None:
    bm = engine.engine.block_manager
    metrics.bind(
        outcomes=lambda: dict(engine.outcomes),
        running=lambda: engine.num_running,
        waiting=lambda: engine.num_waiting,
        kv_blocks_free=lambda: bm.num_free_blocks,
        kv_blocks_total=lambda: bm.num_blocks,
        prefix_cache_hit_rate=lambda: bm.num_hit_tokens / max(1, bm.num_queried_tokens),
    )
