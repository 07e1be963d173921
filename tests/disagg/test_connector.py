"""Prefill/decode disaggregation in one process: a prefill engine and a decode engine joined by
the fake transport. The decode side's greedy tokens equal a colocated run's on the same prompts
(K/V caches of qwen3_moe, MLA's latent cache of deepseek_v3) while it computes none of the
prompts; a dropped, late or corrupted transfer is recomputed or fails the request with an error,
as configured, and never decodes from wrong KV."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from moeflow import LLM, SamplingParams
from moeflow.disagg.connector import KVConnector, OnFailure, TransferUnavailableError
from moeflow.disagg.transport import FakeTransport, Faults
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.request import Request
from moeflow.errors import RequestError
from moeflow.sampling_params import FinishReason, KVTransferParams, StructuredOutputsParams
from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.helpers.engine import assert_idle

FAMILIES = ("qwen3_moe", "deepseek_v3")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pd")
    return {f: make_tiny_checkpoint(f, root / f) for f in FAMILIES}


def _llm(path: Path, kv_cache_tokens: int = 1024) -> LLM:
    return LLM(
        str(path),
        dtype="float32",
        device="cpu",
        max_model_len=min(128, kv_cache_tokens),
        kv_cache_tokens=kv_cache_tokens,
    )


def _pair(
    path: Path,
    faults: Faults | None = None,
    on_failure: OnFailure = "recompute",
    wait_timeout_s: float = 5.0,
    decode_path: Path | None = None,
) -> tuple[LLM, LLM, FakeTransport]:
    prefill, decode = _llm(path), _llm(decode_path or path)
    a, b = FakeTransport.pair(faults)
    prefill.engine.kv_connector = KVConnector(prefill.engine, a, "prefill")
    decode.engine.kv_connector = KVConnector(
        decode.engine, b, "decode", wait_timeout_s=wait_timeout_s, on_failure=on_failure
    )
    return prefill, decode, a


def _workload(n: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts of 1-40 tokens (inside one block, on a boundary, across blocks)."""
    rng = random.Random(seed)
    lens = [1, 15, 16, 17, 40] + [rng.randint(1, 40) for _ in range(n - 5)]
    prompts = [[rng.randrange(256) for _ in range(k)] for k in lens]
    params = [
        SamplingParams(temperature=0, max_tokens=rng.randint(2, 8), ignore_eos=True)
        for _ in prompts
    ]
    return prompts, params


def _run(engine: LLMEngine) -> None:
    for _ in range(10_000):
        if not engine.has_unfinished():
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def _disaggregated(
    prefill: LLM, decode: LLM, prompts: list[list[int]], params: list[SamplingParams]
) -> list[Request]:
    """Each prompt prefilled (max_tokens 1) on one engine, then decoded on the other."""
    for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
        kt = KVTransferParams(f"t{i}", do_remote_decode=True)
        prefill.engine.add_request(ids, dataclasses.replace(p, max_tokens=1, kv_transfer=kt))
    _run(prefill.engine)
    reqs = []
    for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
        kt = KVTransferParams(f"t{i}", do_remote_prefill=True)
        reqs.append(decode.engine.add_request(ids, dataclasses.replace(p, kv_transfer=kt)))
    _run(decode.engine)
    return reqs


