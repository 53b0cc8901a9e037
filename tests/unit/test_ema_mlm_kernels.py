"""The EMA and masked-MLM kernels under the Triton interpreter (conftest sets TRITON_INTERPRET=1 without
a GPU), at small shapes, against float64 evaluations and the PyTorch references; plus their dispatch
and the chunked PyTorch path. Full-size and bf16-on-GPU checks live in tests/gpu."""

import importlib

import pytest
import torch
from albef_kernels import ema_update_, ema_update_reference_, mlm_loss, mlm_loss_reference
from albef_kernels._dispatch import use_backend
from albef_kernels.ema import ema_update_triton_
from albef_kernels.mlm_loss import MlmLossFunction, mlm_loss_forward

# the package re-exports functions named like their modules (albef_kernels.mlm_loss is the function)
ema_mod = importlib.import_module("albef_kernels.ema")
mlm_mod = importlib.import_module("albef_kernels.mlm_loss")

EPS32 = 2.0**-24


def _report(name, got, want):
    err = (got.double() - want.double()).abs()
    return f"{name}: max abs err {err.max().item():.3e} at flat index {int(err.argmax())}"


# --- EMA -------------------------------------------------------------------------------------------

EMA_SHAPES = [(), (1,), (7,), (64,), (65,), (129, 3), (33, 17), (0,), (2, 0, 3), (5, 4, 3)]


def _pairs(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = [torch.randn(s, generator=g) for s in shapes]
    p = [torch.randn(s, generator=g) for s in shapes]
    return m, p


def _assert_ema_exact(out, m0, p0, decay):
    """fp32 result within a few rounding steps of the float64 formula, element by element."""
    for i, (o, a, b) in enumerate(zip(out, m0, p0)):
        want = decay * a.double() + (1.0 - decay) * b.double()
        bound = 3 * EPS32 * (a.double().abs() + b.double().abs()) + 1e-30
        assert o.shape == a.shape and o.dtype == torch.float32
        assert ((o.double() - want).abs() <= bound).all(), _report(f"tensor {i} {tuple(a.shape)}", o, want)


@pytest.mark.parametrize("decay", [0.995, 0.9, 0.3])
def test_ema_triton_matches_float64_formula(decay):
    """Many blocks per tensor (block 64), partial last blocks, 0-d and empty tensors, one launch."""
    m, p = _pairs(EMA_SHAPES)
    m0 = [t.clone() for t in m]
    ema_update_triton_(m, p, decay, block=64)
    _assert_ema_exact(m, m0, p, decay)
    ref = [t.clone() for t in m0]
    ema_update_reference_(ref, p, decay)
    for a, b in zip(m, ref):
        torch.testing.assert_close(a, b, rtol=2e-7, atol=1e-7)


def test_ema_dispatch_with_default_block_uses_full_and_partial_blocks():
    """Through the public entry point (default 4,096-element blocks): an unmasked full block and a
    masked tail in the same tensor, next to a 0-d tensor."""
    m, p = _pairs([(2 * 4096 + 5,), (), (3, 5)], seed=1)
    m0 = [t.clone() for t in m]
    with use_backend("triton"):
        ema_update_(m, p, 0.995)
    _assert_ema_exact(m, m0, p, 0.995)


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_ema_triton_endpoints_are_exact(decay):
    """decay 1 keeps the momentum tensors bit for bit; decay 0 copies the online ones (lerp's two forms)."""
    m, p = _pairs([(70,), (3, 3)], seed=2)
    m0 = [t.clone() for t in m]
    ema_update_triton_(m, p, decay, block=64)
    for a, b in zip(m, m0 if decay == 1.0 else p):
        assert torch.equal(a, b)


def test_ema_plan_follows_new_storage():
    """The cached pointer table is keyed by addresses: replacing a parameter's storage (what .to(),
    .cuda() or `p.data = ...` do) must give a fresh table, never writes through a stale address."""
    m, p = _pairs([(100,), (10,)], seed=3)
    ema_update_triton_(m, p, 0.5, block=64)
    stale = m[0]
    m[0] = stale.clone()  # new storage at another address
    before_new, before_stale = m[0].clone(), stale.clone()
    ema_update_triton_(m, p, 0.5, block=64)
    assert torch.equal(stale, before_stale)  # the old storage is no longer written
    _assert_ema_exact([m[0]], [before_new], [p[0]], 0.5)


def test_ema_rejects_momentum_tensors_sharing_memory():
    m, p = _pairs([(8,)])
    with pytest.raises(ValueError, match="share memory"):
        ema_update_triton_([m[0], m[0]], [p[0], p[0].clone()], 0.9, block=64)


def test_ema_other_dtypes_and_layouts_take_the_reference(monkeypatch):
    """Forced Triton with float64 or non-contiguous tensors: the reference runs (still exact)."""
    called = []
    monkeypatch.setattr(ema_mod, "ema_update_triton_", lambda *a, **k: called.append(1))
    m = [torch.randn(4, 3, dtype=torch.float64)]
    p = [torch.randn(4, 3, dtype=torch.float64)]
    want = [0.9 * m[0] + 0.1 * p[0]]
    nc_m, nc_p = torch.randn(3, 4).t(), torch.randn(3, 4).t()  # non-contiguous (4, 3)
    nc_want = 0.9 * nc_m.double() + 0.1 * nc_p.double()
    with use_backend("triton"):
        ema_update_(m, p, 0.9)
        ema_update_([nc_m], [nc_p], 0.9)
    assert not called
    torch.testing.assert_close(m[0], want[0], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(nc_m.double(), nc_want, rtol=1e-6, atol=1e-7)


def test_ema_auto_backend_keeps_cpu_tensors_on_the_reference(monkeypatch):
    monkeypatch.setattr(ema_mod, "ema_update_triton_", lambda *a, **k: pytest.fail("Triton path on CPU tensors"))
    m, p = _pairs([(5,)])
    m0 = [t.clone() for t in m]
    with use_backend("auto"):
        ema_update_(m, p, 0.99)
    _assert_ema_exact(m, m0, p, 0.99)


def test_ema_validates_inputs():
    with pytest.raises(ValueError, match="2 momentum tensors but 1 online"):
        ema_update_([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)], 0.9)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\], got 1.5"):
        ema_update_([torch.zeros(2)], [torch.zeros(2)], 1.5)
    with pytest.raises(ValueError, match="power of two"):
        ema_update_triton_([torch.zeros(2)], [torch.zeros(2)], 0.9, block=100)


