"""engine/cost.py: every step's time and energy booked to its requests, nothing lost. With a fake
clock and a fake meter whose readings advance by scripted amounts, the requests' shares plus
idle equal the readings exactly, through chunked prefill, preemption, prefix-cache hits, both
schedules and idle gaps; RAPL's wraparound is undone; no meter means no joules."""

from __future__ import annotations

import itertools
import random
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeflow import LLM, SamplingParams
from moeflow.engine.cost import (
    CostLedger,
    CostSnapshot,
    RaplMeter,
    RequestCost,
    SampledMeter,
    Share,
    _split,
    find_meter,
    usage_cost,
)
from moeflow.engine.request import Request


class Scripted:
    """A reading that advances by the next scripted step each time it is read."""

    def __init__(self, steps: Iterator[int]) -> None:
        self.steps = steps
        self.value = 1_000_000  # any origin: only differences count

    def __call__(self) -> int:
        self.value += next(self.steps)
        return self.value


class FakeMeter:
    source = "fake"

    def __init__(self, steps: Iterator[int]) -> None:
        self.reading = Scripted(steps)

    def read_uj(self) -> int:
        return self.reading()


def _random_steps(seed: int, low: int, high: int) -> Iterator[int]:
    rng = random.Random(seed)
    return (rng.randint(low, high) for _ in itertools.count())


def test_split_is_exact_and_proportional() -> None:
    assert _split(10, [1, 1, 1]) == [4, 3, 3]
    assert _split(10, [3, 1, 1]) == [6, 2, 2]
    assert _split(7, [5]) == [7]
    rng = random.Random(0)
    for _ in range(500):
        units = [rng.randint(1, 300) for _ in range(rng.randint(1, 20))]
        total = rng.randint(0, 10**9)
        parts = _split(total, units)
        assert sum(parts) == total
        for part, u in zip(parts, units, strict=True):
            assert abs(part - total * u / sum(units)) < 1


def test_book_step_splits_by_tokens_and_rows() -> None:
    clock = Scripted(iter([0, 10, 9, 5]))
    meter = FakeMeter(iter([0, 100, 30, 7]))
    ledger = CostLedger(meter, clock=clock)
    a, b, c = RequestCost(), RequestCost(), RequestCost()
    # A prefill chunk of 3 tokens beside two decode rows sampling output tokens 2 and 0.
    ledger.book_step([Share(a, 3, "prefill"), Share(b, 1, "decode", 2), Share(c, 1, "decode", 0)])
    assert (a.prefill_ns, b.decode_ns, c.decode_ns) == (6, 2, 2)
    assert (a.energy_uj, b.energy_uj, c.energy_uj) == (60, 20, 20)
    assert list(b.token_decode_ns) == [0, 0, 2] and list(c.token_decode_ns) == [2]
    ledger.book_step(None)  # a step that only waited for the launch before: the same shares
    assert (a.prefill_ns, b.decode_ns, c.decode_ns) == (6 + 5, 2 + 2, 2 + 2)  # 9 -> 5, 2, 2
    ledger.book_idle()
    assert ledger.ns == {"prefill": 11, "decode": 8, "idle": 5}
    assert ledger.uj == {"prefill": 60 + 18, "decode": 40 + 12, "idle": 7}


@pytest.mark.parametrize("overlap", [False, True])
def test_requests_plus_idle_equal_the_readings(
    overlap: bool, tiny_checkpoints: dict[str, Path]
) -> None:
    # A small cache and budget: chunked prefill, preemption and prefix-cache hits all happen.
    llm = LLM(
        str(tiny_checkpoints["llama"]),
        dtype="float32",
        device="cpu",
        max_model_len=128,
        kv_cache_tokens=256,
        max_num_batched_tokens=48,
        overlap_schedule=overlap,
    )
    engine = llm.engine
    clock = Scripted(_random_steps(1, 1, 10**7))
    meter = FakeMeter(_random_steps(2, 0, 10**6))
    engine.cost = ledger = CostLedger(meter, clock=clock)
    t0, e0 = clock.value, meter.reading.value  # the window opens at the ledger's first reading
    rng = random.Random(3)
    shared = [rng.randrange(256) for _ in range(40)]
    reqs: list[Request] = []
    for i in range(12):
        prompt = (shared if i % 3 == 0 else []) + [rng.randrange(256) for _ in range(i * 7 + 1)]
        params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 40), ignore_eos=True)
        reqs.append(engine.add_request(prompt, params))
        for _ in range(rng.randint(0, 3)):
            engine.step()
        if i % 4 == 0:
            ledger.book_idle()  # the engine thread's idle tick
    engine.run_to_completion()
    ledger.book_idle()
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.num_hit_tokens > 0

    booked_ns = sum(r.cost.prefill_ns + r.cost.decode_ns for r in reqs)
    booked_uj = sum(r.cost.energy_uj for r in reqs)
    assert booked_ns + ledger.ns["idle"] == clock.value - t0
    assert booked_uj + ledger.uj["idle"] == meter.reading.value - e0
    assert sum(r.cost.prefill_ns for r in reqs) == ledger.ns["prefill"]
    assert sum(r.cost.decode_ns for r in reqs) == ledger.ns["decode"]
    assert ledger.ns["idle"] > 0
    for r in reqs:
        assert r.cost.prefill_ns > 0  # every request's prompt ran
        assert sum(r.cost.token_decode_ns) == r.cost.decode_ns
        # Output token 0 comes from a prefill chunk; each later one from a decode row, unless a
        # recompute after preemption sampled it (then it booked no decode time).
        assert len(r.cost.token_decode_ns) <= max(len(r.output_ids) + overlap, 1)
        assert r.cost.token_decode_ns[:1] in (array("q"), array("q", [0]))
        if r.num_preemptions == 0 and len(r.output_ids) > 1:
            assert all(t > 0 for t in r.cost.token_decode_ns[1 : len(r.output_ids)])
        assert r.first_scheduled_time is not None and r.first_token_time is not None
        assert r.arrival_time <= r.first_scheduled_time <= r.first_token_time


