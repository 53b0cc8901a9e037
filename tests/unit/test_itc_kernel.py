"""The fused ITC op (kernels/itc_loss.py): the Triton kernel under TRITON_INTERPRET=1 and the streaming
PyTorch path against the reference, for the loss, the in-batch block and every gradient (q of each
direction and temp), at small odd shapes; plus the dispatch rules. GPU sizes: tests/gpu."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from albef_kernels import _dispatch, itc_loss, itc_loss_bidirectional, itc_loss_reference
from albef_kernels._dispatch import use_backend
from albef_kernels.itc_loss import itc_loss_forward, itc_loss_fused, itc_loss_streaming_forward

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


def path_both(inputs, temp, alpha, weights, path, directions=2):
    """`itc_loss_fused` on `path` over the first `directions` directions: (loss, sim, grad image_feat,
    grad text_feat, grad temp) of sum(weights * loss) (grad text_feat None for one direction)."""
    img, img_m, txt, txt_m, img_q, txt_q = inputs
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    t = temp.clone().requires_grad_()
    loss, sim = itc_loss_fused([(img, img_m, txt_m, txt_q), (txt, txt_m, img_m, img_q)][:directions], t, alpha, path)
    (weights[:directions] * loss).sum().backward()
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


@pytest.mark.parametrize("B, Q, D, alpha", SHAPES)
def test_inbatch_launch_matches_reference(B, Q, D, alpha, monkeypatch):
    """Above INBATCH_IN_COMBINE_MAX_B the in-batch keys are a launch of the split kernel's INBATCH
    specialisation (one more partial slot, the (B, B) block written there) instead of the combine
    kernel's loop: the same results."""
    monkeypatch.setattr(itc_module, "INBATCH_IN_COMBINE_MAX_B", 0)
    inputs = make_inputs(B, Q, D, seed=B + Q + 1)
    temp = torch.tensor(0.07)
    weights = torch.tensor([0.7, 0.4])
    assert_all_close(fused_both(inputs, temp, alpha, weights), reference_both(inputs, temp, alpha, weights),
                     rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("inbatch_max", [128, 0])  # in-batch keys in the combine kernel / their own launch
@pytest.mark.parametrize("B, Q, D", [(5, 37, 24), (16, 300, 64), (7, 130, 33)])
def test_tma_and_pointer_queue_loads_agree(B, Q, D, inbatch_max, monkeypatch):
    """The queue tiles load (and the O partials store) through TMA descriptors where `_tma_ready` allows
    (16-bit queues with 16-byte aligned rows: not at D = 33) and through pointers otherwise; forced either
    way (fp32 queues through TMA where their rows align), both give the streaming oracle's numbers."""
    monkeypatch.setattr(itc_module, "INBATCH_IN_COMBINE_MAX_B", inbatch_max)
    img, img_m, txt, txt_m, img_q, txt_q = make_inputs(B, Q, D, seed=D)
    dirs = [(img, img_m, txt_m, txt_q), (txt, txt_m, img_m, img_q)]
    temp = torch.tensor(0.07)
    want = itc_loss_streaming_forward([tuple(t.double() for t in d) for d in dirs], temp.double(), 0.4)
    assert not itc_module._tma_ready(img_q, txt_q)  # fp32 queues: pointer loads unless forced
    assert itc_module._tma_ready(img_q.bfloat16(), txt_q.bfloat16()) == (D * 2 % 16 == 0)
    for tma in ((False, True) if D * 4 % 16 == 0 else (False,)):
        got = itc_module._triton_forward(dirs, temp, 0.4, tma=tma)
        for name, a, b in zip(("loss", "sim", "dq", "dtemp"), got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * b.abs().max().item(),
                                       msg=lambda m: f"tma={tma} {name}: {m}")


def test_combine_merges_splits_in_several_passes():
    """More splits than the combine kernel loads at once (BLOCK_S = 2, 8 splits: four passes of the
    running max and of the weighted sums) merges like one pass."""
    img, img_m, txt, txt_m, img_q, txt_q = make_inputs(4, 1000, 16, seed=5)
    dirs = [(img, img_m, txt_m, txt_q), (txt, txt_m, img_m, img_q)]
    temp = torch.tensor(0.05)
    one = itc_module._triton_forward(dirs, temp, 0.4, splits=8, combine_config=dict(BLOCK_S=16, num_warps=1))
    many = itc_module._triton_forward(dirs, temp, 0.4, splits=8, combine_config=dict(BLOCK_S=2, num_warps=1))
    for name, a, b in zip(("loss", "sim", "dq", "dtemp"), many, one):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * b.abs().max().item(), msg=lambda m: f"{name}: {m}")


