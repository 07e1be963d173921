"""Host values to device tensors without waiting on the device."""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of host `values` on `device`. On a GPU the values are staged in pinned memory
    and copied asynchronously: a plain copy from pageable memory would wait for every kernel
    already queued, which is exactly what the overlap schedule must not do."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    host = torch.tensor(values, dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)
