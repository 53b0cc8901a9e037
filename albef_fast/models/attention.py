"""The attention call shared by the text and fusion encoders.

One place decides how attention runs, so that alternative backends (flash-attn varlen, PyTorch's
flash kernels) can be switched in without touching the model. Today: PyTorch SDPA, which picks
its own kernel (flash / memory-efficient / math) for the device, dtype and mask.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def padding_mask(mask: Tensor) -> Tensor:
    """(B, L) 1/0 attention mask -> (B, 1, 1, L) bool, True where a key may be attended.

    ALBEF adds -10000 to padded keys' scores; with a True-means-keep bool mask SDPA uses -inf. Both
    give exactly zero probability in fp32 and bf16 (exp(-10000) underflows), and no row is ever fully
    masked because [CLS] is always a real token.
    """
    return mask.bool()[:, None, None, :]


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v with dropout on the probabilities.

    Args:
        q: (B, H, Lq, Dh); k, v: (B, H, Lk, Dh).
        mask: None or (B, 1, 1, Lk) bool, True = attend.
    Returns:
        (B, H, Lq, Dh)
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
