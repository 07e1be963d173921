"""The KV connector of prefill/decode disaggregation (engine/kv_connector.py's interface), in
two sides:
- worker side (KVWorker): the model's cache tensors, copied block by block into one flat uint8
  payload and back. The layout is whatever the family caches: K and V per layer
  ([N, S, Hkv, D] each), or MLA's compressed latent ([N, S, L + R]); both ends must agree.
- scheduler side (KVConnector): which requests send or wait, the checks a received transfer
  must pass, admission straight into decode, and what a failed transfer becomes.

A prefill instance sends, as a request ends cleanly, one message: its prompt's blocks, their
SHA-256, the request and transfer ids, the prompt's token ids and the first token (with its
logprobs when asked). A decode instance holds the request until that message arrives, checks
everything, allocates blocks, writes them and schedules the request as a decode. A transfer
that fails (lost, late, corrupt, for another prompt or layout, or the link down) is either
recomputed locally or fails the request with an error (`on_failure`): never decoded from
wrong KV."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch

from moeflow.disagg.transport import GlooTransport, Message, Transport, TransportError
from moeflow.engine.kv_cache import cache_tensors
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.request import Request
from moeflow.engine.sampler import TokenLogprobs, skip_draw
from moeflow.errors import EngineDeadError, RequestError
from moeflow.sampling_params import FinishReason, KVTransferParams
from moeflow.utils import cdiv
from moeflow.utils.dtype import dtype_name

logger = logging.getLogger("moeflow")

Role = Literal["prefill", "decode"]
OnFailure = Literal["recompute", "error"]
KV_KIND = "kv"


class TransferUnavailableError(EngineDeadError):
    """The link to the other instance is down: this instance cannot take its part of a
    disaggregated request now (HTTP 503)."""


# ---- worker side --------------------------------------------------------------------------------
class KVWorker:
    """Copies whole blocks of every cache tensor between the cache and one payload. Payload
    layout: tensor by tensor in model order, each its blocks in block-table order."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tensors = cache_tensors(model)  # [N, S, ...] each
        # One block of each tensor: what both ends must agree on.
        self.layout = [
            {"dtype": dtype_name(t.dtype), "shape": list(t.shape[1:])} for t in self.tensors
        ]
        self.block_bytes = [t[0].numel() * t.element_size() for t in self.tensors]

    def payload_bytes(self, num_blocks: int) -> int:
        return num_blocks * sum(self.block_bytes)

    def save(self, block_ids: list[int]) -> torch.Tensor:
        """The blocks' contents as a flat uint8 CPU tensor."""
        if not self.tensors:
            return torch.empty(0, dtype=torch.uint8)
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.tensors[0].device)
        parts = [t.index_select(0, idx).reshape(-1).view(torch.uint8) for t in self.tensors]
        return torch.cat(parts).cpu()  # [num_blocks * sum(block_bytes)]

    def load(self, block_ids: list[int], payload: torch.Tensor) -> None:
        """Write a payload saved by `save` (same layout, checked by the caller) into blocks."""
        n = len(block_ids)
        if not self.tensors:
            return
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.tensors[0].device)
        offset = 0
        for t, nbytes in zip(self.tensors, self.block_bytes, strict=True):
            chunk = payload[offset : offset + n * nbytes].to(t.device)
            t.index_copy_(0, idx, chunk.view(t.dtype).view(n, *t.shape[1:]))  # [n, S, ...]
            offset += n * nbytes


def checksum(payload: torch.Tensor) -> str:
    return hashlib.sha256(payload.numpy().data).hexdigest()


# ---- scheduler side -----------------------------------------------------------------------------
@dataclass(slots=True)
class _Held:
    req: Request
    deadline: float  # time.monotonic() after which the transfer counts as lost


