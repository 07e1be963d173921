"""`moeflow bench --workload serve`: what serving adds to the engine, in one command on one model.
The same chat prompts (one per stream, rendered with the model's template) and greedy requests of
--decode-tokens tokens (EOS ignored) go, for 1 stream and for --concurrency streams at once, to
  1. the offline engine (LLMEngine stepped in this process: the engine's own decode step),
  2. `moeflow serve` in a child process, over HTTP on loopback (streamed chat completions),
  3. llama.cpp's `llama-server` on the same GGUF file with as many slots, when it is found
     (MOEFLOW_LLAMA_CPP_BIN or the cached build), through the same client.
Each reports TTFT, inter-token latency (a request's decode time per token after the first) and
output tok/s (all streams' tokens over the wave's wall time); the ratios that matter are printed
beside them. The client is a small asyncio HTTP/1.1 reader of the SSE stream, so that its own
cost per token stays far below the servers'."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch

from moeflow.bench.default import PROMPT_TEXT
from moeflow.bench.llama_cpp_tools import find_tool
from moeflow.sampling_params import SamplingParams

LLAMA_SERVER = "llama-server"
SERVED_NAME = "bench"
WARM_TOKENS = 4  # tokens of each warm-up request
START_TIMEOUT_S = 600.0  # a server that is not healthy by then failed to start
_T = TypeVar("_T")


@dataclass(slots=True)
class StreamTiming:
    """One request as its client saw it: seconds from sending it to each content event."""

    event_s: list[float]  # arrival of each event that carried text
    num_tokens: int  # completion tokens (the server's usage, else the tokens asked for)

    @property
    def ttft_s(self) -> float:
        return self.event_s[0]

    @property
    def itl_s(self) -> float | None:
        """Decode time per token after the first (None for a one-token answer)."""
        if self.num_tokens < 2:
            return None
        return (self.event_s[-1] - self.event_s[0]) / (self.num_tokens - 1)


@dataclass(slots=True)
class WaveResult:
    """One engine's figures at one stream count (a wave of `streams` requests sent at once)."""

    streams: int
    ttft_p50_ms: float
    itl_p50_ms: float | None  # median over requests of their inter-token latency
    output_tok_s: float  # every stream's tokens over the wave's wall time
    num_tokens: int

    @classmethod
    def of(cls, timings: list[StreamTiming], wall_s: float) -> WaveResult:
        itls = [t.itl_s for t in timings if t.itl_s is not None]
        num_tokens = sum(t.num_tokens for t in timings)
        return cls(
            len(timings),
            1000 * statistics.median(t.ttft_s for t in timings),
            1000 * statistics.median(itls) if itls else None,
            num_tokens / wall_s,
            num_tokens,
        )


