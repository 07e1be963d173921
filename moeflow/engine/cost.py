"""The cost of a query: every engine step's wall time, and the energy a real meter read over it,
booked to the step's requests by their share of its tokens (a prefill chunk's tokens, one per
decode row); the time between steps is booked as idle. Integer nanoseconds and microjoules,
split by largest remainder, so nothing is lost: over any window, the requests' shares plus idle
equal the clock's and the meter's readings exactly.

Energy comes only from a meter that measures it (RAPL on the CPU's packages, NVML's energy
counter on a GPU); without one it is None, never an estimate. A meter measures its whole
device: other processes running on it are booked to this engine's steps too."""

from __future__ import annotations

import ctypes
import logging
import re
import threading
import time
import weakref
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

logger = logging.getLogger("moeflow")

Phase = Literal["prefill", "decode", "idle"]
RAPL_ROOT = Path("/sys/class/powercap")


class EnergyMeter(Protocol):
    """A cumulative energy reading from a real meter."""

    source: str  # what measures: "rapl" | "nvml" (the `energy_source` of a cost)

    def read_uj(self) -> int:
        """Microjoules since the meter was made: never decreases (wraparound is the meter's to
        undo)."""
        ...


@dataclass(slots=True)
class RequestCost:
    """What one request was booked, updated by the engine thread after each step."""

    prefill_ns: int = 0
    decode_ns: int = 0
    energy_uj: int = 0
    # token_decode_ns[k]: the decode time booked to the row that sampled output token k (0 for
    # a token sampled by a prefill chunk), so that any leading run of tokens has its own time.
    token_decode_ns: array = field(default_factory=lambda: array("q"))

    def snapshot(self, energy_source: str | None, cached_tokens: int) -> CostSnapshot:
        return CostSnapshot(
            self.prefill_ns,
            self.decode_ns,
            self.energy_uj if energy_source is not None else None,
            energy_source,
            cached_tokens,
            tuple(self.token_decode_ns),
        )


@dataclass(frozen=True, slots=True)
class CostSnapshot:
    """A finished request's cost, handed to its caller with its last update."""

    prefill_ns: int
    decode_ns: int
    energy_uj: int | None  # None without a meter
    energy_source: str | None
    cached_tokens: int  # prompt tokens found in the prefix cache (not computed)
    token_decode_ns: tuple[int, ...]

    def decode_ns_of_first(self, num_tokens: int) -> int:
        """Decode time booked to the rows that sampled output tokens 0..num_tokens-1."""
        return sum(self.token_decode_ns[:num_tokens])


@dataclass(frozen=True, slots=True)
class Share:
    """One request's part of a step: `units` tokens of `phase`; a decode row samples output
    token `token_index`."""

    cost: RequestCost
    units: int
    phase: Literal["prefill", "decode"]
    token_index: int = -1


