"""Qwen3 dense: Llama with RMSNorm on each head's q and k before RoPE (qk-norm)."""

from __future__ import annotations

from moeflow.config import ModelConfig
from moeflow.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_attention(cls, config: ModelConfig) -> LlamaAttention:
        bias = config.attention_bias
        return LlamaAttention(config, qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=None)


ENTRY_CLASSES = [Qwen3ForCausalLM]
