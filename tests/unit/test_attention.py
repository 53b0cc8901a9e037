"""The attention backends (math vs SDPA, dense vs packed), the encoders' packing, the ViT's attention
against timm's own, and the reuse of the image's cross-attention keys/values (CPU, fp32)."""

import logging
from functools import partial

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import albef_fast.models.attention as attn
import albef_fast.models.text as text_module
from albef_fast.models.albef import ALBEF
from albef_fast.models.presets import get_preset
from albef_fast.models.text import FusionEncoder, TextEncoder
from albef_fast.models.vision import VitAttention, build_vision_encoder
from albef_fast.task import PretrainTask

from tests.helpers import tiny_batch

# (B, L) key masks: full rows, ragged right padding, rows where only [CLS] is real, and a row whose
# real tokens are not a prefix (packing must not assume one)
MASKS = {
    "full": torch.ones(3, 7, dtype=torch.bool),
    "ragged": torch.arange(9)[None] < torch.tensor([9, 4, 6, 2])[:, None],
    "cls_only": torch.arange(6)[None] < torch.tensor([1, 6, 1])[:, None],
    "holes": torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool),
}


def qkv(B, Lq, Lk, H=3, Dh=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, H, Dh, generator=g, requires_grad=True) for n in (Lq, Lk, Lk)]


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=g))


