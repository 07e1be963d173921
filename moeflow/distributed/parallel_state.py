"""The process's place in a parallel group: its rank, the tensor-, expert- and data-parallel
ranks and sizes, and two process groups: the device group (NCCL on a GPU, gloo on a CPU) for
the model's collectives, the ranks of one data-parallel replica, and a gloo control group of
every rank for the step messages and the replicas' logits. None while a single
process runs: every parallel layer then takes its single-process path, and no group exists.

Set once per process (`init_parallel`), before the model is built: the layers read their
shard at construction (vLLM's get_tensor_model_parallel_world_size, as a value here)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Store

# A step's collectives end in seconds; one that waits longer means a rank is gone or hung.
DEVICE_GROUP_TIMEOUT_S = 120.0
# Ranks other than 0 wait on the control group for the next step, however long the server idles.
CONTROL_GROUP_TIMEOUT_S = 10 * 365 * 24 * 3600.0


@dataclass(frozen=True)
class ParallelState:
    """rank = dp_rank * tp_size + tp_rank. Expert parallelism spans the tensor-parallel group
    of one data-parallel replica (vLLM's EP size is TP x DP; experts are not shared across
    replicas here): ep_rank = tp_rank when enabled."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    use_ep: bool
    device_group: dist.ProcessGroup | None  # None only in tests that build shards in one process
    control_group: dist.ProcessGroup | None

    @property
    def ep_rank(self) -> int:
        return self.tp_rank if self.use_ep else 0

    @property
    def ep_size(self) -> int:
        return self.tp_size if self.use_ep else 1


_state: ParallelState | None = None


def get_state() -> ParallelState | None:
    """The process's parallel state; None in a single process."""
    return _state


def tp_rank_size() -> tuple[int, int]:
    """(tensor-parallel rank, size): (0, 1) in a single process."""
    return (0, 1) if _state is None else (_state.tp_rank, _state.tp_size)


def ep_rank_size() -> tuple[int, int]:
    """(expert-parallel rank, size): (0, 1) without expert parallelism."""
    return (0, 1) if _state is None else (_state.ep_rank, _state.ep_size)


def init_parallel(
    rank: int,
    tp_size: int,
    dp_size: int,
    use_ep: bool,
    store: Store | None,
    device: str,
) -> ParallelState:
    """Join the group through `store` (a TCPStore rank 0 hosts; None: torchrun's, from the
    environment) and set the process's state."""
    global _state
    assert _state is None, "init_parallel runs once per process"
    world = tp_size * dp_size
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(
        backend,
        init_method="env://" if store is None else None,
        store=store,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=DEVICE_GROUP_TIMEOUT_S),
    )
    control: Any = dist.new_group(
        backend="gloo", timeout=datetime.timedelta(seconds=CONTROL_GROUP_TIMEOUT_S)
    )
    device_group: Any = dist.group.WORLD
    if dp_size > 1:
        # one device group per replica; every rank creates every group, in the same order
        for d in range(dp_size):
            group = dist.new_group(list(range(d * tp_size, (d + 1) * tp_size)), backend=backend)
            if d == rank // tp_size:
                device_group = group
    _state = ParallelState(
        rank=rank,
        world_size=world,
        tp_rank=rank % tp_size,
        tp_size=tp_size,
        dp_rank=rank // tp_size,
        dp_size=dp_size,
        use_ep=use_ep,
        device_group=device_group,
        control_group=control,
    )
    return _state


def set_state_for_tests(state: ParallelState | None) -> None:
    """Set the state without a group (building one rank's shard in a single process)."""
    global _state
    _state = state


def destroy_parallel() -> None:
    global _state
    if _state is not None and dist.is_initialized():
        dist.destroy_process_group()
    _state = None


def device_of_rank(device: str, rank: int) -> str:
    """The device a rank computes on: cuda:<rank> when `device` names CUDA, else `device`."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return device
