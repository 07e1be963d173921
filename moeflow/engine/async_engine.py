"""The engine thread and its asyncio bridge. One thread owns the LLMEngine and steps it, and runs
the OutputProcessor right after each step (so updates carry text); coroutines submit requests and
aborts through a command queue and read each request's updates from its own asyncio.Queue. A
step's updates reach each event loop in one call (one wake-up per step, however many streams).
Bounded: a full waiting queue refuses new work at once (QueueFullError).

NOTE: if a step raises, engine state is unknown: every open request gets an error update, the
engine is marked dead (health fails) and, when `exit_on_death`, the process exits non-zero."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.output_processor import OutputProcessor, RequestState, RequestUpdate
from moeflow.errors import EngineDeadError, MoeflowError
from moeflow.kernels import cpu_ext
from moeflow.sampling_params import SamplingParams
from moeflow.tokenizer import Tokenizer

logger = logging.getLogger("moeflow")


class QueueFullError(MoeflowError):
    """The waiting queue is at its cap; the caller should retry later (HTTP 503)."""


@dataclass(frozen=True, slots=True)
class KVStats:
    """The KV cache's occupancy and the prefix cache's lookups, as /metrics shows them."""

    num_free_blocks: int
    num_blocks: int
    num_queried_tokens: int  # prompt tokens looked up in the prefix cache
    num_hit_tokens: int  # of those, found


@dataclass(slots=True)
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestUpdate]


# ---- commands from the event loop to the engine thread ------------------------------------------
@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: _Sink
    ack: concurrent.futures.Future[None]  # the engine's RequestError, or None once admitted


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _AbortAll:
    """Drain's last word: end every request still open."""


_Command = _Add | _Abort | _AbortAll


