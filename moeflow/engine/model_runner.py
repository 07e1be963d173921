"""Turns a scheduled batch into a ForwardBatch (flat token ids, positions, cache slots, block
tables), runs the model under forward_context (decode batches through CUDA graphs when they are
captured, engine/cuda_graph.py) and returns the logits of the sequences that sample this step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from moeflow.context import ForwardBatch, forward_context
from moeflow.engine.cuda_graph import DecodeGraphRunner, graph_batch_sizes
from moeflow.engine.scheduler import ScheduledBatch
from moeflow.models.base import CausalLM


@dataclass(slots=True)
class StepProfile:
    """Where the profiled engine steps spent their time: host seconds per phase, and CUDA events
    around each forward (GPU busy time). The engine is synchronous, so a step's GPU idle time is
    its wall time less the forward's GPU time."""

    steps: int = 0
    schedule_s: float = 0.0  # scheduler: which requests run, block allocation
    prepare_s: float = 0.0  # host lists -> device tensors of the ForwardBatch
    forward_s: float = 0.0  # host time launching the forward (on CPU: running it)
    sample_s: float = 0.0  # sampling, the wait for the device included
    postprocess_s: float = 0.0  # appending tokens, stop checks, freeing finished requests
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return (
            self.schedule_s + self.prepare_s + self.forward_s + self.sample_s + self.postprocess_s
        )

    @property
    def host_overhead_s(self) -> float:
        """Host work the device always waits for: scheduling, preparing, post-processing."""
        return self.schedule_s + self.prepare_s + self.postprocess_s

    def gpu_forward_s(self) -> float | None:
        """GPU seconds of the forwards (None on CPU); waits for the last one."""
        if not self.events:
            return None
        self.events[-1][1].synchronize()
        return sum(a.elapsed_time(b) for a, b in self.events) / 1000.0


class ModelRunner:
    def __init__(self, model: CausalLM, block_size: int, device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.graphs: DecodeGraphRunner | None = None
        # Routing statistics count on the host-visible path only: graphs are bypassed meanwhile.
        self.graphs_paused = False
        self.profile: StepProfile | None = None

    def make_graph_runner(
        self, max_num_seqs: int, max_model_len: int, sink_block: int
    ) -> DecodeGraphRunner:
        """Static decode buffers for up to max_num_seqs rows (not captured yet)."""
        self.graphs = DecodeGraphRunner(
            self.model,
            graph_batch_sizes(max_num_seqs),
            -(-max_model_len // self.block_size),
            self.block_size,
            sink_block,
            self.device,
        )
        return self.graphs

    def prepare(self, batch: ScheduledBatch) -> ForwardBatch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        cu_seqlens = [0]
        logits_indices: list[int] = []
        for req, n in zip(batch.reqs, batch.num_new_tokens, strict=True):
            start = req.num_computed_tokens
            end = start + n
            input_ids.extend(req.tokens_slice(start, end))
            positions.extend(range(start, end))
            table = req.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            context_lens.append(end)
            cu_seqlens.append(cu_seqlens[-1] + n)
            if end == req.num_tokens:  # the prompt (or recompute) is done: sample
                logits_indices.append(cu_seqlens[-1] - 1)
        max_blocks = max(len(r.block_table) for r in batch.reqs)
        tables = [r.block_table + [-1] * (max_blocks - len(r.block_table)) for r in batch.reqs]
        dev = self.device

        def t(x: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64).to(dev, non_blocking=True)

        return ForwardBatch(
            input_ids=t(input_ids),
            positions=t(positions),
            slot_mapping=t(slots),
            block_tables=t(tables),
            context_lens=t(context_lens),
            cu_seqlens_q=t(cu_seqlens),
            logits_indices=t(logits_indices),
            query_lens_cpu=list(batch.num_new_tokens),
            context_lens_cpu=context_lens,
            is_decode=all(n == 1 for n in batch.num_new_tokens),
        )

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [S, V] (float32) of the S sequences of `batch` that sample this step, in order."""
        profile = self.profile
        start = time.perf_counter() if profile is not None else 0.0
        graphs = self._graphs_for(batch)
        fb = None
        if graphs is not None:
            graphs.load(batch)
        else:
            fb = self.prepare(batch)
        if profile is None:
            return self._launch(graphs, fb, len(batch.reqs))
        launched = time.perf_counter()
        profile.prepare_s += launched - start
        events = None
        if self.device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        logits = self._launch(graphs, fb, len(batch.reqs))
        if events is not None:
            events[1].record()
            profile.events.append(events)
        profile.forward_s += time.perf_counter() - launched
        return logits

    def _graphs_for(self, batch: ScheduledBatch) -> DecodeGraphRunner | None:
        """The graph runner when it takes this batch: few enough rows, not paused, and every row
        one new token that samples (the graphs compute logits for every row)."""
        graphs = self.graphs
        if (
            graphs is None
            or self.graphs_paused
            or graphs.padded_size(len(batch.reqs)) is None
            or any(n != 1 for n in batch.num_new_tokens)
            or any(r.num_computed_tokens + 1 != r.num_tokens for r in batch.reqs)
        ):
            return None
        return graphs

    def _launch(
        self, graphs: DecodeGraphRunner | None, fb: ForwardBatch | None, n: int
    ) -> torch.Tensor:
        if graphs is not None:
            return graphs.replay(n).float()
        assert fb is not None
        with forward_context(fb):
            hidden = self.model(fb.input_ids, fb.positions)  # [T, E]
        if fb.logits_indices.numel() == 0:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        return self.model.compute_logits(hidden, fb.logits_indices).float()  # [S, V]
