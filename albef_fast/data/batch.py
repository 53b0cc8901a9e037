"""The one batch type every loader produces and the task consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Batch:
    """A pretraining batch, tokenised and MLM-masked by the loader (nothing is done on the hot path).

    Shapes: B = batch, L = longest caption in the batch (<= max_text_len), M = masked tokens.
    """

    image: Tensor
    """(B, 3, H, W) float32, normalised with the CLIP mean/std."""
    text_ids: Tensor
    """(B, L) int64: `[CLS] w1 .. wn [PAD] ..` (no [SEP] for single sentences, as ALBEF)."""
    text_mask: Tensor
    """(B, L) int64, 1 for real tokens, 0 for padding."""
    mlm_ids: Tensor
    """(B, L) int64: text_ids with the masked positions replaced 80/10/10."""
    mlm_positions: Tensor
    """(M,) int64 flat indices into the (B*L) token grid of the masked positions, ascending."""
    mlm_labels: Tensor
    """(M,) int64 original ids at mlm_positions."""

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})