def test_backward_with_an_expanded_upstream_gradient_and_no_temperature_gradient():
    """loss.sum().backward() hands the op an expanded (stride 0) gradient; temp without requires_grad
    gets none: the one-launch backward reads the stride and skips temp's output."""
    img, img_m, txt, txt_m, img_q, txt_q = make_inputs(6, 50, 24, seed=9)
    temp = torch.tensor(0.07)
    grads = []
    for backend in ("triton", "torch"):
        a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
        with use_backend(backend):
            loss, _ = itc_loss_bidirectional(a, img_m, b, txt_m, img_q, txt_q, temp, 0.4)
        loss.sum().backward()
        grads.append((a.grad, b.grad))
    assert temp.grad is None
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


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
    itc_module_chunk = itc_module.STREAMING_CHUNK
    try:
        itc_module.STREAMING_CHUNK = 8  # several chunks at this size
        out = path_both(inputs, temp, alpha, weights, "streaming")
    finally:
        itc_module.STREAMING_CHUNK = itc_module_chunk
    assert_all_close(out, ref, rtol=1e-10, atol=1e-12)


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
        directions = [(img, img_m, txt_m, txt_q), (txt, txt_m, img_m, img_q)]
        return itc_loss_fused(directions, t, 0.4, "streaming")[0]

    assert torch.autograd.gradcheck(f, (img, txt))


# --- dispatch ----------------------------------------------------------------------------------------


