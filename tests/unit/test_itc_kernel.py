"""The fused ITC op (kernels/itc_loss.py): the Triton kernel under TRITON_INTERPRET=1 and the streaming
PyTorch path against the reference, for the loss, the in-batch block and every gradient (q of each
direction and temp), at small odd shapes; plus the dispatch rules. GPU sizes: tests/gpu."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from albef_kernels import _dispatch, itc_loss, itc_loss_bidirectional, itc_loss_reference
from albef_kernels._dispatch import use_backend
from albef_kernels.itc_loss import ITCLossFunction, itc_loss_forward, itc_loss_streaming_forward

itc_module = importlib.import_module("albef_kernels.itc_loss")  # the package's `itc_loss` is the function

pytestmark = pytest.mark.skipif(not _dispatch.triton_available(), reason="needs Triton (interpreter)")


def unit(*shape, dtype=torch.float32, g=None):
    return F.normalize(torch.randn(*shape, dtype=torch.float64, generator=g), dim=-1).to(dtype)


def make_inputs(B, Q, D, *, feat_dtype=torch.float32, queue_dtype=torch.float32, seed=0):
    """ALBEF's inputs: (image_feat, image_feat_m, text_feat, text_feat_m, image_queue, text_queue)."""
    g = torch.Generator().manual_seed(seed)
    feats = [unit(B, D, dtype=feat_dtype, g=g) for _ in range(4)]
    queues = [unit(Q, D, dtype=queue_dtype, g=g) for _ in range(2)]
    return (*feats, *queues)


def reference_both(inputs, temp, alpha, weights):
    """Reference loss w0 * L_i2t + w1 * L_t2i, its gradients to both queries and temp, and the sims."""
    img, img_m, txt, txt_m, img_q, txt_q = inputs
    img, txt = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    t = temp.detach().clone().requires_grad_()
    l0, s0 = itc_loss_reference(img, img_m, txt_m, txt_q, t, alpha)
    l1, s1 = itc_loss_reference(txt, txt_m, img_m, img_q, t, alpha)
    (weights[0] * l0 + weights[1] * l1).backward()
    return torch.stack([l0, l1]).detach(), torch.stack([s0, s1]), img.grad, txt.grad, t.grad


def fused_both(inputs, temp, alpha, weights, backend="triton"):
    img, img_m, txt, txt_m, img_q, txt_q = inputs
    img, txt = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    t = temp.detach().clone().requires_grad_()
    with use_backend(backend):
        loss, sim = itc_loss_bidirectional(img, img_m, txt, txt_m, img_q, txt_q, t, alpha)
    (weights * loss).sum().backward()
    return loss.detach(), sim, img.grad, txt.grad, t.grad


NAMES = ("loss", "sim", "grad image_feat", "grad text_feat", "grad temp")


def assert_all_close(out, ref, rtol, atol):
    for name, a, b in zip(NAMES, out, ref):
        assert a.dtype == b.dtype or name == "sim", f"{name}: dtype {a.dtype} != {b.dtype}"
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


SHAPES = [  # (B, Q, D, alpha)
    (5, 37, 24, 0.4),  # odd sizes everywhere, D padded to 32
    (7, 130, 33, 0.0),  # alpha 0: hard targets only; queue spans several 16-key tiles
    (16, 64, 32, 1.0),  # alpha 1: momentum targets only; B one full row block
    (17, 40, 256, 0.4),  # ALBEF's D; B just over a row block
    (3, 0, 16, 0.4),  # empty queue: in-batch keys only
    (1, 9, 16, 0.4),  # B = 1
]


