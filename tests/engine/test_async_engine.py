"""The engine thread behind asyncio: results equal the synchronous engine's, leaving early aborts
and frees blocks, a full queue refuses at once, and a dying engine fails every open request."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from moeflow import LLM, SamplingParams
from moeflow.engine.async_engine import AsyncEngine, QueueFullError, RequestUpdate
from moeflow.errors import EngineDeadError, RequestError


@pytest.fixture(scope="module")
def llm(tiny_checkpoints: dict[str, Path]) -> LLM:
    return LLM(str(tiny_checkpoints["llama"]), dtype="float32", device="cpu", max_model_len=256)


async def _collect(engine: AsyncEngine, ids: list[int], params: SamplingParams, rid: str):  # noqa: ANN202
    updates: list[RequestUpdate] = []
    async for u in await engine.generate(ids, params, rid):
        updates.append(u)
    return updates


def test_results_equal_the_sync_engine(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5], [42] * 20]
    expected = [o.token_ids for o in llm.generate(prompts, params)]

    async def main() -> list[list[int]]:
        engine = AsyncEngine(llm.engine)
        engine.start()
        try:
            results = await asyncio.gather(
                *(_collect(engine, p, params, f"r{i}") for i, p in enumerate(prompts))
            )
        finally:
            await engine.drain(5)
        for updates in results:
            assert updates[-1].finish_reason == "length"
        assert engine.outcomes["accepted"] == engine.outcomes["finished"] == 3
        return [[t for u in updates for t in u.new_token_ids] for updates in results]

    assert asyncio.run(main()) == expected
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_one_hand_off_per_step(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """However many requests a step advances, the engine thread wakes the event loop once for
    their updates (and once per admission, for its ack)."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5], [42] * 20]
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    calls = {"engine": 0}

    async def main() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if threading.current_thread().name == "moeflow-engine":
                calls["engine"] += 1
            return call_soon_threadsafe(*args, **kwargs)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
        engine = AsyncEngine(llm.engine)
        steps = llm.engine.stats.num_steps
        engine.start()
        try:
            results = await asyncio.gather(
                *(_collect(engine, p, params, f"h{i}") for i, p in enumerate(prompts))
            )
        finally:
            await engine.drain(5)
        num_steps = llm.engine.stats.num_steps - steps
        num_updates = sum(len(u) for u in results)
        assert num_updates >= 3 * 12
        assert calls["engine"] <= num_steps + len(prompts) < num_updates
        return [[t for u in updates for t in u.new_token_ids] for updates in results]

    assert asyncio.run(main()) == expected


def test_leaving_early_aborts_and_bad_input_raises(llm: LLM) -> None:
    async def main() -> None:
        engine = AsyncEngine(llm.engine, max_waiting=1)
        engine.start()
        try:
            it = await engine.generate([1, 2], SamplingParams(max_tokens=200), "leave")
            async for _ in it:
                break
            await it.aclose()  # type: ignore[attr-defined]
            for _ in range(100):
                if engine.outcomes["aborted"] == 1:
                    break
                await asyncio.sleep(0.02)
            assert engine.outcomes["aborted"] == 1
            with pytest.raises(RequestError):
                await engine.generate([], SamplingParams(), "empty")
            assert engine.outcomes["rejected"] == 1
        finally:
            await engine.drain(5)

    asyncio.run(main())
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished()


def test_queue_full_refuses_at_once(llm: LLM) -> None:
    async def main() -> None:
        engine = AsyncEngine(llm.engine, max_waiting=0)
        engine.start()
        try:
            with pytest.raises(QueueFullError):
                await engine.generate([1], SamplingParams(), "x")
        finally:
            await engine.drain(5)

    asyncio.run(main())


def test_engine_death_fails_open_requests(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        engine = AsyncEngine(llm.engine)

        def boom() -> list:
            raise RuntimeError("simulated device fault")

        monkeypatch.setattr(llm.engine, "step", boom)
        engine.start()
        updates = await _collect(engine, [1, 2, 3], SamplingParams(max_tokens=4), "doomed")
        assert updates[-1].error is not None and "simulated" in updates[-1].error
        assert not engine.is_alive and not engine.is_healthy()
        with pytest.raises(EngineDeadError):
            await engine.generate([1], SamplingParams(), "after")

    asyncio.run(main())
    monkeypatch.undo()
    # The dead engine's request is gone from its sinks; clean the sync engine for other tests.
    for rid in list(llm.engine.requests):
        llm.engine.abort(rid)