class KVConnector:
    """One instance's side of the pair: a prefill instance sends, a decode instance receives
    (each still serves plain requests colocated). Runs on the engine thread only."""

    def __init__(
        self,
        engine: LLMEngine,
        transport: Transport,
        role: Role,
        wait_timeout_s: float = 30.0,
        on_failure: OnFailure = "recompute",
        max_unclaimed: int = 64,
    ) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"a KV connector's role is prefill or decode, got {role!r}")
        if on_failure not in ("recompute", "error"):
            raise ValueError(f"on_failure is recompute or error, got {on_failure!r}")
        self.engine = engine
        self.transport = transport
        self.role = role
        self.wait_timeout_s = wait_timeout_s
        self.on_failure = on_failure
        self.max_unclaimed = max_unclaimed
        self.worker = KVWorker(engine.runner.model)
        self.block_size = engine.config.block_size
        self.held: dict[str, _Held] = {}  # transfer id -> request waiting for its KV
        # Transfers that arrived before their request (the usual order), oldest first, with
        # their arrival time; bounded in number and age.
        self.unclaimed: OrderedDict[str, tuple[Message, float]] = OrderedDict()
        # sent / send_failed (prefill); admitted / recomputed / failed (decode), and why.
        self.stats: Counter[str] = Counter()

    # ---- the engine's interface (engine/kv_connector.py) --------------------------------------
    def check_request(self, params: KVTransferParams) -> None:
        if params.do_remote_decode and self.role != "prefill":
            raise RequestError(
                "do_remote_decode asks for a prefill instance; this one is --role decode",
                param="kv_transfer_params",
            )
        if params.do_remote_prefill and self.role != "decode":
            raise RequestError(
                "do_remote_prefill asks for a decode instance; this one is --role prefill",
                param="kv_transfer_params",
            )
        if params.do_remote_prefill and params.transfer_id in self.held:
            raise RequestError(
                f"transfer id {params.transfer_id!r} is already waiting", param="kv_transfer_params"
            )
        error = self.transport.error
        if error is not None and (self.role == "prefill" or self.on_failure == "error"):
            raise TransferUnavailableError(f"the KV transfer link is down: {error}")

    def add_receiving(self, req: Request) -> None:
        assert req.params.kv_transfer is not None
        deadline = time.monotonic() + self.wait_timeout_s
        self.held[req.params.kv_transfer.transfer_id] = _Held(req, deadline)

    def has_pending(self) -> bool:
        return bool(self.held)

    def poll(self, wait: bool) -> list[Request]:
        self._drain(0.005 if wait and self.held else 0.0)
        done: list[Request] = []
        now = time.monotonic()
        for transfer_id, held in list(self.held.items()):
            arrived = self.unclaimed.pop(transfer_id, None)
            if arrived is not None:
                del self.held[transfer_id]
                done += self._admit(held.req, arrived[0])
            elif self.transport.error is not None:
                del self.held[transfer_id]
                done += self._fail(held.req, f"the link is down ({self.transport.error})")
            elif now > held.deadline:
                del self.held[transfer_id]
                done += self._fail(held.req, f"nothing arrived within {self.wait_timeout_s:g} s")
        return done

    def request_finished(self, req: Request) -> None:
        params = req.params.kv_transfer
        assert params is not None
        if params.do_remote_prefill:
            held = self.held.get(params.transfer_id)
            if held is not None and held.req is req:  # aborted while waiting
                del self.held[params.transfer_id]
            return
        clean = req.error is None and req.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        num_prompt = len(req.prompt_ids)
        if not clean or not req.output_ids or req.num_computed_tokens < num_prompt:
            self.stats["not_sent"] += 1
            return
        num_blocks = cdiv(num_prompt, self.block_size)
        payload = self.worker.save(req.block_table[:num_blocks])
        header: dict[str, Any] = {
            "kind": KV_KIND,
            "transfer_id": params.transfer_id,
            "request_id": req.request_id,
            "prompt_ids": req.prompt_ids,
            "first_token": req.output_ids[0],
            "block_size": self.block_size,
            "num_blocks": num_blocks,
            "layout": self.worker.layout,
            "checksum": checksum(payload),
        }
        if req.output_logprobs:
            lp = req.output_logprobs[0]
            header["first_logprob"] = [lp.token_id, lp.logprob, [[t, v] for t, v in lp.top.items()]]
        try:
            self.transport.send(Message(header, payload))
            self.stats["sent"] += 1
        except (TransportError, ValueError) as e:
            self.stats["send_failed"] += 1
            logger.error("KV transfer %s not sent: %s", params.transfer_id, e)

    # ---- receiving ------------------------------------------------------------------------------
    def _drain(self, wait_s: float) -> None:
        """Move arrived transfers into `unclaimed`; drop the oldest beyond the caps."""
        while True:
            try:
                msg = self.transport.recv(wait_s)
            except TransportError:
                break  # poll() fails what still waits
            if msg is None:
                break
            wait_s = 0.0
            transfer_id = msg.header.get("transfer_id")
            if msg.kind != KV_KIND or not isinstance(transfer_id, str):
                logger.warning("KV transfer: ignored a message of kind %r", msg.kind)
                continue
            self.unclaimed.pop(transfer_id, None)
            self.unclaimed[transfer_id] = (msg, time.monotonic())
        too_old = time.monotonic() - 2 * self.wait_timeout_s
        while self.unclaimed:
            transfer_id, (_, arrived) = next(iter(self.unclaimed.items()))
            if len(self.unclaimed) <= self.max_unclaimed and arrived >= too_old:
                break
            del self.unclaimed[transfer_id]
            self.stats["unclaimed_dropped"] += 1

    def _admit(self, req: Request, msg: Message) -> list[Request]:
        problem = self._check(req, msg)
        if problem is not None:
            return self._fail(req, problem)
        engine = self.engine
        if not engine.scheduler.admit_computed(req):
            # No room for its blocks now: computed here once room allows, like any request.
            logger.info(
                "KV transfer %s: no room for its blocks, recomputing", msg.header["transfer_id"]
            )
            self.stats["recomputed_no_room"] += 1
            engine.scheduler.add(req)
            return []
        num_blocks = msg.header["num_blocks"]
        assert msg.payload is not None
        self.worker.load(req.block_table[:num_blocks], msg.payload)
        lp = None
        if req.params.logprobs is not None:
            token_id, logprob, top = msg.header["first_logprob"]
            lp = TokenLogprobs(token_id, logprob, dict(top))
        if req.generator is not None:
            skip_draw(req.generator)  # the draw of the first token, made on the prefill side
        self.stats["admitted"] += 1
        engine.accept_token(req, msg.header["first_token"], lp)
        return [req]

    def _check(self, req: Request, msg: Message) -> str | None:
        """Why this transfer cannot be used for `req` (None: it can)."""
        h = msg.header
        num_prompt = len(req.prompt_ids)
        if h.get("prompt_ids") != req.prompt_ids:
            return "it holds another prompt's tokens"
        if h.get("block_size") != self.block_size or h.get("layout") != self.worker.layout:
            return (
                f"its KV layout (block size {h.get('block_size')}, {h.get('layout')}) is not "
                f"this instance's (block size {self.block_size}, {self.worker.layout})"
            )
        num_blocks = cdiv(num_prompt, self.block_size)
        payload = msg.payload
        if (
            h.get("num_blocks") != num_blocks
            or payload is None
            or payload.numel() != self.worker.payload_bytes(num_blocks)
        ):
            return "its payload does not hold the prompt's blocks"
        if h.get("checksum") != checksum(payload):
            return "its checksum does not match (corrupted on the way)"
        first = h.get("first_token")
        if not isinstance(first, int) or not 0 <= first < self.engine.model_config.vocab_size:
            return f"its first token {first!r} is not in the vocabulary"
        if req.params.logprobs is not None and not _valid_logprob(h.get("first_logprob"), first):
            return "the first token's logprobs are missing"
        return None

    def _fail(self, req: Request, reason: str) -> list[Request]:
        assert req.params.kv_transfer is not None
        transfer_id = req.params.kv_transfer.transfer_id
        if self.on_failure == "recompute":
            logger.warning("KV transfer %s failed (%s): recomputing", transfer_id, reason)
            self.stats["recomputed"] += 1
            self.engine.scheduler.add(req)
            return []
        logger.warning("KV transfer %s failed (%s): the request fails", transfer_id, reason)
        self.stats["failed"] += 1
        req.error = f"KV transfer {transfer_id} failed: {reason}"
        self.engine.abort(req.request_id)
        return [req]


