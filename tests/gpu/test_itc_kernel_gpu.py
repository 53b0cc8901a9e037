"""The fused ITC kernel and the hard-negative sampler on a GPU at ALBEF's size (B = 64, Q = 65,536,
D = 256): every output and gradient against a float64 oracle, with the low-precision rule (the kernel's
error is at most 2x PyTorch's own error at the same precision), determinism, no host synchronisation,
and the sampler's distribution. Skipped without CUDA (tests/conftest.py)."""

import pytest
import torch
import torch.nn.functional as F

from albef_kernels import itc_loss_bidirectional, itc_loss_reference, sample_hard_negatives
from albef_kernels._dispatch import use_backend
from albef_kernels.hard_negatives import sample_hard_negatives_forward

pytestmark = pytest.mark.gpu
B, Q, D = 64, 65536, 256
ALPHA = 0.4


def make_inputs(B, Q, D, feat_dtype, queue_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    feats = [unit(B, D).to(feat_dtype).cuda() for _ in range(4)]  # image, image_m, text, text_m
    queues = [unit(Q, D).to(queue_dtype).cuda() for _ in range(2)]  # image queue, text queue
    return (*feats, *queues)


def run(loss_fn, inputs, temp, dtype=None):
    """(loss (2,), sim (2, B, B), grad image_feat, grad text_feat, grad temp) of 0.3 L_i2t + 0.9 L_t2i."""
    img, img_m, txt, txt_m, img_q, txt_q = inputs
    img, txt = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    t = temp.detach().clone().requires_grad_()
    loss, sim = loss_fn(img, img_m, txt, txt_m, img_q, txt_q, t)
    (loss * torch.tensor([0.3, 0.9], device=loss.device, dtype=loss.dtype)).sum().backward()
    return [x.detach().double() for x in (loss, sim, img.grad, txt.grad, t.grad)]


def fused(*args):
    *tensors, t = args
    with use_backend("triton"):
        return itc_loss_bidirectional(*tensors, t, ALPHA)


def torch_at(dtype):
    """The reference formula evaluated by PyTorch at `dtype` (float64 = the oracle); with dtype=None the
    project's reference itself (fp32, whatever the inputs)."""

    def one(q, q_m, k, queue, t):
        if dtype is None:
            return itc_loss_reference(q, q_m, k, queue, t, ALPHA)
        n = q.shape[0]
        keys = torch.cat([k.to(dtype), queue.to(dtype)])
        sim = q.to(dtype) @ keys.t() / t.to(dtype)
        with torch.no_grad():
            targets = ALPHA * F.softmax(q_m.to(dtype) @ keys.t() / t.to(dtype), dim=1)
            targets[:, :n] += (1 - ALPHA) * torch.eye(n, device=q.device, dtype=dtype)
        return -(F.log_softmax(sim, dim=1) * targets).sum(1).mean(), sim[:, :n]

    def both(img, img_m, txt, txt_m, img_q, txt_q, t):
        a, sa = one(img, img_m, txt_m, txt_q, t)
        b, sb = one(txt, txt_m, img_m, img_q, t)
        return torch.stack([a, b]), torch.stack([sa, sb])

    return both


NAMES = ("loss", "sim", "grad image_feat", "grad text_feat", "grad temp")


def assert_no_worse_than_torch(out, oracle, torch_out, factor, floor):
    """flash-attn's rule: max |kernel - oracle| <= factor * max |torch - oracle| + floor * scale."""
    for name, a, o, p in zip(NAMES, out, oracle, torch_out):
        err, ref_err = (a - o).abs().max().item(), (p - o).abs().max().item()
        scale = o.abs().max().item()
        print(f"{name:16s} kernel err {err:.3e}  torch err {ref_err:.3e}  scale {scale:.3e}")
        assert err <= factor * ref_err + floor * scale, (
            f"{name}: kernel error {err:.3e} > {factor} x torch's {ref_err:.3e} + {floor} x {scale:.3e}")


def test_full_size_fp32():
    inputs = make_inputs(B, Q, D, torch.float32, torch.float32)
    temp = torch.tensor(0.07, device="cuda")
    oracle = run(torch_at(torch.float64), [x.double() for x in inputs], temp.double())
    ref = run(torch_at(None), inputs, temp)
    out = run(fused, inputs, temp)
    # 3xTF32 dots are fp32-accurate to a small factor; the floor allows 2e-6 of each tensor's scale
    assert_no_worse_than_torch(out, oracle, ref, factor=2, floor=2e-6)


@pytest.mark.parametrize("feat_dtype", [torch.float32, torch.bfloat16])
def test_full_size_bf16_queue(feat_dtype):
    """bf16 queues (tensor-core bf16 dots, fp32 accumulation) against PyTorch computing the same formula
    in bf16; both judged against float64 on the same (bf16-rounded) values."""
    inputs = make_inputs(B, Q, D, feat_dtype, torch.bfloat16, seed=1)
    temp = torch.tensor(0.07, device="cuda")
    oracle = run(torch_at(torch.float64), [x.double() for x in inputs], temp.double())
    torch_bf16 = run(torch_at(torch.bfloat16), inputs, temp)
    out = run(fused, inputs, temp)
    assert_no_worse_than_torch(out, oracle, torch_bf16, factor=2, floor=1e-6)


def test_inbatch_launch_bf16_queue():
    """B = 192 (above INBATCH_IN_COMBINE_MAX_B): the in-batch keys run as the split kernel's INBATCH launch
    (bf16 tensor-core dots, one more partial slot), same rule as above."""
    from albef_kernels import itc_loss as itc_module

    n = 192
    assert n > itc_module.INBATCH_IN_COMBINE_MAX_B
    inputs = make_inputs(n, Q, D, torch.float32, torch.bfloat16, seed=5)
    temp = torch.tensor(0.07, device="cuda")
    oracle = run(torch_at(torch.float64), [x.double() for x in inputs], temp.double())
    assert_no_worse_than_torch(run(fused, inputs, temp), oracle, run(torch_at(torch.bfloat16), inputs, temp),
                               factor=2, floor=1e-6)


@pytest.mark.parametrize("queue_dtype, tma", [(torch.bfloat16, False), (torch.float32, True)])
def test_full_size_other_queue_loads(queue_dtype, tma, monkeypatch):
    """The queue-load path `_tma_ready` does not choose, forced: pointer loads for bf16 queues (the
    default on pre-Hopper GPUs), TMA for fp32 queues (available with tma=True). Same rule as above."""
    from albef_kernels import itc_loss as itc_module

    real = itc_module._triton_forward
    monkeypatch.setattr(itc_module, "_triton_forward", lambda *a, **k: real(*a, **{**k, "tma": tma}))
    inputs = make_inputs(B, Q, D, torch.float32, queue_dtype, seed=3)
    temp = torch.tensor(0.07, device="cuda")
    oracle = run(torch_at(torch.float64), [x.double() for x in inputs], temp.double())
    if queue_dtype == torch.bfloat16:
        assert_no_worse_than_torch(run(fused, inputs, temp), oracle, run(torch_at(torch.bfloat16), inputs, temp),
                                   factor=2, floor=1e-6)
    else:
        assert_no_worse_than_torch(run(fused, inputs, temp), oracle, run(torch_at(None), inputs, temp), 2, 2e-6)


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
def test_full_size_sdpa_path(backend):
    """The SDPA candidate path (kernels/itc_loss.py: O and LSE from PyTorch's fused attention) at full
    size with bf16 queues, same rule as the kernel. A backend whose attention kernel refuses the shapes
    (probed alone) is skipped with its own message (reported, not passed); any error after that fails."""
    from albef_kernels.itc_loss import _attend, _sdpa_chunk, itc_loss_fused

    def sdpa(img, img_m, txt, txt_m, img_q, txt_q, t):
        return itc_loss_fused([(img, img_m, txt_m, txt_q), (txt, txt_m, img_m, img_q)], t, ALPHA, f"sdpa:{backend}")

    inputs = make_inputs(B, Q, D, torch.float32, torch.bfloat16, seed=4)
    temp = torch.tensor(0.07, device="cuda")
    size = _sdpa_chunk(Q, 2 * B, inputs[0].device)
    probe = inputs[4][: 2 * B].expand(Q // size, -1, -1).contiguous()  # (chunks, 2B, D) bf16 queries
    try:
        _attend(probe, inputs[5].view(Q // size, size, D), backend)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"{backend} refused: {str(exc)[:200]}")
    out = run(sdpa, inputs, temp)
    oracle = run(torch_at(torch.float64), [x.double() for x in inputs], temp.double())
    assert_no_worse_than_torch(out, oracle, run(torch_at(torch.bfloat16), inputs, temp), factor=2, floor=1e-6)


def test_odd_shape_fp32():
    """Non-power-of-2 D (masked columns), B not a multiple of the row block, a queue split unevenly."""
    inputs = make_inputs(37, 1000, 200, torch.float32, torch.float32, seed=2)
    temp = torch.tensor(0.05, device="cuda")
    oracle = run(torch_at(torch.float64), [x.double() for x in inputs], temp.double())
    assert_no_worse_than_torch(run(fused, inputs, temp), oracle, run(torch_at(None), inputs, temp), 2, 2e-6)


def test_deterministic_and_free_of_host_syncs():
    inputs = make_inputs(B, Q, D, torch.float32, torch.bfloat16, seed=3)
    temp = torch.tensor(0.07, device="cuda")
    first = run(fused, inputs, temp)  # also autotunes (which synchronises) before the check below
    sims = torch.randn(2, B, B, device="cuda")
    sample_hard_negatives_forward(sims, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with use_backend("triton"):
            img, img_m, txt, txt_m, img_q, txt_q = inputs
            img.requires_grad_()
            loss, sim = itc_loss_bidirectional(img, img_m, txt, txt_m, img_q, txt_q, temp, ALPHA)
            loss.sum().backward()
            idx, valid = sample_hard_negatives(sim)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    img.requires_grad_(False)
    second = run(fused, inputs, temp)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical calls"
    assert idx.shape == (2, B) and valid.all()


def test_cuda_graph_replay_matches_eager():
    """ITC forward + backward and the sampler captured in one CUDA graph (how a compiled step runs):
    each replay gives exactly the eager loss, block and gradients (the combine kernel's arrival
    counters are zeroed by the forward kernel), and the sampler draws afresh on each replay
    (device-drawn key)."""
    from albef_kernels import itc_loss_path

    img0, img_m, txt0, txt_m, img_q, txt_q = make_inputs(B, Q, D, torch.float32, torch.bfloat16, seed=4)
    img, txt = img0.clone().requires_grad_(), txt0.clone().requires_grad_()
    temp = torch.tensor(0.07, device="cuda", requires_grad=True)
    weights = torch.tensor([0.3, 0.9], device="cuda")
    leaves = (img, txt, temp)

    def step():
        with use_backend("triton"):
            loss, sim = itc_loss_bidirectional(img, img_m, txt, txt_m, img_q, txt_q, temp, ALPHA)
            index, valid = sample_hard_negatives(sim)
        loss.backward(weights)
        return loss, sim, index, valid

    with use_backend("triton"):
        assert itc_loss_path(img, img_m, txt, txt_m, img_q, txt_q, temp) == "triton"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning synchronises: never inside a capture)
        for _ in range(2):
            for x in leaves:
                x.grad = None
            eager = step()
            eager_grads = [x.grad.clone() for x in leaves]
    torch.cuda.current_stream().wait_stream(side)
    for x in leaves:
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    draws = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for name, a, b in zip(("loss", "sim"), static[:2], eager[:2]):
            assert torch.equal(a, b), f"{name}: a replay differs from the eager call"
        for name, x, g in zip(("grad image_feat", "grad text_feat", "grad temp"), leaves, eager_grads):
            assert torch.equal(x.grad, g), f"{name}: a replay differs from the eager call"
        assert static[3].all() and (static[2] != torch.arange(B, device="cuda")).all()
        draws.append(static[2].clone())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_torch_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of ITC forward + backward on the GPU through the registered op
    (aot_eager: the op's fake and backward registrations, without inductor's compile time)."""
    inputs = make_inputs(B, Q, D, torch.float32, torch.bfloat16, seed=5)
    temp = torch.tensor(0.07, device="cuda")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    for name, a, b in zip(NAMES, run(compiled, inputs, temp), run(fused, inputs, temp)):
        assert torch.equal(a, b), f"{name}: compiled differs from eager"


# --- sampler ----------------------------------------------------------------------------------------


def test_sampler_never_the_positive_and_degenerate_rows():
    g = torch.Generator().manual_seed(0)
    sim = (torch.randn(2, B, B, generator=g) * 5).cuda()
    sim.diagonal(dim1=1, dim2=2).add_(200.0)
    for seed in range(20):
        idx, valid = sample_hard_negatives_forward(sim, seed)
        assert valid.all() and (idx != torch.arange(B, device="cuda")).all()
    nan, inf = float("nan"), float("inf")
    odd = torch.tensor([[0.0, nan, nan], [-inf, 5.0, 1.0], [1.0, inf, 0.0]], device="cuda")
    idx, valid = sample_hard_negatives_forward(odd, 5)
    assert idx.tolist() == [0, 2, 2] and valid.tolist() == [False, True, False]
    idx, valid = sample_hard_negatives_forward(torch.randn(1, 1, device="cuda"), 5)
    assert idx.tolist() == [0] and valid.tolist() == [False]


def test_sampler_distribution_matches_multinomial():
    """As the interpreter test, with many more draws: K = 8 column classes of 40, 200 launches of a
    (2, 320, 320) stack = 32,000 draws per row class; chi-square over 7 degrees of freedom."""
    K, per, launches = 8, 40, 200
    n_rows = K * per
    cls = torch.arange(n_rows, device="cuda") // per
    level = torch.tensor([0.0, 1.5, -1.0, 3.0, 0.5, -2.0, 2.0, 1.0], device="cuda")
    sim = level[cls].expand(n_rows, n_rows).clone()
    sim.diagonal().add_(torch.linspace(-2, 6, n_rows, device="cuda"))
    w = F.softmax(sim.double(), 1) * (1 - torch.eye(n_rows, device="cuda", dtype=torch.float64))
    w = w / w.sum(1, keepdim=True)
    expected = torch.stack([w[c * per].view(K, per).sum(1) for c in range(K)])
    counts = torch.zeros(K, K, device="cuda", dtype=torch.float64)
    stack = torch.stack([sim, sim])
    for seed in range(launches):
        idx, valid = sample_hard_negatives_forward(stack, 1000 + seed)
        for r in range(2):
            counts.index_put_((cls, cls[idx[r]]), torch.ones(n_rows, device="cuda", dtype=torch.float64),
                              accumulate=True)
    exp = expected * counts.sum(1, keepdim=True)
    chi2 = ((counts - exp) ** 2 / exp).sum(1)
    assert (chi2 < 24.32).all(), f"chi2 per row class {chi2.tolist()} (0.999 quantile, 7 dof: 24.32)"
