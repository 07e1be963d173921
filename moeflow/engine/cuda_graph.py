"""Decode steps replayed from CUDA graphs: one graph per padded batch size, captured at start-up
over static input buffers; each step copies its batch into the buffers (padding rows point at a
sink block that no sequence owns) and replays the graph of the next size up.

The same runner without capture (`capture=False`) runs the padded static batch eagerly: that is
how the padding is tested on machines without a GPU."""

from __future__ import annotations

import logging
import time

import torch

from moeflow.context import ForwardBatch, forward_context
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
        self.max_bs = self.batch_sizes[-1]
        self.block_size = block_size
        self.sink_block = sink_block
        self.device = device
        n, w = self.max_bs, max_blocks_per_seq

        def buf(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        self.input_ids = buf(n)
        self.positions = buf(n)
        self.slot_mapping = buf(n)
        self.block_tables = buf(n, w)
        self.context_lens = buf(n)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int64, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=device)
        self._fill_padding(0)
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
    def run(self, fb: ForwardBatch) -> torch.Tensor:
        """Logits [B, V] of a decode batch of B <= max_bs rows, through the graph of the next
        size up (or eagerly over the same padded buffers when nothing was captured)."""
        n = fb.num_seqs
        bs = self.padded_size(n)
        assert fb.is_decode and bs is not None, "not a decode batch the graphs cover"
        self.input_ids[:n].copy_(fb.input_ids)
        self.positions[:n].copy_(fb.positions)
        self.slot_mapping[:n].copy_(fb.slot_mapping)
        self.context_lens[:n].copy_(fb.context_lens)
        width = fb.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(fb.block_tables)
        self.block_tables[:n, width:].fill_(-1)
        self._fill_padding(n)
        if bs in self.graphs:
            graph, logits = self.graphs[bs]
            graph.replay()
        else:
            padded = self.static_batch(bs)
            with forward_context(padded):
                logits = self._forward(padded)
        return logits[:n]

    def _forward(self, fb: ForwardBatch) -> torch.Tensor:
        hidden = self.model(fb.input_ids, fb.positions)  # [bs, E]
        return self.model.compute_logits(hidden, fb.logits_indices)  # [bs, V]

    def _fill_padding(self, first: int) -> None:
        """Rows first.. of the buffers become padding rows (see the class docstring)."""
        self.input_ids[first:].zero_()
        self.positions[first:].zero_()
        self.slot_mapping[first:].fill_(self.sink_block * self.block_size)
        self.context_lens[first:].fill_(1)
        self.block_tables[first:].fill_(-1)
        self.block_tables[first:, 0].fill_(self.sink_block)
