"""Training engines: how the forward/backward of a micro-batch, the optimizer step, the momentum
update and the checkpoints run under each parallel strategy.

* `TorchEngine`: one process, or torch DistributedDataParallel (`ddp`). Parameters, gradients and
  optimizer state are replicated; gradients are averaged once per optimizer step (`no_sync` on the
  other micro-batches).
* `DeepSpeedEngine`: DeepSpeed ZeRO stage 1, 2 or 3 (`zero1/2/3`), configured from the TrainConfig
  (deepspeed_config.py). The whole PretrainTask goes to `deepspeed.initialize`, with only the online
  parameters in the optimizer, so under ZeRO-3 the frozen momentum parameters are partitioned exactly
  like the online ones and gathered for the momentum forward by the same hooks.

The momentum model is the EMA of the true parameters under every strategy (PERFORMANCE.md §5):
replicated strategies and ZeRO-1/2 update full fp32 tensors that are identical on every rank (after a
ZeRO-1/2 step every rank holds the updated full parameters); ZeRO-3 updates each rank's momentum
shard from its online shard (`ds_tensor`, the same flat partition of the same shapes): no gather,
1/W of the work, and no "modified a gathered copy that is then discarded" bug (OpenRLHF#1357).

The queues get the momentum features of every micro-batch of every rank, gathered without gradient
in (micro-batch, rank) order. With one process and A accumulation steps this is the order of the A
micro-batches, so W processes x A micro-batches and one process x (W*A) micro-batches enqueue the
same rows. Hard negatives stay within the micro-batch, as in ALBEF.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from albef_kernels import ema_update_
from torch import Tensor

from albef_fast.data.batch import Batch
from albef_fast.distributed.env import DistEnv, barrier, gather_objects, gather_rows, wait_for_main
from albef_fast.models.albef import TEMP_MAX, TEMP_MIN
from albef_fast.task import PretrainOutput, PretrainTask
from albef_fast.train.checkpoint import (
    LATEST,
    CheckpointError,
    RunPosition,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    write_atomic,
)

log = logging.getLogger("albef_fast")

DEEPSPEED_LATEST = "checkpoint-latest.json"
DEEPSPEED_FORMAT = "albef-fast/deepspeed-checkpoint-v1"


class TorchEngine:
    """One process or DDP. `forward_backward` per micro-batch, `step` per optimizer step."""

    def __init__(self, task: PretrainTask, optimizer: torch.optim.Optimizer, env: DistEnv, *, accum_steps: int,
                 grad_clip: float, ddp: bool) -> None:
        self.task, self.optimizer, self.env = task, optimizer, env
        self.accum_steps, self.grad_clip = accum_steps, grad_clip
        self.strategy = "ddp" if ddp else "none"
        self.module: torch.nn.Module = task
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            device = next(task.parameters()).device
            # No buffer broadcast per forward: the queues are identical on every rank by construction (same
            # gathered rows, same pointer); ALBEF's default re-broadcasts 128 MiB of queue per forward.
            # (`broadcast_buffers` was renamed `forward_sync_buffers` in torch 2.14.)
            sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in DistributedDataParallel.__init__.__code__.co_varnames \
                else {"broadcast_buffers": False}
            self.module = DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None,
                                                  **sync)
        self.micro = 0

    @property
    def at_boundary(self) -> bool:
        """True when the next micro-batch is the last one of the optimizer step."""
        return (self.micro + 1) % self.accum_steps == 0

    def forward_backward(self, batch: Batch, alpha: float, autocast: Any) -> PretrainOutput:
        sync = nullcontext() if self.strategy == "none" or self.at_boundary else self.module.no_sync()
        with sync:
            with autocast:
                out = self.module(batch, alpha)
            (out.loss / self.accum_steps).backward()
        self.micro += 1
        return out

    def step(self) -> bool:
        """The optimizer step, once every `accum_steps` micro-batches; True when it ran."""
        if self.micro % self.accum_steps:
            return False
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.task.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def after_step(self, outputs: Sequence[PretrainOutput]) -> None:
        self.task.after_step(outputs, gather=gather_rows)

    # --- checkpoints: one file, written by rank 0, with every rank's RNG state ----------------------------
    def save(self, out_dir: Path, pos: RunPosition, config: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """Rank 0 writes the one file; `rank_state` (this rank's data-event counts, ...) and the RNG state of
        every rank go in with it."""
        ranks = gather_objects({**rank_state, "rng": rng_state()})
        if self.env.is_main:
            save_checkpoint(out_dir, self.task, self.optimizer, pos, config,
                            extra={"world_size": self.env.world_size, "strategy": self.strategy, "ranks": ranks})
        wait_for_main("checkpoint write")

    def load(self, out_dir: Path) -> tuple[RunPosition, dict[str, Any], int, list[dict[str, Any]]] | None:
        """Restore the latest checkpoint of `out_dir` if there is one: (position, its config, the number
        of ranks that wrote it, every rank's saved `rank_state`). Any number of ranks may resume a one-file
        checkpoint; the RNG states are restored when the number is the same."""
        path = out_dir / LATEST
        if (out_dir / DEEPSPEED_LATEST).exists() and not path.exists():
            raise CheckpointError(f"{out_dir} holds a DeepSpeed checkpoint ({DEEPSPEED_LATEST}); resume it with "
                                  "the same distributed.strategy (zero1/zero2/zero3)")
        if not path.exists():
            return None
        pos, state = load_checkpoint(path, self.task, self.optimizer, restore_rng=False)
        ranks = state.get("ranks") or [{"rng": state["rng"]}]  # a one-process checkpoint of session 1
        _restore_rank_rng([r["rng"] for r in ranks], self.env)
        return pos, state["config"], len(ranks), ranks


def _plain_shapes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The temperature back to ALBEF's 0-d shape (DeepSpeed runs hold it as (1,))."""
    return {k: v.reshape(()) if k.endswith("temp") and v.numel() == 1 else v for k, v in state.items()}


class DeepSpeedEngine:
    """DeepSpeed ZeRO stage 1-3 around the whole PretrainTask (see the module docstring)."""

    def __init__(self, task: PretrainTask, optimizer: torch.optim.Optimizer, env: DistEnv, ds_config: dict[str, Any],
                 *, keep_checkpoints: int) -> None:
        import deepspeed

        self.task, self.env, self.keep = task, env, keep_checkpoints
        self.stage = ds_config["zero_optimization"]["stage"]
        self.strategy = f"zero{self.stage}"
        self.accum_steps = ds_config["gradient_accumulation_steps"]
        self._base_optimizer = optimizer
        if self.stage == 3:
            # Parameters used in PretrainTask.forward outside the forward of the module that owns them
            # (the temperature; the tied MLM decoder weights used by the fused MLM loss) must be
            # gathered when the task's forward runs.
            # (`deepspeed.zero` is an attribute, not an importable module, in 0.19.8)
            for model in (task.model, task.model_m):
                for p in _directly_used_parameters(model):
                    deepspeed.zero.register_external_parameter(task, p)
        # DeepSpeed 0.19.8 broadcasts each parameter viewed as bytes, which fails for a 0-d tensor: the
        # temperature is kept as a (1,) tensor under DeepSpeed (same value; its checkpoints are its own).
        for p in task.parameters():
            if p.ndim == 0:
                p.data = p.data.reshape(1)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=ds_config)
        self._pairs: tuple[list[Tensor], list[Tensor]] | None = None

    @property
    def at_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    def forward_backward(self, batch: Batch, alpha: float, autocast: Any) -> PretrainOutput:
        # autocast is DeepSpeed's (torch_autocast in its config), not the loop's
        out = self.engine(batch, alpha)
        self.engine.backward(out.loss)  # scaled by 1/accum_steps inside
        return out

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()  # every micro-batch; steps the optimizer at the boundary only
        return boundary

    def set_lr(self, lr: float) -> None:
        for group in self._base_optimizer.param_groups:
            group["lr"] = lr

    def momentum_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """(momentum tensors, online tensors) the EMA runs on: the full parameters under ZeRO-1/2, this
        rank's shards under ZeRO-3 (identical partitions: same shapes, same world size)."""
        if self._pairs is None:
            params_m, params = self.task.momentum_pairs()
            if self.stage == 3:
                params_m, params = [p.ds_tensor for p in params_m], [p.ds_tensor for p in params]
                bad = [i for i, (a, b) in enumerate(zip(params_m, params)) if a.shape != b.shape]
                if bad:
                    raise RuntimeError(f"ZeRO-3 partitions of momentum and online parameters differ ({len(bad)} pairs)")
            self._pairs = (list(params_m), list(params))
        return self._pairs

    def full_state(self) -> dict[str, Tensor] | None:
        """The whole task state_dict (plain shapes, CPU) on rank 0, None elsewhere. Under ZeRO-3 every rank
        must call it: the parameters are gathered (read-only) and copied out, because the task's own
        modules keep DeepSpeed's hooks, which would re-partition them inside a rank-0-only evaluation."""
        gathered: Any = nullcontext()
        if self.stage == 3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(self.task.parameters()), modifier_rank=None)
        with gathered:
            state = ({k: v.detach().cpu().clone() for k, v in self.task.state_dict().items()}
                     if self.env.is_main else None)
        return _plain_shapes(state) if state is not None else None

    @torch.no_grad()
    def after_step(self, outputs: Sequence[PretrainOutput]) -> None:
        ema_update_(*self.momentum_pairs(), self.task.momentum)
        self.task.enqueue(outputs, gather=gather_rows)
        self._clamp_temp()

    @torch.no_grad()
    def _clamp_temp(self) -> None:
        """ALBEF's clamp of the temperature, applied to the optimizer's fp32 copy too (else the next step
        would restart from the unclamped value)."""
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_set_full_fp32_param,
            safe_set_local_fp32_param,
        )

        p = self.task.model.temp
        if self.stage == 3:
            p.ds_tensor.clamp_(TEMP_MIN, TEMP_MAX)
            local = safe_get_local_fp32_param(p)
            if local is not None and local.numel():
                safe_set_local_fp32_param(p, local.clamp(TEMP_MIN, TEMP_MAX))
        else:
            p.clamp_(TEMP_MIN, TEMP_MAX)  # full on every rank, equal to the fp32 master after the step
            safe_set_full_fp32_param(p, p.detach().float())

    # --- checkpoints: DeepSpeed's per-rank files + ours, then an atomic pointer -------------------------
    def save(self, out_dir: Path, pos: RunPosition, config: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """Write tag step-N, then move the pointer. The tag the pointer names is never rewritten (the loop
        does not save the same step twice; this guards the rule)."""
        root, tag = out_dir / "deepspeed", f"step-{pos.step:08d}"
        if _read_pointer(out_dir).get("tag") == tag:
            return
        queues = {k: v.detach().cpu() for k, v in self.task.queues.state_dict().items()}
        client = {"position": vars(pos), "config": config, "queues": queues, "world_size": self.env.world_size}
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
        # Frozen (momentum) parameters are not in DeepSpeed's ZeRO-3 optimizer partitions: each rank keeps
        # its own shards. Every rank's RNG state likewise.
        mine: dict[str, Any] = {**rank_state, "rng": rng_state()}
        if self.stage == 3:
            mine["momentum_shards"] = [t.detach().cpu().clone() for t in self.momentum_pairs()[0]]
        write_atomic(root / tag / f"albef-rank{self.env.rank:05d}.pt", mine)
        barrier()  # every rank has written everything before the pointer moves
        if self.env.is_main:
            pointer = {"format": DEEPSPEED_FORMAT, "tag": tag, "step": pos.step, "strategy": self.strategy,
                       "world_size": self.env.world_size}
            write_atomic(out_dir / DEEPSPEED_LATEST, json.dumps(pointer).encode())
            tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
            for old in tags[: max(0, len(tags) - self.keep)]:
                shutil.rmtree(old, ignore_errors=True)
        wait_for_main("checkpoint pointer update")

    def load(self, out_dir: Path) -> tuple[RunPosition, dict[str, Any], int, list[dict[str, Any]]] | None:
        """Restore the checkpoint `checkpoint-latest.json` points to (same strategy and number of ranks);
        returns as `TorchEngine.load`, with this rank's `rank_state` at index `rank` of the list."""

        pointer_path = out_dir / DEEPSPEED_LATEST
        if not pointer_path.exists():
            if (out_dir / LATEST).exists():
                raise CheckpointError(f"{out_dir} holds a one-file checkpoint ({LATEST}, strategy none/ddp); "
                                      f"resume it with distributed.strategy=none or ddp")
            return None
        try:
            pointer = json.loads(pointer_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {pointer_path}: {exc}") from exc
        if pointer.get("format") != DEEPSPEED_FORMAT:
            raise CheckpointError(f"{pointer_path} is not an albef-fast DeepSpeed checkpoint pointer")
        if pointer["strategy"] != self.strategy or pointer["world_size"] != self.env.world_size:
            raise CheckpointError(
                f"{out_dir}: the checkpoint was written by {pointer['strategy']} on {pointer['world_size']} ranks; "
                f"this run is {self.strategy} on {self.env.world_size}. ZeRO partitions the optimizer state per "
                "rank: resume with the same strategy and number of ranks. The weights of a finished run are also "
                "in output_dir/weights (any number of ranks can start from them with model.init_from)")
        root, tag = out_dir / "deepspeed", pointer["tag"]
        path, client = self.engine.load_checkpoint(str(root), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {root / tag}")
        self.task.queues.load_state_dict(client["queues"])
        mine_path = root / tag / f"albef-rank{self.env.rank:05d}.pt"
        try:
            mine = torch.load(mine_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read {mine_path}: {exc}") from exc
        if self.stage == 3:
            with torch.no_grad():
                for t, saved in zip(self.momentum_pairs()[0], mine["momentum_shards"], strict=True):
                    t.copy_(saved)
        restore_rng_state(mine.pop("rng"))
        mine.pop("momentum_shards", None)
        ranks = [{} for _ in range(self.env.world_size)]
        ranks[self.env.rank] = mine
        return RunPosition(**client["position"]), client["config"], client["world_size"], ranks


def _read_pointer(out_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((out_dir / DEEPSPEED_LATEST).read_text())
    except (OSError, ValueError):
        return {}


def _directly_used_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters PretrainTask.forward reads outside their owner's forward: the temperature and the
    MLM decoder's (tied) weight and bias."""
    params = [model.mlm_head.weight, model.mlm_head.bias]
    if isinstance(getattr(model, "temp", None), torch.nn.Parameter):
        params.append(model.temp)
    return params


def _restore_rank_rng(rngs: list[dict[str, Any]], env: DistEnv) -> None:
    if len(rngs) == env.world_size:
        restore_rng_state(rngs[env.rank])
    else:  # a different number of ranks: the data order is per-sample seeded and unaffected
        log.warning("checkpoint was written by %d ranks, this run has %d: the per-rank RNG states (dropout, "
                    "hard-negative draws) restart from the seed", len(rngs), env.world_size)


def has_checkpoint(out_dir: Path) -> bool:
    """Whether `out_dir` holds a checkpoint that a run with resume=true continues from."""
    return (out_dir / LATEST).exists() or (out_dir / DEEPSPEED_LATEST).exists()


def build_engine(cfg: Any, task: PretrainTask, optimizer: torch.optim.Optimizer, env: DistEnv,
                 device: torch.device) -> TorchEngine | DeepSpeedEngine:
    strategy = resolve_strategy(cfg.distributed.strategy, env)
    if strategy in ("none", "ddp"):
        return TorchEngine(task, optimizer, env, accum_steps=cfg.optim.grad_accum_steps, grad_clip=cfg.optim.grad_clip,
                           ddp=strategy == "ddp")
    from dataclasses import replace

    from albef_fast.distributed.deepspeed_config import deepspeed_config

    ds_cfg = deepspeed_config(replace(cfg, distributed=replace(cfg.distributed, strategy=strategy)), env.world_size,
                              device)
    return DeepSpeedEngine(task, optimizer, env, ds_cfg, keep_checkpoints=cfg.distributed.keep_checkpoints)


def resolve_strategy(strategy: str, env: DistEnv) -> str:
    if strategy == "auto":
        return "ddp" if env.is_distributed else "none"
    if strategy == "none" and env.is_distributed:
        raise ValueError(f"distributed.strategy=none but the launcher started {env.world_size} processes: use "
                         "ddp, zero1, zero2 or zero3 (or auto)")
    return strategy


