"""The training loop: build everything, then a loop short enough to read in one go.

One process (CPU or one GPU), or one of several started by a launcher (torchrun, deepspeed, srun):
the strategy (DDP, DeepSpeed ZeRO-1/2/3) lives in albef_fast/distributed/engine.py behind four calls:
forward_backward per micro-batch, step, after_step (EMA, enqueue, clamp) and save/load. On CUDA the
forward runs under bf16 autocast; parameters, optimizer state, the momentum model and the queues stay
fp32.
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albef_kernels._dispatch as kernel_dispatch
import numpy as np
import torch

import albef_fast.models.attention as attention_backend
from albef_fast.config import TrainConfig, to_dict
from albef_fast.data.loader import build_training_data
from albef_fast.distributed.engine import build_engine, has_checkpoint, resolve_strategy
from albef_fast.distributed.env import (
    DistEnv,
    MainRankWaitError,
    all_reduce_mean,
    destroy_process_group,
    env_from_launcher,
    gather_objects,
    init_process_group,
    wait_for_main,
)
from albef_fast.models.albef import ALBEF
from albef_fast.models.presets import get_preset
from albef_fast.models.queue import check_queue_size
from albef_fast.task import PretrainOutput, PretrainTask
from albef_fast.train.checkpoint import CheckpointError, RunPosition
from albef_fast.train.metrics import MetricsLogger, plot_losses, read_metrics
from albef_fast.train.optim import build_optimizer
from albef_fast.train.schedule import alpha_at, lr_at

log = logging.getLogger("albef_fast")


@dataclass
class RunSummary:
    steps: int
    output_dir: Path
    final_metrics: dict[str, Any]
    retrieval_before: dict[str, float] | None = None
    retrieval_after: dict[str, float] | None = None
    data_stats: dict[str, int] = field(default_factory=dict)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The training device; with several processes per node, cuda means cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} was asked for but CUDA is not available; use device=cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def autocast_for(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def resolve_data_files(cfg: TrainConfig, image_size: int) -> tuple[list[str], str | None]:
    """The training JSON files and the optional retrieval JSON; generates the scene data if asked."""
    if cfg.data.source == "scenes":
        from albef_fast.data.scenes import ensure_scenes

        splits = ensure_scenes(Path(cfg.data.cache_dir).expanduser() / "scenes", n_train=cfg.data.scenes_train,
                               n_eval=cfg.data.scenes_eval, image_size=max(96, image_size))
        return [str(splits.train_json)], cfg.data.eval_file or str(splits.eval_json)
    if not cfg.data.train_files:
        raise ValueError("data.train_files is empty: give ALBEF JSON files (data.train_files=a.json,b.json) "
                         "or use the embedded scene data (data.source=scenes)")
    return list(cfg.data.train_files), cfg.data.eval_file


# Fields that fix the data order and the tensor shapes: a resumed run must keep them. The global batch
# (data.batch_size x processes x optim.grad_accum_steps) must stay too; how it is split may change.
_RESUME_KEYS = ("model.preset", "model.image_size", "data.source", "data.train_files", "data.train_weights",
                "data.scenes_train", "data.scenes_eval", "data.max_text_len", "loss.queue_size", "seed")


def check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path, *, saved_world_size: int = 1,
                    world_size: int = 1) -> None:
    now = to_dict(cfg)

    def get(d: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            d = d.get(part, {}) if isinstance(d, dict) else {}
        return d

    changed = [f"{k}: {get(saved, k)!r} -> {get(now, k)!r}" for k in _RESUME_KEYS
               if get(saved, k) != get(now, k) and not (isinstance(get(now, k), list) and list(get(saved, k)) == get(now, k))]
    old_global = get(saved, "data.batch_size") * saved_world_size * (get(saved, "optim.grad_accum_steps") or 1)
    new_global = cfg.data.batch_size * world_size * cfg.optim.grad_accum_steps
    if old_global != new_global:
        changed.append(f"global batch (data.batch_size x processes x optim.grad_accum_steps): {old_global} -> "
                       f"{new_global}")
    if changed:
        raise ValueError(f"cannot resume from {path}: the run was started with different settings ("
                         f"{'; '.join(changed)}); use another output_dir, or resume=false to start over there")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig) -> RunSummary:
    """Pretrain with `cfg`. Launched once per process (torchrun / deepspeed / srun start several)."""
    env = env_from_launcher()
    strategy = resolve_strategy(cfg.distributed.strategy, env)
    device = resolve_device(cfg.device, env.local_rank)
    if strategy != "none":
        init_process_group(env, device, cfg.distributed.backend, cfg.distributed.timeout_s,
                           deepspeed=strategy.startswith("zero"), wait_timeout_s=cfg.distributed.eval_timeout_s)
    try:
        return _train(cfg, env, strategy, device)
    finally:
        destroy_process_group()


def _train(cfg: TrainConfig, env: DistEnv, strategy: str, device: torch.device) -> RunSummary:
    # --- build ------------------------------------------------------------------------------------
    seed_everything(cfg.seed)  # the same initial model and queues on every rank
    kernel_dispatch.configure(cfg.kernels.backend, cfg.kernels.disable)
    attention_backend.configure(cfg.kernels.attention)
    overrides = {"image_size": cfg.model.image_size} if cfg.model.image_size else {}
    model_cfg = get_preset(cfg.model.preset, **overrides)
    accum = cfg.optim.grad_accum_steps
    global_batch = cfg.data.batch_size * env.world_size * accum
    check_queue_size(cfg.loss.queue_size, global_batch)
    out_dir = Path(cfg.output_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        train_files, eval_file = resolve_data_files(cfg, model_cfg.image_size)  # generates the scene data once
    wait_for_main("data generation")
    if not env.is_main:
        train_files, eval_file = resolve_data_files(cfg, model_cfg.image_size)
    dataset, sampler, loader, stats = build_training_data(
        cfg.data, train_files, model_cfg.image_size, seed=cfg.seed, device=device,
        mlm_probability=cfg.loss.mlm_probability, rank=env.rank, world_size=env.world_size, accum_steps=accum)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = steps_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps is not None:
        total_steps = min(total_steps, cfg.optim.max_steps)

    task = PretrainTask(ALBEF(model_cfg), queue_size=cfg.loss.queue_size, momentum=cfg.loss.momentum)
    m = cfg.model
    if (m.init_from or m.init_vit or m.init_bert) and not (cfg.resume and has_checkpoint(out_dir)):
        from albef_fast.weights import initialise_task

        for line in initialise_task(task, albef=m.init_from, vit=m.init_vit, bert=m.init_bert):
            log.info("init %s", line)
    task = task.to(device)
    optimizer = build_optimizer(task.model, cfg.optim)
    engine = build_engine(cfg, task, optimizer, env, device)
    # As ALBEF (seed + rank): dropout and hard-negative draws differ per rank; data seeds are per sample.
    seed_everything(cfg.seed + env.rank)
    log.info("strategy %s on %d process(es): global batch %d = %d per micro-batch x %d x %d accumulation steps",
             strategy, env.world_size, global_batch, cfg.data.batch_size, env.world_size, accum)
    pos = RunPosition()
    metrics_path = out_dir / "metrics.jsonl"
    loaded = engine.load(out_dir) if cfg.resume else None
    if env.is_distributed:  # every rank must continue from the same step (output_dir on a shared filesystem)
        steps = gather_objects(loaded[0].step if loaded is not None else -1)
        if len(set(steps)) > 1:
            raise CheckpointError(f"the ranks found different checkpoints in {out_dir} (steps by rank, -1 = none: "
                                  f"{steps}): output_dir must be one folder on a filesystem every node shares")
    if loaded is not None:
        pos, saved, saved_world, ranks = loaded
        check_resumable(saved, cfg, out_dir, saved_world_size=saved_world, world_size=env.world_size)
        # bad/converted-sample counts continue; with another number of ranks rank 0 takes the totals
        if saved_world == env.world_size:
            dataset.events.load_state_dict(ranks[env.rank].get("data_events", {}))
        elif env.is_main:
            totals = [r.get("data_events", {}) for r in ranks]
            dataset.events.load_state_dict({k: sum(t.get(k, 0) for t in totals) for k in set().union(*totals)})
        log.info("resumed from %s at step %d (epoch %d, batch %d)", out_dir, pos.step, pos.epoch, pos.batch)
        if env.is_main and metrics_path.exists():  # drop lines logged after the checkpoint by the interrupted run
            kept = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= pos.step]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    elif env.is_main and metrics_path.exists():
        metrics_path.unlink()

    summary = RunSummary(steps=pos.step, output_dir=out_dir, final_metrics={}, data_stats=dict(stats))
    evaluate = _retrieval_fn(cfg, eval_file, model_cfg, device, env, engine)
    if evaluate and cfg.eval.before_training and pos.step == 0:
        summary.retrieval_before = evaluate(task.model, "before training")

    # --- loop -------------------------------------------------------------------------------------
    task.train()
    autocast = autocast_for(cfg.precision, device)
    metrics = MetricsLogger(metrics_path, total_steps, pos.step, cfg.progress and env.is_main, write=env.is_main,
                            reduce=all_reduce_mean)
    row: dict[str, Any] = {}
    saved_step = pos.step if loaded is not None else -1

    def save() -> None:  # a step is saved once: a ZeRO checkpoint folder is never rewritten in place
        nonlocal saved_step
        if pos.step != saved_step:
            engine.save(out_dir, pos, to_dict(cfg), {"data_events": dataset.events.state_dict()})
            saved_step = pos.step

    try:
        for epoch in range(pos.epoch, cfg.optim.epochs):
            start_step = pos.batch if epoch == pos.epoch else 0
            sampler.set_epoch(epoch, start_step)
            outs: list[PretrainOutput] = []
            t_wait, data_wait = time.perf_counter(), 0.0
            for i, batch in enumerate(loader):
                it = start_step + i // accum  # optimizer step within the epoch
                if pos.step >= total_steps:
                    break
                data_wait += time.perf_counter() - t_wait
                batch = batch.to(device, non_blocking=True)
                lr, alpha = lr_at(cfg.optim, epoch, it), alpha_at(cfg.loss, epoch, it, steps_per_epoch)
                engine.set_lr(lr)
                outs.append(engine.forward_backward(batch, alpha, autocast))
                if not engine.step():  # accumulating
                    t_wait = time.perf_counter()
                    continue
                engine.after_step(outs)  # EMA, enqueue (every rank's features), temperature clamp
                # the position to resume from: the next step, or the start of the next epoch
                last = it + 1 == steps_per_epoch
                pos = RunPosition(pos.step + 1, epoch + last, 0 if last else it + 1)
                metrics.update(outs, global_batch, data_wait)
                outs, data_wait = [], 0.0
                if pos.step % cfg.log_every == 0 or pos.step == total_steps:
                    row = metrics.log(pos.step, {"epoch": epoch, "lr": lr, "alpha": round(alpha, 4)})  # host sync
                if pos.step % cfg.checkpoint_every == 0:
                    save()
                t_wait = time.perf_counter()
            if pos.step >= total_steps:
                break
        save()
    except RuntimeError as exc:
        if isinstance(exc, MainRankWaitError) or not (env.is_distributed and _is_collective_failure(exc)):
            raise  # a failed wait for rank 0 names its own setting (distributed.eval_timeout_s)
        raise DistributedRunError(
            f"rank {env.rank} of {env.world_size} stopped at step {pos.step}: {exc}. A collective failure usually "
            f"means another rank died (see its error) or stalled past distributed.timeout_s="
            f"{cfg.distributed.timeout_s:g}. The last complete checkpoint in {out_dir} is resumable: relaunch "
            "with the same command (resume=true)") from exc
    finally:
        metrics.close()
    if env.is_main and metrics_path.exists():  # a 0-step run logs nothing
        plot_losses(metrics_path, out_dir / "losses.png")
    if strategy.startswith("zero"):  # the weights in a form every tool reads (convert, init_from, eval)
        _export_weights(engine, task, out_dir / "weights", env)
    summary.steps, summary.final_metrics = pos.step, row
    per_rank = gather_objects(dataset.events.totals())  # bad / converted samples met by every rank's loader
    events = {k: sum(c.get(k, 0) for c in per_rank) for k in per_rank[0]}
    summary.data_stats.update(events)
    log.info("data: samples replaced or converted this run: %s", {k: v for k, v in events.items() if v})
    if evaluate and cfg.eval.after_training:
        summary.retrieval_after = evaluate(task.model, "after training")
    return summary


def _export_weights(engine: Any, task: PretrainTask, folder: Path, env: DistEnv) -> None:
    """ZeRO runs: the whole task (online and momentum weights, queues) as an albef-fast weights folder,
    gathered from the shards (a collective), written by rank 0."""
    state = engine.full_state()
    if env.is_main:
        from albef_fast.weights import save_pretrained

        plain = PretrainTask(ALBEF(task.model.config), queue_size=task.queues.size, momentum=task.momentum)
        plain.load_state_dict(state)
        save_pretrained(plain, folder)
        log.info("weights written to %s (albef-fast folder: convert, model.init_from)", folder)
    wait_for_main("weights export")


class DistributedRunError(RuntimeError):
    """A distributed run stopped because a collective failed (a rank died or timed out)."""


def _is_collective_failure(exc: BaseException) -> bool:
    """torch raises DistError subclasses for most backend failures; gloo's transport errors arrive as a
    plain RuntimeError that names gloo."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("gloo", "nccl", "connection reset", "connection closed", "timed out"))


def _retrieval_fn(cfg: TrainConfig, eval_file: str | None, model_cfg: Any, device: torch.device, env: DistEnv,
                  engine: Any):
    """Zero-shot retrieval on rank 0 while the other ranks wait. Under ZeRO-3 every rank first takes part
    in gathering the weights, and rank 0 evaluates a plain copy (`DeepSpeedEngine.full_state`)."""
    if not eval_file:
        return None
    from albef_fast.eval.retrieval import evaluate_retrieval_file, format_recalls

    def run(model: ALBEF, label: str) -> dict[str, float]:
        if getattr(engine, "stage", None) == 3:
            state = engine.full_state()  # collective
            if env.is_main:
                model = ALBEF(model_cfg)
                model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
                model.to(device)
        result: dict[str, float] = {}
        if env.is_main:
            result = evaluate_retrieval_file(model, eval_file, image_size=model_cfg.image_size, k_test=cfg.eval.k_test,
                                             batch_size=cfg.eval.batch_size, device=device,
                                             autocast=autocast_for(cfg.precision, device))
            print(f"zero-shot retrieval {label} ({Path(eval_file).name}): {format_recalls(result)}", flush=True)
        wait_for_main(f"retrieval evaluation {label}")
        return result

    return run