def _colocated(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("family", FAMILIES)
def test_disaggregated_decode_equals_colocated(family: str, checkpoints: dict[str, Path]) -> None:
    prefill, decode, _ = _pair(checkpoints[family])
    prompts, params = _workload(8, seed=3)
    want = _colocated(_llm(checkpoints[family]), prompts, params)
    reqs = _disaggregated(prefill, decode, prompts, params)
    assert [r.output_ids for r in reqs] == want
    assert all(r.error is None and r.finish_reason is FinishReason.LENGTH for r in reqs)
    stats = decode.engine.kv_connector.stats  # type: ignore[union-attr]
    assert stats["admitted"] == len(prompts) and stats["recomputed"] == 0
    # The decode engine ran no prompt token: one row per output token after the first.
    assert decode.engine.stats.num_computed_tokens == sum(p.max_tokens - 1 for p in params)  # type: ignore[operator]
    assert prefill.engine.kv_connector.stats["sent"] == len(prompts)  # type: ignore[union-attr]
    assert_idle(prefill)
    assert_idle(decode)


def test_first_token_logprobs_and_stops_carry_over(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["qwen3_moe"]
    prefill, decode, _ = _pair(path)
    prompts, _ = _workload(5, seed=5)
    ref = _llm(path)
    first = _colocated(ref, prompts, [SamplingParams(temperature=0, max_tokens=1)] * 5)
    # Stop at each prompt's first token: the decode side ends on the token it received.
    params = [
        SamplingParams(temperature=0, max_tokens=6, logprobs=2, stop_token_ids=f) for f in first
    ]
    want = ref.generate([{"prompt_token_ids": p} for p in prompts], params)
    reqs = _disaggregated(prefill, decode, prompts, params)
    for r, w in zip(reqs, want, strict=True):
        assert r.output_ids == w.outputs[0].token_ids == r.output_ids[:1]
        assert r.finish_reason is FinishReason.STOP
        (lp,) = r.output_logprobs
        (want_lp,) = w.outputs[0].logprobs
        assert lp.token_id == want_lp.token_id and sorted(lp.top) == sorted(want_lp.top)
        assert lp.logprob == pytest.approx(want_lp.logprob, abs=1e-5)
    assert_idle(decode)


# A late transfer: delayed from its send, far past the decode side's 0.3 s wait (a 1 s delay
# had passed already on a loaded 2-core machine by the time the decode side looked).
LATE = 60.0


@pytest.mark.parametrize("fault", ["drop", "corrupt", LATE])
def test_failed_transfer_is_recomputed(fault: str | float, checkpoints: dict[str, Path]) -> None:
    """Lost, corrupted, or later than the decode side waits: the prompt is computed there."""
    path = checkpoints["qwen3_moe"]
    prefill, decode, _ = _pair(path, Faults([fault]), "recompute", wait_timeout_s=0.3)
    prompts, params = _workload(5, seed=7)
    want = _colocated(_llm(path), prompts, params)
    reqs = _disaggregated(prefill, decode, prompts, params)
    assert [r.output_ids for r in reqs] == want
    stats = decode.engine.kv_connector.stats  # type: ignore[union-attr]
    assert (stats["admitted"], stats["recomputed"]) == (4, 1)
    assert decode.engine.stats.num_computed_tokens > sum(p.max_tokens - 1 for p in params)  # type: ignore[operator]
    assert_idle(decode)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("drop", "nothing arrived"), ("corrupt", "checksum"), (LATE, "nothing arrived")],
)
def test_failed_transfer_fails_the_request(
    fault: str | float, reason: str, checkpoints: dict[str, Path]
) -> None:
    """With on_failure="error" the request ends with an error and no token: never garbage."""
    path = checkpoints["deepseek_v3"]
    prefill, decode, _ = _pair(path, Faults([fault]), "error", wait_timeout_s=0.3)
    prompts, params = _workload(5, seed=9)
    want = _colocated(_llm(path), prompts, params)
    reqs = _disaggregated(prefill, decode, prompts, params)
    failed = reqs[0]
    assert failed.output_ids == [] and failed.finish_reason is FinishReason.ABORT
    assert failed.error is not None and "KV transfer t0 failed" in failed.error
    assert reason in failed.error
    assert [r.output_ids for r in reqs[1:]] == want[1:]
    assert_idle(decode)


def test_a_prompt_mismatch_is_refused(checkpoints: dict[str, Path]) -> None:
    """The fake corrupts a payload-free message's first prompt id; a KV message with another
    prompt's ids (here: sent for another prompt under the same transfer id) is refused."""
    path = checkpoints["qwen3_moe"]
    prefill, decode, _ = _pair(path, on_failure="error")
    p = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    kt = KVTransferParams("x", do_remote_decode=True)
    prefill.engine.add_request([1, 2, 3, 4], dataclasses.replace(p, max_tokens=1, kv_transfer=kt))
    _run(prefill.engine)
    kt = KVTransferParams("x", do_remote_prefill=True)
    req = decode.engine.add_request([1, 2, 3, 5], dataclasses.replace(p, kv_transfer=kt))
    _run(decode.engine)
    assert req.error is not None and "another prompt" in req.error and req.output_ids == []


def test_layouts_of_different_families_are_refused(checkpoints: dict[str, Path]) -> None:
    """K/V blocks of qwen3_moe cannot fill deepseek_v3's latent cache: an error, not garbage."""
    prefill, decode, _ = _pair(
        checkpoints["qwen3_moe"], on_failure="error", decode_path=checkpoints["deepseek_v3"]
    )
    prompts, params = _workload(5, seed=1)
    reqs = _disaggregated(prefill, decode, prompts, params)
    assert all(r.error is not None and "layout" in r.error for r in reqs)
    assert all(r.output_ids == [] for r in reqs)


