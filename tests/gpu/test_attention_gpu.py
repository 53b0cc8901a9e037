"""Flash attention paths against PyTorch in bf16 (the low-precision rule: error against an fp32 oracle
no more than 2x PyTorch's own bf16 error, plus a small floor), and the bf16 autocast policy."""

import pytest
import torch

import albef_fast.models.attention as attn
import albef_fast.models.text as text_module
from albef_fast.models.albef import ALBEF
from albef_fast.models.presets import get_preset
from albef_fast.models.text import FusionEncoder, TextEncoder
from albef_fast.task import PretrainTask

from tests.helpers import tiny_batch

pytestmark = pytest.mark.gpu
FLOOR = 1e-3  # bf16 outputs are O(1): an absolute floor for cases where PyTorch's own error is ~0

# ViT self-attention, cross-attention (text queries over image tokens), padded text self-attention
SHAPES = {"vit": (4, 257, 257, 12, 64), "cross": (4, 25, 257, 12, 64), "text": (5, 25, 25, 12, 64)}
LENGTHS = torch.tensor([25, 1, 7, 1, 19])  # rows with only [CLS] real


def _inputs(B, Lq, Lk, H, Dh, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, n, H, Dh, device="cuda", generator=g) for n in (Lq, Lk, Lk)]


def _errors(fn, inputs, mask, backend):
    """Max |out - oracle| and |grad - oracle grad| of fn in bf16 with `backend`, oracle = math in fp32."""
    cot = torch.randn_like(fn(*inputs, mask, "math")) * (1 if mask is None else mask[..., None, None])
    results = []
    for dtype, name in ((torch.float32, "math"), (torch.bfloat16, backend)):
        xs = [t.to(dtype).requires_grad_() for t in inputs]
        out = fn(*xs, mask, name)
        results.append([out.float(), *(g.float() for g in torch.autograd.grad(out, xs, cot.to(dtype)))])
    ref, got = results
    real = slice(None) if mask is None else mask
    return [(g[real] if i == 0 else g).sub(r[real] if i == 0 else r).abs().max().item()
            for i, (g, r) in enumerate(zip(got, ref))]


def _dense(q, k, v, mask, backend):
    with attn.use_backend(backend):
        return attn.attention(q, k, v, mask)


def _packed(q, k, v, mask, backend):
    pad = attn.Padding.build(mask, packed=True)
    L = mask.shape[1]
    with attn.use_backend(backend):
        return pad.unpack(attn.varlen_attention(pad.pack(q), pad.pack(k), pad.pack(v), pad.cu_seqlens, pad.cu_seqlens, L, L))


def _backends():
    out = ["torch_flash"]
    if attn.flash_attn_available():
        out.append("flash_attn")
    return out


@pytest.mark.parametrize("backend", ["torch_flash", "flash_attn"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_flash_matches_pytorch_in_bf16(backend, shape):
    if backend not in _backends():
        pytest.skip("flash-attn is not installed (optional extra [gpu])")
    B, Lq, Lk, H, Dh = SHAPES[shape]
    inputs = _inputs(B, Lq, Lk, H, Dh)
    mask = (torch.arange(Lk, device="cuda")[None] < LENGTHS.cuda()[:, None]) if shape == "text" else None
    if mask is None:
        x = inputs[0].bfloat16()
        with attn.use_backend(backend):
            assert attn.resolve(x, kind="dense") == backend
        fn = _dense
    else:  # padded text runs packed on the flash backends (torch_flash: PyTorch's varlen kernel)
        if backend == "torch_flash" and not attn.torch_varlen_available():
            pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
        fn = _packed
    ours = _errors(fn, inputs, mask, backend)
    pytorch = _errors(_dense, inputs, mask, "math")  # PyTorch's own bf16 error, same oracle
    print(f"{backend} {shape}: ours {ours}, pytorch bf16 {pytorch}")
    for name, e, e_pt in zip(("out", "dq", "dk", "dv"), ours, pytorch):
        assert e <= 2 * e_pt + FLOOR, f"{name}: {e:.3e} > 2 x {e_pt:.3e} + {FLOOR}"


def test_packed_encoders_in_bf16_match_dense_sdpa():
    """Eval mode (no dropout): torch_flash packs the text (PyTorch varlen) when it can; the real
    positions agree with the dense SDPA path under the low-precision rule."""
    cfg = get_preset("albef_base", text_layers=2, fusion_layers=2)
    torch.manual_seed(0)
    text, fusion = TextEncoder(cfg).cuda().eval(), FusionEncoder(cfg).cuda().eval()
    B, L = 5, 25
    mask = (torch.arange(L)[None] < LENGTHS[:, None]).long().cuda()
    ids = torch.randint(1000, 3000, (B, L), device="cuda") * mask
    image = torch.randn(B, 257, cfg.vision_width, device="cuda")
    real = mask.bool()

    def run(backend, dtype):
        with attn.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            return fusion(text(ids, mask), mask, image)[real].float()

    ref = run("math", torch.float32)
    e_ours = (run("torch_flash", torch.bfloat16) - ref).abs().max().item()
    e_pt = (run("sdpa", torch.bfloat16) - ref).abs().max().item()
    print(f"encoders bf16: torch_flash {e_ours:.3e}, sdpa {e_pt:.3e}, varlen {attn.torch_varlen_available()}")
    assert e_ours <= 2 * e_pt + FLOOR


def test_bf16_autocast_policy(monkeypatch):
    """Under bf16 autocast: attention and matmuls in bf16, LayerNorm outputs and the losses in fp32."""
    seen = []
    real = attn.attention
    monkeypatch.setattr(text_module, "attention", lambda q, k, v, m, p: seen.append(q.dtype) or real(q, k, v, m, p))
    norm_dtypes = []
    torch.manual_seed(0)
    task = PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=48).cuda()
    hook = task.model.fusion_encoder.layers[0].self_norm.register_forward_hook(
        lambda mod, inp, out: norm_dtypes.append(out.dtype))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = task(tiny_batch(task.model.config, B=8).to("cuda"), alpha=0.4)
    hook.remove()
    out.loss.backward()
    assert seen and set(seen) == {torch.bfloat16}
    assert norm_dtypes and set(norm_dtypes) == {torch.float32}
    for name in ("loss", "itc_loss", "itm_loss", "mlm_loss"):
        assert getattr(out, name).dtype == torch.float32, name
    assert all(torch.isfinite(p.grad).all() for p in task.model.parameters() if p.grad is not None)


def test_image_kv_reuse_in_bf16(monkeypatch):
    import albef_fast.task as task_module

    torch.manual_seed(0)
    task = PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=48).cuda().eval()
    batch = tiny_batch(task.model.config, B=8).to("cuda")
    neg = torch.tensor([3, 0, 5, 1, 2, 4, 7, 6], device="cuda")
    monkeypatch.setattr(task_module, "sample_hard_negatives", lambda sim: (neg, torch.ones_like(neg, dtype=torch.bool)))
    losses = []
    for reuse in (True, False):
        monkeypatch.setattr(task, "reuse_image_kv", reuse)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = task(batch, alpha=0.4)
        losses.append(torch.stack([out.itc_loss, out.itm_loss, out.mlm_loss]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-2, atol=1e-2)
