"""ViT image encoder, built with timm (REFERENCE §1.1).

timm's VisionTransformer with class token, learned position embedding, pre-norm blocks, LayerNorm
eps 1e-6, exact GELU, qkv bias, no dropout, no head; its parameter names equal ALBEF's
`visual_encoder.*` keys. `forward_features` returns the full token sequence after the final norm.

Each block's timm `Attention` is replaced by `VitAttention`, which keeps timm's `qkv` and `proj`
Linear modules (same parameter names, same initialisation) and calls the project's attention
(`albef_fast.models.attention`), so that one backend choice covers the ViT, the text and the fusion
layers. ALBEF's ViT has no attention dropout, no qk-norm and no projection dropout.
"""

from __future__ import annotations

from functools import partial

from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from albef_fast.models.attention import attention
from albef_fast.models.presets import ModelConfig


class VitAttention(nn.Module):
    """Drop-in for timm's ViT `Attention` (qkv Linear -> attention -> proj Linear), taking over its
    `qkv` and `proj` modules. Only the configuration ALBEF uses is accepted."""

    def __init__(self, timm_attention: nn.Module) -> None:
        super().__init__()
        a = timm_attention
        extras = {name: getattr(a, name, None) for name in ("q_norm", "k_norm", "norm")}
        if any(m is not None and not isinstance(m, nn.Identity) for m in extras.values()) \
                or getattr(a, "gate", None) is not None \
                or a.attn_drop.p != 0.0 or a.proj_drop.p != 0.0 or a.qkv.out_features != 3 * a.proj.in_features:
            raise ValueError("VitAttention supports plain timm Attention only (no qk-norm, scale-norm, gate, "
                             f"attention or projection dropout); got {a}")
        self.num_heads = a.num_heads
        self.qkv = a.qkv
        self.proj = a.proj

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        if attn_mask is not None or is_causal:
            raise ValueError("VitAttention takes no attn_mask and is not causal")
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)  # (B, N, H, Dh)
        return self.proj(attention(q, k, v).reshape(B, N, C))


def build_vision_encoder(cfg: ModelConfig) -> VisionTransformer:
    vit = VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.vision_width,
        depth=cfg.vision_depth,
        num_heads=cfg.vision_heads,
        mlp_ratio=cfg.vision_mlp_ratio,
        qkv_bias=True,
        num_classes=0,
        global_pool="",
        class_token=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
    )
    nn.init.trunc_normal_(vit.cls_token, std=0.02)  # ALBEF: trunc_normal(.02) (timm: normal(1e-6))
    for block in vit.blocks:
        block.attn = VitAttention(block.attn)
    return vit


def encode_image(vit: VisionTransformer, image: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1 + num_patches, vision_width)."""
    return vit.forward_features(image)



