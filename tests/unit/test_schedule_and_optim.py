"""ALBEF's learning-rate schedule, alpha ramp and parameter groups (REFERENCE §3.4)."""

import pytest
import torch

from albef_fast.config import LossConfig, OptimConfig
from albef_fast.models.albef import ALBEF
from albef_fast.models.presets import get_preset
from albef_fast.train.optim import build_optimizer, param_groups
from albef_fast.train.schedule import alpha_at, lr_at


def test_pretraining_lr_schedule_matches_the_reference():
    cfg = OptimConfig()  # lr 1e-4, min 1e-5, warmup 1e-5 over 20 steps of 100 iterations, 30 epochs
    assert lr_at(cfg, 0, 0) == pytest.approx(1e-5)
    assert lr_at(cfg, 0, 100) == pytest.approx(1e-5)  # the step taken after iteration 100 applies from 101
    assert lr_at(cfg, 0, 101) == pytest.approx(1.45e-5)
    assert lr_at(cfg, 0, 1050) == pytest.approx(1e-5 + 10 * 4.5e-6)
    assert lr_at(cfg, 0, 2000) == pytest.approx(1e-5 + 19 * 4.5e-6)
    assert lr_at(cfg, 0, 2001) == pytest.approx(1e-4)
    assert lr_at(cfg, 0, 50_000) == pytest.approx(1e-4)
    assert lr_at(cfg, 1, 0) == pytest.approx(9.975e-5, rel=1e-4)
    assert lr_at(cfg, 29, 123) == pytest.approx(1.025e-5, rel=1e-3)
    assert lr_at(cfg, 30, 0) == pytest.approx(1e-5)


def test_alpha_ramps_over_the_first_epoch_only():
    cfg = LossConfig()
    assert alpha_at(cfg, 0, 0, 100) == 0.0
    assert alpha_at(cfg, 0, 50, 100) == pytest.approx(0.2)
    assert alpha_at(cfg, 1, 0, 100) == pytest.approx(0.4)
    assert alpha_at(LossConfig(alpha_warmup=False), 0, 0, 100) == pytest.approx(0.4)


def test_param_groups_follow_albef():
    """1-D tensors and biases undecayed; temp (0-d), pos_embed, cls_token and embeddings decayed."""
    model = ALBEF(get_preset("albef_tiny"))
    decay, no_decay = param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert {"temp", "visual_encoder.pos_embed", "visual_encoder.cls_token",
            "text_encoder.embeddings.word_embeddings.weight"} <= decayed
    assert {"mlm_head.bias", "itm_head.bias", "text_encoder.embeddings.norm.weight"} <= undecayed
    assert decayed.isdisjoint(undecayed)
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    twin = model.momentum_copy()
    assert sum(len(g["params"]) for g in param_groups(twin, 0.02)) == 0


def test_cpu_optimizer_is_fused_and_steps_like_the_default():
    """On the CPU build_optimizer takes PyTorch's fused AdamW (2.7x faster on albef_tiny); three steps
    with fresh random gradients land where the default (single-tensor) AdamW lands, to fp32 rounding."""
    torch.manual_seed(0)
    model = ALBEF(get_preset("albef_tiny"))
    twin = ALBEF(get_preset("albef_tiny"))
    twin.load_state_dict(model.state_dict())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OptimConfig(lr=1e-3)
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"] is True
    default = torch.optim.AdamW(param_groups(twin, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                eps=cfg.eps)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        default.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert not torch.equal(p, start[name]), name  # every parameter moved
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_resume_keeps_this_runs_optimizer_implementation(tmp_path):
    """A checkpoint whose AdamW was not fused (written before the CPU optimizer was, or on a device
    without the fused kernels) resumes into the fused optimizer with its state, still fused."""
    from albef_fast.task import PretrainTask
    from albef_fast.train.checkpoint import RunPosition, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    task = PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=8)
    cfg = OptimConfig()
    old = torch.optim.AdamW(param_groups(task.model, cfg.weight_decay), lr=cfg.lr)  # fused=None
    for p in task.model.parameters():
        p.grad = torch.randn_like(p)
    old.step()
    path = save_checkpoint(tmp_path, task, old, RunPosition(step=1, epoch=0, batch=1), {})
    new = build_optimizer(task.model, cfg)
    load_checkpoint(path, task, new, restore_rng=False)
    assert all(g["fused"] is True for g in new.param_groups)
    saved = old.state_dict()["state"]
    assert all(torch.equal(new.state_dict()["state"][k]["exp_avg"], v["exp_avg"]) for k, v in saved.items())
