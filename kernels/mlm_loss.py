"""Masked-language-modelling loss with momentum distillation, on the masked positions only
(REFERENCE §2 step 10).

For the M masked positions with transformed hidden states h (M, D) and h_m (M, D) (momentum model):
    logits   = h   W^T   + b          (M, V)
    logits_m = h_m W_m^T + b_m        (M, V), no gradient
    L = (1 - alpha) * mean CE(logits, labels) + alpha * mean( -sum_v softmax(logits_m)_v log_softmax(logits)_v )
ALBEF projects every position of the sequence to the vocabulary and ignores the unmasked ones in
the loss; projecting only the masked rows is exactly the same loss at ~15 % of the cost. The fused
kernel (issue "Triton kernels") additionally never holds an (M, V) tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mlm_loss_reference(
    h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor,
    h_m: Tensor, weight_m: Tensor, bias_m: Tensor, alpha: float,
) -> Tensor:
    """Args:
        h: (M, D) online hidden states after the MLM transform at the masked positions.
        weight, bias: (V, D), (V,) online vocabulary projection (weight tied to word embeddings).
        labels: (M,) int64 original token ids.
        h_m, weight_m, bias_m: the momentum model's counterparts (no gradient flows into them).
        alpha: distillation weight in [0, 1].
    Returns:
        () loss; exactly 0 (connected to the graph) when M = 0.
    """
    if h.shape[0] == 0:
        return h.sum() * 0.0
    acc = torch.promote_types(h.dtype, torch.float32)  # softmax statistics in fp32 at least
    logp = F.log_softmax((h @ weight.t() + bias).to(acc), dim=-1)  # (M, V)
    ce = F.nll_loss(logp, labels)
    with torch.no_grad():
        soft = F.softmax((h_m @ weight_m.t() + bias_m).to(acc), dim=-1)  # (M, V)
    distill = -(soft * logp).sum(dim=-1).mean()
    return (1.0 - alpha) * ce + alpha * distill


def mlm_loss(
    h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor,
    h_m: Tensor, weight_m: Tensor, bias_m: Tensor, alpha: float,
) -> Tensor:
    """MLM + distillation loss over masked positions; see `mlm_loss_reference`."""
    if h.shape != h_m.shape or h.shape[:1] != labels.shape or weight.shape != weight_m.shape:
        raise ValueError(
            f"mlm_loss: h {tuple(h.shape)}, h_m {tuple(h_m.shape)}, labels {tuple(labels.shape)}, "
            f"weight {tuple(weight.shape)}, weight_m {tuple(weight_m.shape)} are inconsistent"
        )
    return mlm_loss_reference(h, weight, bias, labels, h_m, weight_m, bias_m, alpha)
