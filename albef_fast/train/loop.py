"""The training loop: build everything, then a loop short enough to read in one go.

One process, CPU or one GPU. On CUDA the forward runs under bf16 autocast; parameters, optimizer
state, the momentum model and the queues stay fp32.
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

import numpy as np
import torch

import albef_kernels._dispatch as kernel_dispatch
from albef_fast.config import TrainConfig, to_dict
from albef_fast.data.loader import build_training_data
import albef_fast.models.attention as attention_backend
from albef_fast.models.albef import ALBEF
from albef_fast.models.presets import get_preset
from albef_fast.models.queue import check_queue_size
from albef_fast.task import PretrainTask
from albef_fast.train.checkpoint import LATEST, RunPosition, load_checkpoint, save_checkpoint
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was asked for but CUDA is not available; use device=cpu or auto")
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


# Fields that fix the data order and the tensor shapes: a resumed run must keep them.
_RESUME_KEYS = ("model.preset", "model.image_size", "data.source", "data.train_files", "data.train_weights", "data.batch_size",
                "data.scenes_train", "data.scenes_eval", "data.max_text_len", "loss.queue_size", "seed")


def check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    now = to_dict(cfg)

    def get(d: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            d = d.get(part, {}) if isinstance(d, dict) else {}
        return d

    changed = [f"{k}: {get(saved, k)!r} -> {get(now, k)!r}" for k in _RESUME_KEYS
               if get(saved, k) != get(now, k) and not (isinstance(get(now, k), list) and list(get(saved, k)) == get(now, k))]
    if changed:
        raise ValueError(f"cannot resume from {path}: the run was started with different settings ("
                         f"{'; '.join(changed)}); use another output_dir, or resume=false to start over there")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig) -> RunSummary:
    # --- build ------------------------------------------------------------------------------------
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    kernel_dispatch.configure(cfg.kernels.backend, cfg.kernels.disable)
    attention_backend.configure(cfg.kernels.attention)
    overrides = {"image_size": cfg.model.image_size} if cfg.model.image_size else {}
    model_cfg = get_preset(cfg.model.preset, **overrides)
    check_queue_size(cfg.loss.queue_size, cfg.data.batch_size)  # one process: global batch = batch_size
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    train_files, eval_file = resolve_data_files(cfg, model_cfg.image_size)
    dataset, sampler, loader, stats = build_training_data(cfg.data, train_files, model_cfg.image_size, seed=cfg.seed,
                                                          device=device, mlm_probability=cfg.loss.mlm_probability)
    iters_per_epoch = len(sampler)
    total_steps = iters_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps is not None:
        total_steps = min(total_steps, cfg.optim.max_steps)

    task = PretrainTask(ALBEF(model_cfg), queue_size=cfg.loss.queue_size, momentum=cfg.loss.momentum).to(device)
    optimizer = build_optimizer(task.model, cfg.optim)
    pos = RunPosition()
    metrics_path = out_dir / "metrics.jsonl"
    if cfg.resume and (out_dir / LATEST).exists():
        pos, saved = load_checkpoint(out_dir / LATEST, task, optimizer)
        check_resumable(saved, cfg, out_dir / LATEST)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", out_dir / LATEST, pos.step, pos.epoch, pos.batch)
        if metrics_path.exists():  # drop lines logged after the checkpoint by the interrupted run
            kept = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= pos.step]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    elif metrics_path.exists():
        metrics_path.unlink()

    summary = RunSummary(steps=pos.step, output_dir=out_dir, final_metrics={}, data_stats=dict(stats))
    evaluate = _retrieval_fn(cfg, eval_file, model_cfg.image_size, device)
    if evaluate and cfg.eval.before_training and pos.step == 0:
        summary.retrieval_before = evaluate(task.model, "before training")

    # --- loop -------------------------------------------------------------------------------------
    task.train()
    metrics = MetricsLogger(metrics_path, total_steps, pos.step, cfg.progress)
    row: dict[str, Any] = {}
    try:
        for epoch in range(pos.epoch, cfg.optim.epochs):
            start_batch = pos.batch if epoch == pos.epoch else 0
            sampler.set_epoch(epoch, start_batch)
            t_wait = time.perf_counter()
            for it, batch in enumerate(loader, start=start_batch):
                if pos.step >= total_steps:
                    break
                data_wait = time.perf_counter() - t_wait
                batch = batch.to(device, non_blocking=True)
                lr, alpha = lr_at(cfg.optim, epoch, it), alpha_at(cfg.loss, epoch, it, iters_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast_for(cfg.precision, device):
                    out = task(batch, alpha)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                task.after_step(out)  # EMA, enqueue, temperature clamp
                # the position to resume from: the next batch, or the start of the next epoch
                last = it + 1 == iters_per_epoch
                pos = RunPosition(pos.step + 1, epoch + last, 0 if last else it + 1)
                metrics.update([out.loss, out.itc_loss, out.itm_loss, out.mlm_loss, task.model.temp],
                               batch.size, data_wait)
                if pos.step % cfg.log_every == 0 or pos.step == total_steps:
                    row = metrics.log(pos.step, {"epoch": epoch, "lr": lr, "alpha": round(alpha, 4)})  # host sync
                if pos.step % cfg.checkpoint_every == 0:
                    save_checkpoint(out_dir, task, optimizer, pos, to_dict(cfg))
                t_wait = time.perf_counter()
            if pos.step >= total_steps:
                break
    finally:
        metrics.close()
    save_checkpoint(out_dir, task, optimizer, pos, to_dict(cfg))
    plot_losses(metrics_path, out_dir / "losses.png")
    summary.steps, summary.final_metrics = pos.step, row
    events = dataset.events.totals()  # bad / converted samples met by this process's loader
    summary.data_stats.update(events)
    log.info("data: samples replaced or converted this run: %s", {k: v for k, v in events.items() if v})
    if evaluate and cfg.eval.after_training:
        summary.retrieval_after = evaluate(task.model, "after training")
    return summary


def _retrieval_fn(cfg: TrainConfig, eval_file: str | None, image_size: int, device: torch.device):
    if not eval_file:
        return None
    from albef_fast.eval.retrieval import evaluate_retrieval_file, format_recalls

    def run(model: ALBEF, label: str) -> dict[str, float]:
        result = evaluate_retrieval_file(model, eval_file, image_size=image_size, k_test=cfg.eval.k_test,
                                         batch_size=cfg.eval.batch_size, device=device,
                                         autocast=autocast_for(cfg.precision, device))
        print(f"zero-shot retrieval {label} ({Path(eval_file).name}): {format_recalls(result)}", flush=True)
        return result

    return run
