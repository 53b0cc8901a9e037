"""BERT text encoder (layers [0, text_layers)) and fusion encoder (the remaining layers, each with
cross-attention to the image tokens), with ALBEF's exact semantics (REFERENCE §1.2-§1.3):

- post-LN sub-blocks (residual, then LayerNorm eps 1e-12), exact-erf GELU, dropout 0.1;
- embeddings = word + position + token_type[0] (ALBEF passes no token types, so row 0 is always
  added), then LayerNorm and dropout; no pooler;
- bidirectional self-attention with a padding mask; cross-attention keys/values come from the image
  tokens, which are never padded, so it takes no mask;
- the MLM head (dense, GELU, LayerNorm, decoder) has its decoder weight tied to the word embeddings.

A stock transformers `BertModel` cannot be the fusion encoder (cross-attention forces a causal
decoder there), hence these compact modules. Self-attention uses one fused qkv projection and
cross-attention one fused kv projection (BERT checkpoints' q/k/v weights are concatenated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef_fast.models.attention import attention, padding_mask
from albef_fast.models.presets import ModelConfig


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = cfg.attention_dropout

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        o = attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)  # (B, H, L, Dh)
        return self.out(o.transpose(1, 2).reshape(B, L, D))


class CrossAttention(nn.Module):
    """Text queries over image keys/values (B, N_img, vision_width)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv = nn.Linear(cfg.vision_width, 2 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = cfg.attention_dropout

    def forward(self, x: Tensor, image: Tensor) -> Tensor:
        B, L, D = x.shape
        H, Dh = self.num_heads, D // self.num_heads
        q = self.q(x).view(B, L, H, Dh).transpose(1, 2)  # (B, H, L, Dh)
        k, v = self.kv(image).view(B, image.shape[1], 2, H, Dh).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh) each
        o = attention(q, k, v, None, dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(B, L, D))


class BertLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, cross: bool) -> None:
        super().__init__()
        eps = cfg.layer_norm_eps
        self.self_attn = SelfAttention(cfg)
        self.self_norm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.cross_attn = CrossAttention(cfg) if cross else None
        self.cross_norm = nn.LayerNorm(cfg.hidden_size, eps=eps) if cross else None
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.drop = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor, mask: Tensor | None, image: Tensor | None = None) -> Tensor:
        x = self.self_norm(x + self.drop(self.self_attn(x, mask)))
        if self.cross_attn is not None:
            x = self.cross_norm(x + self.drop(self.cross_attn(x, image)))
        return self.mlp_norm(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout)

    def forward(self, ids: Tensor) -> Tensor:
        L = ids.shape[1]
        if L > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_position {self.position_embeddings.num_embeddings}")
        x = self.word_embeddings(ids) + self.position_embeddings.weight[:L] + self.token_type_embeddings.weight[0]
        return self.drop(self.norm(x))  # (B, L, D)


class TextEncoder(nn.Module):
    """Embeddings + the first `text_layers` BERT layers (ALBEF mode='text')."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList([BertLayer(cfg, cross=False) for _ in range(cfg.text_layers)])

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask: (B, L) int64 -> (B, L, hidden)."""
        x, m = self.embeddings(ids), padding_mask(mask)
        for layer in self.layers:
            x = layer(x, m)
        return x


class FusionEncoder(nn.Module):
    """The last `fusion_layers` BERT layers, each with cross-attention to the image (mode='fusion')."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([BertLayer(cfg, cross=True) for _ in range(cfg.fusion_layers)])

    def forward(self, text: Tensor, mask: Tensor, image: Tensor) -> Tensor:
        """text: (B, L, hidden), mask: (B, L), image: (B, N_img, vision_width) -> (B, L, hidden)."""
        x, m = text, padding_mask(mask)
        for layer in self.layers:
            x = layer(x, m, image)
        return x


class MlmHead(nn.Module):
    """BERT's prediction head. `transform` runs on the masked positions only; the vocabulary
    projection (`weight`, `bias`) is applied by the MLM loss op, which needs it unfused."""

    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied, as BertForMaskedLM
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def transform(self, h: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(h)))

    @property
    def weight(self) -> Tensor:
        return self.decoder.weight

    def forward(self, h: Tensor) -> Tensor:
        """Full logits (..., vocab): for inspection; training uses transform + the loss op."""
        return F.linear(self.transform(h), self.weight, self.bias)


def init_bert_weights(module: nn.Module) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, LayerNorm 1/0, zero [PAD] row."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
