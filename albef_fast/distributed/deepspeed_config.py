"""The DeepSpeed configuration, generated from the typed TrainConfig (never a hand-kept JSON that can
disagree with it).

Precision: bf16 runs as `torch_autocast` (parameters and the optimizer stay fp32; the forward runs in
bf16 as in the one-process loop), not as DeepSpeed's `bf16` mode (bf16 parameters with fp32 master
copies). Two reasons: the momentum model must be the EMA of the true (fp32) parameters, which then are
the module's own parameters under ZeRO-1/2 and their local shards under ZeRO-3; and the numbers stay
those of the one-process run. By default DeepSpeed's torch_autocast also communicates the parameters
and gradients of Linear/Conv layers in bf16; `lower_precision_safe_modules: []` turns that off, so
gradients are reduced in fp32 as under DDP. The cost is fp32 collectives (2x the bytes of bf16 ones).
(The H200 ZeRO step times of session 2 in benchmarks/results/distributed.csv were measured before this
setting, with bf16 communication.)

Offload: DeepSpeed refuses a client (torch) optimizer with offload_optimizer unless
zero_force_ds_cpu_optimizer is false; DeepSpeedCPUAdam would need a one-time op build. The torch AdamW
then steps on the host copies.
"""

from __future__ import annotations

from typing import Any

import torch

from albef_fast.config import TrainConfig

STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def zero_stage(strategy: str) -> int | None:
    return STAGES.get(strategy)


def deepspeed_config(cfg: TrainConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    """DeepSpeed's config dict for `cfg.distributed.strategy` (zero1/zero2/zero3) on `world_size` ranks."""
    stage = zero_stage(cfg.distributed.strategy)
    if stage is None:
        raise ValueError(f"distributed.strategy={cfg.distributed.strategy!r} is not a DeepSpeed strategy "
                         f"({sorted(STAGES)})")
    micro, accum = cfg.data.batch_size, cfg.optim.grad_accum_steps
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": device.type == "cuda"}
    if stage == 3:
        # Every parameter partitioned, the 0-d temperature included: the momentum model's EMA then runs
        # shard against shard (albef_fast/distributed/engine.py); a "persistent" (unpartitioned) small
        # parameter would keep a full copy that the shard update does not reach.
        zero["stage3_param_persistence_threshold"] = 0
    if cfg.distributed.offload_optimizer:
        if stage < 2:
            raise ValueError("distributed.offload_optimizer needs strategy zero2 or zero3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the loop logs; DeepSpeed's own prints would duplicate it
        "wall_clock_breakdown": False,
    }
