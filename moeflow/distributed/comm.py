"""The collectives the parallel layers call, over the tensor-parallel (device) group. Each has
a plain single-process path that returns its input (or the one-element answer) at once, so a
model built without a group runs exactly as before.

NOTE: with tensor-parallel attention every rank holds every token, so expert parallelism
combines the ranks' partial expert outputs with one all-reduce (= reduce-scatter + all-gather);
all_to_all is here for ranks that hold different tokens (data-parallel attention)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.distributed.parallel_state import get_state


def _group() -> dist.ProcessGroup | None:
    state = get_state()
    if state is None or state.tp_size == 1:
        return None
    assert state.device_group is not None, "a parallel state without a group cannot communicate"
    return state.device_group


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place; returns x."""
    group = _group()
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The ranks' x concatenated along `dim`, in rank order."""
    group = _group()
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Sum over the ranks, then this rank's equal slice along `dim`."""
    group = _group()
    if group is None:
        return x
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % size:
        raise ValueError(f"reduce_scatter: dim {dim} of {tuple(x.shape)} not divisible by {size}")
    # NOTE: gloo has no reduce_scatter: an all-reduce then a slice gives the same sums.
    summed = all_reduce(x.clone())
    n = x.shape[dim] // size
    return summed.narrow(dim, rank * n, n).contiguous()


def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Rows of x [N, ...] sent to each rank in order (send_counts[r] rows to rank r); returns the
    rows received, recv_counts[r] from rank r, in rank order."""
    group = _group()
    if group is None:
        return x
    if dist.get_backend(group) == "gloo":
        # gloo has no all_to_all_single: one all_gather of every rank's rows, then each takes
        # the slices meant for it.
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        counts = torch.tensor(send_counts, dtype=torch.int64)
        all_counts = [torch.empty_like(counts) for _ in range(size)]
        dist.all_gather(all_counts, counts, group=group)
        width = max(int(c.sum()) for c in all_counts)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        rows = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(rows, padded, group=group)
        taken = []
        for src in range(size):
            start = int(all_counts[src][:rank].sum())
            taken.append(rows[src][start : start + int(all_counts[src][rank])])
        return torch.cat(taken)
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    return out


def control_group() -> dist.ProcessGroup:
    """The gloo group of every rank (step messages, the replicas' logits)."""
    state = get_state()
    assert state is not None and state.control_group is not None
    return state.control_group


def broadcast_object_bytes(data: bytes | None, src: int = 0) -> bytes:
    """Bytes from rank `src` to every rank of the control group (typed messages only: the
    caller encodes JSON; nothing here pickles)."""
    group = control_group()
    length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(length, src, group=group)
    buf = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data is not None
        else torch.empty(int(length.item()), dtype=torch.uint8)
    )
    if buf.numel():
        dist.broadcast(buf, src, group=group)
    return bytes(buf.numpy())


def broadcast_tensor(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """A CPU tensor from rank `src` over the control group, in place."""
    dist.broadcast(x, src, group=control_group())
    return x