def run_serve_bench(args: argparse.Namespace) -> int:
    """The workload described by the `moeflow bench` arguments; 0 on success."""
    threads = args.threads or os.cpu_count() or 1
    streams = sorted({1, args.concurrency})
    if args.concurrency < 1 or args.decode_tokens < 2 or args.prompt_len < 1:
        raise ValueError("--concurrency >= 1, --decode-tokens >= 2 and --prompt-len >= 1")
    if args.compare not in ("auto", "none", "", "llama-cpp"):
        raise ValueError("--compare: the serve workload's peer is llama-cpp (llama-server)")
    load_start = os.getloadavg()[0]
    print(
        f"workload: {args.prompt_len}-token chat messages, {args.decode_tokens} greedy tokens "
        f"each (EOS ignored), streams {','.join(map(str, streams))}, {threads} threads; "
        f"load average {load_start:.2f} at the start"
    )
    offline, model_path, prompts = _offline(args, threads, streams)
    results: dict[str, dict[int, WaveResult]] = {"offline engine": offline}
    notes: dict[str, str] = {}
    bodies = [_chat_body(p, args.decode_tokens) for p in prompts]
    waves = _waves_of(bodies, streams)
    try:
        cmd, env = _moeflow_cmd(args, threads)
        results["moeflow serve"] = _bench_server(cmd, env, waves)
    except RuntimeError as e:
        notes["moeflow serve"] = f"failed: {e}"
    peer, note = _llama_server(args, model_path, threads, waves)
    if peer is not None:
        results["llama-server"] = peer
    notes["llama-server"] = note
    load_end = os.getloadavg()[0]

    print()
    print(_table(results, streams))
    for name, note in notes.items():
        if note:
            print(f"{name}: {note}")
    ratios = _ratios(results, args.concurrency)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    print(f"load average {load_end:.2f} at the end (the machine's other work shows in the figures)")
    if args.json:
        report = {
            "command": " ".join(sys.argv),
            "settings": {
                "model": model_path,
                "prompt_len": args.prompt_len,
                "decode_tokens": args.decode_tokens,
                "streams": streams,
                "threads": threads,
            },
            "load_average": {"start": load_start, "end": load_end},
            "results": {
                name: {str(s): asdict(w) for s, w in waves.items()}
                for name, waves in results.items()
            },
            "notes": notes,
            "ratios": ratios,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if "moeflow serve" in results else 1


# ---- the offline engine ----------------------------------------------------------------------
def _offline(
    args: argparse.Namespace, threads: int, streams: list[int]
) -> tuple[dict[int, WaveResult], str, list[str]]:
    """The engine's own figures on the prompts the servers get; returns them, the model file
    and the prompts (one message per stream)."""
    from moeflow.api import LLM

    torch.set_num_threads(threads)
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        quantize=args.quantize,
        max_num_seqs=_max_num_seqs(args),
    )
    tokenizer = llm.tokenizer
    text_ids = tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)
    text = tokenizer.decode((text_ids * (args.prompt_len // len(text_ids) + 1))[: args.prompt_len])
    # Distinct from the first token on, so that no request reuses another's prefix blocks.
    prompts = [f"({i}) {text}" for i in range(sum(streams))]
    prompt_ids = [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True
            ),
            add_special_tokens=False,
        )
        for p in prompts
    ]
    engine = llm.engine
    results: dict[int, WaveResult] = {}
    warm = SamplingParams(temperature=0.0, max_tokens=WARM_TOKENS, ignore_eos=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
    for n, wave in zip(streams, _waves_of(prompt_ids, streams), strict=True):
        for ids in wave:
            engine.add_request(list(reversed(ids)), warm)  # warm-up: no prefix shared
        engine.run_to_completion()
        start = time.monotonic()
        reqs = [engine.add_request(ids, params) for ids in wave]
        engine.run_to_completion()
        wall = time.monotonic() - start
        timings = []
        for r in reqs:
            assert r.first_token_time is not None and r.last_token_time is not None
            first, last = r.first_token_time - start, r.last_token_time - start
            timings.append(StreamTiming([first, last], len(r.output_ids)))
        results[n] = WaveResult.of(timings, wall)
    path = llm.loaded.path
    del llm, engine
    gc.collect()
    return results, path, prompts


# ---- the servers ---------------------------------------------------------------------------------
def _moeflow_cmd(args: argparse.Namespace, threads: int) -> tuple[list[str], dict[str, str]]:
    """`moeflow serve` as the offline engine was built, and its environment."""
    cmd = [sys.executable, "-m", "moeflow", "serve", "--served-model-name", SERVED_NAME]
    cmd += ["--dtype", args.dtype, "--device", args.device]
    if args.model is not None:
        cmd += ["--model", args.model]
    if args.max_model_len is not None:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.quantize is not None:
        cmd += ["--quantize", args.quantize]
    cmd += ["--max-num-seqs", str(_max_num_seqs(args))]
    # `serve` takes its thread count from the environment.
    return cmd, {**os.environ, "MOEFLOW_NUM_THREADS": str(threads)}


def _max_num_seqs(args: argparse.Namespace) -> int:
    return max(64, args.concurrency)  # serve's default, or the streams if more


def _llama_server(
    args: argparse.Namespace,
    model_path: str,
    threads: int,
    waves: list[list[dict[str, Any]]],
) -> tuple[dict[int, WaveResult] | None, str]:
    """llama-server's figures, or None and why not."""
    if args.compare in ("none", ""):
        return None, ""
    if not (os.path.isfile(model_path) and model_path.endswith(".gguf")):
        return None, "skipped: needs a GGUF model"
    binary = find_tool(LLAMA_SERVER)
    if binary is None:
        return None, (
            "skipped: no llama-server (set MOEFLOW_LLAMA_CPP_BIN to a llama.cpp build's bin/ "
            "folder; `cmake --build build --target llama-server` builds it)"
        )
    num_slots = max(len(w) for w in waves)
    # Every slot gets the context of one stream: the templated prompt, the answer, a margin.
    ctx = num_slots * (2 * args.prompt_len + args.decode_tokens + 64)
    cmd = [
        str(binary), "-m", model_path, "-t", str(threads), "-tb", str(threads),
        "-c", str(ctx), "-np", str(num_slots), "--no-webui",
    ]  # fmt: skip
    try:
        return _bench_server(cmd, dict(os.environ), waves), f"{binary}, {num_slots} slots"
    except RuntimeError as e:
        return None, f"failed: {e}"


def _bench_server(
    cmd: list[str], env: dict[str, str], waves: list[list[dict[str, Any]]]
) -> dict[int, WaveResult]:
    """Start the server `cmd` (plus --host and --port) on a free loopback port, then for each
    wave of request bodies: warm it up with as many short requests, and time the wave. The
    server is stopped with SIGTERM afterwards. RuntimeError (with its log's tail) on failure."""
    port = _free_port()
    args = [*cmd, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_healthy(proc, port)
            return asyncio.run(_time_waves(port, waves))
        except (RuntimeError, OSError, ValueError) as e:
            log.seek(0)
            tail = log.read().decode("utf-8", "replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{e}; log: {' | '.join(tail)}") from None
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _time_waves(port: int, waves: list[list[dict[str, Any]]]) -> dict[int, WaveResult]:
    results: dict[int, WaveResult] = {}
    for wave in waves:
        # Warm-up: as many requests, each its message reversed (no prefix shared), a few tokens.
        warm = [_warm_body(b) for b in wave]
        await asyncio.gather(*(stream_chat("127.0.0.1", port, b) for b in warm))
        start = time.perf_counter()
        timings = await asyncio.gather(*(stream_chat("127.0.0.1", port, b) for b in wave))
        results[len(wave)] = WaveResult.of(list(timings), time.perf_counter() - start)
    return results


def _waves_of(items: list[_T], streams: list[int]) -> list[list[_T]]:
    """`items` cut into consecutive waves of `streams` items each."""
    out, start = [], 0
    for n in streams:
        out.append(items[start : start + n])
        start += n
    return out


def _warm_body(body: dict[str, Any]) -> dict[str, Any]:
    messages = [{**m, "content": m["content"][::-1]} for m in body["messages"]]
    return {**body, "messages": messages, "max_tokens": WARM_TOKENS}


def _wait_healthy(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if asyncio.run(_get_status("127.0.0.1", port, "/health")) == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server was not healthy after {START_TIMEOUT_S:.0f} s")


def _chat_body(message: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": message}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# ---- the client ----------------------------------------------------------------------------------
async def stream_chat(host: str, port: int, body: dict[str, Any]) -> StreamTiming:
    """POST one streamed chat completion and time its events (RuntimeError on a non-200 answer,
    an error event or a stream without text)."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + payload)
        await writer.drain()
        status, chunked = await _read_head(reader)
        if status != 200:
            raise RuntimeError(
                f"HTTP {status}: {(await reader.read(500)).decode(errors='replace')}"
            )
        events: list[float] = []
        num_tokens: int | None = None
        parser = SSEParser()
        async for data in _body(reader, chunked):
            now = time.perf_counter() - start
            for event in parser.feed(data):
                if event == "[DONE]":
                    continue
                obj = json.loads(event)
                if "error" in obj:
                    raise RuntimeError(f"error event: {obj['error']}")
                if any(_has_text(c) for c in obj.get("choices") or []):
                    events.append(now)
                usage = obj.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    num_tokens = int(usage["completion_tokens"])
    finally:
        writer.close()
    if not events:
        raise RuntimeError("the stream carried no text")
    return StreamTiming(events, num_tokens if num_tokens is not None else body["max_tokens"])


class SSEParser:
    """Server-sent events from byte chunks cut anywhere: the `data:` payload of each event."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        # Joined before normalising, so a CRLF cut between two chunks is still one line end.
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        out = []
        for event in events:
            lines = [ln[5:].lstrip() for ln in event.split(b"\n") if ln.startswith(b"data:")]
            if lines:
                out.append(b"\n".join(lines).decode())
        return out


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the body is chunked) of an HTTP/1.1 response."""
    status_line = await reader.readline()
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise RuntimeError(f"not an HTTP response: {status_line[:80]!r}")
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "transfer-encoding":
            chunked = "chunked" in value.lower()
    return int(parts[1]), chunked


async def _body(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    """The response body as it arrives (chunked transfer decoded; else until the server closes)."""
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size = int((await reader.readline()).split(b";")[0].strip(), 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk


async def _get_status(host: str, port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        return (await _read_head(reader))[0]
    finally:
        writer.close()


def _has_text(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the report ----------------------------------------------------------------------------------
def _ratios(results: dict[str, dict[int, WaveResult]], concurrency: int) -> dict[str, float]:
    """The serving overhead at one stream and the throughput beside llama-server."""
    out: dict[str, float] = {}
    offline, served = results["offline engine"], results.get("moeflow serve")
    peer = results.get("llama-server")
    if served is not None:
        itl, base = served[1].itl_p50_ms, offline[1].itl_p50_ms
        if itl is not None and base:
            out["moeflow serve ITL / offline decode step, 1 stream"] = itl / base
        out[f"moeflow serve / offline output tok/s, {concurrency} streams"] = (
            served[concurrency].output_tok_s / offline[concurrency].output_tok_s
        )
    if served is not None and peer is not None:
        out[f"moeflow serve / llama-server output tok/s, {concurrency} streams"] = (
            served[concurrency].output_tok_s / peer[concurrency].output_tok_s
        )
        itl, peer_itl = served[1].itl_p50_ms, peer[1].itl_p50_ms
        if itl is not None and peer_itl:
            out["moeflow serve / llama-server ITL, 1 stream"] = itl / peer_itl
    return out


def _table(results: dict[str, dict[int, WaveResult]], streams: list[int]) -> str:
    head = (
        f"{'streams':>7}  {'engine':<15} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} {'out tok/s':>10}"
    )
    rows = [head, "-" * len(head)]
    for n in streams:
        for name, waves in results.items():
            w = waves.get(n)
            if w is None:
                continue
            itl = "-" if w.itl_p50_ms is None else f"{w.itl_p50_ms:.2f}"
            rows.append(
                f"{n:>7}  {name:<15} {w.ttft_p50_ms:>12.1f} {itl:>11} {w.output_tok_s:>10.1f}"
            )
    return "\n".join(rows)
