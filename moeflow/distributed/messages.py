"""The typed messages rank 0 sends the other ranks over the control group: a JSON header with
a schema (`kind` and its fields, checked on receipt) and, for a step, one int64 tensor holding
the flattened batch. Never pickle (docs/RELIABILITY.md rule 1).

  {"kind": "init", "num_cache_blocks": N, "block_size": S, "dtype": "float32"}
  {"kind": "step", "num_tokens": T, "num_seqs": B, "table_width": W, "num_logits": S,
   "query_lens": [...], "context_lens": [...], "is_decode": bool, "replica": d, "last": bool}
   + int64 [3T + 2B + 1 + S + BW]
  {"kind": "stop"}
With data parallelism a step is one piece per replica that has sequences (`replica`: the
data-parallel rank that runs it), the last marked `last`; every rank receives every piece and
runs its own once the last has come. A replica's logits go back to rank 0 point to point
(`send_logits` / `receive_logits`: an int64 [2] shape, then the float32 rows)."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

from moeflow.context import ForwardBatch
from moeflow.distributed.comm import broadcast_object_bytes, broadcast_tensor, control_group

_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "init": {"num_cache_blocks": int, "block_size": int, "dtype": str},
    "step": {
        "num_tokens": int,
        "num_seqs": int,
        "table_width": int,
        "num_logits": int,
        "query_lens": list,
        "context_lens": list,
        "is_decode": bool,
        "replica": int,
        "last": bool,
    },
    "stop": {},
}


def send(message: dict[str, Any], payload: torch.Tensor | None = None) -> None:
    """Rank 0: broadcast one message (and the step's tensor)."""
    _check(message)
    broadcast_object_bytes(json.dumps(message).encode())
    if payload is not None:
        broadcast_tensor(payload.contiguous())


def receive() -> dict[str, Any]:
    """Other ranks: the next message's header, checked against its schema."""
    message = json.loads(broadcast_object_bytes(None).decode())
    _check(message)
    return message


def send_step(fb: ForwardBatch, replica: int = 0, last: bool = True) -> None:
    b, w = fb.block_tables.shape
    payload = torch.cat(
        [
            fb.input_ids,
            fb.positions,
            fb.slot_mapping,
            fb.context_lens,
            fb.cu_seqlens_q,
            fb.logits_indices,
            fb.block_tables.reshape(-1),
        ]
    ).cpu()
    header = {
        "kind": "step",
        "num_tokens": int(fb.input_ids.shape[0]),
        "num_seqs": b,
        "table_width": w,
        "num_logits": int(fb.logits_indices.shape[0]),
        "query_lens": list(fb.query_lens_cpu),
        "context_lens": list(fb.context_lens_cpu),
        "is_decode": fb.is_decode,
        "replica": replica,
        "last": last,
    }
    send(header, payload)


def receive_step(header: dict[str, Any], device: torch.device) -> ForwardBatch:
    """The step's ForwardBatch, its tensors on `device` (after `receive` returned `header`)."""
    t, b, w, s = (header[k] for k in ("num_tokens", "num_seqs", "table_width", "num_logits"))
    payload = torch.empty(3 * t + 2 * b + 1 + s + b * w, dtype=torch.int64)
    broadcast_tensor(payload)
    dev = payload.to(device)
    sizes = [t, t, t, b, b + 1, s, b * w]
    ids, positions, slots, ctx, cu, logits, tables = dev.split(sizes)
    return ForwardBatch(
        input_ids=ids,
        positions=positions,
        slot_mapping=slots,
        block_tables=tables.view(b, w),
        context_lens=ctx,
        cu_seqlens_q=cu,
        logits_indices=logits,
        query_lens_cpu=[int(n) for n in header["query_lens"]],
        context_lens_cpu=[int(n) for n in header["context_lens"]],
        is_decode=bool(header["is_decode"]),
    )


def send_logits(logits: torch.Tensor) -> None:
    """A data-parallel replica's first rank: its logits [S, V] to rank 0."""
    group = control_group()
    rows, vocab = logits.shape
    dist.send(torch.tensor([rows, vocab], dtype=torch.int64), 0, group=group)
    dist.send(logits.float().cpu().contiguous(), 0, group=group)


def receive_logits(src: int, rows: int) -> torch.Tensor:
    """Rank 0: the logits [rows, V] float32 of the replica whose first rank is `src`."""
    group = control_group()
    shape = torch.empty(2, dtype=torch.int64)
    dist.recv(shape, src, group=group)
    if int(shape[0]) != rows:
        raise RuntimeError(f"rank {src} sent {int(shape[0])} logits rows, expected {rows}")
    out = torch.empty(rows, int(shape[1]), dtype=torch.float32)
    dist.recv(out, src, group=group)
    return out


def _check(message: Any) -> None:
    if not isinstance(message, dict) or message.get("kind") not in _SCHEMA:
        raise ValueError(f"not a step message: {str(message)[:80]}")
    for key, kind in _SCHEMA[message["kind"]].items():
        if not isinstance(message.get(key), kind):
            raise ValueError(f"step message {message['kind']!r}: field {key!r} is not {kind}")
