"""The ALBEF model: encoders, projection heads, ITM head and temperature. It computes and returns
tensors; it holds no losses and changes no state (the task and the training loop do that)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef_fast.models.presets import ModelConfig
from albef_fast.models.text import FusionEncoder, MlmHead, TextEncoder, init_bert_weights
from albef_fast.models.vision import build_vision_encoder, encode_image

TEMP_MIN, TEMP_MAX = 0.001, 0.5

# Submodules that have a momentum (EMA) twin, as ALBEF's model_pairs: the visual encoder, vision_proj,
# the whole BERT with its MLM head, and text_proj. itm_head and temp have none.
MOMENTUM_MODULES = ("visual_encoder", "vision_proj", "text_encoder", "fusion_encoder", "mlm_head", "text_proj")


class ALBEF(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.visual_encoder = build_vision_encoder(config)
        self.vision_proj = nn.Linear(config.vision_width, config.embed_dim)
        self.text_encoder = TextEncoder(config)
        self.fusion_encoder = FusionEncoder(config)
        self.mlm_head = MlmHead(config, self.text_encoder.embeddings.word_embeddings)
        self.text_proj = nn.Linear(config.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(config.temp))
        # BERT's init for the text side (from_pretrained in ALBEF); the decoder is tied to the word
        # embeddings, so only the head's transform is initialised here. vision_proj, text_proj and
        # itm_head keep PyTorch's default Linear init, as in ALBEF.
        for module in (self.text_encoder, self.fusion_encoder, self.mlm_head.dense, self.mlm_head.norm):
            module.apply(init_bert_weights)

    # --- unimodal encoders ------------------------------------------------------------------------
    def encode_image(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) float -> (B, 1 + P, vision_width) token embeddings."""
        return encode_image(self.visual_encoder, image)

    def image_feature(self, image_embeds: Tensor) -> Tensor:
        """(B, 1 + P, vision_width) -> (B, embed_dim) L2-normalised projection of [CLS], in fp32 (fp64 for an
        fp64 model: the parity harness's oracle)."""
        feat = self.vision_proj(image_embeds[:, 0])
        return F.normalize(feat.to(torch.promote_types(feat.dtype, torch.float32)), dim=-1)

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask: (B, L) int64 -> (B, L, hidden): layers [0, text_layers), no image."""
        return self.text_encoder(ids, mask)

    def text_feature(self, text_embeds: Tensor) -> Tensor:
        """(B, L, hidden) -> (B, embed_dim) L2-normalised projection of [CLS], fp32 (fp64 for an fp64 model)."""
        feat = self.text_proj(text_embeds[:, 0])
        return F.normalize(feat.to(torch.promote_types(feat.dtype, torch.float32)), dim=-1)

    # --- multimodal ------------------------------------------------------------------------------
    def image_kv(self, image_embeds: Tensor) -> list[Tensor]:
        """(B, 1 + P, vision_width) -> per fusion layer the (B, 1 + P, 2 * hidden) cross-attention keys
        and values, to compute once and share between the rows (`image_index`) or calls of `fuse`."""
        return self.fusion_encoder.image_kv(image_embeds)

    def fuse(self, text_embeds: Tensor, mask: Tensor, image_embeds: Tensor | None = None, *,
             image_kv: list[Tensor] | None = None, image_index: Tensor | None = None) -> Tensor:
        """Fusion layers over text tokens with cross-attention to image tokens -> (B, L, hidden).

        The image is given either as tokens `image_embeds` (B, 1 + P, vision_width), or as `image_kv`
        from `image_kv()` with an optional (B,) `image_index` picking each text row's image."""
        return self.fusion_encoder(text_embeds, mask, image_embeds, image_kv=image_kv, image_index=image_index)

    def itm_logits(self, fused: Tensor) -> Tensor:
        """(B, L, hidden) fused sequence -> (B, 2) match logits from [CLS]; class 1 = match."""
        return self.itm_head(fused[:, 0])

    # --- momentum twin ---------------------------------------------------------------------------
    def momentum_copy(self) -> "ALBEF":
        """An fp32 copy of MOMENTUM_MODULES with requires_grad=False (no itm_head, no temp). The tied
        MLM decoder stays tied in the copy."""
        twin = copy.deepcopy(self).float()
        for name, _ in list(twin.named_children()):
            if name not in MOMENTUM_MODULES:
                delattr(twin, name)
        for name in list(twin._parameters):  # temp
            delattr(twin, name)
        twin.requires_grad_(False)
        return twin

    @torch.no_grad()
    def clamp_temp_(self) -> None:
        self.temp.clamp_(TEMP_MIN, TEMP_MAX)
