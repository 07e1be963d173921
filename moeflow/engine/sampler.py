"""Sampler: penalties, temperature, top-k / top-p / min-p, per-request seeds and logprobs, with
vLLM's semantics. Owns no model state; its one host sync is the copy of the results, which
`Sampler.sample` leaves for the caller to wait for (SampledBatch.to_host)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.engine.structured_output import apply_bitmask
from moeflow.kernels import sampling
from moeflow.sampling_params import SamplingParams
from moeflow.utils.device import to_device

# Shapes: N rows in the batch, V vocab, S sampled (non-greedy) rows, L rows asking for logprobs,
# K the largest top-logprobs count among those L rows.


@dataclass(slots=True)
class SamplingRow:
    """One sequence to sample for, this step; the engine builds it from its request."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]  # tokens generated so far
    generator: torch.Generator | None  # per request, from make_generator; None for greedy


@dataclass(slots=True)
class TokenLogprobs:
    """Logprobs of one sampled token, from the raw logits (before penalties and temperature)."""

    token_id: int
    logprob: float
    top: dict[int, float]  # top-N token -> logprob by falling logprob, N = params.logprobs


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded from `seed`, or when None from torch's global CPU RNG (so
    `torch.manual_seed` makes unseeded requests reproducible too)."""
    if seed is None:
        seed = int(torch.randint(2**63 - 1, (1,)).item())
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Stateless: a request's random state lives in its SamplingRow.generator, so a seeded request
    draws the same tokens alone or in any batch, at any row, whatever its neighbours."""

    def sample(
        self, logits: torch.Tensor, rows: list[SamplingRow], bitmask: torch.Tensor | None = None
    ) -> SampledBatch:
        """logits [N, V], any float dtype, never written -> the sampled ids, which stay on the
        device (for the next step's inputs) while their copy to the host is queued behind the
        sampling (SampledBatch.to_host() waits for it). bitmask: structured output's allowed
        tokens, host int32 [N, W] (engine/structured_output.py), applied after the penalties;
        logprobs stay those of the raw logits."""
        num_rows = logits.shape[0]
        if logits.dim() != 2 or len(rows) != num_rows:
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        if bitmask is None and all(_is_plain_greedy(row.params) for row in rows):
            token_ids = logits.argmax(dim=-1)  # [N]
            return SampledBatch(token_ids, token_ids, [], 0, [row.params for row in rows])

        device = logits.device
        raw = logits.float()  # [N, V]; NOTE: may alias `logits`, so nothing below writes in place
        lp_rows = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        lp_idx = to_device(lp_rows, torch.long, device)  # [L]
        logprobs = raw[lp_idx].log_softmax(dim=-1) if lp_rows else None  # [L, V]

        x = apply_penalties(raw, rows)  # [N, V]
        if bitmask is not None:
            x = apply_bitmask(x, bitmask)  # [N, V]
        sample_rows = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if len(sample_rows) == num_rows:
            token_ids = _sample(x, rows)  # [N]
        else:
            token_ids = x.argmax(dim=-1)  # [N]
            if sample_rows:
                sample_idx = to_device(sample_rows, torch.long, device)  # [S]
                token_ids[sample_idx] = _sample(x[sample_idx], [rows[i] for i in sample_rows])

        params = [row.params for row in rows]
        if logprobs is None:
            return SampledBatch(token_ids, token_ids, [], 0, params)
        vocab_size = logprobs.shape[1]
        sampled_lp = logprobs.gather(1, token_ids[lp_idx][:, None]).squeeze(1)  # [L]
        max_n = min(max(rows[i].params.logprobs or 0 for i in lp_rows), vocab_size)
        top_lp, top_ids = logprobs.topk(max_n, dim=-1)  # [L, K] each, by falling logprob
        # float64 holds every token id and float32 logprob exactly: one copy for everything
        flat = torch.cat(
            [
                token_ids.double(),
                sampled_lp.double(),
                top_lp.double().flatten(),
                top_ids.double().flatten(),
            ]
        )
        return SampledBatch(token_ids, flat, lp_rows, max_n, params)


