"""Typed messages between a prefill and a decode instance, and the transports that carry them:
a torch.distributed gloo pair (two processes, rendezvous over TCP on loopback) and an in-process
fake that can drop, delay and corrupt. A message is a JSON header and at most one uint8 payload
tensor; nothing is ever pickled. Every wait is bounded: a peer that stops talking (no message,
not even a heartbeat, for `idle_timeout_s`) is declared dead.

Wire format of one message on the gloo pair (three tensors, in order):
    prefix   int64 [2]        MAGIC, header length in bytes
    header   uint8 [H]        UTF-8 JSON object: "kind", the kind's fields, "payload_bytes"
    payload  uint8 [P]        only when payload_bytes > 0
"""

from __future__ import annotations

import abc
import datetime
import json
import logging
import queue
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from moeflow.errors import MoeflowError

logger = logging.getLogger("moeflow")

MAGIC = 0x6D66_6B76  # "mfkv"
MAX_HEADER_BYTES = 16 * 2**20  # a prompt's token ids and the layout: far below this
# NOTE: torch's stubs lack ProcessGroupGloo's send/recv and _Options: reached untyped.
_dist: Any = torch.distributed
HEARTBEAT = "heartbeat"
BYE = "bye"


class TransportError(MoeflowError):
    """The transport cannot carry messages (the peer is gone, hung or broke the protocol)."""


@dataclass(slots=True)
class Message:
    """One message: `header` is a JSON object (its "kind" says what it is); `payload` a flat
    uint8 CPU tensor or None."""

    header: dict[str, Any]
    payload: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return str(self.header.get("kind", ""))


