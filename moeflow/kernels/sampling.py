"""Drawing one token per row from softmax(logits / temperature): reference and dispatch.

One inverse-CDF draw per row from a uniform u in [0, 1) that the caller takes from the row's own
generator, so a row's token depends only on its own random state, alone or in any batch. The
exponential race (Gumbel-max) that needs one random draw per vocabulary entry costs 5.9 ms per
row at V = 152k on a CPU core (torch's CPU generator), more than a 4-layer MoE decode step's
weights; and on the CPU, torch ops write [S, V] temporaries (scaled logits, probabilities, the
CDF) that cost milliseconds per step at 16 rows, so the plain case (temperature only) runs the
CPU kernel `sample_rows`: three read-only passes over each row.
"""

from __future__ import annotations

import torch

from moeflow.kernels import cpu_ext


def sample_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [S, V] (unnormalised is fine: zeros are never drawn), u [S] float64 -> ids [S]."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # [S, V]; float64: the tail keeps its share
    target = u.to(cdf.device, torch.float64) * cdf[:, -1]  # [S], in [0, mass)
    # the first token whose CDF passes the target: a zero-probability token never does
    ids = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)  # [S]
    return ids.clamp_max_(probs.shape[1] - 1)


def sample_softmax_ref(
    logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """logits [S, V], temperature [S] (> 0), u [S] float64 -> ids [S]."""
    return sample_probs((logits.float() / temperature[:, None]).softmax(dim=-1), u)


def sample_softmax(
    logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """sample_softmax_ref; on the CPU the fused kernel (which rounds its exps differently: a
    target within ~1e-6 of a CDF step may fall on the neighbouring token)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        ops = cpu_ext.ops()
        if ops is not None:
            inv_temp = (1.0 / temperature.float()).contiguous()  # [S]
            return ops.sample_rows(logits, inv_temp, u.to(torch.float64).contiguous())
    return sample_softmax_ref(logits, temperature, u)
