"""Hard-negative sampling for ITM (REFERENCE §2 step 8), batched and free of host synchronisation.

ALBEF draws, for each row b, one index j != b with probability softmax(s_b)_j renormalised over
j != b (softmax, zero the diagonal, torch.multinomial), in a Python loop with 2B `.item()` calls. It
crashes with "invalid multinomial distribution" when a row has no mass left: B = 1, or when every
off-diagonal weight underflows to zero in fp32 (a dominant positive, > ~100 nats).

Here the same distribution is sampled by Gumbel-max in log space: argmax_j (s_bj + G_bj) over
j != b, with G_bj i.i.d. Gumbel(0, 1). Nothing underflows, identical rows give a uniform draw over
the other samples, and no host synchronisation happens.

Degenerate rows: when row b has no valid negative (B = 1, or every other logit is -inf/NaN), the
sampler returns index b itself and valid[b] = False; the ITM loss gives such pairs weight zero.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_hard_negatives_reference(sim: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Args:
        sim: (B, B) logits, row b = query b against the in-batch keys, positive on the diagonal.
        generator: optional RNG for the Gumbel noise (default: the global one of sim's device).
    Returns:
        index: (B,) int64, a negative key for each row (b itself where none exists).
        valid: (B,) bool, False where row b had no candidate.
    """
    B = sim.shape[0]
    logits = sim.float().masked_fill(torch.eye(B, dtype=torch.bool, device=sim.device), float("-inf"))
    logits = logits.masked_fill(torch.isnan(logits), float("-inf"))
    u = torch.rand(logits.shape, device=sim.device, generator=generator)
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))
    best, index = (logits + gumbel).max(dim=1)
    valid = torch.isfinite(best)
    index = torch.where(valid, index, torch.arange(B, device=sim.device))
    return index, valid


def sample_hard_negatives(sim: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One hard negative per row of `sim` (B, B); see `sample_hard_negatives_reference`."""
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sample_hard_negatives expects a square (B, B) matrix, got {tuple(sim.shape)}")
    return sample_hard_negatives_reference(sim, generator)
