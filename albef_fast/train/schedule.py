"""Learning-rate and distillation-weight schedules as pure functions of (epoch, iteration).

ALBEF (REFERENCE §3.4) drives timm's CosineLRScheduler in an unusual way: in epoch 0 it calls
`step(i // 100)` every 100 iterations up to the warm-up length, after the optimizer step of
iteration i (so the new rate applies from iteration i + 1); at the start of each later epoch e it
calls `step(e + warmup_steps)`. Computing the rate directly from (epoch, i) reproduces that and
needs no scheduler state in checkpoints.
"""

from __future__ import annotations

import math

from albef_fast.config import LossConfig, OptimConfig


def _scheduler_lr(cfg: OptimConfig, t: int) -> float:
    """timm CosineLRScheduler(t_initial=epochs, lr_min=min_lr, warmup_t=warmup_steps,
    warmup_lr_init=warmup_lr, cycle_limit=1) at scheduler time t."""
    if t < cfg.warmup_steps:
        return cfg.warmup_lr + t * (cfg.lr - cfg.warmup_lr) / cfg.warmup_steps
    t = t - cfg.warmup_steps
    if t >= cfg.epochs:
        return cfg.min_lr
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / cfg.epochs))


def lr_at(cfg: OptimConfig, epoch: int, it: int) -> float:
    """Learning rate used by iteration `it` (0-based) of epoch `epoch`."""
    if epoch == 0:
        t = min(max(it - 1, 0) // cfg.warmup_step_iters, cfg.warmup_steps)
    else:
        t = epoch + cfg.warmup_steps
    return _scheduler_lr(cfg, t)


def alpha_at(cfg: LossConfig, epoch: int, it: int, iters_per_epoch: int) -> float:
    """Distillation weight: 0 at the first step, ramping linearly to `alpha` over epoch 0."""
    if epoch == 0 and cfg.alpha_warmup:
        return cfg.alpha * min(1.0, it / iters_per_epoch)
    return cfg.alpha