class CostLedger:
    """Books the engine's time and energy (module docstring). The engine calls `book_idle` when
    a step starts (the gap since the last booking was idle) and `book_step` when it ends."""

    def __init__(
        self, meter: EnergyMeter | None, clock: Callable[[], int] = time.perf_counter_ns
    ) -> None:
        self.meter = meter
        self.energy_source = meter.source if meter is not None else None
        self.clock = clock
        self.ns: dict[Phase, int] = {"prefill": 0, "decode": 0, "idle": 0}
        self.uj: dict[Phase, int] = {"prefill": 0, "decode": 0, "idle": 0}
        self._t = clock()
        self._e = meter.read_uj() if meter is not None else 0
        self._last: Sequence[Share] = ()

    def book_idle(self) -> None:
        ns, uj = self._advance()
        self.ns["idle"] += ns
        self.uj["idle"] += uj

    def book_step(self, shares: Sequence[Share] | None) -> None:
        """Book the time and energy since the last booking to `shares` (None: to the shares of
        the step before, whose launch this step only waited for; empty: idle)."""
        shares = self._last if shares is None else shares
        if not shares:
            self.book_idle()
            return
        self._last = shares
        ns, uj = self._advance()
        units = [s.units for s in shares]
        for share, part_ns, part_uj in zip(
            shares, _split(ns, units), _split(uj, units), strict=True
        ):
            c = share.cost
            self.ns[share.phase] += part_ns
            self.uj[share.phase] += part_uj
            c.energy_uj += part_uj
            if share.phase == "prefill":
                c.prefill_ns += part_ns
                continue
            c.decode_ns += part_ns
            k, tokens = share.token_index, c.token_decode_ns
            if len(tokens) <= k:
                tokens.extend([0] * (k + 1 - len(tokens)))
            tokens[k] += part_ns

    def totals(self) -> tuple[dict[str, float], dict[str, float] | None]:
        """(seconds, joules or None without a meter) per phase, booked so far."""
        seconds: dict[str, float] = {p: v / 1e9 for p, v in self.ns.items()}
        if self.meter is None:
            return seconds, None
        return seconds, {p: v / 1e6 for p, v in self.uj.items()}

    def _advance(self) -> tuple[int, int]:
        t = self.clock()
        e = self.meter.read_uj() if self.meter is not None else 0
        ns, uj = t - self._t, e - self._e
        self._t, self._e = t, e
        return ns, uj


def usage_cost(
    parts: Iterable[tuple[CostSnapshot, int]], price_per_hour: float | None
) -> dict[str, Any]:
    """The `cost` object of a response's usage, over its requests: (snapshot, reasoning tokens
    of that request's output). reasoning_seconds is the decode time of the rows that sampled
    the reasoning tokens; usd is the attributed seconds at `price_per_hour`."""
    parts = list(parts)
    prefill_ns = sum(s.prefill_ns for s, _ in parts)
    decode_ns = sum(s.decode_ns for s, _ in parts)
    reasoning_ns = sum(s.decode_ns_of_first(n) for s, n in parts)
    energy = [s.energy_uj for s, _ in parts]
    metered = bool(parts) and all(e is not None for e in energy)
    seconds = (prefill_ns + decode_ns) / 1e9
    return {
        "prefill_seconds": prefill_ns / 1e9,
        "decode_seconds": decode_ns / 1e9,
        "reasoning_seconds": reasoning_ns / 1e9,
        "cached_tokens": sum(s.cached_tokens for s, _ in parts),
        "joules": sum(e or 0 for e in energy) / 1e6 if metered else None,
        "energy_source": parts[0][0].energy_source if metered else None,
        "usd": price_per_hour * seconds / 3600 if price_per_hour is not None else None,
    }


# ---- meters -------------------------------------------------------------------------------------
class RaplMeter:
    """The CPU packages' energy counters (Linux powercap, `intel-rapl:N/energy_uj`; AMD's
    packages appear there too), summed. Each wraps at its `max_energy_range_uj`: a reading
    below the one before adds the range. Read at least once per wrap period (minutes at full
    power; the engine thread books idle every half second)."""

    source = "rapl"

    def __init__(self, zones: Sequence[Path]) -> None:
        if not zones:
            raise ValueError("no RAPL zones")
        self.zones = list(zones)
        self.ranges = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
        self._last = [self._raw(z) for z in self.zones]
        self._total = 0

    def read_uj(self) -> int:
        for i, zone in enumerate(self.zones):
            raw = self._raw(zone)
            delta = raw - self._last[i]
            self._total += delta if delta >= 0 else delta + self.ranges[i]
            self._last[i] = raw
        return self._total

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())


