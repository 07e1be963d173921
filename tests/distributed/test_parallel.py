"""Tensor, expert and data parallelism on gloo (2 or 4 ranks on this machine: "mp", Ray on one
node or on two, torchrun): greedy tokens and last-token logits (fp32, within 1e-5) equal the
single-process engine's, for qwen3_moe and deepseek_v3 (MLA heads split), MoE split by expert
rows or by expert, tp=2 x dp=2, GGUF blocks (Q8_0, Q4_K_M) split over the ranks; an EPLB
placement with redundant copies changes nothing. Each parallel engine runs in its own process
(tests/helpers/dist_run.py) under a timeout, so a hung group fails instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.bench.gguf_models import write_gguf
from moeflow.distributed.eplb import rebalance_experts
from moeflow.kernels import cpu_ext
from moeflow.loading.presets import PRESETS
from moeflow.weights.ggml_quants import GGMLType
from tests.helpers.checkpoints import make_deepseek_checkpoint, make_tiny_checkpoint
from tests.helpers.dist_run import PROMPTS, run
from tests.helpers.server import free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 600  # generous: 2 ranks on a loaded 2-core machine took over 240 s once


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


def run_bounded(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run `cmd` (with `env` added to the environment) in its own session; past RUN_TIMEOUT_S
    the whole session (every rank) is killed and the test fails. Returns stdout."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the parallel run hung past {RUN_TIMEOUT_S} s: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return out


def run_parallel(model: Path, env: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """The same run with `kwargs` (2 ranks), in a fresh process bounded in time."""
    cmd = [sys.executable, "-m", "tests.helpers.dist_run", str(model), json.dumps(kwargs)]
    return json.loads(run_bounded(cmd, env).strip().splitlines()[-1])


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["tokens"] == want["tokens"]
    for a, b in zip(got["logits"], want["logits"], strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "expert_parallel", "backend"),
    [
        ("qwen3_moe", False, "mp"),
        ("qwen3_moe", True, "mp"),
        ("deepseek_v3", False, "mp"),
        ("deepseek_v3", True, "mp"),
        ("qwen3_moe", False, "ray"),  # a local Ray cluster of one CPU, rank 1 as an actor
    ],
)
def test_tp2_equals_tp1(
    model: str,
    expert_parallel: bool,
    backend: str,
    checkpoints: dict[str, Path],
    single: dict[str, dict[str, Any]],
) -> None:
    if backend == "ray":
        pytest.importorskip("ray", reason="the Ray backend needs ray (moeflow[distributed])")
    got = run_parallel(
        checkpoints[model],
        tensor_parallel_size=2,
        enable_expert_parallel=expert_parallel,
        distributed_executor_backend=backend,
    )
    assert_same(got, single[model])
    if backend == "ray":  # one local node: both ranks on it (PACK)
        assert len(got["nodes"]) == 2 and got["nodes"][0] == got["nodes"][1]


def test_ray_ranks_on_separate_nodes(
    checkpoints: dict[str, Path], single: dict[str, dict[str, Any]]
) -> None:
    """A Ray cluster of two nodes on this machine: the head (where rank 0, the driver, joins)
    has CPUs for both ranks, the second node one. MOEFLOW_RAY_PLACEMENT=STRICT_SPREAD puts rank
    1's actor on the second node (PACK would keep it beside rank 0); deepseek_v3's tokens and
    logits (MLA heads split) equal one process's."""
    pytest.importorskip("ray", reason="the Ray backend needs ray (moeflow[distributed])")
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.ray_cluster", "2", "1"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        line = holder.stdout.readline()
        assert line, f"the Ray cluster did not start (exit {holder.poll()})"
        cluster = json.loads(line)
        got = run_parallel(
            checkpoints["deepseek_v3"],
            env={"RAY_ADDRESS": cluster["address"], "MOEFLOW_RAY_PLACEMENT": "STRICT_SPREAD"},
            tensor_parallel_size=2,
            distributed_executor_backend="ray",
        )
        assert got["nodes"] == [cluster["head"], cluster["other"]]  # as each rank saw its node
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        try:
            holder.wait(timeout=120)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
    assert_same(got, single["deepseek_v3"])