@pytest.mark.parametrize("B, Q, D, alpha", SHAPES)
def test_triton_both_directions_match_reference(B, Q, D, alpha):
    inputs = make_inputs(B, Q, D, seed=B + Q)
    temp = torch.tensor(0.07)
    weights = torch.tensor([0.3, 0.9])  # distinct upstream gradients per direction
    ref = reference_both(inputs, temp, alpha, weights)
    out = fused_both(inputs, temp, alpha, weights)
    assert_all_close(out, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_triton_split_merge_is_exact(splits):
    """The combine of per-split partials gives the same numbers whatever the number of splits."""
    inputs = make_inputs(6, 300, 20, seed=3)
    img, img_m, txt, txt_m, img_q, txt_q = inputs
    dirs = [(img, img_m, txt_m, txt_q), (txt, txt_m, img_m, img_q)]
    temp = torch.tensor(0.05)
    got = itc_loss_forward(dirs, temp, 0.4, splits=splits)
    want = itc_loss_streaming_forward([tuple(t.double() for t in d) for d in dirs], temp.double(), 0.4)
    for name, a, b in zip(("loss", "sim", "dq", "dtemp"), got, want):
        # fp32 against an fp64 oracle: 1e-6 of the tensor's scale (cancellation in O - tgt)
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * b.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_triton_single_direction_matches_reference():
    img, img_m, txt, txt_m, img_q, txt_q = make_inputs(9, 50, 40, seed=7)
    q = img.clone().requires_grad_()
    t = torch.tensor(0.1, requires_grad=True)
    with use_backend("triton"):
        loss, sim = itc_loss(q, img_m, txt_m, txt_q, t, 0.4)
    loss.backward()
    q_ref = img.clone().requires_grad_()
    t_ref = torch.tensor(0.1, requires_grad=True)
    loss_ref, sim_ref = itc_loss_reference(q_ref, img_m, txt_m, txt_q, t_ref, 0.4)
    loss_ref.backward()
    assert loss.shape == () and sim.shape == (9, 9)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sim, sim_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-5, atol=1e-5)


