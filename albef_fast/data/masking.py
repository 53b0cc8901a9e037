"""MLM masking (REFERENCE §2 step 10), done per sample in the loader so that the masked positions are
known on the host: the task gathers them with no device-to-host synchronisation."""

from __future__ import annotations

import torch
from torch import Tensor

from albef_fast.data.captions import CLS_ID, MASK_ID, PAD_ID, VOCAB_SIZE


def mask_tokens(
    ids: Tensor, generator: torch.Generator, *, probability: float = 0.15, vocab_size: int = VOCAB_SIZE
) -> tuple[Tensor, Tensor]:
    """Select `probability` of the tokens (never [PAD] or [CLS]); of those, 80 % become [MASK],
    10 % a uniformly random id (any id, special ones included, as ALBEF) and 10 % stay unchanged.

    Args:
        ids: (L,) or (B, L) int64 token ids.
        generator: CPU generator that owns every random draw here.
    Returns:
        masked_ids: same shape as ids.
        selected: bool, same shape: the positions the loss is computed on.
    """
    selected = torch.bernoulli(torch.full(ids.shape, probability), generator=generator).bool()
    selected &= (ids != PAD_ID) & (ids != CLS_ID)
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8), generator=generator).bool() & selected
    randomised = torch.bernoulli(torch.full(ids.shape, 0.5), generator=generator).bool() & selected & ~replaced
    random_ids = torch.randint(vocab_size, ids.shape, dtype=ids.dtype, generator=generator)
    masked = torch.where(replaced, torch.full_like(ids, MASK_ID), ids)
    masked = torch.where(randomised, random_ids, masked)
    return masked, selected