def test_dead_link(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["qwen3_moe"]
    prefill, decode, link = _pair(path, on_failure="error", wait_timeout_s=30)
    p = SamplingParams(temperature=0, max_tokens=3)
    held = decode.engine.add_request(
        [1, 2, 3], dataclasses.replace(p, kv_transfer=KVTransferParams("a", do_remote_prefill=True))
    )
    decode.engine.step()
    assert decode.engine.has_unfinished() and held.output_ids == []
    link.kill()
    done = decode.engine.step()  # fails at once, without waiting out the 30 s
    assert done == [held] and held.error is not None and "link is down" in held.error
    for llm, kt in (
        (prefill, KVTransferParams("b", do_remote_decode=True)),
        (decode, KVTransferParams("c", do_remote_prefill=True)),
    ):
        with pytest.raises(TransferUnavailableError):
            llm.engine.add_request([1, 2], dataclasses.replace(p, kv_transfer=kt))
    assert_idle(decode)


def test_requests_that_do_not_fit_the_role_are_refused(checkpoints: dict[str, Path]) -> None:
    prefill, decode, _ = _pair(checkpoints["qwen3_moe"])
    colocated = _llm(checkpoints["qwen3_moe"])
    p = SamplingParams(temperature=0, max_tokens=2)
    send = dataclasses.replace(p, kv_transfer=KVTransferParams("a", do_remote_decode=True))
    receive = dataclasses.replace(p, kv_transfer=KVTransferParams("a", do_remote_prefill=True))
    for llm, params, words in (
        (decode, send, "--role decode"),
        (prefill, receive, "--role prefill"),
        (colocated, send, "--role prefill or decode"),
    ):
        with pytest.raises(RequestError, match=words):
            llm.engine.add_request([1, 2], params)
    decode.engine.add_request([1, 2], receive)
    with pytest.raises(RequestError, match="already waiting"):
        decode.engine.add_request([1, 2], receive)
    # Plain requests still run colocated on either instance.
    assert prefill.generate({"prompt_token_ids": [1, 2]}, p)[0].outputs[0].token_ids


def test_abort_while_waiting_frees_everything(checkpoints: dict[str, Path]) -> None:
    _, decode, _ = _pair(checkpoints["qwen3_moe"])
    kt = KVTransferParams("a", do_remote_prefill=True)
    req = decode.engine.add_request([1, 2, 3], SamplingParams(max_tokens=2, kv_transfer=kt))
    decode.engine.step()
    assert decode.engine.abort(req.request_id)
    assert not decode.engine.kv_connector.has_pending()  # type: ignore[union-attr]
    assert_idle(decode)


def test_kv_transfer_params_are_checked() -> None:
    for kwargs in ({}, {"do_remote_decode": True, "do_remote_prefill": True}):
        with pytest.raises(RequestError, match="exactly one"):
            KVTransferParams("a", **kwargs)
    for bad in ("", "a b", "x" * 129, "é"):
        with pytest.raises(RequestError, match="transfer_id"):
            KVTransferParams(bad, do_remote_decode=True)


def test_no_room_for_the_blocks_recomputes_later(checkpoints: dict[str, Path]) -> None:
    """Three blocks of cache: the first transfer takes two, the second waits as a plain
    request and is computed once the first has finished; both equal the colocated tokens."""
    path = checkpoints["qwen3_moe"]
    prefill, decode = _llm(path), _llm(path, kv_cache_tokens=48)
    a, b = FakeTransport.pair()
    prefill.engine.kv_connector = KVConnector(prefill.engine, a, "prefill")
    decode.engine.kv_connector = KVConnector(decode.engine, b, "decode", on_failure="error")
    prompts = [list(range(10, 30)), list(range(40, 60))]
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)] * 2
    want = _colocated(_llm(path), prompts, params)
    reqs = _disaggregated(prefill, decode, prompts, params)
    assert [r.output_ids for r in reqs] == want and [r.error for r in reqs] == [None, None]
    stats = decode.engine.kv_connector.stats  # type: ignore[union-attr]
    assert (stats["admitted"], stats["recomputed_no_room"]) == (1, 1)
    assert_idle(decode)


def test_seeded_sampling_equals_colocated(checkpoints: dict[str, Path]) -> None:
    """A seeded request draws the same uniforms as colocated: the decode side skips the draw
    the prefill side made for the first token."""
    path = checkpoints["qwen3_moe"]
    prefill, decode, _ = _pair(path)
    prompts, _ = _workload(5, seed=13)
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=8, ignore_eos=True)
        for i in range(5)
    ]
    want = _colocated(_llm(path), prompts, params)
    assert [r.output_ids for r in _disaggregated(prefill, decode, prompts, params)] == want


def test_structured_output_carries_over(checkpoints: dict[str, Path]) -> None:
    """The decode side's grammar takes the first token the prefill side sampled under it."""
    path = checkpoints["qwen3_moe"]
    prefill, decode, _ = _pair(path)
    prompts, _ = _workload(5, seed=17)
    so = StructuredOutputsParams(regex="(yes|no|maybe)[a-z]{0,3}")
    params = [SamplingParams(temperature=0, max_tokens=8, structured_outputs=so)] * 5
    want = _colocated(_llm(path), prompts, params)
    reqs = _disaggregated(prefill, decode, prompts, params)
    assert [r.output_ids for r in reqs] == want and all(r.error is None for r in reqs)