def test_triton_non_contiguous_inputs():
    """Row-strided slices run in place; a transposed view (inner stride != 1) is copied by the launcher."""
    B, Q, D = 6, 45, 24
    g = torch.Generator().manual_seed(11)
    base = torch.zeros(B, 3 * D)
    base[:, D:2 * D] = unit(B, D, g=g)
    img_view = base[:, D:2 * D]  # row stride 3D
    img_m = unit(D, B, g=g).t()  # inner stride B
    txt, txt_m = unit(B, D, g=g), unit(B, D, g=g)
    img_q = unit(2 * Q, D, g=g)[::2]  # every other row
    txt_q = unit(Q, D, g=g)
    inputs = (img_view, img_m, txt, txt_m, img_q, txt_q)
    assert not img_view.is_contiguous() and img_m.stride(-1) != 1 and not img_q.is_contiguous()
    weights = torch.tensor([1.0, 0.5])
    ref = reference_both(tuple(x.contiguous() for x in inputs), torch.tensor(0.07), 0.4, weights)
    out = fused_both(inputs, torch.tensor(0.07), 0.4, weights)
    assert_all_close(out, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("feat_dtype", [torch.float32, torch.bfloat16])
def test_triton_bf16_queue(feat_dtype):
    """bf16 queues (and features): the interpreter computes the dots in fp32 on the bf16 values, so it
    must equal the reference on the same values (which upcasts to fp32) to fp32 rounding. The GPU test
    checks the bf16 tensor-core dots against PyTorch's own bf16 error."""
    inputs = make_inputs(7, 70, 48, feat_dtype=feat_dtype, queue_dtype=torch.bfloat16, seed=5)
    weights = torch.tensor([0.5, 0.5])
    ref = reference_both(inputs, torch.tensor(0.07), 0.4, weights)
    out = fused_both(inputs, torch.tensor(0.07), 0.4, weights)
    assert out[2].dtype == feat_dtype  # gradients come back in the query's dtype
    rtol, atol = (1e-5, 2e-6) if feat_dtype == torch.float32 else (1e-2, 1e-3)  # grads rounded to bf16
    assert_all_close(out, ref, rtol=rtol, atol=atol)


# --- streaming PyTorch path ------------------------------------------------------------------------


@pytest.mark.parametrize("B, Q, D, alpha", [(5, 37, 24, 0.4), (4, 0, 8, 1.0), (1, 19, 6, 0.0)])
def test_streaming_matches_reference_float64(B, Q, D, alpha):
    inputs = make_inputs(B, Q, D, feat_dtype=torch.float64, queue_dtype=torch.float64, seed=2)
    temp = torch.tensor(0.07, dtype=torch.float64)
    weights = torch.tensor([0.7, 0.2], dtype=torch.float64)
    ref = reference_both(inputs, temp, alpha, weights)
    img, img_m, txt, txt_m, img_q, txt_q = inputs
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    t = temp.clone().requires_grad_()
    itc_module_chunk = itc_module.STREAMING_CHUNK
    try:
        itc_module.STREAMING_CHUNK = 8  # several chunks at this size
        loss, sim = ITCLossFunction.apply(t, alpha, "streaming", img, img_m, txt_m, txt_q,
                                          txt, txt_m, img_m, img_q)
    finally:
        itc_module.STREAMING_CHUNK = itc_module_chunk
    (weights * loss).sum().backward()
    assert_all_close((loss.detach(), sim, img.grad, txt.grad, t.grad), ref, rtol=1e-10, atol=1e-12)


def test_streaming_gradcheck():
    """The identity's gradients to the queries of both directions against finite differences,
    independent of the reference. (The temperature also enters the targets, which ALBEF and the
    identity hold constant, so finite differences in temp measure something else: its gradient is
    checked against the reference above and against frozen targets in test_objectives.)"""
    img, img_m, txt, txt_m, img_q, txt_q = make_inputs(3, 7, 5, feat_dtype=torch.float64,
                                                      queue_dtype=torch.float64, seed=9)
    img.requires_grad_(), txt.requires_grad_()
    t = torch.tensor(0.2, dtype=torch.float64)

    def f(img, txt):
        args = (img, img_m, txt_m, txt_q, txt, txt_m, img_m, img_q)
        return ITCLossFunction.apply(t, 0.4, "streaming", *args)[0]

    assert torch.autograd.gradcheck(f, (img, txt))


# --- dispatch ----------------------------------------------------------------------------------------


def _path_of(monkeypatch, inputs, temp=torch.tensor(0.07)):
    seen = []
    real = itc_module.ITCLossFunction.apply
    monkeypatch.setattr(itc_module.ITCLossFunction, "apply", lambda *a: (seen.append(a[2]), real(*a))[1])
    itc_loss_bidirectional(*inputs, temp, 0.4)
    return seen[0] if seen else "reference"


def test_dispatch_rules(monkeypatch):
    small = make_inputs(4, 12, 8)
    assert _path_of(monkeypatch, small) == "reference"  # CPU, small: the reference
    with use_backend("triton"):
        assert _path_of(monkeypatch, small) == "triton"  # forced under the interpreter
        f64 = make_inputs(4, 12, 8, feat_dtype=torch.float64, queue_dtype=torch.float64)
        t64 = torch.tensor(0.07, dtype=torch.float64)
        assert _path_of(monkeypatch, f64, t64) == "reference"  # no fp64 kernel
        wide = make_inputs(2, 3, 264)
        assert _path_of(monkeypatch, wide) == "reference"  # D > 256: outside the kernel's envelope
    monkeypatch.setattr(itc_module, "STREAMING_MIN_LOGITS", 4 * 16)
    assert _path_of(monkeypatch, small) == "streaming"  # CPU, large: the streaming path
    with use_backend("torch"):
        assert _path_of(monkeypatch, small) == "reference"  # ALBEF_KERNELS=torch
    try:
        _dispatch.configure("auto", disable=["itc_loss"])
        assert _path_of(monkeypatch, small) == "reference"  # kernels.disable=[itc_loss]
    finally:
        _dispatch.configure("auto")


def test_gradient_to_momentum_side_falls_back_to_reference():
    """The fused identity treats q_m, keys and queue as constants (ALBEF's momentum tensors); if one of
    them asks for a gradient anyway, the reference runs and delivers it."""
    img, img_m, txt, txt_m, img_q, txt_q = make_inputs(4, 10, 8)
    txt_q.requires_grad_()
    with use_backend("triton"):
        loss, _ = itc_loss_bidirectional(img, img_m, txt, txt_m, img_q, txt_q, torch.tensor(0.1), 0.4)
    loss.sum().backward()
    assert txt_q.grad is not None and txt_q.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_fp32_under_autocast(backend, monkeypatch):
    monkeypatch.setattr(itc_module, "STREAMING_MIN_LOGITS", 16)  # auto on CPU -> the streaming path
    inputs = make_inputs(5, 20, 16)
    ref = reference_both(inputs, torch.tensor(0.07), 0.4, torch.ones(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_both(inputs, torch.tensor(0.07), 0.4, torch.ones(2), backend=backend)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert_all_close(out, ref, rtol=1e-5, atol=2e-6)


def test_validation_names_the_shapes():
    img, img_m, txt, txt_m, img_q, txt_q = make_inputs(4, 10, 8)
    with pytest.raises(ValueError, match=r"queue=\(10, 7\)"):
        itc_loss_bidirectional(img, img_m, txt, txt_m, img_q, txt_q[:, :7], torch.tensor(0.1), 0.4)
    with pytest.raises(ValueError, match="B >= 1"):
        itc_loss(img[:0], img_m[:0], txt_m[:0], txt_q, torch.tensor(0.1), 0.4)