class NvmlMeter:
    """A GPU's total energy counter (NVML nvmlDeviceGetTotalEnergyConsumption, millijoules since
    the driver loaded; Volta and newer), through libnvidia-ml by ctypes."""

    source = "nvml"

    def __init__(self, uuid: str) -> None:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(lib.nvmlInit_v2(), "nvmlInit_v2")
        handle = ctypes.c_void_p()
        by_uuid = lib.nvmlDeviceGetHandleByUUID
        self._check(by_uuid(uuid.encode(), ctypes.byref(handle)), "nvmlDeviceGetHandleByUUID")
        self._lib, self._handle = lib, handle
        self._start = self._raw_mj()

    def read_uj(self) -> int:
        return (self._raw_mj() - self._start) * 1000

    def _raw_mj(self) -> int:
        mj = ctypes.c_ulonglong()
        rc = self._lib.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(mj))
        self._check(rc, "nvmlDeviceGetTotalEnergyConsumption")
        return mj.value

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc != 0:
            raise OSError(f"NVML {what} failed (return code {rc})")


class SampledMeter:
    """A meter too slow to read at every step, read on a daemon thread every `period_s`:
    `read_uj` returns the latest reading at once. Why: on the first GPU run (an H200) every
    decode step took 8.4-9.2 ms whatever the model (OLMoE's 2.2 GiB a step as Qwen3's 5.7),
    with the GPU idle 40-76% of it and the engine's timed phases ~0.5 ms; the two NVML reads a
    step were the only other work of any size found in it. That the reads cost those
    milliseconds is not yet measured (`scripts/gpu_check.sh nvml` does). The totals stay what
    the meter read (each booking takes the delta since the reading before); a step is booked
    the energy of the readings that landed since the step before, so steps shorter than the
    period get lumpier joules (NVML's counter is reported to update about every 10 ms)."""

    def __init__(self, meter: EnergyMeter, period_s: float = 0.02) -> None:
        self.source = meter.source
        self._value = meter.read_uj()
        self._stop = threading.Event()
        # The thread holds the meter weakly: it ends once the meter is dropped (an engine's
        # ledger going away), or at close().
        weakref.finalize(self, self._stop.set)
        self._thread = threading.Thread(
            target=_sample,
            args=(weakref.ref(self), meter, period_s, self._stop),
            name="moeflow-energy",
            daemon=True,
        )
        self._thread.start()

    def read_uj(self) -> int:
        return self._value

    def close(self) -> None:
        """Stop the reading thread (the last reading stays)."""
        self._stop.set()


def _sample(
    owner: weakref.ReferenceType[SampledMeter],
    meter: EnergyMeter,
    period_s: float,
    stop: threading.Event,
) -> None:
    """SampledMeter's thread: a reading every period_s into the owner while it lives."""
    while not stop.wait(period_s):
        try:
            value = meter.read_uj()  # ctypes drops the GIL during the call
        except OSError as e:
            logger.warning("energy meter %s stopped: %s", meter.source, e)
            return
        sampled = owner()
        if sampled is None:
            return
        sampled._value = value
        del sampled


def find_meter(device: str, rapl_root: Path = RAPL_ROOT) -> EnergyMeter | None:
    """The meter of `device` ("cpu", "cuda", "cuda:N") when one is readable, else None (logged
    once, with the reason). A GPU's NVML counter is read on a thread (SampledMeter); RAPL's
    sysfs files take microseconds and are read at each booking."""
    try:
        if device.startswith("cuda"):
            import torch

            props = torch.cuda.get_device_properties(torch.device(device))
            return SampledMeter(NvmlMeter(f"GPU-{props.uuid}"))
        zones = sorted(
            p for p in rapl_root.glob("intel-rapl:*") if re.fullmatch(r"intel-rapl:\d+", p.name)
        )
        return RaplMeter(zones)
    except Exception as e:  # any failure to open a meter means "no meter"
        logger.info("no energy meter for %s (%s): costs carry joules = null", device, e)
        return None


def _split(total: int, units: Sequence[int]) -> list[int]:
    """`total` split in proportion to `units`, in integers that sum to `total` exactly (largest
    remainder; ties to the earlier share)."""
    whole = sum(units)
    parts = [total * u // whole for u in units]
    left = total - sum(parts)
    by_remainder = sorted(range(len(units)), key=lambda i: -(total * units[i] % whole))
    for i in by_remainder[:left]:
        parts[i] += 1
    return parts
