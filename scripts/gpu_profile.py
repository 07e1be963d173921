"""Where a decode step's GPU time goes: `python scripts/gpu_profile.py [PRESET] [LAYERS] [BATCH]`
builds PRESET (default qwen3-30b-a3b, its first LAYERS layers, default 8) with random weights,
decodes BATCH (default 1) requests and prints torch.profiler's kernel table over 16 steps, eager
and with the captured graphs, beside the wall time of a step. Run by scripts/gpu_check.sh
(stage `profile`); on a CPU it profiles the CPU ops."""

from __future__ import annotations

import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moeflow import LLM, SamplingParams

STEPS = 16


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "qwen3-30b-a3b"
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    rng = random.Random(0)
    for eager in (True, False):
        llm = LLM(
            f"preset:{preset}",
            hf_overrides={"num_hidden_layers": layers},
            device="cuda" if cuda else "cpu",
            max_model_len=512,
            enforce_eager=eager,
        )
        engine = llm.engine
        vocab = llm.loaded.model_config.vocab_size
        params = SamplingParams(temperature=0.0, max_tokens=3 * STEPS + 4, ignore_eos=True)
        reqs = [
            engine.add_request([rng.randrange(vocab) for _ in range(128)], params)
            for _ in range(batch)
        ]
        while not all(r.output_ids for r in reqs):
            engine.step()
        for _ in range(STEPS):  # warm: every kernel compiled, the graphs replayed once
            engine.step()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(STEPS):
                engine.step()
            if cuda:
                torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / STEPS
        mode = "eager" if eager else "graphs"
        print(f"=== {preset}, {layers} layers, batch {batch}, {mode}: {1e3 * wall:.2f} ms/step")
        print(prof.key_averages().table(sort_by=sort, row_limit=22, max_name_column_width=70))
        del llm, engine, reqs
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
