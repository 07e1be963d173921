"""`moeflow serve`: the engine thread, the app, and uvicorn on a loopback port by default."""

from __future__ import annotations

import argparse
import logging
import os
import signal

import uvicorn

from moeflow.engine.async_engine import AsyncEngine
from moeflow.engine.llm_engine import LLMEngine
from moeflow.server.app import MAX_HEADER_BYTES, ServerConfig, create_app

logger = logging.getLogger("moeflow")


def serve(engine: LLMEngine, args: argparse.Namespace) -> int:
    name = args.served_model_name or os.path.basename(engine.config.model.rstrip("/"))
    async_engine = AsyncEngine(engine, max_waiting=args.max_waiting, exit_on_death=True)
    config = ServerConfig(
        served_model_name=name, api_key=args.api_key, reasoning=args.reasoning_parser
    )
    app = create_app(async_engine, config)
    async_engine.start()
    print(f"moeflow: serving {name!r} on http://{args.host}:{args.port}", flush=True)
    # uvicorn drains on SIGTERM, then re-raises the signal with the handler that was there before
    # it started: a no-op here, so a drained server exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        # Let oversized headers reach the app, which answers 431 in the OpenAI error shape.
        h11_max_incomplete_event_size=4 * MAX_HEADER_BYTES,
        timeout_graceful_shutdown=20,
    )
    return 0
