"""Engine construction: EngineConfig.resolve from plain numbers, and build_engine, whose engine
always holds the sink block of padded graph rows beyond the block manager's blocks."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.config import CPU_KV_CACHE_TOKENS, EngineArgs, EngineConfig
from moeflow.engine.factory import build_engine, load
from moeflow.engine.kv_cache import kv_bytes_per_token
from tests.helpers.checkpoints import make_tiny_checkpoint


def _resolve(args: EngineArgs, fit: int | None = None, device: str = "cpu") -> EngineConfig:
    return EngineConfig.resolve(
        args, model="m", device=device, dtype="float32", model_max_len=4096, kv_tokens_that_fit=fit
    )


def test_resolve_fills_the_autos() -> None:
    cpu = _resolve(EngineArgs())
    assert cpu.max_model_len == 4096 and cpu.kv_cache_tokens == CPU_KV_CACHE_TOKENS
    assert not cpu.overlap_schedule
    gpu = _resolve(EngineArgs(max_model_len=1024), fit=100_000, device="cuda:0")
    assert gpu.max_model_len == 1024 and gpu.kv_cache_tokens == 100_000 and gpu.overlap_schedule
    # a GPU short of memory still gets one full context (allocation then says it does not fit)
    assert _resolve(EngineArgs(), fit=-5, device="cuda").kv_cache_tokens == 4096
    assert not _resolve(EngineArgs(overlap_schedule=False), device="cuda").overlap_schedule
    assert _resolve(EngineArgs(kv_cache_tokens=5000)).kv_cache_tokens == 5000


def test_resolve_rejects_lengths_that_cannot_work() -> None:
    with pytest.raises(ValueError, match="exceeds the model's context 4096"):
        _resolve(EngineArgs(max_model_len=8192))
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        _resolve(EngineArgs(max_model_len=2048, kv_cache_tokens=1024))


def test_the_engine_allocates_the_sink_block(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    args = EngineArgs(
        model=str(path), dtype="float32", device="cpu", max_model_len=64, kv_cache_tokens=100
    )
    loaded = load(args)
    engine = build_engine(args, loaded)
    config = engine.config
    assert config.num_kv_blocks == 7 and config.sink_block == 7  # ceil(100 / 16)
    assert engine.block_manager.num_blocks == 7
    caches = [m.k_cache for m in loaded.model.modules() if hasattr(m, "k_cache")]
    assert caches and all(c.shape[0] == config.num_cache_blocks == 8 for c in caches)
    per_token = kv_bytes_per_token(loaded.model, torch.float32)
    assert engine.kv_cache_bytes == 8 * config.block_size * per_token
    req = engine.add_request([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.run_to_completion()
    assert len(req.output_ids) == 2


def test_llm_takes_exactly_the_engine_args() -> None:
    params = list(inspect.signature(LLM.__init__).parameters)[1:]
    assert params == [f.name for f in fields(EngineArgs)]


def test_gpu_memory_utilization_is_a_share_of_the_whole_gpu() -> None:
    """vLLM's meaning: the engine holds that share of the GPU's total memory in all, so the KV
    cache gets the share less what is in use (weights, other processes) less the reserve."""
    from moeflow.loading.memory_plan import GPU_KV_SHARE, GPU_RESERVE_BYTES, kv_tokens_that_fit

    gib = 2**30
    total, free = 100 * gib, 70 * gib  # 30 GiB in use after the weights
    assert kv_tokens_that_fit(free, 1024, total, 0.5) == (20 * gib - GPU_RESERVE_BYTES) // 1024
    assert kv_tokens_that_fit(free, 1024, total, 0.3) < 0  # resolve then keeps one context
    default = kv_tokens_that_fit(free, 1024)
    assert default == int((free * GPU_KV_SHARE - GPU_RESERVE_BYTES) // 1024)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        _resolve(EngineArgs(gpu_memory_utilization=1.5), device="cuda")


def test_gpu_memory_utilization_on_a_cpu_is_refused(tiny_checkpoints: dict[str, Path]) -> None:
    args = EngineArgs(
        model=str(tiny_checkpoints["llama"]), device="cpu", gpu_memory_utilization=0.8
    )
    with pytest.raises(ValueError, match="on a CPU give --kv-cache-tokens"):
        load(args)
