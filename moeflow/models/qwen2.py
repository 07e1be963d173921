"""Qwen2 / Qwen2.5 / QwQ: Llama with a bias on q, k and v (none on o)."""

from __future__ import annotations

from moeflow.config import ModelConfig
from moeflow.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_attention(cls, config: ModelConfig) -> LlamaAttention:
        return LlamaAttention(
            config, qkv_bias=True, o_bias=False, qk_norm=False, sliding_window=None
        )


ENTRY_CLASSES = [Qwen2ForCausalLM]