# --- MLM ---------------------------------------------------------------------------------------------


def _mlm_inputs(M, D, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g).to(dtype)
    # logits of size ~1-3: a non-trivial softmax on both sides
    return (t(M, D), t(V, D) * 0.5, t(V), torch.randint(V, (M,), generator=g),
            t(M, D), t(V, D) * 0.5, t(V))


def _oracle(args, alpha):
    """Loss and gradients (h, W, b) of the reference in float64."""
    h, W, b, y, hm, Wm, bm = (a.double() if a.is_floating_point() else a for a in args)
    h, W, b = (x.requires_grad_() for x in (h, W, b))
    loss = mlm_loss_reference(h, W, b, y, hm, Wm, bm, alpha)
    loss.backward()
    return loss.detach(), h.grad, W.grad, b.grad


def _run(fn, args, alpha):
    h, W, b, y, hm, Wm, bm = args
    h, W, b = (x.detach().clone().requires_grad_() for x in (h, W, b))
    loss = fn(h, W, b, y, hm, Wm, bm, alpha)
    loss.backward()
    return loss.detach(), h.grad, W.grad, b.grad


def _assert_matches_oracle(got, want, rtol=1e-5, atol=1e-6):
    for name, g, w in zip(("loss", "dh", "dweight", "dbias"), got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


MLM_CASES = [  # (M, D, V, chunk)
    (5, 16, 203, 64),  # V odd, not a multiple of the chunk: 3 full chunks + a tail of 11
    (1, 8, 37, 16),  # M = 1
    (6, 12, 100, 100),  # one chunk exactly
    (3, 8, 50, 256),  # chunk larger than V
]


@pytest.mark.parametrize("triton_rows", [True, False], ids=["triton", "chunked_torch"])
@pytest.mark.parametrize("M, D, V, chunk", MLM_CASES)
def test_mlm_chunked_matches_float64_reference(M, D, V, chunk, triton_rows):
    args = _mlm_inputs(M, D, V, seed=M + V)
    fn = lambda *a: MlmLossFunction.apply(*a, chunk, triton_rows)
    _assert_matches_oracle(_run(fn, args, 0.4), _oracle(args, 0.4))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_mlm_triton_alpha_endpoints(alpha):
    """alpha 0 is plain cross-entropy, alpha 1 pure distillation (the label term vanishes)."""
    args = _mlm_inputs(4, 8, 70, seed=7)
    fn = lambda *a: MlmLossFunction.apply(*a, 32, True)
    _assert_matches_oracle(_run(fn, args, alpha), _oracle(args, alpha))


def test_mlm_triton_noncontiguous_inputs():
    """Transposed h and h_m, strided decoder weights and bias, strided labels, through `mlm_loss`."""
    M, D, V = 4, 8, 45
    g = torch.Generator().manual_seed(11)
    h = torch.randn(D, M, generator=g).t()
    hm = torch.randn(D, M, generator=g).t()
    W = (torch.randn(V, 2 * D, generator=g) * 0.5)[:, ::2]
    Wm = (torch.randn(D, V, generator=g) * 0.5).t()
    b = torch.randn(2 * V, generator=g)[::2]
    bm = torch.randn(V, generator=g)
    y = torch.randint(V, (2 * M,), generator=g)[::2]
    args = (h, W, b, y, hm, Wm, bm)
    assert not any(a.is_contiguous() for a in (h, W, b, y, hm, Wm))
    with use_backend("triton"):
        got = _run(lambda *a: mlm_loss(*a, chunk_size=16), args, 0.4)
    _assert_matches_oracle(got, _oracle(args, 0.4))


def test_mlm_triton_no_masked_token_is_a_connected_zero():
    args = list(_mlm_inputs(0, 8, 30))
    with use_backend("triton"):
        loss, dh, dW, db = _run(mlm_loss, args, 0.4)
    assert loss.item() == 0.0 and dh.shape == (0, 8) and dW is None and db is None  # as the reference


def test_mlm_chunked_torch_path_is_exact_in_float64():
    """The chunked PyTorch path (CPU fallback for large shapes) in float64: same loss and gradients as
    the reference to float64 rounding."""
    args = _mlm_inputs(6, 10, 97, dtype=torch.float64, seed=5)
    fn = lambda *a: MlmLossFunction.apply(*a, 20, False)
    _assert_matches_oracle(_run(fn, args, 0.4), _oracle(args, 0.4), rtol=1e-12, atol=1e-13)


def test_mlm_bf16_rows_no_worse_than_torch_bf16():
    """bf16 inputs (GEMMs in bf16, row maths in fp32): the Triton rows' error against the fp32-input
    float64 oracle is at most 2x the error of PyTorch's own reference run in bf16."""
    args32 = _mlm_inputs(5, 16, 120, seed=9)
    args16 = tuple(a.bfloat16() if a.is_floating_point() else a for a in args32)
    want = _oracle(args32, 0.4)
    got = _run(lambda *a: MlmLossFunction.apply(*a, 32, True), args16, 0.4)
    torch_bf16 = _run(mlm_loss_reference, args16, 0.4)
    for name, g, p, w in zip(("loss", "dh", "dweight", "dbias"), got, torch_bf16, want):
        err, err_pt = (g.double() - w).abs().max().item(), (p.double() - w).abs().max().item()
        assert err <= 2 * err_pt + 1e-6, f"{name}: kernel error {err:.3e}, PyTorch bf16 error {err_pt:.3e}"


def test_mlm_gradients_only_where_asked_and_no_grad_mode():
    args = _mlm_inputs(3, 8, 40, seed=4)
    loss, dh, dw, db = mlm_loss_forward(*args, 0.4, chunk_size=16, triton_rows=True, grads=(True, False, False))
    assert dw is None and db is None and dh.shape == (3, 8)
    with torch.no_grad(), use_backend("triton"):
        loss_ng = mlm_loss(*args, 0.4, chunk_size=16)
    torch.testing.assert_close(loss_ng.double(), _oracle(args, 0.4)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_ng)


def test_mlm_second_backward_is_refused():
    args = [a.clone() for a in _mlm_inputs(3, 8, 40)]
    args[0].requires_grad_()
    loss = MlmLossFunction.apply(*args, 0.4, 16, False)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_mlm_dispatch_on_cpu(monkeypatch):
    """auto on CPU: the reference below CHUNKED_ABOVE logits, the chunked PyTorch path above it; the
    Triton kernels are never called."""
    monkeypatch.setattr(mlm_mod, "_chunk_lse_triton", lambda *a: pytest.fail("Triton on CPU tensors"))
    used = []
    apply = MlmLossFunction.apply
    monkeypatch.setattr(MlmLossFunction, "apply", lambda *a: used.append(a[-1]) or apply(*a))
    args = _mlm_inputs(4, 8, 50, seed=3)
    want = _oracle(args, 0.4)
    with use_backend("auto"):
        _assert_matches_oracle(_run(mlm_loss, args, 0.4), want)
        assert used == []
        monkeypatch.setattr(mlm_mod, "CHUNKED_ABOVE", 4 * 50 - 1)
        _assert_matches_oracle(_run(lambda *a: mlm_loss(*a, chunk_size=16), args, 0.4), want)
        assert used == [False]
    with use_backend("torch"):
        _run(mlm_loss, args, 0.4)
        assert used == [False, False]


def test_mlm_validates_inputs():
    h, W, b, y, hm, Wm, bm = _mlm_inputs(3, 8, 20)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 20\), got \[.*20\]"):
        mlm_loss(h, W, b, torch.tensor([0, 5, 20]), hm, Wm, bm, 0.4)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        mlm_loss(h, W, b, y, hm, Wm, bm, 1.5)
    with pytest.raises(ValueError, match="inconsistent"):
        mlm_loss(h, W, b[:5], y, hm, Wm, bm, 0.4)
    with pytest.raises(TypeError, match="labels must be int64"):
        mlm_loss(h, W, b, y.int(), hm, Wm, bm, 0.4)


