"""DeepSeek's multi-head latent attention with a latent paged cache: per token and layer the
cache holds only [kv_lora_rank + qk_rope_head_dim] values (576 for V3), not 2 x H x head_dim.
Prefill/extend decompresses through kv_b_proj; decode attends in latent space with the absorbed
projections (q_nope through W_UK before, W_UV after).

Tensor parallelism splits the heads: q / q_b / kv_b projections by column (each rank its heads'
rows), o_proj by row; the latent (kv_a) is computed whole on every rank, so each rank's cache
holds the same latent.

Shape legend: T tokens, E hidden, H heads (this rank's), L kv_lora_rank, R rope dim, Dn nope dim,
Dv v dim."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeflow.context import get_forward_batch
from moeflow.distributed.parallel_state import tp_rank_size
from moeflow.kernels.mla import mla_decode, mla_prefill, store_latent
from moeflow.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear, split_size
from moeflow.layers.norm import RMSNorm
from moeflow.layers.rotary import RotaryEmbedding, yarn_mscale


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
        self.kv_b_proj = ColumnParallelLinear(
            kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim)
        )
        self.kv_b_proj.keep_quantized = False  # decode absorbs its float weight (W_UK, W_UV)
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

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
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
        batch = get_forward_batch()
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
