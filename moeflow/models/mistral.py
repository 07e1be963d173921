"""Mistral: Llama with an optional sliding attention window (config `sliding_window`)."""

from __future__ import annotations

from moeflow.config import ModelConfig
from moeflow.models.llama import LlamaAttention, LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_attention(cls, config: ModelConfig) -> LlamaAttention:
        window = config.hf.get("sliding_window")
        return LlamaAttention(
            config, qkv_bias=False, o_bias=False, qk_norm=False, sliding_window=window or None
        )


ENTRY_CLASSES = [MistralForCausalLM]