# --- real compilation (no GPU needed) -----------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import importlib, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
ema = importlib.import_module("albef_kernels.ema")
mlm = importlib.import_module("albef_kernels.mlm_loss")
target = GPUTarget("cuda", 90, 32)
def ops(fn, sig, consts, div=(), warps=4):
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                       options=dict(num_warps=warps))
    return sorted(set(re.findall(r"[ls][dt]\.global[.a-z0-9]*", k.asm["ptx"])))
esig = dict(Addr_ptr="*i64", Numel_ptr="*i64", Tensor_ptr="*i32", Block_ptr="*i32", n_tensors="i32",
            weight="fp32", BLOCK="constexpr", ALIGNED="constexpr")
print("ema", ops(ema._ema_fwd_kernel, esig, dict(BLOCK=4096, ALIGNED=True), warps=8))
for dt in ("fp32", "bf16"):
    fsig = dict(Z_ptr="*" + dt, Zm_ptr="*" + dt, B_ptr="*fp32", Bm_ptr="*fp32", Lse_ptr="*fp32", n_rows="i32",
                n_cols="i32", stride_z_row="i32", stride_zm_row="i32", BLOCK_V="constexpr")
    div = ("Z_ptr", "Zm_ptr", "B_ptr", "Bm_ptr", "n_cols", "stride_z_row", "stride_zm_row")
    print("fwd", dt, ops(mlm._mlm_loss_fwd_kernel, fsig, dict(BLOCK_V=1024), div))
    bsig = dict(fsig, Labels_ptr="*i64", Part_ptr="*fp32", Db_ptr="*fp32", col0="i32", alpha="fp32", scale="fp32",
                BLOCK_M="constexpr", HAS_DB="constexpr")
    bsig = {a: bsig[a] for a in mlm._mlm_loss_bwd_kernel.arg_names}
    print("bwd", dt, ops(mlm._mlm_loss_bwd_kernel, bsig, dict(BLOCK_M=32, BLOCK_V=64, HAS_DB=True), div))
