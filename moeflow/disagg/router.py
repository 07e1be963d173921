"""`moeflow router`: the OpenAI API in front of a prefill instance and a decode instance (both
`moeflow serve --role ...`). Each completion goes to the prefill instance with max_tokens 1,
then, once its KV is on the way, to the decode instance, which answers the client (streamed or
whole); `kv_transfer_params` with one transfer id link the two. Every failure is an OpenAI error
body: a backend's own 4xx/5xx answer passes through, a backend that cannot be reached or
breaks is 502. Never imports torch."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moeflow.server.wire import BadRequestBody, error_body, parse_json_body, require_object

logger = logging.getLogger("moeflow")

MAX_BODY_BYTES = 8 * 1024 * 1024
_INVALID = "invalid_request_error"


@dataclass(frozen=True)
class RouterConfig:
    prefill_url: str  # e.g. http://127.0.0.1:8100 (no /v1)
    decode_url: str
    host: str = "127.0.0.1"
    port: int = 8000
    timeout_s: float = 600.0  # one backend call at most (per read while streaming)
    connect_timeout_s: float = 10.0
    max_body_bytes: int = MAX_BODY_BYTES


class _Failure(Exception):
    """Answered as an OpenAI error body with this status."""

    def __init__(
        self, status: int, message: str, type_: str = "server_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.message, self.type, self.param), status_code=self.status
        )


def create_router_app(
    config: RouterConfig, transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """The router app; `transport` replaces the network (tests)."""
    timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
    client = httpx.AsyncClient(timeout=timeout, transport=transport)
    prefill, decode = config.prefill_url.rstrip("/"), config.decode_url.rstrip("/")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(
        title="moeflow router", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )

    @app.exception_handler(_Failure)
    async def failure(request: Request, exc: _Failure) -> JSONResponse:
        return exc.response()

    @app.get("/health")
    async def health() -> Response:
        reasons = []
        for name, base in (("prefill", prefill), ("decode", decode)):
            try:
                resp = await client.get(f"{base}/health", timeout=config.connect_timeout_s)
                if resp.status_code != 200:
                    reasons.append(f"{name}: HTTP {resp.status_code}")
            except httpx.HTTPError as e:
                reasons.append(f"{name}: {_describe(e)}")
        if reasons:
            return JSONResponse({"status": "unhealthy", "reason": "; ".join(reasons)}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            resp = await client.get(f"{decode}/v1/models", headers=_auth(request))
        except httpx.HTTPError as e:
            raise _Failure(502, f"the decode instance did not answer: {_describe(e)}") from None
        return _passthrough(resp)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await route(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await route(request, "/v1/completions")

    async def route(request: Request, path: str) -> Response:
        body = await _read_body(request, config.max_body_bytes)
        transfer_id = f"xfer-{uuid.uuid4().hex}"
        headers = {"Content-Type": "application/json", **_auth(request)}
        # 1. Prefill: the prompt and its first token; the instance sends the KV as it ends.
        first = {
            **body,
            "max_tokens": 1,
            "stream": False,
            "kv_transfer_params": {"transfer_id": transfer_id, "do_remote_decode": True},
        }
        first.pop("stream_options", None)
        if "max_completion_tokens" in body:
            first["max_completion_tokens"] = 1
        try:
            resp = await client.post(f"{prefill}{path}", content=_dump(first), headers=headers)
        except httpx.HTTPError as e:
            raise _Failure(502, f"the prefill instance did not answer: {_describe(e)}") from None
        if 400 <= resp.status_code < 500:
            return _passthrough(resp)  # the request's own fault: the decode side would agree
        if resp.status_code != 200:
            raise _Failure(502, f"the prefill instance failed: {_error_message(resp)}")
        # 2. Decode: the same request, its prompt's KV taken from the transfer.
        second = {
            **body,
            "kv_transfer_params": {"transfer_id": transfer_id, "do_remote_prefill": True},
        }
        url = f"{decode}{path}"
        if not body.get("stream"):
            try:
                resp = await client.post(url, content=_dump(second), headers=headers)
            except httpx.HTTPError as e:
                raise _Failure(502, f"the decode instance did not answer: {_describe(e)}") from None
            return _passthrough(resp)
        try:
            resp = await client.send(
                client.build_request("POST", url, content=_dump(second), headers=headers),
                stream=True,
            )
        except httpx.HTTPError as e:
            raise _Failure(502, f"the decode instance did not answer: {_describe(e)}") from None
        if resp.status_code != 200:
            await resp.aread()
            await resp.aclose()
            return _passthrough(resp)
        return StreamingResponse(
            _relay(resp),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    return app


def run_router(config: RouterConfig) -> int:
    """Serve until SIGTERM (exit 0) or Ctrl-C."""
    app = create_router_app(config)
    print(
        f"moeflow: routing on http://{config.host}:{config.port} "
        f"(prefill {config.prefill_url}, decode {config.decode_url})",
        flush=True,
    )
    # As `moeflow serve`: uvicorn re-raises SIGTERM with the handler from before it started.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    return 0


# ---- helpers -------------------------------------------------------------------------------------
async def _read_body(request: Request, max_body_bytes: int) -> dict[str, Any]:
    """The JSON object the client sent (415 / 413 / 400 as the server answers them); requests
    the router cannot split into one prefill and one decode are refused here."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise _Failure(415, "Content-Type must be application/json", _INVALID)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise _Failure(413, f"request body over {max_body_bytes} bytes", _INVALID)
        chunks.append(chunk)
    try:
        body = require_object(parse_json_body(b"".join(chunks)))
    except BadRequestBody as e:
        raise _Failure(400, str(e), _INVALID) from None
    if body.get("n", 1) != 1:
        raise _Failure(
            400,
            "the router takes n = 1 (one KV transfer per request)",
            _INVALID,
            "n",
        )
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        raise _Failure(
            400,
            "the router takes one prompt per request (one KV transfer per request)",
            _INVALID,
            "prompt",
        )
    return body


async def _relay(resp: httpx.Response) -> AsyncIterator[bytes]:
    """The decode instance's event stream, byte for byte; if it breaks, an error event and
    [DONE]. Closing this (the client left) closes the decode call, which aborts the request."""
    try:
        async for chunk in resp.aiter_bytes():
            yield chunk
    except httpx.HTTPError as e:
        message = f"the decode instance's stream broke: {_describe(e)}"
        yield f"data: {json.dumps(error_body(message, 'server_error'))}\n\n".encode()
        yield b"data: [DONE]\n\n"
    finally:
        await resp.aclose()


def _passthrough(resp: httpx.Response) -> Response:
    """A backend's answer as it came (JSON bodies, OpenAI error bodies included)."""
    headers = {k: v for k, v in resp.headers.items() if k.lower() == "retry-after"}
    media_type = resp.headers.get("content-type", "application/json")
    return Response(resp.content, resp.status_code, headers, media_type)


def _error_message(resp: httpx.Response) -> str:
    """A backend's error body's message, or its status."""
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status_code}"


def _auth(request: Request) -> dict[str, str]:
    """The client's credentials, passed on to both instances (which check them)."""
    value = request.headers.get("authorization")
    return {} if value is None else {"Authorization": value}


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