def test_dp2_replicas_equal_dp1(
    checkpoints: dict[str, Path], single: dict[str, dict[str, Any]]
) -> None:
    """Two data-parallel replicas ("mp", one process each): requests spread over both (each
    replica ran pieces of the steps) and every request's tokens and logits equal one process's."""
    got = run_parallel(checkpoints["qwen3_moe"], data_parallel_size=2)
    assert got["replicas"] == [0, 1]
    assert_same(got, single["qwen3_moe"])


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_tp2_dp2_equals_one_process(
    expert_parallel: bool, checkpoints: dict[str, Path], single: dict[str, dict[str, Any]]
) -> None:
    """tp=2 x dp=2 (4 ranks on "mp"): two replicas, each split over its own pair of ranks (MoE
    by expert rows, or by expert); requests spread over both replicas and every request's
    tokens and logits equal one process's."""
    got = run_parallel(
        checkpoints["qwen3_moe"],
        tensor_parallel_size=2,
        data_parallel_size=2,
        enable_expert_parallel=expert_parallel,
    )
    assert got["replicas"] == [0, 1]
    assert_same(got, single["qwen3_moe"])


def test_serve_dp2_answers_as_one_process(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """`moeflow serve --data-parallel-size 2`: two requests in turn (one per replica) complete
    with one process's greedy text."""
    path = str(checkpoints["qwen3_moe"])
    prompts = ["abc", "hello there"]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    with LLM(path, dtype="float32", device="cpu", max_model_len=128) as llm:
        want = [out.text for out in llm.generate(prompts, params)]
    server = start_server(
        path,
        tmp_path,
        *("--dtype", "float32", "--device", "cpu", "--max-model-len", "128"),
        *("--data-parallel-size", "2", "--served-model-name", "tiny"),
        wait_s=240,
    )
    try:
        got = []
        for prompt in prompts:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 0}
            body["ignore_eos"] = True
            status, _, data = server.request("POST", "/v1/completions", body, timeout=300)
            assert status == 200, data
            got.append(json.loads(data)["choices"][0]["text"])
    finally:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
    assert got == want


# Tiny GGUFs whose split dims stay whole blocks at tp=2 (o_proj and the experts' down
# projection are split by input columns). Q8_0: 64 -> 32 per rank. Q4_K_M (llama.cpp's types
# per tensor: Q4_K, Q5_K for qwen3_moe's o_proj, Q6_K for the output, the last layer's
# attn_v and ffn_down): 512 -> 256 per rank, whole super-blocks.
TINY_GGUF_QWEN3_MOE = {
    **PRESETS["qwen3-30b-a3b"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 64,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_hidden_layers": 2,
    "vocab_size": 512,
}
TINY_KQUANT_GGUFS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        **TINY_GGUF_QWEN3_MOE,
        "hidden_size": 256,
        "moe_intermediate_size": 512,
        "head_dim": 128,
    },
    # MLA: q_b by heads, o_proj by input columns (4 heads x 128 -> 256 per rank); the first
    # layer dense, the second MoE with a shared expert; kv_b's halves load as floats.
    "deepseek_v3": {
        **PRESETS["deepseek-v3-4l"],
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 512,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 256,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 128,
        "first_k_dense_replace": 1,
        "num_hidden_layers": 2,
        "vocab_size": 512,
    },
}
K_QUANTS = {int(GGMLType.Q4_K), int(GGMLType.Q6_K)}


