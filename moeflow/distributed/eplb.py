"""Expert placement from routing statistics (EPLB-style, our own greedy): the hottest experts
get redundant copies, then the copies are packed onto the expert-parallel ranks so that each
rank's expected load (tokens routed to the copies it holds) is even. The engine takes the result
as `expert_placement` (layers/moe.py MoE.set_placement); since every copy of an expert holds the
same weights and a token's pair runs on exactly one of them, outputs do not depend on it."""

from __future__ import annotations


def rebalance_experts(
    tokens_per_expert: list[list[int]], ep_size: int, num_redundant: int = 0
) -> list[list[int]]:
    """One placement per MoE layer: the checkpoint expert held in each of E + num_redundant
    physical slots, rank 0's slots first. `tokens_per_expert` is LLMEngine.routing_stats()."""
    if ep_size < 1 or num_redundant < 0:
        raise ValueError("ep_size must be >= 1 and num_redundant >= 0")
    return [_place_layer(counts, ep_size, num_redundant) for counts in tokens_per_expert]


def rank_loads(placement: list[int], counts: list[int], ep_size: int) -> list[float]:
    """Tokens each rank's slots are expected to run: an expert's tokens shared by its copies."""
    copies = [placement.count(e) for e in range(len(counts))]
    per = len(placement) // ep_size
    return [
        sum(counts[e] / copies[e] for e in placement[r * per : (r + 1) * per])
        for r in range(ep_size)
    ]


def _place_layer(counts: list[int], ep_size: int, num_redundant: int) -> list[int]:
    num_experts = len(counts)
    num_slots = num_experts + num_redundant
    if num_slots % ep_size:
        raise ValueError(
            f"{num_experts} experts + {num_redundant} redundant copies do not fill {ep_size} "
            "ranks evenly"
        )
    copies = [1] * num_experts
    for _ in range(num_redundant):  # copy the expert with the most tokens per copy
        hot = max(range(num_experts), key=lambda e: (counts[e] / copies[e], -e))
        copies[hot] += 1
    # Heaviest copies first, each to the least loaded rank with room (not already holding it).
    items = sorted(
        ((counts[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
        key=lambda item: (-item[0], item[1]),
    )
    per_rank = num_slots // ep_size
    slots: list[list[int]] = [[] for _ in range(ep_size)]
    loads = [0.0] * ep_size
    for load, e in items:
        room = [r for r in range(ep_size) if len(slots[r]) < per_rank]
        fresh = [r for r in room if e not in slots[r]] or room
        r = min(fresh, key=lambda r: (loads[r], r))
        slots[r].append(e)
        loads[r] += load
    return [e for rank_slots in slots for e in rank_slots]