def _path_of(monkeypatch, inputs, temp=torch.tensor(0.07)):
    seen = []
    real = itc_module.itc_loss_fused
    monkeypatch.setattr(itc_module, "itc_loss_fused", lambda *a: (seen.append(a[3]), real(*a))[1])
    itc_loss_bidirectional(*inputs, temp, 0.4)
    path = seen[0] if seen else "reference"
    assert itc_module.itc_loss_path(*inputs, temp) == path  # the public query agrees with the call
    return path


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
    at_threshold = make_inputs(8, itc_module.STREAMING_MIN_LOGITS_CPU // 8 - 8, 8)
    assert _path_of(monkeypatch, at_threshold) == "streaming"  # CPU from 8k logits: streaming, faster there
    monkeypatch.setattr(itc_module, "STREAMING_MIN_LOGITS", 0)  # the off-CPU threshold does not apply here
    assert _path_of(monkeypatch, small) == "reference"
    monkeypatch.setattr(itc_module, "STREAMING_MIN_LOGITS_CPU", 4 * 16)
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
    monkeypatch.setattr(itc_module, "STREAMING_MIN_LOGITS_CPU", 16)  # auto on CPU -> the streaming path
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


# --- the registered op: torch.compile traces through it -----------------------------------------------


def test_poisoned_allocations(monkeypatch):
    """Every buffer the launcher allocates starts as garbage (NaN floats, int counters at 7): the
    results still match the reference, so no kernel reads memory it has not written, and the combine
    kernel's counters are zeroed by the forward kernel, not by luck of a fresh allocation."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(7) if not out.is_floating_point() else out.fill_(float("nan"))

    inputs = make_inputs(6, 50, 24, seed=12)
    weights = torch.tensor([0.4, 0.8])
    ref = reference_both(inputs, torch.tensor(0.07), 0.4, weights)
    monkeypatch.setattr(itc_module.torch, "empty", poisoned)
    out = fused_both(inputs, torch.tensor(0.07), 0.4, weights)
    monkeypatch.undo()
    assert_all_close(out, ref, rtol=1e-5, atol=2e-6)


def test_repeated_calls_are_identical():
    """The combine kernel's arrival counters are zeroed by the forward kernel of the same call: a second
    call on the same inputs gives bit-identical results (nothing carried over between calls)."""
    inputs = make_inputs(9, 40, 16, seed=4)
    weights = torch.tensor([1.0, 1.0])
    first = fused_both(inputs, torch.tensor(0.07), 0.4, weights)
    second = fused_both(inputs, torch.tensor(0.07), 0.4, weights)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --- SDPA path (PyTorch's fused attention for the queue's share; a benchmark candidate) -------------


@pytest.mark.parametrize("B, Q, D, alpha, chunk", [
    (5, 1100, 24, 0.4, 300),  # three equal chunks and a ragged tail
    (5, 37, 24, 0.4, 512),  # the tail alone
    (7, 256, 16, 0.4, 64),  # equal chunks only
    (4, 0, 8, 1.0, 512),  # no queue: the in-batch keys alone
    (1, 19, 6, 0.0, 8),
])
def test_sdpa_path_matches_reference_float64(B, Q, D, alpha, chunk, monkeypatch):
    """Loss, in-batch block and every gradient of the SDPA path (CPU flash-attention kernel, fp64)
    against the reference, through the same autograd Function as the other fused paths."""
    monkeypatch.setattr(itc_module, "_sdpa_chunk", lambda *a: chunk)
    inputs = make_inputs(B, Q, D, feat_dtype=torch.float64, queue_dtype=torch.float64, seed=4)
    temp = torch.tensor(0.07, dtype=torch.float64)
    weights = torch.tensor([0.3, 0.9], dtype=torch.float64)
    ref = reference_both(inputs, temp, alpha, weights)
    assert_all_close(path_both(inputs, temp, alpha, weights, "sdpa"), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("B, Q, D, chunk, R", [
    (5, 1024, 24, 256, 2), (7, 256, 16, 64, 2), (4, 0, 8, 512, 2), (3, 128, 40, 128, 1), (6, 384, 32, 128, 1),
])
def test_sdpa_fused_combine_matches_reference(B, Q, D, chunk, R, monkeypatch):
    """The SDPA path with the Triton combine kernel (interpreter): attention partials in natural-log
    units without sums, in-batch keys in the kernel, one or two directions, an empty queue; every output
    and gradient against the reference."""
    monkeypatch.setattr(itc_module, "_sdpa_chunk", lambda *a: chunk)
    fused = []
    real = itc_module._sdpa_fused
    monkeypatch.setattr(itc_module, "_sdpa_fused", lambda *a: fused.append(1) or real(*a))
    inputs = make_inputs(B, Q, D, seed=11)
    temp = torch.tensor(0.07)
    weights = torch.tensor([0.6, 0.8]) if R == 2 else torch.tensor([1.0, 0.0])
    ref = reference_both(inputs, temp, 0.4, weights)
    with use_backend("triton"):
        loss, sim, g_img, g_txt, g_t = path_both(inputs, temp, 0.4, weights, "sdpa", directions=R)
    assert fused == [1]
    if R == 2:
        assert_all_close((loss, sim, g_img, g_txt, g_t), ref, rtol=1e-5, atol=2e-6)
    else:
        assert g_txt is None
        for name, a, b in (("loss", loss, ref[0][:1]), ("sim", sim, ref[1][:1]), ("grad image_feat", g_img, ref[2]),
                           ("grad temp", g_t, ref[4])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_sdpa_path_copies_the_queries_for_a_kernel_refusing_a_stride_0_batch(monkeypatch):
    """A backend that rejects the expanded queries gets them copied (and from then on directly); the
    result is unchanged."""
    monkeypatch.setattr(itc_module, "_sdpa_chunk", lambda *a: 64)
    monkeypatch.setattr(itc_module, "_SDPA_COPY_QUERIES", set())
    real, calls = itc_module._attend, []

    def picky(x, keys, backend):
        calls.append(x.stride(0))
        if x.shape[0] > 1 and x.stride(0) == 0:
            raise RuntimeError("no stride-0 batch")
        return real(x, keys, backend)

    inputs = make_inputs(5, 200, 16, seed=3)
    img, img_m, txt, txt_m, img_q, txt_q = inputs
    directions = [(img, img_m, txt_m, txt_q), (txt, txt_m, img_m, img_q)]
    temp = torch.tensor(0.07)
    expected = itc_module.itc_loss_sdpa_forward(directions, temp, 0.4)
    monkeypatch.setattr(itc_module, "_attend", picky)
    out = itc_module.itc_loss_sdpa_forward(directions, temp, 0.4)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert itc_module._SDPA_COPY_QUERIES == {"cpu"}
    assert calls[:2] == [0, 10 * 16] and 0 not in calls[2:]  # refused once, copied from then on


def test_sdpa_path_bf16_queue_and_bad_backend():
    """bf16 queues: the attention runs in bf16 (queries rounded to it, O rounded to it), so the path
    must stay within twice the error of the reference computed at the same precision, both against
    the fp32 reference on the same bf16 values. An unknown backend is refused by name."""
    inputs = make_inputs(6, 300, 32, queue_dtype=torch.bfloat16, seed=8)
    temp, weights = torch.tensor(0.07), torch.tensor([0.5, 0.5])
    ref = reference_both(inputs, temp, 0.4, weights)
    out = path_both(inputs, temp, 0.4, weights, "sdpa")
    low = [x.to(torch.bfloat16) for x in inputs]  # PyTorch's own bf16 error: the reference in bf16
    bf16 = reference_both(low, temp.to(torch.bfloat16), 0.4, weights.to(torch.bfloat16))
    for name, a, b, r in zip(NAMES, out, bf16, ref):
        err, own = (a.double() - r.double()).abs().max(), (b.double() - r.double()).abs().max()
        assert err <= 2 * own, f"{name}: SDPA path error {err:.3g} > 2 x bf16 reference error {own:.3g}"
    img, img_m, txt, txt_m, img_q, txt_q = inputs
    with pytest.raises(ValueError, match="SDPA backend must be one of"):
        itc_loss_fused([(img, img_m, txt_m, txt_q)], temp, 0.4, "sdpa:nope")


@pytest.mark.parametrize("path", ["triton", "streaming", "sdpa"])
def test_op_registration_opcheck(path):
    """torch.library's own checks of the op: schema, fake (meta) implementation, autograd registration."""
    img, img_m, txt, txt_m, img_q, txt_q = make_inputs(4, 19, 8, seed=6)
    args = (img.requires_grad_(), img_m, txt_m, txt_q, txt.requires_grad_(), txt_m, img_m, img_q,
            torch.tensor(0.07, requires_grad=True), 0.4, 2, path)
    with use_backend("triton"):
        result = torch.library.opcheck(torch.ops.albef_kernels.itc_loss.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def _compile_matches_eager(backend, compiler, monkeypatch, expected_path, streaming_min=None):
    if streaming_min is not None:
        monkeypatch.setattr(itc_module, "STREAMING_MIN_LOGITS_CPU", streaming_min)
    img, img_m, txt, txt_m, img_q, txt_q = make_inputs(5, 37, 24, seed=8)

    def step(img, txt, temp):
        with use_backend(backend):
            loss, sim = itc_loss_bidirectional(img, img_m, txt, txt_m, img_q, txt_q, temp, 0.4)
        return loss.mean(), sim

    def run(fn):
        a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
        t = torch.tensor(0.07, requires_grad=True)
        loss, sim = fn(a, b, t)
        loss.backward()
        return loss.detach(), sim, a.grad, b.grad, t.grad

    with use_backend(backend):
        assert itc_module.itc_loss_path(img, img_m, txt, txt_m, img_q, txt_q, 0.07) == expected_path
    torch._dynamo.reset()
    graphs = []

    def recording(gm, example_inputs):  # the graph Dynamo captured, then the backend under test
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend(compiler)(gm, example_inputs)

    # fullgraph=True: any graph break is an error
    compiled = run(torch.compile(step, fullgraph=True, backend=recording))
    assert len(graphs) == 1
    # the fused paths are one node of the graph: the op registered with torch.library
    assert ("albef_kernels.itc_loss" in graphs[0]) == (expected_path != "reference"), graphs[0]
    eager = run(step)
    for name, a, b in zip(NAMES, compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend, expected, streaming_min", [
    ("auto", "reference", None),  # CPU default: the plain PyTorch reference
    ("auto", "streaming", 16),  # CPU, large shapes: the streaming path through the registered op
    ("triton", "triton", None),  # the Triton kernel (interpreter) through the registered op
])
def test_torch_compile_fullgraph_matches_eager(backend, expected, streaming_min, monkeypatch):
    """torch.compile(fullgraph=True) of the loss + backward on the CPU: no graph break on any path, and
    the loss, in-batch block and every gradient equal the eager call's. (aot_eager: the fake
    implementation and the registered backward are what AOT autograd traces; inductor below.)"""
    _compile_matches_eager(backend, "aot_eager", monkeypatch, expected, streaming_min)


@pytest.mark.slow
@pytest.mark.parametrize("backend, expected", [("auto", "reference"), ("triton", "triton")])
def test_torch_compile_inductor_matches_eager(backend, expected, monkeypatch):
    """The same with the default inductor backend (C++ code generation on the CPU: ~15-30 s each)."""
    _compile_matches_eager(backend, "inductor", monkeypatch, expected)


def test_enabled_says_which_path():
    """albef_kernels.enabled(op, *tensors): the dispatch decision, without running the op."""
    from albef_kernels import enabled

    x = torch.randn(3)
    assert not enabled("itc_loss", x)  # auto never sends CPU tensors to the interpreter
    assert enabled("itc_loss")  # no tensors: switched on (CUDA tensors would take Triton)
    with use_backend("triton"):
        assert enabled("itc_loss", x)  # forced, under the interpreter
    with use_backend("torch"):
        assert not enabled("itc_loss")
    try:
        _dispatch.configure("auto", disable=["mlm_loss"])
        assert not enabled("mlm_loss") and enabled("itc_loss")
    finally:
        _dispatch.configure("auto")
    with pytest.raises(ValueError, match="unknown kernel op 'itc'"):
        enabled("itc")


def test_launch_count(monkeypatch):
    """What a GPU call costs in launches (each torch op is one; the host's overhead grows with them):
    the forward is the two Triton kernels and six allocations, the backward one Triton kernel (both
    queries' gradients and temp's) and its three outputs, no zero-filled gradient for the in-batch block."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    launches = []

    class Stub:  # stands for a Triton kernel: records the launch, computes nothing
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(self.name)

    views = {"view.default", "select.int", "unsqueeze.default", "expand.default", "detach.default", "slice.Tensor"}
    img, img_m, txt, txt_m, img_q, txt_q = make_inputs(5, 40, 16)
    dirs = [(img, img_m, txt_m, txt_q), (txt, txt_m, img_m, img_q)]
    monkeypatch.setattr(itc_module, "_itc_loss_fwd_kernel", Stub("forward"))
    monkeypatch.setattr(itc_module, "_itc_loss_combine_kernel", Stub("combine"))
    monkeypatch.setattr(itc_module, "_itc_loss_bwd_kernel", Stub("backward"))
    temp = torch.tensor(0.07)
    with Record() as inside:
        itc_module._triton_forward(dirs, temp, 0.4)
    assert launches == ["forward", "combine"]
    assert {op for op in inside.ops if op not in views} == {"empty.memory_format"}, inside.ops

    launches.clear()  # a batch above INBATCH_IN_COMBINE_MAX_B: the in-batch keys are one more launch
    monkeypatch.setattr(itc_module, "INBATCH_IN_COMBINE_MAX_B", 4)
    itc_module._triton_forward(dirs, temp, 0.4)
    assert launches == ["forward", "forward", "combine"]
    monkeypatch.setattr(itc_module, "INBATCH_IN_COMBINE_MAX_B", 128)
    launches.clear()

    img.requires_grad_(), txt.requires_grad_(), temp.requires_grad_()
    upstream = torch.tensor([0.5, 0.5])
    with Record() as whole, use_backend("triton"):
        loss, _ = itc_loss_bidirectional(img, img_m, txt, txt_m, img_q, txt_q, temp, 0.4)
        loss.backward(upstream)
    launched = [op for op in whole.ops if op not in views]
    assert launched == ["empty.memory_format"] * 9, launched
    assert launches == ["forward", "combine", "backward"]


def test_autotune_key_names_kernel_parameters():
    """Every name in the autotune key is a parameter of the split-K kernel (Triton drops unknown names
    silently), and the queue dtype is among them (TMA descriptors hide it from the autotuner)."""
    kernel = itc_module._itc_loss_fwd_kernel
    if isinstance(kernel, itc_module.triton.runtime.Autotuner):  # on a GPU: the bare kernel inside
        kernel = kernel.fn
    assert set(itc_module._AUTOTUNE_KEY) <= set(kernel.arg_names), set(itc_module._AUTOTUNE_KEY) - set(kernel.arg_names)
    assert "QUEUE_DTYPE" in itc_module._AUTOTUNE_KEY


def test_fp32_config_pruning():
    """fp32 queues at D = 256 keep only the configs whose shared memory fits sm_90 (measured offline by
    benchmarks/kernels/sm90_resources.py); 16-bit queues and narrower D keep them all."""
    configs = itc_module._FWD_CONFIGS
    kept = itc_module._prune_configs(configs, {}, D=256, BLOCK_D=256, LOWP_DOT=False)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept} == \
        itc_module._FP32_D256_FITS
    assert itc_module._prune_configs(configs, {}, D=256, BLOCK_D=256, LOWP_DOT=True) == configs
    assert itc_module._prune_configs(configs, {}, D=64, BLOCK_D=64, LOWP_DOT=False) == configs


_SM90_SCRIPT = r"""
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

target = GPUTarget("cuda", 90, 32)


def build(fn, types, consts, **options):
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn  # the forward is autotuned
    signature = {n: types.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
    signature.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=target, options=options)


itc = importlib.import_module("albef_kernels.itc_loss")
hn = importlib.import_module("albef_kernels.hard_negatives")
for qtype, lowp, prec, tma, (bm, bn, warps, stages) in (
        ("bf16", True, "tf32", True, (128, 64, 8, 2)), ("bf16", True, "tf32", False, (128, 64, 8, 2)),
        ("fp32", False, "tf32x3", True, (64, 32, 4, 2)), ("fp32", False, "tf32x3", False, (64, 32, 4, 2))):
    queue = f"tensordesc<{qtype}[{bn}, 256]>" if tma else f"*{qtype}"
    part_o = f"tensordesc<fp32[{bm}, 256]>" if tma else "*fp32"
    k = build(itc._itc_loss_fwd_kernel, {"QU0": queue, "QU1": queue, "PO": part_o, "Count_ptr": "*i32"},
              dict(D=256, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=256, LOWP_DOT=lowp, PRECISION=prec,
                   QUEUE_DTYPE=getattr(triton.language, {"bf16": "bfloat16", "fp32": "float32"}[qtype]),
                   USE_TMA=tma, INBATCH=False),
              num_warps=warps, num_stages=stages)
    ptx = k.asm["ptx"]
    # TMA loads of the queue tiles (global -> shared) and the TMA store of the O partial (shared -> global)
    print("forward", qtype, k.metadata.shared, "tma" if tma else "pointers",
          any(f"cp.async.bulk.tensor.2d.shared::{space}.global" in ptx for space in ("cta", "cluster")),
          "cp.async.bulk.tensor.2d.global.shared::cta" in ptx)
for lowp, qtype, prec, tma in ((True, "bf16", "tf32", True), (False, "fp32", "tf32x3", False),
                               (False, "fp32", "tf32x3", True)):
    cfg = dict(itc._INBATCH_CONFIG[lowp])
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    k = build(itc._itc_loss_fwd_kernel, {"QU0": f"*{qtype}", "QU1": f"*{qtype}", "Count_ptr": "*i32",
                                         "PO": f"tensordesc<fp32[{cfg['BLOCK_M']}, 256]>" if tma else "*fp32"},
              dict(D=256, BLOCK_D=256, LOWP_DOT=lowp, PRECISION=prec, USE_TMA=tma, INBATCH=True,
                   QUEUE_DTYPE=getattr(triton.language, {"bf16": "bfloat16", "fp32": "float32"}[qtype]), **cfg),
              num_warps=warps, num_stages=stages)
    print("inbatch", k.metadata.shared)
k = build(itc._itc_loss_combine_kernel, {"Count_ptr": "*i32", "alpha": "fp32", "m_scale": "fp32"},
          dict(D=256, BLOCK_S=16, BLOCK_D=256, BLOCK_B=64, BLOCK_K=16, HAS_L=True, INBATCH=False), num_warps=4)
ptx = k.asm["ptx"]
print("combine", k.metadata.shared, "atom.global.gpu.acq_rel.add" in ptx, "ld.volatile.global" in ptx)
# the SDPA path's: bf16 O partials without sums
k = build(itc._itc_loss_combine_kernel, {"Count_ptr": "*i32", "alpha": "fp32", "m_scale": "fp32",
                                         "PO0_ptr": "*bf16", "PO1_ptr": "*bf16"},
          dict(D=256, BLOCK_S=64, BLOCK_D=256, BLOCK_B=64, BLOCK_K=16, HAS_L=False, INBATCH=True), num_warps=8)
ptx = k.asm["ptx"]
print("combine", k.metadata.shared, "atom.global.gpu.acq_rel.add" in ptx, "ld.volatile.global" in ptx)
for from_ptr in (False, True):
    build(hn._hard_negatives_kernel, {"Index_ptr": "*i64", "Valid_ptr": "*i1", "Seed_ptr": "*i64"},
          dict(BLOCK_R=64, BLOCK_B=64, SEED_FROM_PTR=from_ptr), num_warps=4)
    print("sampler", from_ptr)
"""


def test_kernels_compile_for_sm90():
    """The interpreter never runs Triton's compiler: compile the ITC forward (a bf16 and an fp32 config
    at D = 256, each with TMA descriptors and with pointers), the combine kernel (fp32 partials with
    sums; bf16 ones without, as the SDPA path gives) and both seed modes of the sampler for an H100
    (sm_90, no GPU needed); the forward fits in shared memory, and the combine's last-arriver reduction
    compiles to an acq_rel GPU-scope atomic and volatile loads."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], check=False, env=env, capture_output=True,
                         text=True, timeout=300)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split() for line in run.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == ["forward"] * 4 + ["inbatch"] * 3 + ["combine"] * 2 + ["sampler"] * 2, \
        run.stdout
    assert all(int(line[2]) <= 232_448 for line in lines[:4]), run.stdout  # sm_90's shared memory per block
    assert all(int(line[1]) <= 232_448 for line in lines[4:7]), run.stdout
    # the TMA variants load the queue and store the O partial through bulk tensor copies, the pointer
    # variants do neither
    assert [tuple(line[3:6]) for line in lines[:4]] == [("tma", "True", "True"), ("pointers", "False", "False")] * 2, \
        run.stdout
    assert lines[7][2:] == lines[8][2:] == ["True", "True"], run.stdout