class Transport(abc.ABC):
    """A bidirectional pipe of Messages to one peer. `send` never blocks on the peer (messages
    are queued); `recv` waits at most `timeout_s`. Once dead, both raise TransportError."""

    @abc.abstractmethod
    def send(self, msg: Message) -> None: ...

    @abc.abstractmethod
    def recv(self, timeout_s: float) -> Message | None:
        """The next message, or None when none came within `timeout_s`."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def error(self) -> str | None:
        """Why the transport died; None while it works."""


def encode_header(header: dict[str, Any]) -> bytes:
    """Strict JSON (no NaN), UTF-8."""
    return json.dumps(header, allow_nan=False, separators=(",", ":")).encode()


def decode_header(data: bytes) -> dict[str, Any]:
    """The header object, or TransportError when it is not strict JSON of an object."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        obj = json.loads(data.decode(), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError) as e:
        raise TransportError(f"malformed message header: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        raise TransportError("malformed message header: not an object with a kind")
    return obj


# ---- the gloo pair ------------------------------------------------------------------------------
class GlooTransport(Transport):
    """Two processes, rank 0 and rank 1, over a private gloo process group (not the default
    group: a process may also run torch.distributed for its own parallelism). Rank 0 listens
    on `host:port` for the rendezvous (a TCPStore on a socket bound to that address, loopback
    by default); both bind gloo's own sockets to `host`. One sender thread drains the outbox
    (sending a heartbeat when idle); one receiver thread fills the inbox."""

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        connect_timeout_s: float = 300.0,
        op_timeout_s: float = 30.0,
        heartbeat_s: float = 1.0,
        idle_timeout_s: float = 30.0,
        max_payload_bytes: int = 2**40,
    ) -> None:
        if rank not in (0, 1):
            raise ValueError(f"a gloo pair has ranks 0 and 1, got {rank}")
        self.rank, self.peer = rank, 1 - rank
        self.op_timeout = datetime.timedelta(seconds=op_timeout_s)
        self.idle_timeout = datetime.timedelta(seconds=idle_timeout_s)
        self.heartbeat_s = heartbeat_s
        self.max_payload_bytes = max_payload_bytes
        self._listen: socket.socket | None = None
        store_kwargs: dict[str, Any] = {}
        if rank == 0:
            # The store's server listens on our socket: bound to `host`, not every interface.
            self._listen = socket.create_server((host, port), reuse_port=False)
            store_kwargs["master_listen_fd"] = self._listen.fileno()
        timeout = datetime.timedelta(seconds=connect_timeout_s)
        try:
            self._store = _dist.TCPStore(host, port, 2, rank == 0, timeout=timeout, **store_kwargs)
            opts = _dist.ProcessGroupGloo._Options()
            opts._devices = [_dist.ProcessGroupGloo.create_device(hostname=host)]
            opts._timeout = self.op_timeout
            self._pg: Any = _dist.ProcessGroupGloo(self._store, rank, 2, opts)
        except (RuntimeError, OSError) as e:  # the peer never came, or the port is taken
            if self._listen is not None:
                self._listen.close()
            raise TransportError(
                f"KV transfer rendezvous on {host}:{port} as rank {rank} failed "
                f"(waited up to {connect_timeout_s:g} s): {e}"
            ) from None
        self._outbox: queue.SimpleQueue[_Encoded | None] = queue.SimpleQueue()
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._error: str | None = None
        self._closing = False
        self._sender = threading.Thread(target=self._send_loop, name="moeflow-kv-send", daemon=True)
        self._receiver = threading.Thread(
            target=self._recv_loop, name="moeflow-kv-recv", daemon=True
        )
        self._sender.start()
        self._receiver.start()

    @property
    def error(self) -> str | None:
        return self._error

    def send(self, msg: Message) -> None:
        if self._error is not None:
            raise TransportError(f"the KV transfer peer is gone: {self._error}")
        self._outbox.put(_encode(msg))

    def recv(self, timeout_s: float) -> Message | None:
        try:
            return self._inbox.get(timeout=timeout_s) if timeout_s > 0 else self._inbox.get_nowait()
        except queue.Empty:
            if self._error is not None:
                raise TransportError(f"the KV transfer peer is gone: {self._error}") from None
            return None

    def close(self) -> None:
        """Say goodbye and wait (bounded) for the peer's answer, so that both receivers end
        before their processes do."""
        if self._closing:
            return
        self._closing = True
        if self._error is None:
            self._outbox.put(_encode(Message({"kind": BYE})))
        self._outbox.put(None)
        wait_s = min(self.op_timeout.total_seconds(), 5.0)
        self._sender.join(timeout=wait_s)
        self._receiver.join(timeout=wait_s)
        if self._listen is not None:
            self._listen.close()

    # ---- threads -------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        try:
            while True:
                try:
                    item = self._outbox.get(timeout=self.heartbeat_s)
                except queue.Empty:
                    item = _encode(Message({"kind": HEARTBEAT}))
                if item is None:
                    return
                for t in item.parts:
                    self._pg.send([t], self.peer, 0).wait(self.op_timeout)
                if item.kind == BYE:
                    return
        except Exception as e:  # noqa: BLE001 - any failure of the pair ends the transport
            self._die(f"send failed: {e}")

    def _recv_loop(self) -> None:
        try:
            while True:
                prefix = torch.empty(2, dtype=torch.int64)
                # Heartbeats arrive every heartbeat_s: silence this long means a hung peer.
                self._pg.recv([prefix], self.peer, 0).wait(self.idle_timeout)
                magic, header_len = prefix.tolist()
                if magic != MAGIC or not 0 < header_len <= MAX_HEADER_BYTES:
                    raise TransportError(f"bad message prefix {magic:#x}, {header_len}")
                body = torch.empty(header_len, dtype=torch.uint8)
                self._pg.recv([body], self.peer, 0).wait(self.op_timeout)
                header = decode_header(body.numpy().tobytes())
                size = header.pop("payload_bytes", 0)
                if not isinstance(size, int) or not 0 <= size <= self.max_payload_bytes:
                    raise TransportError(f"bad payload size {size!r}")
                payload = None
                if size:
                    payload = torch.empty(size, dtype=torch.uint8)
                    self._pg.recv([payload], self.peer, 0).wait(self.op_timeout)
                msg = Message(header, payload)
                if msg.kind == BYE:
                    if not self._closing:  # answer, so that the peer's receiver ends too
                        self._outbox.put(_encode(Message({"kind": BYE})))
                    self._die("the peer closed the transport", logging.INFO)
                    return
                if msg.kind != HEARTBEAT:
                    self._inbox.put(msg)
        except Exception as e:  # noqa: BLE001 - any failure of the pair ends the transport
            self._die(f"receive failed: {e}")

    def _die(self, reason: str, level: int = logging.ERROR) -> None:
        if self._error is None:
            self._error = reason
            if not self._closing:
                logger.log(level, "KV transfer transport ended: %s", reason)
        self._outbox.put(None)  # stop the sender too


