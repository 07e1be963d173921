"""Runs one parallel engine in its own process (so a hung group fails its test's timeout
instead of hanging the suite, and each run forms a fresh group), printing what the tests compare
as one JSON line: greedy token ids of PROMPTS and the last-token logits of each prompt.

  python -m tests.helpers.dist_run MODEL_DIR '{"tensor_parallel_size": 2, ...}'"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from moeflow import LLM, SamplingParams
from moeflow.engine.request import Request
from moeflow.engine.scheduler import ScheduledBatch
from moeflow.layers.moe import FusedExperts

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [100, 50, 25, 12, 6, 3, 1, 200, 31, 17, 4]]
NEW_TOKENS = 5


def run(model: str, **kwargs: Any) -> dict[str, Any]:
    """Greedy ids and last-token logits of PROMPTS through an LLM built with `kwargs`."""
    llm = LLM(
        model, dtype="float32", device="cpu", max_model_len=128, kv_cache_tokens=512, **kwargs
    )
    with llm:
        replicas = _record_replicas(llm)
        executor = llm.engine.runner.executor
        nodes = getattr(executor, "rank_nodes", [])  # Ray's node of each rank (Ray only)
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        tokens = [out.token_ids for out in llm.generate(PROMPTS, params)]
        logits = [last_logits(llm, ids).tolist() for ids in PROMPTS]
    net = llm.loaded.model
    return {
        "tokens": tokens,
        "logits": logits,
        "replicas": sorted(replicas),
        "nodes": nodes,
        # what rank 0 holds in ggml blocks: the types of its linears, and its experts' layers
        "kept_types": sorted({int(getattr(m, "qtype", None) or 0) for m in net.modules()} - {0}),
        "block_experts": sum(
            isinstance(m, FusedExperts) and m.quantized is not None for m in net.modules()
        ),
    }


def _record_replicas(llm: LLM) -> set[int]:
    """The data-parallel replicas that rank 0 sends steps to (from now on); {0} in one process."""
    seen = {0}
    executor = llm.engine.runner.executor
    if executor is not None:
        send = executor.send_step

        def recording(fb: Any, replica: int = 0, last: bool = True) -> None:
            seen.add(replica)
            send(fb, replica, last)

        executor.send_step = recording  # type: ignore[method-assign]
    return seen


def last_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """The prompt's last-token logits [V] through the engine's runner (every rank runs it)."""
    engine = llm.engine
    req = Request("logits", list(ids), SamplingParams(), max_tokens=1)
    assert engine.block_manager.allocate_slots(req, len(ids))
    try:
        return engine.runner.run(ScheduledBatch([req], [len(ids)]))[0]
    finally:
        engine.block_manager.free(req)


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], **json.loads(sys.argv[2]))))