class AsyncEngine:
    """An LLMEngine stepped by its own thread, driven from asyncio (module docstring)."""

    def __init__(
        self, engine: LLMEngine, max_waiting: int = 256, exit_on_death: bool = False
    ) -> None:
        self.engine = engine
        self._outputs = OutputProcessor(engine)  # used by the engine thread only
        self.max_waiting = max_waiting
        self.exit_on_death = exit_on_death
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, _Sink] = {}  # owned by the engine thread
        # Updates not yet handed to their event loop (engine thread), sent by _flush.
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Sink, RequestUpdate]]] = {}
        self._num_pending_adds = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="moeflow-engine", daemon=True)
        self.dead_reason: str | None = None
        self.last_tick = time.monotonic()
        # Counted in the engine thread: "accepted" when admitted, then exactly one of finished /
        # aborted / error when it ends; "rejected" for requests the engine refused at admission.
        self.outcomes: Counter[str] = Counter()
        # The same ended requests by finish reason: stop / length / abort, or error.
        self.finished_reasons: Counter[str] = Counter()
        self.num_running = 0
        self.num_waiting = 0

    # ---- what the server reads of the engine --------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: prompt token ids must be below it."""
        return self.engine.model_config.vocab_size

    def kv_stats(self) -> KVStats:
        """Read from any thread: plain counters the engine thread updates."""
        bm = self.engine.block_manager
        return KVStats(bm.num_free_blocks, bm.num_blocks, bm.num_queried_tokens, bm.num_hit_tokens)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread. Call it from the thread that built the engine: on a CPU,
        that thread's OpenMP workers are freed first (cpu_ext.release_openmp_pool)."""
        if self.engine.device.type == "cpu" and cpu_ext.release_openmp_pool():
            logger.debug("freed the starting thread's OpenMP pool; the engine's is the only one")
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        if self.dead_reason is not None or not self._thread.is_alive():
            return False
        try:
            self.engine.check_health()  # a parallel rank gone: dead before the loop notices
        except EngineDeadError:
            return False
        return True

    def is_healthy(self, max_silence_s: float = 30.0) -> bool:
        """Alive and stepping (or idle-ticking) within the last `max_silence_s` seconds."""
        return self.is_alive and time.monotonic() - self.last_tick < max_silence_s

    @property
    def num_open(self) -> int:
        with self._lock:
            return len(self._sinks) + self._num_pending_adds

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting; wait for in-flight requests up to `timeout_s`, then abort the rest and
        stop the thread."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout_s
        while self.num_open and time.monotonic() < deadline and self.is_alive:
            await asyncio.sleep(0.05)
        self._commands.put(_AbortAll())
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 10.0)

    # ---- requests ------------------------------------------------------------------------------
    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestUpdate]:
        """Submit one request; validation errors (RequestError) and QueueFullError raise here,
        before anything is yielded. Leaving the iterator early aborts the request."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine is not running: {self.dead_reason or 'stopped'}")
        if not self._accepting:
            raise QueueFullError("the server is shutting down")
        with self._lock:
            waiting = self.num_waiting + self._num_pending_adds
            if waiting >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
            self._num_pending_adds += 1
        loop = asyncio.get_running_loop()
        sink = _Sink(loop, asyncio.Queue())
        ack: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._commands.put(_Add(request_id, prompt_ids, params, sink, ack))
        self._wake.set()
        await asyncio.wrap_future(ack)  # raises the engine's RequestError, if any
        return self._updates(request_id, sink)

    async def _updates(self, request_id: str, sink: _Sink) -> AsyncIterator[RequestUpdate]:
        finished = False
        try:
            while True:
                update = await sink.queue.get()
                yield update
                if update.finish_reason is not None or update.error is not None:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer left (client gone, task cancelled)
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))
        self._wake.set()

    # ---- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._run_commands()
                self._flush()  # what the commands ended (aborts), at once
                self.last_tick = time.monotonic()
                if engine.has_unfinished():
                    for state in self._outputs.process(engine.step()):
                        self._publish(state)
                    self._flush()
                    self._snapshot()
                else:
                    self._snapshot()
                    engine.check_health()  # a dead parallel rank ends the loop
                    engine.cost.book_idle()  # often enough for a meter that wraps
                    self._wake.wait(0.5)
                    self._wake.clear()
            self._run_commands()
            self._flush()
        except BaseException as e:  # noqa: BLE001 - engine state is unknown: fail everything
            self.dead_reason = f"{type(e).__name__}: {e}"
            logger.exception("engine loop died")
            for request_id in list(self._sinks):
                update = RequestUpdate(request_id, [], error=f"engine failure: {e}")
                self._push(request_id, update)
                self.outcomes["error"] += 1
                self.finished_reasons["error"] += 1
            with self._lock:
                self._sinks.clear()
            self._flush()
            if self.exit_on_death:
                # Give the event loop a moment to flush the error events, then leave.
                threading.Timer(0.5, os._exit, args=(70,)).start()

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Abort):
                self._abort(command.request_id)
            else:
                for request_id in list(self.engine.requests):
                    self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        state = self._outputs.state(request_id)
        if self._outputs.abort(request_id):
            cost = state.cost() if state is not None else None
            update = RequestUpdate(request_id, [], finish_reason="abort", cost=cost)
            self._end(request_id, update, "aborted")

    def _add(self, command: _Add) -> None:
        try:
            self._outputs.add_request(command.prompt_ids, command.params, command.request_id)
        except BaseException as e:  # noqa: BLE001 - handed to the submitting coroutine
            with self._lock:
                self._num_pending_adds -= 1
            self.outcomes["rejected"] += 1
            command.ack.set_exception(e)
            return
        with self._lock:
            self._num_pending_adds -= 1
            self._sinks[command.request_id] = command.sink
        self.outcomes["accepted"] += 1
        command.ack.set_result(None)

    def _publish(self, state: RequestState) -> None:
        if state.request_id not in self._sinks:
            return
        update = state.take_update()
        if state.finished:
            self._end(state.request_id, update, "error" if update.error else "finished")
        else:
            self._push(state.request_id, update)

    def _end(self, request_id: str, update: RequestUpdate, outcome: str) -> None:
        if request_id not in self._sinks:
            return
        self._push(request_id, update)
        with self._lock:
            del self._sinks[request_id]
        self.outcomes[outcome] += 1
        self.finished_reasons["error" if update.error else update.finish_reason or "abort"] += 1

    def _push(self, request_id: str, update: RequestUpdate) -> None:
        sink = self._sinks.get(request_id)
        if sink is not None:
            self._outbox.setdefault(sink.loop, []).append((sink, update))

    def _flush(self) -> None:
        """Hand the updates gathered since the last flush to their event loops, one call each."""
        outbox, self._outbox = self._outbox, {}
        for loop, updates in outbox.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_deliver, updates)

    def _snapshot(self) -> None:
        sched = self.engine.scheduler
        self.num_running, self.num_waiting = len(sched.running), len(sched.waiting)


def _deliver(updates: list[tuple[_Sink, RequestUpdate]]) -> None:
    """On the event loop: each update into its request's queue, in the order they came."""
    for sink, update in updates:
        sink.queue.put_nowait(update)