@dataclass(slots=True)
class _Encoded:
    kind: str
    parts: list[torch.Tensor]  # prefix, header and maybe payload, as sent


def _encode(msg: Message) -> _Encoded:
    """The wire tensors of `msg` (ValueError for a header that is not JSON)."""
    payload = msg.payload
    size = 0 if payload is None else payload.numel()
    header = encode_header({**msg.header, "payload_bytes": size})
    prefix = torch.tensor([MAGIC, len(header)], dtype=torch.int64)  # [2]
    body = torch.frombuffer(bytearray(header), dtype=torch.uint8)  # [H]
    parts = [prefix, body]
    if payload is not None and size:
        parts.append(payload.contiguous())  # [P]
    return _Encoded(msg.kind, parts)


# ---- the fake ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Faults:
    """What the fake does to the next messages it sends (each entry is used once, in order):
    "drop" loses one, "corrupt" flips a byte of its payload (or of a token id when it has
    none), a number delays one by that many seconds. `kill()` makes both ends dead."""

    plan: list[str | float] = field(default_factory=list)

    def next(self) -> str | float | None:
        return self.plan.pop(0) if self.plan else None


class FakeTransport(Transport):
    """One end of an in-process pair (`FakeTransport.pair()`). Headers go through the same
    JSON encoding as the wire, payloads are copied, so what arrives is what a peer would see."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.peer: FakeTransport | None = None
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._error: str | None = None
        self._timers: list[threading.Timer] = []

    @classmethod
    def pair(cls, faults: Faults | None = None) -> tuple[FakeTransport, FakeTransport]:
        """Two connected ends; `faults` applies to messages sent by the first."""
        a, b = cls(faults or Faults()), cls(Faults())
        a.peer, b.peer = b, a
        return a, b

    @property
    def error(self) -> str | None:
        return self._error

    def kill(self, reason: str = "killed by the test") -> None:
        for end in (self, self.peer):
            if end is not None and end._error is None:
                end._error = reason

    def send(self, msg: Message) -> None:
        if self._error is not None:
            raise TransportError(f"the KV transfer peer is gone: {self._error}")
        assert self.peer is not None
        header = decode_header(encode_header(msg.header))
        payload = None if msg.payload is None else msg.payload.clone()
        fault = self.faults.next()
        if fault == "drop":
            return
        if fault == "corrupt":
            if payload is not None and payload.numel():
                payload[payload.numel() // 2] ^= 0x40
            elif header.get("prompt_ids"):
                header["prompt_ids"][0] += 1
        deliver = self.peer._inbox.put
        if isinstance(fault, (int, float)) and fault > 0:
            timer = threading.Timer(float(fault), deliver, args=(Message(header, payload),))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
            return
        deliver(Message(header, payload))

    def recv(self, timeout_s: float) -> Message | None:
        if self._error is not None:
            raise TransportError(f"the KV transfer peer is gone: {self._error}")
        try:
            return self._inbox.get(timeout=timeout_s) if timeout_s > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
