"""Image-text contrastive loss with momentum distillation, one direction (REFERENCE §2 steps 4-5).

For online queries q (B, D), momentum queries q_m (B, D), keys K = [k_m; queue] (N = B + Q, D):
    s   = q   K^T / temp          (B, N)   online similarities (gradient to q and temp)
    s_m = q_m K^T / temp          (B, N)   momentum similarities (no gradient)
    t   = alpha * softmax(s_m) + (1 - alpha) * onehot(i)      soft targets, positive = column i
    L   = mean_i  -sum_j t_ij * log_softmax(s)_ij
ALBEF averages the two directions: (L(image->text) + L(text->image)) / 2, where the image->text keys are
the momentum text features plus the text queue, and vice versa.

The reference materialises several (B, N) tensors; the fused kernel (issue "Triton kernels") streams
over K instead. Both return the in-batch block s[:, :B] that hard-negative sampling needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def itc_loss_reference(
    q: Tensor, q_m: Tensor, keys_m: Tensor, queue: Tensor, temp: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """Args:
        q: (B, D) L2-normalised online features (requires grad).
        q_m: (B, D) L2-normalised momentum features of the same samples.
        keys_m: (B, D) momentum features of the other modality (in-batch keys; row i is positive for q_i).
        queue: (Q, D) momentum features of the other modality from earlier steps.
        temp: () temperature (may require grad).
        alpha: distillation weight in [0, 1].
    Returns:
        loss: () mean over the batch.
        sim_inbatch: (B, B) detached s[:, :B], the logits of the in-batch keys.
    """
    B = q.shape[0]
    acc = torch.promote_types(q.dtype, torch.float32)
    # fp32 at least, also under autocast: ALBEF runs ITC in fp32 and it costs ~1 GFLOP per direction
    with torch.autocast(q.device.type, enabled=False):
        keys = torch.cat([keys_m, queue], dim=0).to(acc)  # (N, D)
        sim = q.to(acc) @ keys.t() / temp  # (B, N)
        with torch.no_grad():
            sim_m = q_m.to(acc) @ keys.t() / temp  # (B, N)
            targets = alpha * F.softmax(sim_m, dim=1)
            targets[:, :B] += (1.0 - alpha) * torch.eye(B, device=q.device, dtype=targets.dtype)
        loss = -(F.log_softmax(sim, dim=1) * targets).sum(dim=1).mean()
    return loss, sim[:, :B].detach()


def itc_loss(
    q: Tensor, q_m: Tensor, keys_m: Tensor, queue: Tensor, temp: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """Contrastive loss of one direction; see `itc_loss_reference` for arguments and shapes."""
    if q.ndim != 2 or q.shape != q_m.shape or q.shape != keys_m.shape or queue.shape[1:] != q.shape[1:]:
        raise ValueError(
            f"itc_loss expects q, q_m, keys_m of one shape (B, D) and queue (Q, D); got q={tuple(q.shape)}, "
            f"q_m={tuple(q_m.shape)}, keys_m={tuple(keys_m.shape)}, queue={tuple(queue.shape)}"
        )
    return itc_loss_reference(q, q_m, keys_m, queue, temp, alpha)