class SampledBatch:
    """One step's sampled ids on the device, and everything the host reads of it (ids, then
    logprobs when asked for) in one flat tensor whose copy to the host is already queued: on a
    GPU into pinned memory, so `to_host` waits for this step only, not for work queued after."""

    def __init__(
        self,
        token_ids: torch.Tensor,
        flat: torch.Tensor,
        lp_rows: list[int],
        max_n: int,
        params: list[SamplingParams],
    ) -> None:
        self.token_ids = token_ids  # [N] long, on the device
        self._lp_rows = lp_rows
        self._max_n = max_n
        self._params = params
        self._ready: torch.cuda.Event | None = None
        if flat.device.type == "cuda":
            self._host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self._host.copy_(flat, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = flat.cpu()

    def to_host(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        """(token id, logprobs or None) per row; waits for the copy."""
        if self._ready is not None:
            self._ready.synchronize()
        flat = self._host.tolist()
        num_rows = len(self._params)
        ids = [int(t) for t in flat[:num_rows]]
        out: list[TokenLogprobs | None] = [None] * num_rows
        lp_rows, max_n = self._lp_rows, self._max_n
        sampled = flat[num_rows : num_rows + len(lp_rows)]
        top_off = num_rows + len(lp_rows)
        ids_off = top_off + len(lp_rows) * max_n
        for j, i in enumerate(lp_rows):
            n = self._params[i].logprobs or 0
            row_lp = flat[top_off + j * max_n : top_off + j * max_n + n]
            row_ids = flat[ids_off + j * max_n : ids_off + j * max_n + n]
            top = {int(t): lp for t, lp in zip(row_ids, row_lp, strict=True)}
            out[i] = TokenLogprobs(token_id=ids[i], logprob=sampled[j], top=top)
        return ids, out


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits [N, V] float32 -> penalised copy [N, V] (or `logits` itself when no row has any).
    First the OpenAI logit_bias is added; then repetition over prompt + output (logit > 0:
    divide, else multiply); then presence and frequency over output only:
    logit -= presence * (count > 0) + frequency * count."""
    rep_rows = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    count_rows = [
        i
        for i, row in enumerate(rows)
        if row.params.presence_penalty != 0.0 or row.params.frequency_penalty != 0.0
    ]
    bias_rows = [i for i, row in enumerate(rows) if row.params.logit_bias]
    if not rep_rows and not count_rows and not bias_rows:
        return logits
    num_rows, vocab_size = logits.shape
    device = logits.device

    # NOTE: the index lists are rebuilt on the host each step by a per-row loop (O(prompt +
    # output) per penalised row); everything after them is batched.
    if bias_rows:
        bias = torch.zeros(num_rows, vocab_size, dtype=torch.float32)  # [N, V], built on host
        for i in bias_rows:
            ids = [t for t in rows[i].params.logit_bias if t < vocab_size]
            vals = [rows[i].params.logit_bias[t] for t in ids]
            bias[i, ids] = torch.tensor(vals, dtype=torch.float32)
        logits = logits + bias.to(device)
    if rep_rows:
        row_idx, tok_idx = _flat_index(
            rep_rows, [rows[i].prompt_ids + rows[i].output_ids for i in rep_rows]
        )
        seen = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device)  # [N, V]
        seen[row_idx.to(device), tok_idx.to(device)] = True
        penalty = _column([row.params.repetition_penalty for row in rows], device)  # [N, 1]
        logits = torch.where(
            seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits
        )
    if count_rows:
        row_idx, tok_idx = _flat_index(count_rows, [rows[i].output_ids for i in count_rows])
        counts = torch.zeros(num_rows, vocab_size, dtype=torch.float32, device=device)  # [N, V]
        ones = torch.ones(row_idx.numel(), dtype=torch.float32, device=device)
        counts.index_put_((row_idx.to(device), tok_idx.to(device)), ones, accumulate=True)
        frequency = _column([row.params.frequency_penalty for row in rows], device)  # [N, 1]
        presence = _column([row.params.presence_penalty for row in rows], device)  # [N, 1]
        logits = logits - frequency * counts - presence * (counts > 0)
    return logits


def has_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
        or bool(params.logit_bias)
    )


def _is_plain_greedy(params: SamplingParams) -> bool:
    return params.is_greedy and params.logprobs is None and not has_penalties(params)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.float32, device)[:, None]  # [N, 1]


def skip_draw(generator: torch.Generator) -> None:
    """Advance a request's generator past the one uniform a step draws for it (_sample), for a
    token sampled elsewhere (a prefill instance's first token): its later tokens are then the
    ones a colocated run draws."""
    torch.rand(1, dtype=torch.float64, generator=generator, device=generator.device)


def _flat_index(
    row_ids: list[int], token_lists: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs, both [T] long on the CPU, for index_put_ into an [N, V]."""
    lens = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    row_idx = torch.tensor(row_ids, dtype=torch.long).repeat_interleave(lens)  # [T]
    tok_idx = torch.tensor([t for tokens in token_lists for t in tokens], dtype=torch.long)  # [T]
    return row_idx, tok_idx


def _sample(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Penalised logits [S, V] of non-greedy rows -> sampled ids [S]: temperature, top-k, top-p,
    min-p, then one inverse-CDF draw per row from a uniform of the row's own generator (None:
    torch's default generator), so a row's token depends only on its own random state."""
    num_rows, vocab_size = x.shape
    device = x.device
    params = [row.params for row in rows]
    u = torch.cat(
        [torch.rand(1, dtype=torch.float64, generator=row.generator, device=device) for row in rows]
    )  # [S]
    temperature = to_device([p.temperature for p in params], torch.float32, device)  # [S]
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    top_p = [p.top_p for p in params]
    filtered = any(k < vocab_size for k in top_k) or any(p < 1.0 for p in top_p)
    if not filtered and not any(p.min_p > 0.0 for p in params):
        return sampling.sample_softmax(x, temperature, u)

    x = x / temperature[:, None]  # [S, V]
    if filtered:
        x = _top_k_top_p(x, top_k, top_p)
    probs = x.softmax(dim=-1)  # [S, V]
    if any(p.min_p > 0.0 for p in params):
        min_p = _column([p.min_p for p in params], device)  # [S, 1]
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return sampling.sample_probs(probs, u)


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """logits [S, V] -> copy with the tokens outside each row's top-k, then outside the smallest
    set of mass >= top_p (the top token always stays), set to -inf."""
    num_rows, vocab_size = x.shape
    device = x.device
    # stable: ties at the top-k edge keep the lower token id, whatever the batch
    sorted_x, sorted_idx = x.sort(dim=-1, descending=True, stable=True)  # [S, V] each
    k = to_device(top_k, torch.long, device)[:, None]  # [S, 1]
    drop = torch.arange(vocab_size, device=device)[None, :] >= k  # [S, V], sorted order
    if any(p < 1.0 for p in top_p):
        p = _column(top_p, device)  # [S, 1]
        probs = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)  # [S, V]
        mass_before = probs.cumsum(dim=-1) - probs  # [S, V]; exactly 0 for the top token
        # rows with top_p == 1 skip the test: a cumsum rounding past 1.0 must not drop the tail
        drop |= (mass_before >= p) & (p < 1.0)
    drop = torch.empty_like(drop).scatter_(1, sorted_idx, drop)  # [S, V], vocab order
    return x.masked_fill(drop, float("-inf"))
