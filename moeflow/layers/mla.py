"""DeepSeek's multi-head latent attention with a latent paged cache: per token and layer the
cache holds only [kv_lora_rank + qk_rope_head_dim] values (576 for V3), not 2 x H x head_dim.
Prefill/extend decompresses through kv_b_proj; decode attends in latent space with the absorbed
projections (q_nope through W_UK before, W_UV after). On the CPU, with q (or q_a / q_b) and kv_a
kept quantised, a decode step of up to 16 tokens runs as one compiled op (csrc/mla.h
MlaAttention: the projections, norms, rope, cache write, absorbed attention), which the fused
decode step (kernels/decode_stack.py) also runs, so the two give the same numbers. kv_b_proj is
held in floats (prefill decompresses through it); a GGUF file's quantised halves of it (k_b, v_b)
are also kept as they are, and the compiled decode reads those (a sixth of the float bytes for a
Q4_K_M file) instead of the floats.

Tensor parallelism splits the heads: q / q_b / kv_b projections by column (each rank its heads'
rows), o_proj by row; the latent (kv_a) is computed whole on every rank, so each rank's cache
holds the same latent.

Shape legend: T tokens, E hidden, H heads (this rank's), L kv_lora_rank, R rope dim, Dn nope dim,
Dv v dim."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeflow import env
from moeflow.context import get_forward_batch
from moeflow.distributed.parallel_state import tp_rank_size
from moeflow.errors import ModelFormatError
from moeflow.kernels import cpu_ext
from moeflow.kernels.mla import mla_decode, mla_prefill, store_latent
from moeflow.layers.linear import (
    ColumnParallelLinear,
    Linear,
    RowParallelLinear,
    narrow_shard,
    split_size,
)
from moeflow.layers.norm import RMSNorm
from moeflow.layers.rotary import RotaryEmbedding, yarn_mscale
from moeflow.weights.ggml_quants import QuantizedTensor


class MLAAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        rms_norm_eps: float,
        max_position: int,
        rope_theta: float,
        rope_scaling: dict[str, Any] | None,
        rope_layout: str,
        bias: bool = False,
    ) -> None:
        super().__init__()
        _, tp = tp_rank_size()
        self.num_heads, self.kv_lora_rank = split_size(num_heads, tp, "heads"), kv_lora_rank
        self.nope, self.rope, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj: Linear | None = ColumnParallelLinear(hidden_size, num_heads * qk_head_dim)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = Linear(hidden_size, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(q_lora_rank, num_heads * qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, rms_norm_eps)
        self.kv_b_proj = KVBProj(kv_lora_rank, num_heads, qk_nope_head_dim, v_head_dim)
        self.o_proj = RowParallelLinear(num_heads * v_head_dim, hidden_size, bias=bias)
        self.rotary_emb = RotaryEmbedding(
            qk_rope_head_dim, max_position, rope_theta, rope_scaling, layout=rope_layout
        )
        self.scale = qk_head_dim**-0.5
        if rope_scaling and rope_scaling.get("mscale_all_dim"):
            m = yarn_mscale(float(rope_scaling["factor"]), float(rope_scaling["mscale_all_dim"]))
            self.scale *= m * m
        self.latent_cache = torch.empty(0)  # [N, S, L + R], bound by the engine
        self.force_decompressed = False  # tests: run decode through the prefill path
        self._cpu: tuple[Any, Any] | None = None  # (kernel module, its MlaAttention)

    # ---- cache protocol (engine/kv_cache.py) ----
    def allocate_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> int:
        shape = (num_blocks, block_size, self.kv_lora_rank + self.rope)
        self.latent_cache = torch.zeros(shape, dtype=dtype, device=device)
        return self.latent_cache.numel() * self.latent_cache.element_size()

    def cache_bytes_per_token(self, dtype: torch.dtype) -> int:
        return (self.kv_lora_rank + self.rope) * torch.empty(0, dtype=dtype).element_size()

    def cache_tensors(self) -> list[torch.Tensor]:
        return [self.latent_cache]

    def cpu_layer(self, ops: Any) -> Any | None:
        """The compiled latent attention (`ops.MlaAttention`) of this layer, built once per
        kernel module, or None where it does not run it: q (or q_a / q_b) or kv_a not kept
        quantised, norms, biases or kv_b not float32 on the CPU, shapes it does not take. It
        reads kv_b's quantised halves where the file gave them, else kv_b's float32 weight."""
        if self._cpu is not None and self._cpu[0] is ops:
            return self._cpu[1]
        q = self.q_proj if self.q_proj is not None else self.q_a_proj
        kv_a, kv_b = self.kv_a_proj_with_mqa, self.kv_b_proj
        assert q is not None
        projections = [q, kv_a] + ([self.q_b_proj] if self.q_b_proj is not None else [])
        norms = [self.kv_a_layernorm]
        norms += [self.q_a_layernorm] if self.q_a_layernorm is not None else []
        floats = [n.weight for n in norms] + [kv_b.weight]
        floats += [p.bias for p in (q, kv_a) if p.bias is not None]
        halves = kv_b.quantized_halves()
        if (
            ops is None
            or any(not _parts(p) for p in projections)
            or (halves is None and (kv_b.qtype is not None or kv_b.parts is not None))
            or kv_b.bias is not None
            or any(n.eps != norms[0].eps for n in norms)
            or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in floats)
            or (self.kv_lora_rank + self.rope) % 8
            or self.rope % 2
            or self.rope > 256
            or self.num_heads > 128
        ):
            return None
        bias = None
        if q.bias is not None or kv_a.bias is not None:  # zeros where one has none
            bias = torch.cat(
                [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in (q, kv_a)]
            )
        q_parts, kv_parts = _parts(q), _parts(kv_a)
        q_b_parts = _parts(self.q_b_proj) if self.q_b_proj is not None else []
        layer = ops.MlaAttention(
            q.in_features,
            self.num_heads,
            self.kv_lora_rank,
            self.nope,
            self.rope,
            self.v_dim,
            q.out_features if self.q_b_proj is not None else 0,
            [p.weight for p in q_parts + kv_parts],
            [p.qtype for p in q_parts + kv_parts],
            bias,
            self.q_a_layernorm.weight.detach() if self.q_a_layernorm is not None else None,
            [p.weight for p in q_b_parts],
            [p.qtype for p in q_b_parts],
            self.kv_a_layernorm.weight.detach(),
            kv_b.weight.detach() if halves is None else None,
            halves[0].data.flatten(0, 1) if halves is not None else None,  # [H L, row bytes]
            halves[0].qtype if halves is not None else 0,
            halves[1].data.flatten(0, 1) if halves is not None else None,  # [H Dv, row bytes]
            halves[1].qtype if halves is not None else 0,
            self.kv_a_layernorm.eps,
            self.rotary_emb.layout,
        )
        self._cpu = (ops, layer)
        return layer

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        batch = get_forward_batch()
        cpu = self._cpu_decode(batch.is_decode, hidden)
        if cpu is not None:
            out = cpu.forward(
                hidden.contiguous(),
                positions.contiguous(),
                batch.slot_mapping,
                batch.block_tables,
                batch.context_lens,
                self.latent_cache,
                self.rotary_emb.cos_cache,
                self.rotary_emb.sin_cache,
                self.scale,
                env.MOEFLOW_CPU_INT8,
            )  # [T, H * Dv]
            return self.o_proj(out)
        if self.q_proj is not None:
            q = self.q_proj(hidden)
        else:
            assert self.q_a_proj is not None and self.q_a_layernorm is not None
            assert self.q_b_proj is not None
            q = self.q_b_proj(self.q_a_layernorm.norm(self.q_a_proj(hidden)))
        q = q.view(-1, self.num_heads, self.nope + self.rope)  # [T, H, Dn + R]
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        ckv = self.kv_a_proj_with_mqa(hidden)  # [T, L + R]
        c, k_rope = ckv.split([self.kv_lora_rank, self.rope], dim=-1)
        c = self.kv_a_layernorm.norm(c)
        q_rope, k_rope = self.rotary_emb(positions, q_rope, k_rope.unsqueeze(1))
        store_latent(
            torch.cat((c, k_rope.squeeze(1)), dim=-1), self.latent_cache, batch.slot_mapping
        )
        w_kv_b = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, -1)
        # NOTE: a mixed batch (decodes beside prefill chunks) takes the decompressed path for
        # every sequence; only all-decode batches attend in latent space.
        if batch.is_decode and not self.force_decompressed:
            w_uk, w_uv = w_kv_b[:, : self.nope], w_kv_b[:, self.nope :]  # [H, Dn, L], [H, Dv, L]
            q_latent = torch.einsum("thn,hnl->thl", q_nope, w_uk)  # [T, H, L]
            o_latent = mla_decode(
                q_latent,
                q_rope,
                self.latent_cache,
                batch.block_tables,
                batch.context_lens,
                self.scale,
            )  # [T, H, L]
            out = torch.einsum("thl,hvl->thv", o_latent, w_uv)  # [T, H, Dv]
        else:
            out = mla_prefill(
                q_nope,
                q_rope,
                self.latent_cache,
                batch.block_tables,
                batch.query_lens_cpu,
                batch.context_lens_cpu,
                w_kv_b,
                self.scale,
                cu_seqlens_q=batch.cu_seqlens_q,
                context_lens_gpu=batch.context_lens,
            )  # [T, H, Dv]
        return self.o_proj(out.flatten(1))

    def _cpu_decode(self, is_decode: bool, hidden: torch.Tensor) -> Any | None:
        """The compiled op where it runs this step: an all-decode batch of at most 16 float32
        tokens on the CPU (the quantised GEMV's rows), a float32 latent cache."""
        if (
            not is_decode
            or self.force_decompressed
            or hidden.device.type != "cpu"
            or hidden.dtype != torch.float32
            or hidden.shape[0] > 16
            or self.latent_cache.dtype != torch.float32
            or self.latent_cache.dim() != 3
        ):
            return None
        return self.cpu_layer(cpu_ext.ops())


class KVBProj(ColumnParallelLinear):
    """kv_b_proj [H (Dn + Dv), L] in floats (never blocks: prefill decompresses through it and
    the torch decode absorbs it), filled whole (HF folders, older GGUF files) or from llama.cpp's
    per-head halves, the shards "k_b" [H, L, Dn] (W_UK transposed per head) and "v_b" [H, Dv, L]
    (W_UV), which newer GGUF files hold instead (convert_hf_to_gguf.py, DeepseekV2Model). Halves
    that come quantised are also kept as they are (views of the mapped file, this rank's heads):
    the compiled CPU decode reads them in place of the floats."""

    keep_quantized = False  # the float weight is read as such

    def __init__(self, kv_lora_rank: int, num_heads: int, nope: int, v_dim: int) -> None:
        super().__init__(kv_lora_rank, num_heads * (nope + v_dim))
        self.nope, self.v_dim = nope, v_dim
        self.num_heads = self.out_features // (nope + v_dim)  # this rank's
        self.halves: dict[str, QuantizedTensor] = {}

    def expected_shards(self, param_name: str) -> list[str]:
        return ["k_b", "v_b"] if param_name == "weight" else []

    def load(
        self, param_name: str, tensor: torch.Tensor | QuantizedTensor, shard: str | None = None
    ) -> None:
        if shard is None:  # kv_b whole
            self.halves.clear()
            super().load(param_name, tensor, shard)
            return
        h, n, v, rank = self.num_heads, self.nope, self.v_dim, self.in_features
        expected = {"k_b": (h * self.tp_size, rank, n), "v_b": (h * self.tp_size, v, rank)}
        if param_name != "weight" or shard not in expected:
            raise ModelFormatError(f"kv_b_proj has no shard {param_name}[{shard}]")
        if tuple(tensor.shape) != expected[shard]:
            raise ModelFormatError(
                f"attn_{shard} has shape {tuple(tensor.shape)}, expected {expected[shard]} "
                "(heads, then kv_lora_rank x nope for k_b, v x kv_lora_rank for v_b)"
            )
        tensor = narrow_shard(tensor, 0, self.tp_rank, self.tp_size)  # this rank's heads
        if isinstance(tensor, QuantizedTensor):
            self.halves[shard] = tensor
        else:
            self.halves.pop(shard, None)
        if self.weight.is_meta:  # the memory plan's dry run: shapes only (torch's meta ops for
            return  # the dequantisation below would import torch._dynamo, seconds)
        floats = (
            tensor.dequantize(self.weight.dtype) if isinstance(tensor, QuantizedTensor) else tensor
        )
        w = self.weight.data.view(h, n + v, rank)
        with torch.no_grad():
            if shard == "k_b":
                w[:, :n].copy_(floats.transpose(1, 2))
            else:
                w[:, n:].copy_(floats)

    def quantized_halves(self) -> tuple[QuantizedTensor, QuantizedTensor] | None:
        """(k_b, v_b) as kept quantised, where both came so and the CPU reads them."""
        k_b, v_b = self.halves.get("k_b"), self.halves.get("v_b")
        if k_b is None or v_b is None or k_b.data.device.type != "cpu":
            return None
        return k_b, v_b


def _parts(linear: Linear) -> list[Linear]:
    """A Linear's quantised weight as its parts (one, unless its shards mix ggml types); none
    for a float weight."""
    if linear.qtype is not None:
        return [linear]
    parts = [p for p in linear.parts or [] if isinstance(p, Linear) and p.qtype is not None]
    return parts if linear.parts is not None and len(parts) == len(linear.parts) else []
