"""EMA and masked-MLM kernels on a GPU at full ALBEF-base size: fp32 tightly against float64, bf16 by
the "no worse than 2x PyTorch's own bf16 error" rule, the EMA inside the task, and the MLM path's peak
memory (no (M, V) tensor). Auto-skipped without CUDA (tests/conftest.py)."""

from functools import lru_cache

import pytest
import torch
from albef_kernels import ema_update_, ema_update_reference_, mlm_loss, mlm_loss_reference
from albef_kernels._dispatch import use_backend

pytestmark = pytest.mark.gpu
EPS32 = 2.0**-24
M, D, V = 240, 768, 30522  # ALBEF-base batch 64 x 25 tokens x 15 % masked; BERT width and vocabulary


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32 here (the MLM GEMMs follow PyTorch's matmul precision setting)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
    torch.cuda.empty_cache()


@lru_cache(maxsize=1)
def _albef_base_momentum_shapes():
    from albef_fast.models.albef import ALBEF
    from albef_fast.models.presets import get_preset

    with torch.device("meta"):  # shapes only, no memory, no init cost
        twin = ALBEF(get_preset("albef_base")).momentum_copy()
    return [tuple(p.shape) for p in twin.parameters()]


# --- EMA -------------------------------------------------------------------------------------------


def test_ema_albef_base_matches_reference_and_float64():
    shapes = _albef_base_momentum_shapes()
    assert sum(torch.Size(s).numel() for s in shapes) > 200e6
    g = torch.Generator("cuda").manual_seed(0)
    m = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    p = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    ref = [t.clone() for t in m]
    m0 = [t.clone() for t in m[:40]] + [m[-1].clone()]
    with use_backend("triton"):
        ema_update_(m, p, 0.995)
    ema_update_reference_(ref, p, 0.995)
    for i, (a, b) in enumerate(zip(m, ref)):
        torch.testing.assert_close(a, b, rtol=2.5e-7, atol=1e-7,
                                   msg=lambda s, i=i, a=a: f"tensor {i} {tuple(a.shape)}: {s}")
    for a, a0, b in zip(m[:40] + [m[-1]], m0, p[:40] + [p[-1]]):  # float64 formula on a subset
        want = 0.995 * a0.double() + 0.005 * b.double()
        assert ((a.double() - want).abs() <= 3 * EPS32 * (a0.double().abs() + b.double().abs())).all()


def test_ema_survives_module_moves_and_matches_in_task():
    """after_step of the real task with the Triton EMA equals the reference EMA, also after the task's
    parameters got new storage (.cpu().cuda())."""
    from albef_fast.models.albef import ALBEF
    from albef_fast.models.presets import get_preset
    from albef_fast.task import PretrainTask

    torch.manual_seed(0)
    task = PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=48).cuda()
    for _ in range(2):
        with torch.no_grad():
            for p in task.model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        momentum, online = task.momentum_pairs()
        want = [m.double() * 0.995 + p.double() * 0.005 for m, p in zip(momentum, online)]
        with use_backend("triton"):
            ema_update_(momentum, online, task.momentum)
        for a, b in zip(momentum, want):
            torch.testing.assert_close(a.double(), b, rtol=3e-7, atol=1e-7)
        task = task.cpu().cuda()  # new storage for every parameter: the cached table must not be reused


# --- MLM ---------------------------------------------------------------------------------------------


def _inputs(m=M, v=V, d=D, dtype=torch.float32, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(dtype)
    # word-embedding-like scales: logits of order 1, softmax neither flat nor one-hot
    return (t(m, d), t(v, d, scale=0.05), t(v, scale=0.1), torch.randint(v, (m,), device="cuda", generator=g),
            t(m, d), t(v, d, scale=0.05), t(v, scale=0.1))


def _grads(fn, args, alpha=0.4, autocast=False):
    h, W, b, y, hm, Wm, bm = args
    h, W, b = (x.detach().clone().requires_grad_() for x in (h, W, b))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, W, b, y, hm, Wm, bm, alpha)
    loss.backward()
    return [loss.detach().double(), h.grad.double(), W.grad.double(), b.grad.double()]


def _oracle(args, alpha=0.4):
    return _grads(mlm_loss_reference, tuple(a.double() if a.is_floating_point() else a for a in args), alpha)


NAMES = ("loss", "dh", "dweight", "dbias")


def _triton(*a):
    with use_backend("triton"):
        return mlm_loss(*a)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mlm_full_size_fp32_matches_float64(alpha):
    args = _inputs()
    want = _oracle(args, alpha)
    got = _grads(_triton, args, alpha)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-5 * w.abs().max().item(),
                                   msg=lambda s, name=name: f"{name}: {s}")


@pytest.mark.parametrize("mode", ["bf16_inputs", "autocast"])
def test_mlm_full_size_bf16_no_worse_than_torch(mode):
    """bf16 inputs, or fp32 parameters under bf16 autocast (the training setting): the kernel's error
    against the fp32-input float64 oracle is at most 2x the reference's own error in the same mode."""
    args32 = _inputs(seed=1)
    want = _oracle(args32)
    if mode == "bf16_inputs":
        args = tuple(a.bfloat16() if a.is_floating_point() else a for a in args32)
        got, pt = _grads(_triton, args), _grads(mlm_loss_reference, args)
    else:
        got, pt = _grads(_triton, args32, autocast=True), _grads(mlm_loss_reference, args32, autocast=True)
    for name, g, p, w in zip(NAMES, got, pt, want):
        err, err_pt = (g - w).abs().max().item(), (p - w).abs().max().item()
        print(f"{mode} {name}: kernel {err:.3e}  torch {err_pt:.3e}")
        assert err <= 2 * err_pt + 1e-3 * w.abs().max().item(), f"{name}: kernel {err:.3e} vs torch {err_pt:.3e}"


@pytest.mark.parametrize("m, v, chunk", [(1, 1001, 256), (7, 30522, 4096), (300, 777, 128)])
def test_mlm_odd_shapes_and_noncontiguous(m, v, chunk):
    h, W, b, y, hm, Wm, bm = _inputs(m, v, 64, seed=2)
    h, W = h.t().contiguous().t(), W.t().contiguous().t()  # same values, column-major storage
    args = (h, W, b, y, hm, Wm, bm)
    want = _oracle(args)
    got = _grads(lambda *a: mlm_kw(*a, chunk), args)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-5 * w.abs().max().item(),
                                   msg=lambda s, name=name: f"{name}: {s}")


def mlm_kw(h, W, b, y, hm, Wm, bm, alpha, chunk):
    with use_backend("triton"):
        return mlm_loss(h, W, b, y, hm, Wm, bm, alpha, chunk_size=chunk)


def test_mlm_peak_memory_holds_no_tokens_by_vocabulary_tensor():
    """Forward + backward at full size needs the parameter gradients plus chunk-sized buffers: less
    than half of one fp32 (M, V) tensor beyond dweight, dh and dbias."""
    h, W, b, y, hm, Wm, bm = _inputs(seed=3)
    for x in (h, W, b):
        x.requires_grad_()

    def step():
        with use_backend("triton"):
            mlm_loss(h, W, b, y, hm, Wm, bm, 0.4).backward()
        h.grad = W.grad = b.grad = None

    step()  # cuBLAS workspaces and Triton compilation outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (W.numel() + b.numel() + h.numel()) * 4
    print(f"peak extra {extra / 2**20:.1f} MiB, of which gradients {grads / 2**20:.1f} MiB; "
          f"one (M, V) fp32 tensor = {M * V * 4 / 2**20:.1f} MiB")
    assert extra - grads < 0.5 * M * V * 4
