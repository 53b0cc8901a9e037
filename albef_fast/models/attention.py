"""The one attention implementation of the model: ViT self-attention, text self-attention and the
fusion layers' cross-attention all call `attention` (dense) or `varlen_attention` (packed tokens).

    out = softmax(q k^T / sqrt(Dh) + key mask) v, dropout on the probabilities (training only)

Layout: (batch, seq, heads, head_dim) everywhere ("BLHD", flash-attn's layout, and what a fused qkv
projection reshapes into without a copy). Packed: (tokens, heads, head_dim) with cumulative sequence
offsets `cu_seqlens` (B + 1,) int32, as flash-attn's varlen interface.

Backends (`configure(name)` from `kernels.attention` in the config, `use_backend(name)` in tests):

| name        | dense call (ViT, cross-attn, masked text)                | packed text (varlen)                           |
|-------------|----------------------------------------------------------|------------------------------------------------|
| flash_attn  | flash_attn_func (flash-attn 2.x; masked text is packed)   | flash_attn_varlen_func, dropout supported     |
| torch_flash | SDPA restricted to its flash kernel; a key mask -> SDPA    | torch.nn.attention.varlen.varlen_attn (no dropout: eval only) |
| sdpa        | F.scaled_dot_product_attention (PyTorch picks the kernel) | pad, dense SDPA, unpack                        |
| math        | explicit matmul / fp32 softmax / dropout / matmul          | pad, dense math, unpack (the reference twin)   |
| auto        | flash_attn if installed, else torch_flash, on CUDA bf16/fp16; sdpa elsewhere            |

Flash kernels need CUDA and bf16/fp16 inputs (under autocast q, k, v come out of the projections in
bf16). A call they cannot take (fp32, CPU) runs on SDPA instead; each (requested, used, call kind)
decision is logged once. The encoders pack their tokens once per pass (`Padding`) only when the
backend has a varlen kernel for the call (`use_varlen`); the per-token layers (projections, MLP,
LayerNorm) then also skip the padding, as MosaicBERT / flash-attn's BERT do.

Numerics: every path computes the softmax in fp32 (flash kernels internally, the math path by an
explicit upcast) and a padded key gets exactly zero probability (ALBEF's -10000 bias underflows to
zero in fp32 too). A row must keep at least one real key: ALBEF's [CLS] is always real.

flash-attn is an optional extra (`pip install .[gpu]`, CUDA machines only). The CuTe-based
flash-attn-4 (PyPI `flash-attn-4`) has no attention dropout, so it cannot run ALBEF's training-mode
text/fusion attention (p = 0.1) with the reference semantics; it is not wired in.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # flash-attn 2.x; a broken (Python-only) build raises ModuleNotFoundError here too
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except (ImportError, OSError):
    flash_attn_func = flash_attn_varlen_func = None

try:  # PyTorch's own varlen flash attention (prototype in recent releases)
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except ImportError:
    torch_varlen_attn = None

log = logging.getLogger("albef_fast.attention")
BACKENDS = ("auto", "flash_attn", "torch_flash", "sdpa", "math")
_configured = "auto"
_override: str | None = None
_force_varlen = False
_logged: set[tuple[str, str, str]] = set()
_HALF = (torch.float16, torch.bfloat16)


def flash_attn_available() -> bool:
    return flash_attn_func is not None


def torch_varlen_available() -> bool:
    return torch_varlen_attn is not None


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    if name == "flash_attn" and not flash_attn_available():
        raise ValueError("attention backend 'flash_attn' needs the flash-attn package (pip install '.[gpu]' "
                         "on a CUDA machine); use auto, torch_flash, sdpa or math")
    return name


def configure(name: str = "auto") -> None:
    """Set the backend (from the training config's `kernels.attention`)."""
    global _configured
    _configured = _check(name)


def backend() -> str:
    """The requested backend: a `use_backend` block's, else the configured one."""
    return _override or _configured


@contextlib.contextmanager
def use_backend(name: str, *, force_varlen: bool = False) -> Iterator[None]:
    """Run the block with another backend. `force_varlen` makes the encoders pack their tokens even
    where no varlen kernel exists (the packed path then runs through the padded reference), so that
    the packing logic is testable on the CPU."""
    global _override, _force_varlen
    previous = (_override, _force_varlen)
    _override, _force_varlen = _check(name), force_varlen
    try:
        yield
    finally:
        _override, _force_varlen = previous


def _attention_dtype(x: Tensor) -> torch.dtype:
    """The dtype q, k, v will have: the autocast dtype when autocast is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def resolve(x: Tensor, *, kind: str, masked: bool = False, dropout_p: float = 0.0,
            dtype: torch.dtype | None = None) -> str:
    """The path that runs a call of `kind` ("dense" or "varlen") on x's device in `dtype` (default x's).

    Returns one of "flash_attn", "torch_flash", "torch_varlen", "sdpa", "math". Logged once per
    (requested backend, path, kind)."""
    requested = backend()
    fast = x.is_cuda and (dtype or x.dtype) in _HALF
    path = requested
    if requested in ("auto", "flash_attn"):
        path = "flash_attn" if fast and flash_attn_available() else ("torch_flash" if fast else "sdpa")
    if path == "torch_flash":
        if not fast:
            path = "sdpa"
        elif kind == "varlen":
            # PyTorch's varlen kernel takes no dropout; with dropout the padded SDPA path runs
            path = "torch_varlen" if torch_varlen_available() and dropout_p == 0.0 else "sdpa"
        elif masked:
            path = "sdpa"  # the flash kernel takes no mask: SDPA picks its memory-efficient kernel
    elif path == "flash_attn" and kind == "dense" and masked:
        path = "sdpa"  # flash_attn_func takes no mask; the encoders pack masked text instead
    key = (requested, path, kind + ("+mask" if masked else ""))
    if key not in _logged:
        _logged.add(key)
        log.info("attention: backend %s runs %s calls on %s", requested, key[2], path)
    return path


def use_varlen(x: Tensor, dropout_p: float) -> bool:
    """Whether an encoder pass over padded text like x should pack its tokens (once per pass)."""
    path = resolve(x, kind="varlen", dropout_p=dropout_p, dtype=_attention_dtype(x))  # x: before the projections
    return _force_varlen or path in ("flash_attn", "torch_varlen")


# --- dense -------------------------------------------------------------------------------------------


def attention_math(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None,
                   dropout_p: float = 0.0) -> Tensor:
    """The explicit reference: scores, fp32 softmax, dropout, weighted sum. Shapes as `attention`."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, Dh)
    scores = (qt @ kt.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return (probs @ vt).transpose(1, 2)  # (B, Lq, H, Dh)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """Dense attention.

    Args:
        q: (B, Lq, H, Dh); k, v: (B, Lk, H, Dh).
        key_mask: None or (B, Lk) bool, True where a key may be attended.
        dropout_p: dropout on the attention probabilities (pass 0 in eval).
    Returns:
        (B, Lq, H, Dh), possibly a non-contiguous view.
    """
    path = resolve(q, kind="dense", masked=key_mask is not None, dropout_p=dropout_p)
    if path == "math":
        return attention_math(q, k, v, key_mask, dropout_p)
    if path == "flash_attn":
        return flash_attn_func(q, k, v, dropout_p=dropout_p)
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Lk) broadcast over H, Lq
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA's (B, H, L, Dh)
    if path == "torch_flash":
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p).transpose(1, 2)


# --- packed (variable length) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Padding:
    """How one encoder pass lays out its padded tokens: dense (B, L, ...) with a key mask, or packed
    (T, ...) with the real tokens only. Built once per pass from the (B, L) mask.

    Packing keeps every real token and drops the padded ones, so attention over the packed keys is
    exactly the masked attention, whether or not the real tokens form a prefix of each row. Building
    the packed layout costs one host synchronisation (the token count T), as flash-attn's unpad_input.
    """

    mask: Tensor
    """(B, L) bool, True = real token."""
    packed: bool
    indices: Tensor | None = None
    """(T,) int64 positions of the real tokens in the flattened (B * L) sequence."""
    cu_seqlens: Tensor | None = None
    """(B + 1,) int32 offsets of each row's tokens in the packed sequence."""
    max_seqlen: int = 0
    """An upper bound of the row lengths (L: no host sync needed; the kernels accept a bound)."""

    @classmethod
    def build(cls, mask: Tensor, packed: bool) -> "Padding":
        mask = mask.bool()
        if mask.dim() != 2:
            raise ValueError(f"mask must be (B, L), got shape {tuple(mask.shape)}")
        if not packed:
            return cls(mask, False)
        indices = mask.flatten().nonzero().squeeze(1)
        cu = F.pad(mask.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        return cls(mask, True, indices, cu, mask.shape[1])

    @property
    def key_mask(self) -> Tensor | None:
        return None if self.packed else self.mask

    def pack(self, x: Tensor) -> Tensor:
        """(B, L, ...) -> (T, ...) when packed, else x unchanged."""
        return x.flatten(0, 1).index_select(0, self.indices) if self.packed else x

    def unpack(self, x: Tensor) -> Tensor:
        """(T, ...) -> (B, L, ...) with zeros at padded positions when packed, else x unchanged."""
        if not self.packed:
            return x
        B, L = self.mask.shape
        return x.new_zeros(B * L, *x.shape[1:]).index_copy(0, self.indices, x).unflatten(0, (B, L))


def _from_cu_seqlens(cu: Tensor, max_len: int) -> Padding:
    lengths = cu[1:] - cu[:-1]
    mask = torch.arange(max_len, device=cu.device)[None] < lengths[:, None]
    return Padding.build(mask, True)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0) -> Tensor:
    """Attention over packed sequences: query row i attends to key row i only.

    Args:
        q: (Tq, H, Dh); k, v: (Tk, H, Dh): sequences concatenated.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 offsets of each sequence (first 0, last Tq / Tk).
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths.
        dropout_p: dropout on the attention probabilities (pass 0 in eval).
    Returns:
        (Tq, H, Dh)
    """
    path = resolve(q, kind="varlen", dropout_p=dropout_p)
    if path == "flash_attn":
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      dropout_p=dropout_p)
    if path == "torch_varlen" and dropout_p == 0.0:
        return torch_varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    # reference: back to the padded layout, the dense call, and packed again
    pad_q, pad_k = _from_cu_seqlens(cu_seqlens_q, max_seqlen_q), _from_cu_seqlens(cu_seqlens_k, max_seqlen_k)
    out = attention(pad_q.unpack(q), pad_k.unpack(k), pad_k.unpack(v), pad_k.mask, dropout_p)
    return pad_q.pack(out)