@pytest.mark.parametrize("name", list(MASKS))
def test_math_and_sdpa_agree_with_a_padding_mask(name):
    mask = MASKS[name]
    B, L = mask.shape
    inputs = qkv(B, L, L)
    with attn.use_backend("math"):
        ref = attn.attention(*inputs, mask)
    with attn.use_backend("sdpa"):
        out = attn.attention(*inputs, mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for g, r in zip(grads(out, inputs), grads(ref, inputs)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-6)
    # a padded key gets exactly zero weight: changing it changes nothing
    k2, v2 = (t.detach().clone() for t in inputs[1:])
    k2[~mask], v2[~mask] = 1e3, -1e3
    with attn.use_backend("math"):
        torch.testing.assert_close(attn.attention(inputs[0], k2, v2, mask), ref, rtol=0, atol=0)


def test_math_and_sdpa_agree_without_a_mask_for_cross_attention_shapes():
    inputs = qkv(4, 5, 17)  # text queries over image tokens: Lq != Lk
    with attn.use_backend("math"):
        ref = attn.attention(*inputs)
    with attn.use_backend("sdpa"):
        out = attn.attention(*inputs)
    assert out.shape == (4, 5, 3, 16)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for g, r in zip(grads(out, inputs), grads(ref, inputs)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_packed_attention_equals_masked_dense_attention(name, backend):
    mask = MASKS[name]
    B, L = mask.shape
    inputs = qkv(B, L, L)
    pad = attn.Padding.build(mask, packed=True)
    assert pad.cu_seqlens.dtype == torch.int32 and pad.cu_seqlens[-1].item() == mask.sum().item()
    with attn.use_backend(backend):
        dense = attn.attention(*inputs, mask)
        packed = attn.varlen_attention(*(pad.pack(t) for t in inputs), pad.cu_seqlens, pad.cu_seqlens, L, L)
    torch.testing.assert_close(pad.unpack(packed)[mask], dense[mask], rtol=0, atol=1e-6)
    assert torch.equal(pad.unpack(packed)[~mask], torch.zeros_like(dense[~mask]))
    # gradients through the real queries' outputs only (padded queries' outputs are never used)
    cot = torch.randn(dense.shape, generator=torch.Generator().manual_seed(3)) * mask[..., None, None]
    for g, r in zip(torch.autograd.grad(pad.unpack(packed), inputs, cot), torch.autograd.grad(dense, inputs, cot)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-6)


def test_padding_round_trip_and_errors():
    mask = MASKS["holes"]
    x = torch.randn(*mask.shape, 4)
    pad = attn.Padding.build(mask, packed=True)
    assert pad.pack(x).shape == (int(mask.sum()), 4)
    torch.testing.assert_close(pad.unpack(pad.pack(x)), x * mask[..., None])
    dense = attn.Padding.build(mask, packed=False)
    assert dense.pack(x) is x and dense.key_mask is not None and pad.key_mask is None
    with pytest.raises(ValueError, match=r"mask must be \(B, L\)"):
        attn.Padding.build(mask[0], packed=True)


def test_backend_choice_on_the_cpu_and_logged_once(caplog):
    x = torch.randn(2, 3, 4, 8)
    with attn.use_backend("auto"):
        assert attn.resolve(x, kind="dense") == "sdpa"
        assert not attn.use_varlen(x, 0.0)  # no varlen kernel on the CPU: the encoders stay dense
    with attn.use_backend("torch_flash"):  # flash kernels need CUDA and bf16/fp16
        assert attn.resolve(x, kind="dense") == "sdpa"
    with attn.use_backend("math"):
        assert attn.resolve(x, kind="dense", masked=True) == "math"
    with pytest.raises(ValueError, match="not one of"):
        attn.configure("xformers")
    if not attn.flash_attn_available():
        with pytest.raises(ValueError, match="flash-attn package"):
            attn.configure("flash_attn")
    attn._logged.clear()
    with caplog.at_level(logging.INFO, logger="albef_fast.attention"), attn.use_backend("sdpa"):
        for _ in range(3):
            attn.attention(*qkv(1, 2, 2))
    assert sum("runs dense calls on sdpa" in r.message for r in caplog.records) == 1


@pytest.fixture
def cfg():
    return get_preset("albef_tiny")


def _text_batch(B=5, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L, 1, 3, 1, 6])[:B]  # includes [CLS]-only rows
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return torch.randint(1000, 3000, (B, L), generator=g) * mask, mask


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_encoders_packed_equal_dense(cfg, backend):
    """Unpadding once per encoder pass changes nothing at the real positions, outputs or gradients."""
    torch.manual_seed(0)
    text, fusion = TextEncoder(cfg).eval(), FusionEncoder(cfg).eval()
    ids, mask = _text_batch()
    image = torch.randn(5, 9, cfg.vision_width, requires_grad=True)
    params = [image, *text.parameters(), *fusion.parameters()]
    real = mask.bool()
    results = []
    for packed in (False, True):
        with attn.use_backend(backend, force_varlen=packed):
            out = fusion(text(ids, mask), mask, image)
        loss = (out[real] * torch.linspace(-1, 1, out.shape[-1])).sum()
        results.append((out[real], torch.autograd.grad(loss, params, allow_unused=True)))
    (dense, g_dense), (packed, g_packed) = results
    torch.testing.assert_close(packed, dense, rtol=1e-5, atol=1e-5)
    for (name, _), g, r in zip([("image", None), *text.named_parameters(), *fusion.named_parameters()], g_packed, g_dense):
        if r is None:
            assert g is None or not g.any(), name
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=name)


def test_encoders_math_equal_sdpa(cfg):
    torch.manual_seed(0)
    text, fusion = TextEncoder(cfg).eval(), FusionEncoder(cfg).eval()
    ids, mask = _text_batch()
    image = torch.randn(5, 9, cfg.vision_width)
    outs = []
    for backend in ("math", "sdpa"):
        with attn.use_backend(backend):
            outs.append(fusion(text(ids, mask), mask, image))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_dropout_reaches_text_and_fusion_attention_in_training_only(cfg, monkeypatch):
    seen = []
    real = attn.attention
    monkeypatch.setattr(text_module, "attention", lambda q, k, v, m, p: seen.append(p) or real(q, k, v, m, p))
    text, fusion = TextEncoder(cfg), FusionEncoder(cfg)
    ids, mask = _text_batch()
    image = torch.randn(5, 9, cfg.vision_width)
    fusion(text(ids, mask), mask, image)
    n = cfg.text_layers + 2 * cfg.fusion_layers  # self-attention per layer, cross-attention per fusion layer
    assert seen == [cfg.attention_dropout] * n and cfg.attention_dropout == 0.1
    seen.clear()
    text.eval(), fusion.eval()
    fusion(text(ids, mask), mask, image)
    assert seen == [0.0] * n


