"""Peers timed in the same process as moeflow (llama-cpp-python, HF transformers), each on the
same prompt ids and thread count. A missing peer is a one-line skip note, never an error."""

from __future__ import annotations

import gc
import importlib.util
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

PEERS = ("llama-cpp", "hf")
# Peer name -> the modules it needs.
_REQUIRES = {"llama-cpp": ("llama_cpp",), "hf": ("transformers",)}
# The peers and the plot are the `bench` extra of pyproject.toml, not moeflow's dependencies.
BENCH_EXTRA = "pip install 'moeflow[bench]'"


@dataclass(slots=True)
class BenchResult:
    """One engine's figures; None where not measured (a skipped or failed peer says why)."""

    name: str
    load_s: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    note: str = ""
    # total decode tok/s of `concurrent` streams decoding together (moeflow only)
    concurrent_decode_tok_s: float | None = None
    concurrent: int = 0

    @property
    def ms_per_token(self) -> float | None:
        return 1000.0 / self.decode_tok_s if self.decode_tok_s else None

    @property
    def is_measured(self) -> bool:
        return self.decode_tok_s is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "load_s": self.load_s,
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "ms_per_token": self.ms_per_token,
            "concurrent": self.concurrent,
            "concurrent_decode_tok_s": self.concurrent_decode_tok_s,
            "note": self.note,
        }


def require_bench_extra(what: str, modules: tuple[str, ...]) -> None:
    """Fail before any work when `what` needs modules of the `bench` extra that are absent."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"{what} needs {', '.join(missing)}, not installed (the `bench` extra): {BENCH_EXTRA}"
        )


def require_peer(peer: str) -> None:
    """A peer named on the command line must be installed (auto skips a missing one)."""
    require_bench_extra(f"--compare {peer}", _REQUIRES[peer])


def skip_reason(peer: str, model_path: str) -> str | None:
    """Why `peer` cannot run on this model here; None when it can."""
    for module in _REQUIRES[peer]:
        if importlib.util.find_spec(module) is None:
            return f"not installed ({module}; {BENCH_EXTRA})"
    is_gguf = os.path.isfile(model_path) and model_path.endswith(".gguf")
    if peer == "llama-cpp" and not is_gguf:
        return "needs a GGUF model"
    if peer == "hf" and is_gguf and importlib.util.find_spec("gguf") is None:
        return "not installed (gguf, needed by transformers to read a GGUF file)"
    return None


def run_peer(
    peer: str,
    model_path: str,
    prompt_ids: list[int],
    warm_ids: list[int],
    decode_tokens: int,
    threads: int,
) -> BenchResult:
    """Time one peer; its model is freed before this returns. HF runs in float32 (its usual CPU
    dtype); llama-cpp runs the GGUF's own quantised weights."""
    if peer == "llama-cpp":
        result = _run_llama_cpp(model_path, prompt_ids, warm_ids, decode_tokens, threads)
    elif peer == "hf":
        result = _run_hf(model_path, prompt_ids, warm_ids, decode_tokens, torch.float32)
    else:
        raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    gc.collect()
    return result


def _run_llama_cpp(
    model_path: str,
    prompt_ids: list[int],
    warm_ids: list[int],
    decode_tokens: int,
    threads: int,
) -> BenchResult:
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=model_path,
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=len(prompt_ids) + decode_tokens + 16,
        n_batch=512,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    try:
        # Warm-up, as moeflow gets: one prefill of the same length and a few decode steps.
        llm.reset()
        llm.eval(warm_ids)
        for _ in range(3):
            llm.eval([llm.sample(temp=0.0)])
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt_ids)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode_tokens):
            llm.eval([llm.sample(temp=0.0)])  # greedy
        decode_s = time.perf_counter() - start
    finally:
        llm.close()
        del llm
    return BenchResult(
        "llama-cpp", load_s, len(prompt_ids) / prefill_s, decode_tokens / decode_s, "GGUF as is"
    )


def _run_hf(
    model_path: str,
    prompt_ids: list[int],
    warm_ids: list[int],
    decode_tokens: int,
    dtype: torch.dtype,
) -> BenchResult:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the bench prints a table, not bars
    start = time.perf_counter()
    if os.path.isfile(model_path):
        folder, name = os.path.split(os.path.abspath(model_path))
        model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        note = f"GGUF dequantised to {str(dtype).removeprefix('torch.')}"
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        note = str(dtype).removeprefix("torch.")
    model.eval()
    load_s = time.perf_counter() - start
    try:
        with torch.inference_mode():
            _hf_greedy(model, warm_ids, 3)  # warm-up
            prefill_s, decode_s = _hf_greedy(model, prompt_ids, decode_tokens)
    finally:
        del model
    note += ", manual past_key_values loop"
    return BenchResult("hf", load_s, len(prompt_ids) / prefill_s, decode_tokens / decode_s, note)


def _hf_greedy(model: Any, prompt_ids: list[int], decode_tokens: int) -> tuple[float, float]:
    """(prefill seconds, seconds of `decode_tokens` greedy steps after the first token)."""
    input_ids = torch.tensor([prompt_ids], device=model.device)  # [1, P]
    start = time.perf_counter()
    out = model(input_ids, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    int(token.item())  # waits for the device
    prefill_s = time.perf_counter() - start
    past = out.past_key_values
    start = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    int(token.item())  # waits for the device
    return prefill_s, time.perf_counter() - start