@pytest.mark.skipif(not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}")
@pytest.mark.parametrize(
    ("family", "ftype", "expert_parallel"),
    [
        ("qwen3_moe", "q8_0", False),
        ("qwen3_moe", "q8_0", True),
        ("qwen3_moe", "q4_k_m", False),
        ("deepseek_v3", "q4_k_m", False),
        ("deepseek_v3", "q4_k_m", True),
    ],
)
def test_gguf_tp2_equals_tp1(
    family: str, ftype: str, expert_parallel: bool, tmp_path: Path
) -> None:
    """Each rank loads its slices of a GGUF's blocks (kept as blocks: rows, or whole blocks of
    input columns; experts by rows or by expert) and the tokens and logits equal one
    process's. (What a rank reads of the file: test_shard_reads.py.)"""
    path = tmp_path / f"tiny-{ftype}.gguf"
    if ftype == "q8_0":
        write_gguf(TINY_GGUF_QWEN3_MOE, ftype, path)
    else:
        write_gguf(TINY_KQUANT_GGUFS[family], ftype, path)
    want = run(str(path))
    got = run_parallel(path, tensor_parallel_size=2, enable_expert_parallel=expert_parallel)
    assert got["kept_types"] == want["kept_types"]
    if ftype == "q8_0":
        assert want["kept_types"] == [int(GGMLType.Q8_0)]
    else:  # the K-quants stay blocks, split as blocks
        assert set(want["kept_types"]) >= K_QUANTS
    moe_layers = 2 if family == "qwen3_moe" else 1
    assert got["block_experts"] == want["block_experts"] == moe_layers  # experts in blocks
    assert_same(got, want)


@pytest.mark.skipif(not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}")
def test_quantize_tp2_equals_tp1(tmp_path: Path) -> None:
    """`--quantize q8_0` at tp=2: each rank quantises its float slices (experts' rows of 32
    per rank stay whole blocks) and the tokens and logits equal one process's."""
    folder = make_tiny_checkpoint("qwen3_moe", tmp_path / "qwen3_moe", moe_intermediate_size=64)
    want = run(str(folder), quantize="q8_0")
    got = run_parallel(folder, tensor_parallel_size=2, quantize="q8_0")
    assert got["kept_types"] == want["kept_types"] == [int(GGMLType.Q8_0)]
    assert got["block_experts"] == want["block_experts"] == 3  # the 3 MoE layers in blocks
    assert_same(got, want)


def test_torchrun_launches_the_ranks(
    checkpoints: dict[str, Path], single: dict[str, dict[str, Any]]
) -> None:
    """torchrun starts both ranks ("external_launcher"): rank 0 returns from LLM() and runs
    the engine, rank 1 serves its steps inside LLM() and leaves the program after."""
    kwargs = {"tensor_parallel_size": 2, "distributed_executor_backend": "external_launcher"}
    torchrun = Path(sys.executable).with_name("torchrun")
    out = run_bounded(
        [
            str(torchrun),
            *("--nproc-per-node", "2", "--master-addr", "127.0.0.1"),
            *("--master-port", str(free_port())),
            *("-m", "tests.helpers.dist_run", str(checkpoints["qwen3_moe"]), json.dumps(kwargs)),
        ]
    )
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 only
    assert_same(json.loads(lines[0]), single["qwen3_moe"])


@pytest.mark.parametrize("model", ["qwen3_moe", "deepseek_v3"])
def test_eplb_placement_leaves_tokens_unchanged(
    model: str, checkpoints: dict[str, Path], single: dict[str, dict[str, Any]]
) -> None:
    """Placements from the routing statistics, hot experts copied: one process holding every
    slot, and 2 expert-parallel ranks, give the reference's tokens and logits."""
    path = str(checkpoints[model])
    with LLM(path, dtype="float32", device="cpu", max_model_len=128) as llm:
        llm.engine.enable_routing_stats()
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
        stats = llm.engine.routing_stats()
    assert any(len(set(layer)) > 1 for layer in stats)  # uneven: the placement has work to do
    one_rank = rebalance_experts(stats, ep_size=1, num_redundant=3)
    assert [len(p) for p in one_rank] == [len(layer) + 3 for layer in stats]
    assert_same(run(path, expert_placement=one_rank), single[model])
    two_ranks = rebalance_experts(stats, ep_size=2, num_redundant=2)
    got = run_parallel(
        checkpoints[model],
        tensor_parallel_size=2,
        enable_expert_parallel=True,
        expert_placement=two_ranks,
    )
    assert_same(got, single[model])
