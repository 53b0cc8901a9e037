"""ViT image encoder, built with timm (REFERENCE §1.1).

timm's VisionTransformer with class token, learned position embedding, pre-norm blocks, LayerNorm
eps 1e-6, exact GELU, qkv bias, no dropout, no head; its parameter names equal ALBEF's
`visual_encoder.*` keys. `forward_features` returns the full token sequence after the final norm.
"""

from __future__ import annotations

from functools import partial


from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from albef_fast.models.presets import ModelConfig


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
    return vit


def encode_image(vit: VisionTransformer, image: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1 + num_patches, vision_width)."""
    return vit.forward_features(image)