"""


def test_kernels_compile_for_sm90_with_vector_memory_ops():
    """The interpreter never runs Triton's compiler: compile every kernel ahead of time for an H100
    (sm_90, no GPU needed) and check that the full-block paths use 128-bit loads and stores, for the
    EMA through the pointer-alignment hint, for the MLM row kernels at divisible-by-16 strides."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], check=False, env=env, capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 5, run.stdout
    for line in lines:
        assert "ld.global.v4.b32" in line and "st.global" in line, line
    assert "st.global.v4.b32" in lines[0], lines[0]


def test_config_and_environment_switch_both_ops_off(monkeypatch):
    """kernels.disable=[ema, mlm_loss] (KernelConfig -> configure) and ALBEF_KERNELS=torch route both ops
    to PyTorch even where Triton would otherwise run (here: the forced interpreter backend)."""
    from albef_kernels import _dispatch

    monkeypatch.setattr(ema_mod, "ema_update_triton_", lambda *a, **k: pytest.fail("Triton EMA ran"))
    monkeypatch.setattr(mlm_mod, "_chunk_lse_triton", lambda *a: pytest.fail("Triton MLM ran"))
    m, p = _pairs([(6,)])
    args = _mlm_inputs(3, 8, 40)
    try:
        _dispatch.configure("triton", disable=["ema", "mlm_loss"])
        monkeypatch.delenv("ALBEF_KERNELS", raising=False)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        ema_update_(m, p, 0.9)
        mlm_loss(*args, 0.4)
        _dispatch.configure("triton")
        monkeypatch.setenv("ALBEF_KERNELS", "torch")
        ema_update_(m, p, 0.9)
        mlm_loss(*args, 0.4)
        monkeypatch.delenv("ALBEF_KERNELS")
        assert _dispatch.use_triton("ema", m[0]) and _dispatch.use_triton("mlm_loss", args[0])  # the switch mattered
    finally:
        _dispatch.configure("auto")
