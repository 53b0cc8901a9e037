"""Momentum (EMA) update of the momentum model: p_m <- decay * p_m + (1 - decay) * p.

The reference is one multi-tensor call (`torch._foreach_lerp_`: lerp(p_m, p, 1 - decay) = the same
formula), which on CUDA launches a handful of fused kernels for all tensors instead of ALBEF's
Python loop of ~3 allocating kernels per tensor. Cost model: reads p_m and p, writes p_m: 12 bytes
per fp32 parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def ema_update_reference_(momentum: list[Tensor], online: list[Tensor], decay: float) -> None:
    """In place: momentum[i] <- decay * momentum[i] + (1 - decay) * online[i], fp32 momentum tensors."""
    torch._foreach_lerp_(momentum, online, 1.0 - decay)


@torch.no_grad()
def ema_update_(momentum: list[Tensor], online: list[Tensor], decay: float) -> None:
    """EMA of `online` into `momentum` (lists of equal length and pairwise equal shapes)."""
    if len(momentum) != len(online):
        raise ValueError(f"ema_update_: {len(momentum)} momentum tensors but {len(online)} online tensors")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update_: decay must be in [0, 1], got {decay}")
    for i, (m, p) in enumerate(zip(momentum, online)):
        if m.shape != p.shape:
            raise ValueError(f"ema_update_: tensor {i} has momentum shape {tuple(m.shape)}, online {tuple(p.shape)}")
    ema_update_reference_(momentum, online, decay)
