"""BERT text encoder (layers [0, text_layers)) and fusion encoder (the remaining layers, each with
cross-attention to the image tokens), with ALBEF's exact semantics (REFERENCE §1.2-§1.3):

- post-LN sub-blocks (residual, then LayerNorm eps 1e-12), exact-erf GELU, dropout 0.1;
- embeddings = word + position + token_type[0] (ALBEF passes no token types, so row 0 is always
  added), then LayerNorm and dropout; no pooler;
- bidirectional self-attention with a padding mask; cross-attention keys/values come from the image
  tokens, which are never padded, so it takes no mask;
- attention-probability dropout 0.1 in self- and cross-attention (training only);
- the MLM head (dense, GELU, LayerNorm, decoder) has its decoder weight tied to the word embeddings.

A stock transformers `BertModel` cannot be the fusion encoder (cross-attention forces a causal
decoder there), hence these compact modules. Self-attention uses one fused qkv projection and
cross-attention one fused kv projection (BERT checkpoints' q/k/v weights are concatenated).

Attention runs through `albef_fast.models.attention` (backends, packing). Each encoder pass decides
once whether to pack its tokens (`Padding`): packed, every layer works on the (T, hidden) real tokens
and the output is padded back with zeros at the padded positions (which nothing downstream reads).

The fusion encoder's cross-attention keys/values depend only on the image and the layer's `kv`
weights, so `FusionEncoder.image_kv(image)` computes them once per layer and `forward(...,
image_kv=..., image_index=...)` reuses them, gathered by image index, for every row of a call (the
task's 4B ITM + MLM rows) or across calls over the same images: exact, as there is no dropout between
the image tokens and the kv projection.

The cross-attention keys are centred over the image tokens (`CrossAttention.image_kv`): exact (a key
shared by all tokens adds the same score to every key of a query, which softmax ignores, and its
gradient sums to zero), and it keeps the fused kernels' bf16 gradient of the queries accurate. Their
backward forms dS = P * (dP - D) with D = rowsum(dO * O) from the bf16-rounded output O; the
rounding error of D, common to a query's keys, reaches dQ = scale * dS K multiplied by the mean key.
Image tokens at init share a mean key about as large as their spread, and near-uniform attention over
257 keys makes the exact dQ small: uncentred, dQ came out ~8x less accurate than the explicit
softmax path's (bf16, albef_base widths); centred, as accurate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef_fast.models.attention import Padding, attention, use_varlen, varlen_attention
from albef_fast.models.presets import ModelConfig


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = cfg.attention_dropout

    def forward(self, x: Tensor, pad: Padding) -> Tensor:
        """x: (B, L, D), or (T, D) when `pad` is packed -> same shape."""
        D, p = x.shape[-1], self.dropout if self.training else 0.0
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, D // self.num_heads)).unbind(-3)
        if pad.packed:  # (T, H, Dh)
            o = varlen_attention(q, k, v, pad.cu_seqlens, pad.cu_seqlens, pad.max_seqlen, pad.max_seqlen, p)
        else:  # (B, L, H, Dh)
            o = attention(q, k, v, pad.key_mask, p)
        return self.out(o.reshape(*x.shape[:-1], D))


class CrossAttention(nn.Module):
    """Text queries over image keys/values (B, N_img, vision_width)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv = nn.Linear(cfg.vision_width, 2 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = cfg.attention_dropout

    def image_kv(self, image: Tensor) -> Tensor:
        """(B, N_img, vision_width) -> (B, N_img, 2 * D): `self.kv` over the image tokens, keys centred
        over the tokens (values as they are; see the module docstring for why)."""
        kv = self.kv(image)
        D = kv.shape[-1] // 2  # keys are the first half (the (2, H, Dh) layout `forward` unflattens)
        return kv - F.pad(kv[..., :D].mean(1, keepdim=True), (0, D))  # (B, 1, 2D): mean key, zeros for v

    def forward(self, x: Tensor, kv: Tensor, pad: Padding) -> Tensor:
        """x: (B, L, D), or (T, D) when `pad` is packed; kv: (B, N_img, 2 * D), `image_kv` of the image
        tokens (see FusionEncoder.image_kv) -> x's shape."""
        D, p = x.shape[-1], self.dropout if self.training else 0.0
        B, N = kv.shape[:2]
        if B != pad.mask.shape[0]:
            raise ValueError(f"image keys/values are for {B} images but the text batch has {pad.mask.shape[0]} rows")
        q = self.q(x).unflatten(-1, (self.num_heads, D // self.num_heads))
        k, v = kv.unflatten(-1, (2, self.num_heads, D // self.num_heads)).unbind(-3)  # (B, N, H, Dh)
        if pad.packed:  # text rows i attend to image i's N tokens: fixed-length key sequences
            cu_k = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=kv.device)
            o = varlen_attention(q, k.flatten(0, 1), v.flatten(0, 1), pad.cu_seqlens, cu_k, pad.max_seqlen, N, p)
        else:
            o = attention(q, k, v, None, p)
        return self.out(o.reshape(*x.shape[:-1], D))


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

    def forward(self, x: Tensor, pad: Padding, image_kv: Tensor | None = None) -> Tensor:
        x = self.self_norm(x + self.drop(self.self_attn(x, pad)))
        if self.cross_attn is not None:
            x = self.cross_norm(x + self.drop(self.cross_attn(x, image_kv, pad)))
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
        x = self.embeddings(ids)
        pad = Padding.build(mask, packed=use_varlen(x, self.layers[0].self_attn.dropout if self.training else 0.0)
                            if len(self.layers) else False)
        x = pad.pack(x)
        for layer in self.layers:
            x = layer(x, pad)
        return pad.unpack(x)


class FusionEncoder(nn.Module):
    """The last `fusion_layers` BERT layers, each with cross-attention to the image (mode='fusion')."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([BertLayer(cfg, cross=True) for _ in range(cfg.fusion_layers)])

    def image_kv(self, image: Tensor) -> list[Tensor]:
        """Per fusion layer, the cross-attention keys and values of the image tokens.

        Args:
            image: (B, N_img, vision_width) image token embeddings.
        Returns:
            one (B, N_img, 2 * hidden) tensor per layer (keys, centred, and values, laid out as `kv`'s).
        """
        return [layer.cross_attn.image_kv(image) for layer in self.layers]

    def forward(self, text: Tensor, mask: Tensor, image: Tensor | None = None, *,
                image_kv: list[Tensor] | None = None, image_index: Tensor | None = None) -> Tensor:
        """Fusion layers over text tokens with cross-attention to image tokens.

        Args:
            text: (B, L, hidden) text-encoder output; mask: (B, L) 1/0.
            image: (B, N_img, vision_width) image tokens, or None when `image_kv` is given.
            image_kv: `image_kv(images)` computed once for a set of images and reused.
            image_index: (B,) int64, row b attends to image image_index[b] of `image_kv`'s images
                (None: row b to image b).
        Returns:
            (B, L, hidden); padded positions hold zeros when the pass was packed.
        """
        if (image is None) == (image_kv is None):
            raise ValueError("FusionEncoder.forward takes exactly one of image and image_kv")
        if image_kv is not None and len(image_kv) != len(self.layers):
            raise ValueError(f"image_kv has {len(image_kv)} entries for {len(self.layers)} fusion layers")
        pad = Padding.build(mask, packed=use_varlen(text, self.layers[0].self_attn.dropout if self.training else 0.0)
                            if len(self.layers) else False)
        x = pad.pack(text)
        for i, layer in enumerate(self.layers):
            kv = layer.cross_attn.image_kv(image) if image_kv is None else image_kv[i]
            if image_index is not None:
                kv = kv.index_select(0, image_index)
            x = layer(x, pad, kv)
        return pad.unpack(x)


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
