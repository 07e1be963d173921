"""Helpers every `moeflow bench` workload shares: the measured memory bandwidth (the decode
roofline's limit), the device, the `--compare` peers, routing imbalance."""

from __future__ import annotations

import time

import torch

from moeflow.bench.peers import PEERS, require_peer

BANDWIDTH_BYTES = 256 * 2**20  # size of the copied tensor
BANDWIDTH_REPEATS = 5


def measure_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by the best of a few large tensor copies."""
    numel = BANDWIDTH_BYTES // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)  # [N]
    dst = torch.empty_like(src)  # [N]
    best = float("inf")
    for _ in range(BANDWIDTH_REPEATS):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * BANDWIDTH_BYTES / best


def routing_imbalance(stats: list[list[int]]) -> float | None:
    """Mean over MoE layers of max tokens per expert / mean tokens per expert (1.0: uniform)."""
    ratios = [max(layer) * len(layer) / sum(layer) for layer in stats if sum(layer)]
    return sum(ratios) / len(ratios) if ratios else None


def parse_compare(compare: str) -> list[str]:
    """`--compare` as a list of peer names ("auto": every peer, "none" or empty: none). A peer
    named explicitly must be installed (ValueError naming the `bench` extra)."""
    names = [c.strip() for c in compare.split(",") if c.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["auto"]:
        return list(PEERS)
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"--compare: unknown peer(s) {unknown}; choose from {', '.join(PEERS)}")
    for name in names:
        require_peer(name)
    return list(dict.fromkeys(names))


def resolve_device(device: str) -> str:
    """`--device auto` is the GPU when there is one."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock timings are whole."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
