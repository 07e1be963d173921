"""Data parallelism, replica form (`data_parallel_size` > 1): the model is held whole (or split
over its tensor-parallel ranks) by each of dp replicas, and a request runs on one replica for
its whole life. Rank 0 keeps the one engine (scheduler, block manager, sampler); each step it
splits the batch by replica, sends each replica its piece (engine/executor.py, one typed message
per piece), runs replica 0's piece itself and takes the other pieces' logits back from their
first ranks, then samples them all in the batch's order. The replicas compute their pieces at
the same time, so a step costs about the largest piece, not the whole batch.

Every replica holds a KV cache of the same blocks as rank 0's and writes only the blocks of its
own requests: block ids stay the block manager's, and a request's KV lives on its replica.
NOTE: what this is not (yet): vLLM's attention data parallelism with the experts shared across
the replicas by expert parallelism (each replica holds every expert here), and replicas with
KV pools of their own (the pool's blocks are the engine's, so dp replicas hold as many
sequences as one); prefix caching is off, since a cached block lives on one replica only.

Shape legend: S sampling rows of the batch, V vocabulary."""

from __future__ import annotations

from typing import Protocol

import torch

from moeflow.context import ForwardBatch, forward_context
from moeflow.engine.flatten import flatten_batch
from moeflow.engine.scheduler import ScheduledBatch
from moeflow.models.base import CausalLM


class ReplicaSender(Protocol):
    """The group's side that data parallelism needs (engine/executor.py Executor)."""

    @property
    def dp_size(self) -> int: ...

    def next_replica(self) -> int: ...

    def send_step(self, fb: ForwardBatch, replica: int = 0, last: bool = True) -> None: ...

    def receive_logits(self, replica: int, rows: int) -> torch.Tensor: ...


def run_replicas(
    model: CausalLM,
    batch: ScheduledBatch,
    executor: ReplicaSender,
    block_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Logits [S, V] (float32) of the batch's sampling sequences, in order, each piece run by
    its replica (a request meets its replica here, round-robin, on its first step)."""
    pieces = [ScheduledBatch() for _ in range(executor.dp_size)]
    samples: list[tuple[int, int]] = []  # (replica, row among its piece's sampling rows)
    sampling_rows = [0] * executor.dp_size
    for req, n in zip(batch.reqs, batch.num_new_tokens, strict=True):
        if req.dp_replica is None:
            req.dp_replica = executor.next_replica()
        d = req.dp_replica
        pieces[d].reqs.append(req)
        pieces[d].num_new_tokens.append(n)
        if req.num_computed_tokens + n == req.num_tokens:
            samples.append((d, sampling_rows[d]))
            sampling_rows[d] += 1
    # the other replicas' pieces first, so they compute while rank 0 runs its own
    order = [d for d in (*range(1, executor.dp_size), 0) if pieces[d].reqs]
    own: ForwardBatch | None = None
    for i, d in enumerate(order):
        fb, pending = flatten_batch(pieces[d], block_size, device)
        assert not pending.at, "data parallelism runs without the overlap schedule"
        executor.send_step(fb, d, last=i == len(order) - 1)
        if d == 0:
            own = fb
    logits: dict[int, torch.Tensor] = {}
    if own is not None:
        with forward_context(own):
            hidden = model(own.input_ids, own.positions)  # [T, E]
        if own.logits_indices.numel():
            logits[0] = model.compute_logits(hidden, own.logits_indices).float()  # [S0, V]
    for d in order:
        if d != 0 and sampling_rows[d]:
            logits[d] = executor.receive_logits(d, sampling_rows[d]).to(device)
    if not samples:
        return torch.empty((0, 0), dtype=torch.float32, device=device)
    rows = [logits[d][i] for d, i in samples]
    return torch.stack(rows)  # [S, V]
