"""Real weights through the MoE path: SmolLM2 rebuilt as a Mixtral whose 4 experts (top-2,
renormalised) are identical copies of each layer's dense MLP, with a random router. Whatever the
router picks, the output must be the dense model's, token for token. Routing statistics count
every token of every MoE layer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.config import EngineArgs, ModelConfig
from moeflow.engine.factory import build_engine
from moeflow.loading.loader import LoadedModel
from moeflow.models.mixtral import MixtralForCausalLM
from moeflow.weights import gguf, gguf_hf

NUM_EXPERTS = 4


def _as_mixtral(
    weights: Iterator[tuple[str, torch.Tensor]], hidden: int
) -> Iterator[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    for name, t in weights:
        if ".mlp." not in name:
            yield name, t
            continue
        prefix, _, proj = name.partition(".mlp.")
        proj = proj.removesuffix(".weight")
        w = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
        for e in range(NUM_EXPERTS):
            yield f"{prefix}.block_sparse_moe.experts.{e}.{w}.weight", t
        if proj == "gate_proj":
            router = torch.randn(NUM_EXPERTS, hidden, generator=g)
            yield f"{prefix}.block_sparse_moe.gate.weight", router


@pytest.mark.slow
def test_identical_experts_give_the_dense_output(smollm2_gguf: str) -> None:
    dense = LLM(smollm2_gguf, dtype="float32", device="cpu", max_model_len=512)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = [
        dense.encode_chat(messages),
        dense.tokenizer.encode("Once upon a time", add_special_tokens=True),
    ]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    expected = [o.token_ids for o in dense.generate(prompts, params)]

    with gguf.GGUFReader(smollm2_gguf) as reader:
        hf = gguf_hf.gguf_to_hf_config(reader)
        hf.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=2,
        )
        config = ModelConfig.from_hf(hf)
        model = MixtralForCausalLM(config).eval()
        model.load_weights(_as_mixtral(gguf_hf.iter_hf_weights(reader, torch.float32), 576))
    loaded = LoadedModel(
        model, config, dense.tokenizer, "smollm2-as-mixtral", "cpu", torch.float32, 0
    )
    engine = build_engine(EngineArgs(max_model_len=512, kv_cache_tokens=4096), loaded)
    engine.enable_routing_stats()
    reqs = [engine.add_request(p, params) for p in prompts]
    engine.run_to_completion()
    assert [r.output_ids for r in reqs] == expected

    stats = engine.routing_stats()
    assert len(stats) == 30 and all(len(layer) == NUM_EXPERTS for layer in stats)
    # Every token that went through the model picked top-2 experts in every layer.
    computed = engine.stats.num_computed_tokens
    assert all(sum(layer) == 2 * computed for layer in stats)
    assert sum(1 for c in stats[0] if c > 0) >= 2  # the random router spreads tokens
    engine.reset_routing_stats()
    assert all(sum(layer) == 0 for layer in engine.routing_stats())
