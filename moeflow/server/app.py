"""The OpenAI-compatible HTTP app: middleware (CORS when asked, header cap, API key), error
handlers and routes of a few lines each; the endpoints' work is in serving*.py. Everything a
request carries is validated by protocol.py before the engine sees it. Never imports torch."""

from __future__ import annotations

import contextlib
import hmac
import importlib.metadata
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from moeflow.engine.async_engine import AsyncEngine
from moeflow.engine.request import Request as EngineRequest
from moeflow.server import protocol, wire
from moeflow.server.metrics import CONTENT_TYPE, EngineTotals, FinishedRequest, ServerMetrics
from moeflow.server.serving import ApiError, OpenAIServing, ServerConfig
from moeflow.server.serving_chat import OpenAIServingChat
from moeflow.server.serving_completion import OpenAIServingCompletion


def create_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """The app over `engine` (started by the caller); shutting the app down drains the engine."""
    metrics = ServerMetrics(config.served_model_name, config.price_per_hour)
    _bind_metric_sources(metrics, engine)
    serving = OpenAIServing(engine, config, metrics)  # /v1/models, /tokenize, /detokenize
    chat = OpenAIServingChat(engine, config, metrics)
    completion = OpenAIServingCompletion(engine, config, metrics)

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
    if config.allowed_origins:  # added last, so outermost: preflights never meet the API key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    # ---- routes --------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if engine.is_healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "reason": engine.dead_reason}, status_code=503)

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(serving.models())

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": importlib.metadata.version("moeflow")})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await _read_json(request, config.max_body_bytes)
        kind = (
            protocol.TokenizeChatRequest
            if "messages" in body
            else protocol.TokenizeCompletionRequest
        )
        return JSONResponse(await serving.tokenize(_validate(kind, body)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body = await _read_json(request, config.max_body_bytes)
        req = _validate(protocol.DetokenizeRequest, body)
        return JSONResponse(await serving.detokenize(req))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _read_json(request, config.max_body_bytes)
        req = _validate(protocol.ChatCompletionRequest, body)
        return await chat.create_chat_completion(request, req)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _read_json(request, config.max_body_bytes)
        req = _validate(protocol.CompletionRequest, body)
        return await completion.create_completion(request, req)

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
async def _read_json(request: Request, max_body_bytes: int) -> dict[str, Any]:
    """The body as a JSON object: application/json, at most `max_body_bytes` (counted as it
    arrives, whatever Content-Length says), strict JSON (wire.parse_json_body)."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "Content-Type must be application/json")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
        raise ApiError(413, f"request body over {max_body_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise ApiError(413, f"request body over {max_body_bytes} bytes")
        chunks.append(chunk)
    try:
        return wire.require_object(wire.parse_json_body(b"".join(chunks)))
    except wire.BadRequestBody as e:
        raise ApiError(400, str(e)) from None


def _validate(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, param = protocol.validation_error_to_param(e)
        raise ApiError(400, message, param=param) from None


def _bind_metric_sources(metrics: ServerMetrics, engine: AsyncEngine) -> None:
    core = engine.engine

    def totals() -> EngineTotals:
        kv = engine.kv_stats()
        seconds, joules = core.cost.totals()
        return EngineTotals(
            num_running=engine.num_running,
            num_waiting=engine.num_waiting,
            kv_cache_usage=1 - kv.num_free_blocks / max(1, kv.num_blocks),
            num_kv_blocks=kv.num_blocks,
            prefix_cache_queries=kv.num_queried_tokens,
            prefix_cache_hits=kv.num_hit_tokens,
            num_preemptions=core.scheduler.num_preemptions,
            num_accepted=engine.outcomes["accepted"],
            num_rejected=engine.outcomes["rejected"],
            finished_reasons=dict(engine.finished_reasons),
            seconds=seconds,
            joules=joules,
            energy_source=core.cost.energy_source,
        )

    def finished(req: EngineRequest) -> None:  # on the engine thread
        end = req.last_token_time or time.monotonic()
        scheduled = req.first_scheduled_time or end
        first_token = req.first_token_time or end
        metrics.observe_finished(
            FinishedRequest(
                queue_s=scheduled - req.arrival_time,
                prefill_s=first_token - scheduled,
                decode_s=end - first_token,
                num_prompt_tokens=len(req.prompt_ids),
                num_generation_tokens=len(req.output_ids),
            )
        )

    metrics.bind(totals)
    core.finish_listeners.append(finished)
