"""`moeflow bench --workload json-schema`: the cost of structured output. The same N requests
(default 16) decode together twice, once free and once under a json_schema constraint, and the
total decode tok/s of both runs is printed with their ratio (the target: constrained >= 0.9x
free). Every figure is measured in this run."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from moeflow.engine.llm_engine import LLMEngine
from moeflow.sampling_params import SamplingParams, StructuredOutputsParams

TARGET_RATIO = 0.9
# An object that cannot close before max_tokens (at least 1000 notes), so both runs decode the
# same number of tokens and only the per-step cost differs.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "notes": {
            "type": "array",
            "items": {"type": "string", "maxLength": 40},
            "minItems": 1000,
        }
    },
    "required": ["notes"],
    "additionalProperties": False,
}
ASK = "Write notes about the river, as JSON."


def run_structured(args: argparse.Namespace) -> int:
    """The json-schema workload; 0 on success."""
    from moeflow.api import LLM

    n, decode_tokens = args.concurrency, args.decode_tokens
    if n < 1 or decode_tokens < 1:
        raise ValueError("--concurrency and --decode-tokens must be >= 1")
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        seed=args.seed if args.seed is not None else 0,
        quantize=args.quantize,
    )
    # Each request its own prompt (no shared prefix beyond the template's).
    prompts = [
        llm.encode_chat([{"role": "user", "content": f"Request {i}. {ASK}"}]) for i in range(n)
    ]
    free = SamplingParams(temperature=0.0, max_tokens=decode_tokens + 1, ignore_eos=True)
    constraint = StructuredOutputsParams(json=json.dumps(SCHEMA))
    constrained = SamplingParams(
        temperature=0.0, max_tokens=decode_tokens + 1, structured_outputs=constraint
    )
    llm.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    engine = llm.engine
    free_tok_s = _decode_rate(engine, prompts, free)
    constrained_tok_s = _decode_rate(engine, prompts, constrained)
    ratio = constrained_tok_s / free_tok_s
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    print(f"model: {llm.loaded.path} ({llm.config.dtype}, {llm.config.device})")
    print(f"workload: {n} concurrent requests, {decode_tokens} decode tokens each")
    print(f"free decode:        {free_tok_s:10.1f} tok/s (all requests together)")
    print(f"json_schema decode: {constrained_tok_s:10.1f} tok/s")
    print(f"ratio: {ratio:.3f}x ({verdict} the {TARGET_RATIO}x target)")
    if args.json:
        report = {
            "command": "moeflow bench --workload json-schema",
            "model": llm.loaded.path,
            "settings": {"concurrency": n, "decode_tokens": decode_tokens},
            "free_decode_tok_s": free_tok_s,
            "json_schema_decode_tok_s": constrained_tok_s,
            "ratio": ratio,
            "target_ratio": TARGET_RATIO,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _decode_rate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> float:
    """Total decode tok/s of the prompts decoding together: timing starts once every request
    has its first token and stops when the last one finishes."""
    reqs = [engine.add_request(p, params) for p in prompts]
    while not all(r.output_ids or r.is_finished for r in reqs):
        engine.step()
    done = sum(len(r.output_ids) for r in reqs)
    start = time.perf_counter()
    while not all(r.is_finished for r in reqs):
        engine.step()
    elapsed = time.perf_counter() - start
    decoded = sum(len(r.output_ids) for r in reqs) - done
    if decoded < 1 or elapsed <= 0:
        raise RuntimeError("the requests decoded nothing after their first token")
    return decoded / elapsed