def test_usage_cost() -> None:
    a = CostSnapshot(2_000_000_000, 1_000_000_000, 5_000_000, "rapl", 16, (0, 600_000_000, 4))
    b = CostSnapshot(1_000_000_000, 0, 1_000_000, "rapl", 0, ())
    cost = usage_cost([(a, 2), (b, 0)], price_per_hour=3.6)
    assert cost == {
        "prefill_seconds": 3.0,
        "decode_seconds": 1.0,
        "reasoning_seconds": 0.6,
        "cached_tokens": 16,
        "joules": 6.0,
        "energy_source": "rapl",
        "usd": pytest.approx(3.6 * 4 / 3600),
    }
    unmetered = CostSnapshot(1, 2, None, None, 0, (0, 2))
    cost = usage_cost([(unmetered, 5)], price_per_hour=None)
    assert cost["joules"] is None and cost["energy_source"] is None and cost["usd"] is None
    assert cost["reasoning_seconds"] == 2e-9


def _zone(root: Path, name: str, energy: int, max_range: int) -> Path:
    zone = root / name
    zone.mkdir()
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def test_rapl_sums_packages_and_undoes_wraparound(tmp_path: Path) -> None:
    p0 = _zone(tmp_path, "intel-rapl:0", 900, 1000)
    _zone(tmp_path, "intel-rapl:0:0", 5, 1000)  # a sub-zone (core): inside package 0 already
    p1 = _zone(tmp_path, "intel-rapl:1", 10, 10**6)
    meter = find_meter("cpu", rapl_root=tmp_path)
    assert isinstance(meter, RaplMeter) and meter.source == "rapl"
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:1"]
    assert meter.read_uj() == 0
    (p0 / "energy_uj").write_text("50\n")  # wrapped: 900 -> 1000 -> 0 -> 50 is 150
    (p1 / "energy_uj").write_text("40\n")
    assert meter.read_uj() == 150 + 30
    (p0 / "energy_uj").write_text("60\n")
    assert meter.read_uj() == 180 + 10


def test_a_sampled_meter_never_waits_for_a_slow_read() -> None:
    """The engine thread's reading is the latest the meter's thread made: while that thread is
    inside a read that does not return, the engine still reads at once."""
    gate = threading.Event()

    class Blocking:
        source = "slow"

        def __init__(self) -> None:
            self.reads = 0

        def read_uj(self) -> int:
            self.reads += 1
            if self.reads > 1:  # every read after the first waits for the gate
                gate.wait()
            return 1000 * self.reads

    inner = Blocking()
    meter = SampledMeter(inner, period_s=0.001)
    ledger = CostLedger(meter)
    assert meter.source == "slow" and meter.read_uj() == 1000
    deadline = time.monotonic() + 10
    while inner.reads < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert inner.reads == 2  # the thread is inside its read, blocked
    cost = RequestCost()
    ledger.book_step([Share(cost, 1, "decode", 0)])  # returns: the engine does not wait
    assert cost.energy_uj == 0 and meter.read_uj() == 1000
    gate.set()
    while meter.read_uj() < 2000 and time.monotonic() < deadline:
        time.sleep(0.001)
    meter.close()
    meter._thread.join(timeout=10)  # no reading lands after this one
    assert not meter._thread.is_alive()
    reading = meter.read_uj()
    assert reading >= 2000
    ledger.book_step([Share(cost, 1, "decode", 1)])
    assert cost.energy_uj == reading - 1000  # the totals are the meter's readings


def test_a_sampled_meter_s_thread_ends_with_it() -> None:
    meter = SampledMeter(FakeMeter(itertools.repeat(1)), period_s=0.001)
    thread = meter._thread
    assert thread.is_alive()
    del meter
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_no_meter_means_no_joules(tmp_path: Path) -> None:
    assert find_meter("cpu", rapl_root=tmp_path) is None  # no zones
    assert find_meter("cpu", rapl_root=tmp_path / "absent") is None
    ledger = CostLedger(None)
    cost = RequestCost()
    ledger.book_step([Share(cost, 4, "prefill")])
    assert ledger.totals()[1] is None
    snap = cost.snapshot(ledger.energy_source, 0)
    assert snap.energy_uj is None and snap.energy_source is None and snap.prefill_ns > 0


def test_offline_outputs_carry_the_cost(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["llama"]), dtype="float32", device="cpu", max_model_len=64)
    (out,) = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=5, ignore_eos=True))
    cost = out.cost
    assert cost is not None and cost["prefill_seconds"] > 0 and cost["decode_seconds"] > 0
    assert cost["usd"] is None and cost["reasoning_seconds"] == 0
    assert (cost["joules"] is None) == (cost["energy_source"] is None)
