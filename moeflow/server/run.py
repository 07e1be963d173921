"""`moeflow serve`: the engine thread, the app, and uvicorn on a loopback port by default."""

from __future__ import annotations

import logging
import signal

import uvicorn

from moeflow.engine.async_engine import AsyncEngine
from moeflow.engine.llm_engine import LLMEngine
from moeflow.server.app import create_app
from moeflow.server.serving import ServerConfig

logger = logging.getLogger("moeflow")


def serve(engine: LLMEngine, config: ServerConfig) -> int:
    """Serve until SIGTERM (drained, then exit 0) or an engine failure (exit 70)."""
    async_engine = AsyncEngine(engine, max_waiting=config.max_waiting, exit_on_death=True)
    app = create_app(async_engine, config)
    async_engine.start()
    name, host, port = config.served_model_name, config.host, config.port
    print(f"moeflow: serving {name!r} on http://{host}:{port}", flush=True)
    # uvicorn drains on SIGTERM, then re-raises the signal with the handler that was there before
    # it started: a no-op here, so a drained server exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        # Let oversized headers reach the app, which answers 431 in the OpenAI error shape.
        h11_max_incomplete_event_size=4 * config.max_header_bytes,
        timeout_graceful_shutdown=20,
    )
    return 0
