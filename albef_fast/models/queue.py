"""Momentum feature queues (REFERENCE §2, `_dequeue_and_enqueue`): a ring buffer of past momentum
features per modality, used as extra ITC negatives. Stored as (Q, D) rows so that each key is
contiguous; ALBEF stores the transpose (D, Q)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_queue_size(queue_size: int, global_batch: int) -> None:
    """ALBEF writes whole batches into the ring, so the queue must hold a whole number of them."""
    if global_batch <= 0 or queue_size <= 0:
        raise ValueError(f"queue size ({queue_size}) and global batch ({global_batch}) must be positive")
    if queue_size % global_batch:
        below = queue_size // global_batch * global_batch
        above = below + global_batch
        sizes = " or ".join(str(s) for s in (below, above) if s > 0)
        divisors = [d for d in range(1, queue_size + 1) if queue_size % d == 0]
        batches = [str(max(d for d in divisors if d < global_batch))]
        batches += [str(d) for d in divisors if d > global_batch][:1]
        raise ValueError(
            f"loss.queue_size={queue_size} is not a multiple of the global batch {global_batch}: choose "
            f"loss.queue_size={sizes}, or a global batch that divides it ({' or '.join(batches)})"
        )


class FeatureQueues(nn.Module):
    """Image and text queues with one shared write pointer, kept in fp32 whatever the autocast."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        # Random unit vectors, as ALBEF: the first Q / global_batch steps see random negatives.
        self.register_buffer("image", F.normalize(torch.randn(size, dim), dim=1))  # (Q, D)
        self.register_buffer("text", F.normalize(torch.randn(size, dim), dim=1))  # (Q, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor) -> None:
        """Write (N, D) momentum features at the pointer and advance it by N (modulo Q).
        Device-side indexing: no host synchronisation on the pointer."""
        n = image_feat.shape[0]
        if self.size % n:
            check_queue_size(self.size, n)
        rows = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.image.index_copy_(0, rows, image_feat.to(self.image.dtype))
        self.text.index_copy_(0, rows, text_feat.to(self.text.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)