def test_fusion_rejects_ambiguous_or_mismatched_images(cfg):
    fusion = FusionEncoder(cfg)
    ids, mask = _text_batch()
    image = torch.randn(5, 9, cfg.vision_width)
    with pytest.raises(ValueError, match="exactly one of"):
        fusion(torch.randn(5, 8, cfg.hidden_size), mask)
    with pytest.raises(ValueError, match="image keys/values are for 4 images"):
        fusion(torch.randn(5, 8, cfg.hidden_size), mask, image[:4])
    with pytest.raises(ValueError, match="fusion layers"):
        fusion(torch.randn(5, 8, cfg.hidden_size), mask, image_kv=fusion.image_kv(image)[:1])


def test_image_kv_reuse_with_an_index_equals_gathered_images(cfg):
    torch.manual_seed(0)
    fusion = FusionEncoder(cfg).eval()
    _, mask = _text_batch()
    text = torch.randn(5, 8, cfg.hidden_size)
    image = torch.randn(3, 9, cfg.vision_width)
    index = torch.tensor([2, 0, 0, 1, 2])
    ref = fusion(text, mask, image[index])
    out = fusion(text, mask, image_kv=fusion.image_kv(image), image_index=index)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_task_with_image_kv_reuse_equals_the_plain_path(monkeypatch, training):
    """Same losses and gradients with the keys/values computed once as with every pass projecting its
    own images. In training mode with the same seed too: the reuse moves no dropout draw."""
    torch.manual_seed(0)
    task = PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=18).train(training)
    batch = tiny_batch(task.model.config, B=6)
    neg_image, neg_text = torch.tensor([3, 0, 5, 1, 2, 4]), torch.tensor([1, 4, 0, 5, 3, 2])
    results = []
    for reuse in (True, False):
        ok = torch.ones(6, dtype=torch.bool)
        monkeypatch.setattr(task, "hard_negatives", lambda sims: (neg_image, neg_text, ok, ok))
        monkeypatch.setattr(task, "reuse_image_kv", reuse)
        torch.manual_seed(1)
        out = task(batch, alpha=0.4)
        results.append((out, torch.autograd.grad(out.loss, list(task.model.parameters()), allow_unused=True)))
    (out, g), (ref, r) = results
    for name in ("itc_loss", "itm_loss", "mlm_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-6, atol=1e-6)
    for (name, _), a, b in zip(task.model.named_parameters(), g, r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_vit_with_our_attention_equals_timm(cfg):
    """Same parameter names (strict state-dict load into timm's own ViT) and the same outputs and
    gradients as timm's forward."""
    torch.manual_seed(0)
    ours = build_vision_encoder(cfg)
    assert all(isinstance(b.attn, VitAttention) for b in ours.blocks)
    theirs = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vision_width,
                               depth=cfg.vision_depth, num_heads=cfg.vision_heads, mlp_ratio=cfg.vision_mlp_ratio,
                               qkv_bias=True, num_classes=0, global_pool="", class_token=True,
                               norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                               act_layer=torch.nn.GELU)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    image = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    cot = torch.randn(2, cfg.num_patches + 1, cfg.vision_width)  # a random cotangent: well conditioned
    for backend in ("math", "sdpa"):
        with attn.use_backend(backend):
            out = ours.forward_features(image)
        ref = theirs.forward_features(image)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        g = torch.autograd.grad(out, list(ours.parameters()), cot)
        r = torch.autograd.grad(ref, list(theirs.parameters()), cot)
        for (name, _), a, b in zip(ours.named_parameters(), g, r):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=name)


def test_vit_attention_rejects_what_it_does_not_implement(cfg):
    from timm.layers import Attention

    with pytest.raises(ValueError, match="plain timm Attention"):
        VitAttention(Attention(32, num_heads=4, qk_norm=True, norm_layer=torch.nn.LayerNorm))
    a = VitAttention(Attention(32, num_heads=4))
    with pytest.raises(ValueError, match="no attn_mask"):
        a(torch.randn(1, 3, 32), attn_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool))
