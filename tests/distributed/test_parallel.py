"""Tensor and expert parallelism on gloo (2 ranks on this machine, "mp"): greedy tokens and
last-token logits (fp32, within 1e-5) equal the single-process engine's, for qwen3_moe (MoE
split by expert rows, and by expert) and deepseek_v3 (MLA heads split, experts by expert); an
EPLB placement with redundant copies changes nothing. Each parallel engine runs in its own
process (tests/helpers/dist_run.py) under a timeout, so a hung group fails instead of hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.distributed.eplb import rebalance_experts
from tests.helpers.checkpoints import make_deepseek_checkpoint, make_tiny_checkpoint
from tests.helpers.dist_run import PROMPTS, run

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    return {
        "qwen3_moe": make_tiny_checkpoint("qwen3_moe", root / "qwen3_moe"),
        "deepseek_v3": make_deepseek_checkpoint("v3", root / "deepseek_v3"),
    }


@pytest.fixture(scope="module")
def single(checkpoints: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The single-process reference of each model."""
    return {name: run(str(path)) for name, path in checkpoints.items()}


def run_parallel(model: Path, **kwargs: Any) -> dict[str, Any]:
    """The same run with `kwargs` (2 ranks), in a fresh process bounded in time."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.dist_run", str(model), json.dumps(kwargs)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["tokens"] == want["tokens"]
    for a, b in zip(got["logits"], want["logits"], strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "expert_parallel"),
    [("qwen3_moe", False), ("qwen3_moe", True), ("deepseek_v3", True)],
)
def test_tp2_equals_tp1(
    model: str,
    expert_parallel: bool,
    checkpoints: dict[str, Path],
    single: dict[str, dict[str, Any]],
) -> None:
    got = run_parallel(
        checkpoints[model], tensor_parallel_size=2, enable_expert_parallel=expert_parallel
    )
    assert_same(got, single[model])


def test_eplb_placement_leaves_tokens_unchanged(
    checkpoints: dict[str, Path], single: dict[str, dict[str, Any]]
) -> None:
    """Placements from the routing statistics, hot experts copied: one process holding every
    slot, and 2 expert-parallel ranks, give the reference's tokens and logits."""
    path = str(checkpoints["qwen3_moe"])
    with LLM(path, dtype="float32", device="cpu", max_model_len=128) as llm:
        llm.engine.enable_routing_stats()
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
        stats = llm.engine.routing_stats()
    assert any(len(set(layer)) > 1 for layer in stats)  # uneven: the placement has work to do
    one_rank = rebalance_experts(stats, ep_size=1, num_redundant=3)
    assert all(len(p) == 8 + 3 for p in one_rank)
    assert_same(run(path, expert_placement=one_rank), single["qwen3_moe"])
    two_ranks = rebalance_experts(stats, ep_size=2, num_redundant=2)
    got = run_parallel(
        checkpoints["qwen3_moe"],
        tensor_parallel_size=2,
        enable_expert_parallel=True,
        expert_placement=two_ranks,
    )
    assert_same(got, single["qwen3_moe"])
