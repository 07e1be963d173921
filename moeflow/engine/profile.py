"""StepProfile: where profiled engine steps spend their time. The engine owns it (between
start_profile and stop_profile) and hands it to the runner with each step; `timed` and
`device_timed` add a phase's time to it and do nothing when there is none."""

from __future__ import annotations

import contextlib
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal

import torch

# The host phases of a step, as StepProfile's fields.
Phase = Literal["schedule_s", "prepare_s", "forward_s", "sample_s", "wait_s", "postprocess_s"]


@dataclass(slots=True)
class StepProfile:
    """Host seconds per phase, and CUDA events around each step's device work (forward and
    sampling). Without the overlap schedule the device waits for all the host work of a step;
    with it, for what the host does before the launch only (schedule, prepare) while the
    previous step still runs."""

    steps: int = 0  # steps that launched a forward
    schedule_s: float = 0.0  # scheduler: which requests run, block allocation
    prepare_s: float = 0.0  # host lists -> device tensors of the ForwardBatch
    forward_s: float = 0.0  # host time launching the forward (on CPU: running it)
    sample_s: float = 0.0  # host time launching the sampling (on CPU: running it)
    wait_s: float = 0.0  # waiting for sampled ids to reach the host
    postprocess_s: float = 0.0  # appending tokens, stop checks, freeing finished requests
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return (
            self.schedule_s
            + self.prepare_s
            + self.forward_s
            + self.sample_s
            + self.wait_s
            + self.postprocess_s
        )

    @property
    def host_overhead_s(self) -> float:
        """The engine's own Python work: scheduling, preparing, post-processing."""
        return self.schedule_s + self.prepare_s + self.postprocess_s

    def gpu_busy_s(self) -> float | None:
        """GPU seconds of the steps' forwards and sampling (None on CPU); waits for the last."""
        if not self.events:
            return None
        self.events[-1][1].synchronize()
        return sum(a.elapsed_time(b) for a, b in self.events) / 1000.0


def timed(profile: StepProfile | None, phase: Phase) -> AbstractContextManager[None]:
    """`with timed(profile, "prepare_s"):` adds the host seconds of the block to that phase."""
    return _OFF if profile is None else _Timed(profile, phase)


def device_timed(profile: StepProfile | None, device: torch.device) -> AbstractContextManager[None]:
    """`with device_timed(profile, device):` around one step's launches counts the step and,
    on CUDA, records a pair of events around its device work (StepProfile.gpu_busy_s)."""
    return _OFF if profile is None else _DeviceTimed(profile, device)


_OFF = contextlib.nullcontext()


class _Timed:
    __slots__ = ("_profile", "_phase", "_start")

    def __init__(self, profile: StepProfile, phase: Phase) -> None:
        self._profile, self._phase, self._start = profile, phase, 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self._start
        setattr(self._profile, self._phase, getattr(self._profile, self._phase) + seconds)


class _DeviceTimed:
    __slots__ = ("_profile", "_events")

    def __init__(self, profile: StepProfile, device: torch.device) -> None:
        self._profile = profile
        self._events = (
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            if device.type == "cuda"
            else None
        )

    def __enter__(self) -> None:
        if self._events is not None:
            self._events[0].record()

    def __exit__(self, *exc: object) -> None:
        self._profile.steps += 1
        if self._events is not None:
            self._events[1].record()
            self._profile.events.append(self._events)