def attach_kv_connector(
    engine: LLMEngine,
    role: Role,
    addr: str,
    connect_timeout_s: float = 300.0,
    wait_timeout_s: float = 30.0,
    on_failure: OnFailure = "recompute",
) -> KVConnector:
    """Connect to the other instance over a gloo pair (prefill is rank 0 and listens on
    `addr`, decode connects; both block until the other comes, at most `connect_timeout_s`)
    and give `engine` its connector. One process only: the KV worker copies the blocks of
    rank 0's cache, not those of other tensor-parallel ranks or data-parallel replicas."""
    if engine.runner.executor is not None:
        raise ValueError(
            f"--role {role} needs tensor_parallel_size and data_parallel_size 1: moving the KV "
            "of a parallel engine is not supported yet"
        )
    host, port = parse_addr(addr)
    rank = 0 if role == "prefill" else 1
    # No transfer can hold more than the whole cache: a larger payload is refused unread.
    transport = GlooTransport(
        host, port, rank, connect_timeout_s, max_payload_bytes=engine.kv_cache_bytes
    )
    connector = KVConnector(engine, transport, role, wait_timeout_s, on_failure)
    engine.kv_connector = connector
    return connector


def parse_addr(addr: str) -> tuple[str, int]:
    """HOST:PORT (ValueError naming the flag's format otherwise)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--kv-transfer-addr must be HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


def _valid_logprob(value: Any, token: int) -> bool:
    """[token_id, logprob, [[id, logprob], ...]] for `token`."""
    return (
        isinstance(value, list)
        and len(value) == 3
        and value[0] == token
        and isinstance(value[1], float)
        and isinstance(value[2], list)
        and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) for p in value[2])
        and all(isinstance(p[1], float) for p in value[2])
    )
