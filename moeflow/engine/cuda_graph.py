"""Decode steps replayed from CUDA graphs: one graph per padded batch size, captured at start-up
over static input buffers; each step writes its batch into a pinned host twin of the buffers
(padding rows point at a sink block that no sequence owns), copies it over in two transfers and
replays the graph of the next size up.

The same runner without capture (`capture=False`) runs the padded static batch eagerly: that is
how the padding is tested on machines without a GPU."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from moeflow.context import ForwardBatch, forward_context
from moeflow.engine.flatten import HostBatch, PendingTokens, flatten_into
from moeflow.engine.scheduler import ScheduledBatch
from moeflow.models.base import CausalLM

logger = logging.getLogger("moeflow")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 (as vLLM does), up to and including max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


class DecodeGraphRunner:
    """Static buffers for up to max(batch_sizes) decode rows and, once `capture()` ran, one
    graph per size. Row i of a padded batch of n real rows (i >= n) decodes token 0 at position
    0 into slot 0 of `sink_block`, with a context of one token: it reads and writes nothing a
    real sequence owns."""

    def __init__(
        self,
        model: CausalLM,
        batch_sizes: list[int],
        max_blocks_per_seq: int,
        block_size: int,
        sink_block: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.batch_sizes = sorted(batch_sizes)
        self.max_bs = n = self.batch_sizes[-1]
        self.width = w = max_blocks_per_seq
        self.block_size = block_size
        self.sink_block = sink_block
        self.device = device
        # One int64 buffer, [ids | positions | slots | context lens] x n rows, then the block
        # tables [n, w]; every static input is a contiguous slice of it. Its host twins are
        # pinned so each step is two asynchronous copies. There are two, used in turn: with the
        # overlap schedule, step N+1 is written while step N's copies may still be queued.
        self._buf = torch.zeros(n * (4 + w), dtype=torch.int64, device=device)
        pin = device.type == "cuda"
        self._hosts = [
            torch.zeros(n * (4 + w), dtype=torch.int64, pin_memory=pin) for _ in range(2)
        ]
        self._turn = 0
        self.input_ids, self.positions, self.slot_mapping, self.context_lens = (
            self._buf[i * n : (i + 1) * n] for i in range(4)
        )
        self.block_tables = self._buf[4 * n :].view(n, w)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int64, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=device)
        for host in self._hosts:
            self._fill_padding(host.numpy(), 0, n)
        self._buf.copy_(self._hosts[0])
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_s = 0.0

    def padded_size(self, num_seqs: int) -> int | None:
        """The smallest graph batch size holding `num_seqs` rows, or None when none does."""
        return next((b for b in self.batch_sizes if b >= num_seqs), None)

    def static_batch(self, bs: int) -> ForwardBatch:
        """A decode ForwardBatch of `bs` rows over the static buffers."""
        return ForwardBatch(
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            context_lens=self.context_lens[:bs],
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            logits_indices=self.logits_indices[:bs],
            query_lens_cpu=[1] * bs,
            # Host lengths only feed the reference kernels' slicing; padding rows hold 1 token.
            context_lens_cpu=[1] * bs,
            is_decode=True,
        )

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture one graph per batch size, largest first, sharing one memory pool; returns
        the seconds it took. Every row is a padding row while capturing."""
        start = time.perf_counter()
        pool = None
        for bs in reversed(self.batch_sizes):
            fb = self.static_batch(bs)
            with forward_context(fb):
                for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks its kernels
                    self._forward(fb)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), forward_context(fb):
                logits = self._forward(fb)
            pool = graph.pool()
            self.graphs[bs] = (graph, logits)
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - start
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
            len(self.graphs),
            self.batch_sizes,
            self.capture_s,
        )
        return self.capture_s

    @torch.inference_mode()
    def replay(self, n: int) -> torch.Tensor:
        """Logits [n, V] of the n decode rows `load` wrote, through the graph of the next size
        up (or eagerly over the same padded buffers when nothing was captured)."""
        bs = self.padded_size(n)
        assert bs is not None, f"no graph holds {n} rows"
        if bs in self.graphs:
            graph, logits = self.graphs[bs]
            graph.replay()
        else:
            padded = self.static_batch(bs)
            with forward_context(padded):
                logits = self._forward(padded)
        return logits[:n]

    def load(self, batch: ScheduledBatch) -> PendingTokens:
        """Write the batch's rows (and padding after them) into a host twin, copy it over.
        Returns the rows whose input token is pending (left 0 here)."""
        self._turn ^= 1
        host = self._hosts[self._turn]
        h = host.numpy()
        n, w = self.max_bs, self.width
        rows = len(batch.reqs)
        padded = self.padded_size(rows)
        assert padded is not None and all(k == 1 for k in batch.num_new_tokens), "not a graph batch"
        # One token per row: the first `rows` entries of each field of the twin.
        buf = HostBatch(
            input_ids=h[:rows],
            positions=h[n : n + rows],
            slot_mapping=h[2 * n : 2 * n + rows],
            context_lens=h[3 * n : 3 * n + rows],
            block_tables=h[4 * n : 4 * n + rows * w].reshape(rows, w),
        )
        pending = flatten_into(buf, batch, self.block_size)
        self._fill_padding(h, rows, padded)
        # NOTE: non_blocking from pinned memory; this twin is next written two steps later,
        # after the engine has waited for the sampled ids of the step these copies precede.
        self._buf[: 4 * n].copy_(host[: 4 * n], non_blocking=True)
        used = 4 * n + padded * w
        self._buf[4 * n : used].copy_(host[4 * n : used], non_blocking=True)
        return pending

    def _forward(self, fb: ForwardBatch) -> torch.Tensor:
        hidden = self.model(fb.input_ids, fb.positions)  # [bs, E]
        return self.model.compute_logits(hidden, fb.logits_indices)  # [bs, V]

    def _fill_padding(self, h: np.ndarray, first: int, last: int) -> None:
        """Rows first..last-1 of the host twin `h` become padding rows (see the class
        docstring)."""
        n, w = self.max_bs, self.width
        h[first:last] = 0
        h[n + first : n + last] = 0
        h[2 * n + first : 2 * n + last] = self.sink_block * self.block_size
        h[3 * n + first : 3 * n + last] = 1
        h[4 * n + first * w : 4 * n + last * w] = -1
        h[4 * n + first * w : 4 * n + last * w : w] = self.sink_block
