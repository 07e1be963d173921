"""Runs a scheduled batch: flattens it (engine/flatten.py), fills its pending input tokens on the
device, runs the model under forward_context and returns the logits of the sequences that sample
this step (data-parallel replicas each run their requests' piece: engine/data_parallel.py).
Decode steps replay CUDA graphs when captured (engine/cuda_graph.py), or on the CPU take the
fused decode step where the model fits it (kernels/decode_stack.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moeflow.context import ForwardBatch, forward_context
from moeflow.engine.cuda_graph import DecodeGraphRunner, graph_batch_sizes
from moeflow.engine.data_parallel import ReplicaSender, run_replicas
from moeflow.engine.flatten import flatten_batch
from moeflow.engine.profile import StepProfile, timed
from moeflow.engine.scheduler import ScheduledBatch
from moeflow.kernels.decode_stack import CpuDecodeStack
from moeflow.models.base import CausalLM
from moeflow.utils import cdiv
from moeflow.utils.device import to_device


@dataclass(slots=True)
class TokenCarry:
    """The previous step's sampled ids, still on the device, for the rows of this step whose
    input token is pending (overlap schedule): `row_of` maps a request id to its row there."""

    token_ids: torch.Tensor  # [S] long
    row_of: dict[str, int]


class StepSender(ReplicaSender, Protocol):
    """The other ranks of a parallel group (engine/executor.py Executor)."""

    def check_alive(self) -> None:
        """Raise EngineDeadError when a rank is gone."""
        ...


class ModelRunner:
    def __init__(self, model: CausalLM, block_size: int, device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.graphs: DecodeGraphRunner | None = None
        # Routing statistics count on the host-visible path only: graphs are bypassed meanwhile.
        self.graphs_paused = False
        # The fused CPU decode step (kernels/decode_stack.py), tried on every eager step.
        self.decode_stack = CpuDecodeStack(model.decoder_parts())
        # Parallel ranks (engine/executor.py): each eager step's batch is sent to them first.
        self.executor: StepSender | None = None

    def make_graph_runner(
        self, max_num_seqs: int, max_model_len: int, sink_block: int
    ) -> DecodeGraphRunner:
        """Static decode buffers for up to max_num_seqs rows (not captured yet)."""
        self.graphs = DecodeGraphRunner(
            self.model,
            graph_batch_sizes(max_num_seqs),
            cdiv(max_model_len, self.block_size),
            self.block_size,
            sink_block,
            self.device,
        )
        return self.graphs

    @torch.inference_mode()
    def run(
        self,
        batch: ScheduledBatch,
        carry: TokenCarry | None = None,
        profile: StepProfile | None = None,
    ) -> torch.Tensor:
        """Logits [S, V] (float32) of the S sequences of `batch` that sample this step, in order.
        Rows whose input token is pending take it from `carry` on the device."""
        if self.executor is not None and self.executor.dp_size > 1:
            with timed(profile, "forward_s"):
                return run_replicas(self.model, batch, self.executor, self.block_size, self.device)
        with timed(profile, "prepare_s"):
            graphs = self._graphs_for(batch)
            fb = None
            if graphs is not None:
                pending = graphs.load(batch)
                input_ids = graphs.input_ids
            else:
                fb, pending = flatten_batch(batch, self.block_size, self.device)
                input_ids = fb.input_ids
            if pending.at:
                assert carry is not None, "a pending input token without the step that sampled it"
                src = [carry.row_of[r] for r in pending.request_ids]
                dst_t = to_device(pending.at, torch.int64, self.device)
                src_t = to_device(src, torch.int64, self.device)
                input_ids.index_copy_(0, dst_t, carry.token_ids.index_select(0, src_t))
        with timed(profile, "forward_s"):
            return self._launch(graphs, fb, len(batch.reqs))

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
        if self.executor is not None:
            self.executor.send_step(fb)
        with forward_context(fb):
            if self.executor is None and self.decode_stack.fits(fb):
                hidden = self.decode_stack.forward(fb)  # [T, E]
            else:
                hidden = self.model(fb.input_ids, fb.positions)  # [T, E]
        if fb.logits_indices.numel() == 0:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        return self.model.compute_logits(hidden, fb.logits_indices).float()  # [S, V]
