"""`moeflow bench --workload serve` with stand-in settings (the scripted checkpoint, a few tokens,
2 streams): every engine's token counts and the report's keys, no timing asserts; and its SSE
client against a server that cuts events and line ends anywhere."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from moeflow.bench.serving import SSEParser, run_serve_bench, stream_chat
from moeflow.cli import build_parser


def test_serve_bench_counts_every_token(scripted_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    args = build_parser().parse_args(
        [
            "bench", "--workload", "serve", "--model", str(scripted_checkpoint),
            "--dtype", "float32", "--max-model-len", "256", "--threads", "1",
            "--prompt-len", "8", "--decode-tokens", "6", "--concurrency", "2",
            "--compare", "none", "--json", str(out),
        ]
    )  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert run_serve_bench(args) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert report["settings"]["streams"] == [1, 2]
    assert report["results"].keys() == {"offline engine", "moeflow serve"}
    for waves in report["results"].values():
        assert waves.keys() == {"1", "2"}
        for n, wave in waves.items():
            assert wave["streams"] == int(n)
            assert wave["num_tokens"] == 6 * int(n)  # the server's usage, EOS ignored
            assert wave["ttft_p50_ms"] > 0 and wave["itl_p50_ms"] > 0
            assert wave["output_tok_s"] > 0
    assert set(report["ratios"]) == {
        "moeflow serve ITL / offline decode step, 1 stream",
        "moeflow serve / offline output tok/s, 2 streams",
    }
    assert report["notes"] == {"llama-server": ""}


def test_sse_parser_joins_cut_events() -> None:
    stream = b'data: {"a": 1}\r\n\r\n: comment\n\ndata: [DONE]\n\n'
    for cut in range(1, len(stream)):
        parser = SSEParser()
        events = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert events == ['{"a": 1}', "[DONE]"], cut


def test_stream_chat_times_each_text_event() -> None:
    """A chunked SSE answer whose chunks cut events in two: one time per event with text (not
    the role chunk), the token count from usage."""
    events = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"reasoning_content": "lo"}}]},
        {"choices": [{"delta": {"content": "!"}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"completion_tokens": 5}},
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    body += b"data: [DONE]\n\n"
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> tuple[int, int]:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            timing = await stream_chat("127.0.0.1", port, {"max_tokens": 9})
        return len(timing.event_s), timing.num_tokens

    assert asyncio.run(main()) == (3, 5)


def test_stream_chat_error_event_raises() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(b'HTTP/1.1 200 OK\r\n\r\ndata: {"error": {"message": "boom"}}\n\n')
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            await stream_chat("127.0.0.1", port, {"max_tokens": 9})

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(main())
