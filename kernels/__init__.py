"""Fused operators of albef-fast, importable as `albef_kernels`.

Each op has a plain PyTorch `<op>_reference` (the test oracle, benchmark baseline and CPU path),
Triton kernels, and a public `<op>` entry point that dispatches (`_dispatch.use_triton`: Triton on
CUDA tensors, the reference elsewhere, or when switched off by config or ALBEF_KERNELS=torch);
`enabled(op, *tensors)` says which way an op goes (`itc_loss_path` the exact ITC path). The ITC op
and the sampler are also registered with torch.library (`torch.ops.albef_kernels.itc_loss` with a fake
implementation and its backward, `...sample_hard_negatives` with a fake implementation), so
torch.compile traces them without a graph break; both also run inside a captured CUDA graph.
This package never imports albef_fast.
"""

from albef_kernels._dispatch import enabled
from albef_kernels.ema import ema_update_, ema_update_reference_
from albef_kernels.hard_negatives import sample_hard_negatives, sample_hard_negatives_reference
from albef_kernels.itc_loss import itc_loss, itc_loss_bidirectional, itc_loss_path, itc_loss_reference
from albef_kernels.mlm_loss import mlm_loss, mlm_loss_reference

__all__ = [
    "ema_update_",
    "ema_update_reference_",
    "enabled",
    "itc_loss",
    "itc_loss_bidirectional",
    "itc_loss_path",
    "itc_loss_reference",
    "mlm_loss",
    "mlm_loss_reference",
    "sample_hard_negatives",
    "sample_hard_negatives_reference",
]
