"""Decode through the CUDA-graph runner: its padded static batches give the same tokens and
log-probs as the plain batch. On CPU the runner replays the padded batch eagerly (what a graph
would run); on a GPU the graphs are captured for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeflow.api import LLM
from moeflow.engine.cuda_graph import graph_batch_sizes
from moeflow.sampling_params import SamplingParams
from tests.helpers.checkpoints import make_deepseek_checkpoint, make_tiny_checkpoint
from tests.helpers.engine import assert_same_outputs
from tests.helpers.tokenizer_files import TINY_VOCAB

PROMPTS = [[5, 9, 13, 2, 7], [40, 41], [100, 3, 3, 3, 3, 3, 3, 3, 60, 61, 62]]


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]


def _decode(llm: LLM) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
    outs = llm.generate([list(p) for p in PROMPTS], params)
    return [(o.token_ids, [lp.logprob for lp in o.logprobs or []]) for o in outs]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graphs")
    return {
        "llama": make_tiny_checkpoint("llama", root / "llama", seed=3),
        "qwen3_moe": make_tiny_checkpoint("qwen3_moe", root / "qwen3_moe", seed=4),
        "deepseek_v2": make_deepseek_checkpoint("v2", root / "v2", seed=5),
    }


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v2"])
def test_padded_static_batches_match_plain_decode(
    family: str, checkpoints: dict[str, Path]
) -> None:
    """3 sequences padded to 4 rows (the fourth decodes into the sink block) and 1-2 sequences
    once some finish: same greedy tokens and log-probs as the plain batch, and the padding rows
    never touch the blocks of real sequences."""
    path = str(checkpoints[family])
    plain = LLM(path, dtype="float32", device="cpu", max_model_len=64, max_num_seqs=4)
    want = _decode(plain)
    llm = LLM(path, dtype="float32", device="cpu", max_model_len=64, max_num_seqs=4)
    runner = llm.engine.runner
    graphs = runner.make_graph_runner(4, llm.config.max_model_len, llm.config.sink_block)
    assert graphs.batch_sizes == [1, 2, 4]
    calls: list[int] = []
    replay = graphs.replay
    graphs.replay = lambda n: (calls.append(n), replay(n))[1]  # type: ignore[method-assign]
    got = _decode(llm)
    assert 3 in calls  # decode steps went through the padded static batch
    assert_same_outputs(got, want, atol=1e-4)
    assert all(0 <= t < TINY_VOCAB for ids, _ in got for t in ids)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v2"])
def test_captured_graphs_match_eager(family: str, checkpoints: dict[str, Path]) -> None:
    """Graphs with the overlap schedule (a GPU's defaults) against eager steps without it."""
    path = str(checkpoints[family])
    eager = LLM(
        path,
        dtype="float32",
        device="cuda",
        max_model_len=64,
        enforce_eager=True,
        overlap_schedule=False,
    )
    assert eager.engine.runner.graphs is None
    want = _decode(eager)
    del eager
    llm = LLM(path, dtype="float32", device="cuda", max_model_len=64, max_num_seqs=8)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and sorted(graphs.graphs) == [1, 2, 4, 8]
    assert llm.engine.overlap_schedule
    assert_same_outputs(_decode(llm), want, atol=1e-3)


def test_step_profile_splits_the_step(checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(checkpoints["llama"]), dtype="float32", device="cpu", max_model_len=64)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    reqs = [engine.add_request(list(p), params) for p in PROMPTS]
    engine.start_profile()
    while not all(r.is_finished for r in reqs):
        engine.step()
    profile = engine.stop_profile()
    assert engine.profile is None
    assert profile.steps == 4  # one prefill step (all three prompts) and three decode steps
    phases = (profile.schedule_s, profile.prepare_s, profile.forward_s, profile.sample_s)
    assert all(t > 0 for t in phases) and profile.postprocess_s > 0
    assert profile.host_overhead_s < profile.wall_s
    assert profile.gpu_busy_s() is None  # no CUDA events on CPU


def test_only_sampling_decode_rows_take_the_graphs(checkpoints: dict[str, Path]) -> None:
    """A one-token prompt chunk that does not sample yet (chunked prefill) runs eagerly: the
    graphs compute logits for every row."""
    from moeflow.engine.scheduler import ScheduledBatch

    llm = LLM(str(checkpoints["llama"]), dtype="float32", device="cpu", max_model_len=64)
    runner = llm.engine.runner
    c = llm.config
    runner.make_graph_runner(4, c.max_model_len, c.sink_block)
    params = SamplingParams(temperature=0.0, max_tokens=2)
    req = llm.engine.add_request([5, 6, 7, 8], params)
    req.num_computed_tokens = 2  # two prompt tokens left: a 1-token chunk does not sample
    assert runner._graphs_for(ScheduledBatch([req], [1])) is None  # noqa: SLF001
    req.num_computed_tokens = 3  # the last prompt token samples
    assert runner._graphs_for(ScheduledBatch([req], [1])) is runner.graphs  # noqa: SLF001
    runner.graphs_paused = True
    assert runner._graphs_for(ScheduledBatch([req], [1])) is None  # noqa: SLF001
