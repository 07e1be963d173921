"""The transports: a gloo pair carries typed messages both ways (JSON header, uint8 payload,
nothing pickled), every wait is bounded (rendezvous, a silent peer, a closed peer), and the
fake drops, delays and corrupts on request. Also the KV of a real engine pair over gloo."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.disagg.connector import KVConnector, parse_addr
from moeflow.disagg.transport import (
    FakeTransport,
    Faults,
    GlooTransport,
    Message,
    TransportError,
    decode_header,
    encode_header,
)
from moeflow.sampling_params import KVTransferParams
from tests.helpers.checkpoints import make_tiny_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_pair(**kwargs: float) -> tuple[GlooTransport, GlooTransport]:
    """Both ranks of a pair in this process (rank 0 on a thread: each blocks for the other)."""
    port = _free_port()
    ends: dict[int, GlooTransport] = {}

    def connect(rank: int) -> None:
        ends[rank] = GlooTransport("127.0.0.1", port, rank, connect_timeout_s=30, **kwargs)

    t = threading.Thread(target=connect, args=(0,))
    t.start()
    connect(1)
    t.join(timeout=30)
    return ends[0], ends[1]


def _recv(end: GlooTransport | FakeTransport, timeout_s: float = 10) -> Message:
    msg = end.recv(timeout_s)
    assert msg is not None, "nothing arrived"
    return msg


def test_gloo_pair_carries_messages_both_ways() -> None:
    a, b = _gloo_pair()
    try:
        payload = torch.randint(0, 256, (100_003,), dtype=torch.uint8)
        a.send(Message({"kind": "kv", "ids": [1, 2, 3], "x": 0.5}, payload))
        a.send(Message({"kind": "note", "text": "é"}))
        b.send(Message({"kind": "reply"}))
        first, second = _recv(b), _recv(b)
        assert first.header == {"kind": "kv", "ids": [1, 2, 3], "x": 0.5}
        assert first.payload is not None and torch.equal(first.payload, payload)
        assert second.header == {"kind": "note", "text": "é"} and second.payload is None
        assert _recv(a).header == {"kind": "reply"}
        time.sleep(1.5)  # heartbeats flow while idle and are never delivered
        assert b.recv(0) is None and b.error is None
    finally:
        a.close()
        b.close()
    # A goodbye ends the peer: its recv raises instead of waiting.
    deadline = time.monotonic() + 10
    while b.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(TransportError, match="closed"):
        b.recv(0.1)
    with pytest.raises(TransportError):
        b.send(Message({"kind": "late"}))


def test_gloo_rendezvous_without_a_peer_times_out() -> None:
    start = time.monotonic()
    with pytest.raises(TransportError, match="rendezvous"):
        GlooTransport("127.0.0.1", _free_port(), 1, connect_timeout_s=1)
    assert time.monotonic() - start < 30


def test_a_silent_peer_is_declared_dead() -> None:
    """No message and no heartbeat for idle_timeout_s: the receiver gives up, bounded."""
    a, b = _gloo_pair(heartbeat_s=60, idle_timeout_s=1)
    deadline = time.monotonic() + 20
    while (a.error is None or b.error is None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.error is not None and b.error is not None
    with pytest.raises(TransportError):
        a.send(Message({"kind": "kv"}))


def test_headers_are_strict_json() -> None:
    with pytest.raises(ValueError):
        encode_header({"kind": "kv", "x": float("nan")})
    for bad in (b"\xff", b"[1]", b'{"x": 1}', b'{"kind": "kv", "x": NaN}', b"{"):
        with pytest.raises(TransportError, match="malformed"):
            decode_header(bad)
    assert decode_header(encode_header({"kind": "kv", "a": [1]})) == {"kind": "kv", "a": [1]}


def test_fake_drops_delays_and_corrupts() -> None:
    faults = Faults(["drop", "corrupt", 0.3])
    a, b = FakeTransport.pair(faults)
    payload = torch.zeros(8, dtype=torch.uint8)
    for i in range(4):
        a.send(Message({"kind": "kv", "i": i}, payload))
    corrupted = _recv(b, 1)
    assert corrupted.header["i"] == 1 and corrupted.payload is not None
    assert int(corrupted.payload.sum()) != 0 and int(payload.sum()) == 0  # a copy was changed
    assert _recv(b, 1).header["i"] == 3  # the delayed one (2) comes after
    assert _recv(b, 2).header["i"] == 2
    assert b.recv(0.05) is None  # 0 was dropped
    a.kill()
    with pytest.raises(TransportError):
        b.recv(0)


def test_parse_addr() -> None:
    assert parse_addr("127.0.0.1:29700") == ("127.0.0.1", 29700)
    assert parse_addr("[::1]:5") == ("::1", 5)
    for bad in ("127.0.0.1", ":80", "h:0", "h:x", "h:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_addr(bad)


def test_engine_pair_over_gloo(tmp_path: Path) -> None:
    """A prompt's KV between two engines over a real gloo pair: the decode side's greedy
    tokens equal a colocated run's, with no prompt token computed there."""
    path = make_tiny_checkpoint("qwen3_moe", tmp_path / "m")

    def llm() -> LLM:
        return LLM(str(path), dtype="float32", device="cpu", max_model_len=128)

    prefill, decode, ref = llm(), llm(), llm()
    a, b = _gloo_pair()
    try:
        prefill.engine.kv_connector = KVConnector(prefill.engine, a, "prefill")
        decode.engine.kv_connector = KVConnector(decode.engine, b, "decode", on_failure="error")
        prompts = [list(range(3, 3 + n)) for n in (5, 16, 37)]
        p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        want = [
            o.outputs[0].token_ids
            for o in ref.generate([{"prompt_token_ids": q} for q in prompts], p)
        ]
        for i, q in enumerate(prompts):
            kt = KVTransferParams(f"g{i}", do_remote_decode=True)
            prefill.engine.add_request(q, dataclasses.replace(p, max_tokens=1, kv_transfer=kt))
        prefill.engine.run_to_completion()
        reqs = [
            decode.engine.add_request(
                q,
                dataclasses.replace(
                    p, kv_transfer=KVTransferParams(f"g{i}", do_remote_prefill=True)
                ),
            )
            for i, q in enumerate(prompts)
        ]
        decode.engine.run_to_completion()
        assert [r.error for r in reqs] == [None] * 3
        assert [r.output_ids for r in reqs] == want
        assert decode.engine.stats.num_computed_tokens == 3 * 5
    finally:
        a.close()
        b.close()
