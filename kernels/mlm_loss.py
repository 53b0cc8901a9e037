"""Masked-language-modelling loss with momentum distillation, on the masked positions only
(REFERENCE §2 step 10), chunked over the vocabulary so that no (tokens x vocabulary) tensor exists.

Math. For the M masked positions with transformed hidden states h (M, D) and h_m (M, D) (momentum model):
    z   = h   W^T   + b        (M, V)          z_m = h_m W_m^T + b_m     (M, V), no gradient
    q   = softmax(z_m)         t = alpha * q + (1 - alpha) * onehot(labels)      (each row of t sums to 1)
    L   = mean_i [ -sum_v t_iv log_softmax(z)_iv ] = mean_i [ lse(z_i) - sum_v t_iv z_iv ]
        = (1 - alpha) * mean CE(z, labels) + alpha * mean soft-CE(z, q)
    dL/dz_iv = (softmax(z)_iv - t_iv) / M;   dh = dz W,  dW = dz^T h,  db = sum_i dz_i.
ALBEF projects every position of the sequence to the vocabulary and ignores the unmasked ones in
the loss; projecting only the masked rows is exactly the same loss at ~15 % of the cost.

Design (Liger fused-linear-cross-entropy style, but chunked over V instead of over tokens, because
the distillation target needs softmax(z_m) over the whole vocabulary and M is small):
  pass 1, per chunk of C vocabulary rows: h W_c^T and h_m W_m,c^T (two cuBLAS GEMMs) ->
          `_mlm_loss_fwd_kernel` adds the biases in fp32 and merges both rows' log-sum-exp into a
          running (2, M) statistic (one program per row, online max/sum);
  pass 2, per chunk: the same two GEMMs again -> `_mlm_loss_bwd_kernel` (one program per 64-column
          tile, looping over the rows) turns the online buffer into dL/dz_c in place, writes the bias
          gradient of its columns (an fp32 column sum, no atomics) and a (M, tiles) partial of
          sum_v t z -> dh += dz_c W_c, dW_c = dz_c^T h (two more GEMMs).
Why not one fully fused GEMM kernel (Apple CCE style): the GEMMs are nearly all of the FLOPs and stay
in cuBLAS (a hand-written Triton GEMM would first have to match it); what needed fusing is the (M, V)
softmax arithmetic, which the two row kernels do on chunk-sized buffers.
The gradients are complete at the end of the forward (nothing but (M,) statistics and the gradients
themselves is kept); backward only scales them by the incoming gradient. The chunked PyTorch path
(the CPU fallback for large shapes) runs the same two passes with the row maths in torch ops; the
Triton path swaps in the two kernels, so both share every GEMM. Under bf16 the logits are the bf16
GEMM output plus the fp32 bias, as in the reference under autocast, and dL/dz is rounded to bf16
only for the dh/dW GEMMs (the bias gradient sums it in fp32).

Cost model (M=240, D=768, V=30,522 at ALBEF-base batch 64): 6 GEMMs of 2*M*D*V = 11.3 GFLOP each
(the reference does 4: z, z_m, dh, dW) plus ~3 passes over (M, C) chunk buffers; W and W_m are read
twice, dW written once (~0.4 GB in fp32). Extra memory: 2 chunk buffers (M, C), (2, M) statistics,
dh (M, D) fp32, dW (V, D) (as in any path); never (M, V). Report TFLOP/s on the reference's 8*M*D*V.
Envelope: any M >= 1 (M = 0 returns the reference's graph-connected 0), any V, D; h, h_m in fp32,
bf16 or fp16 (GEMMs run in h's dtype, or in the autocast dtype when autocast is on, as the
reference's matmuls would; softmax statistics and sums in fp32); labels must lie in [0, V) (checked
on the CPU; on CUDA a bad label is not detected, to avoid a host sync). First-order gradients only,
one backward per forward (the stored gradients are scaled in place).
References: ALBEF (arXiv:2107.07651) MLM with momentum distillation; Liger-Kernel
fused_linear_cross_entropy (gradients in forward, chunked); Apple Cut Cross-Entropy (arXiv
2411.09009) for the never-materialise-logits goal; Triton fused-softmax tutorial (online max/sum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from albef_kernels import _dispatch
from albef_kernels._dispatch import triton_available, use_triton
from torch import Tensor

if triton_available():
    import triton
    import triton.language as tl
else:  # the reference and the chunked path still work without Triton
    triton = tl = None

CHUNK_SIZE = 4096
"""Vocabulary rows per chunk: 8 chunks for BERT's 30,522; a chunk buffer is M x 4096 (3.9 MB fp32 at M=240)."""
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNKED_ABOVE = 1 << 22
FUSED_ABOVE = 1 << 26  # M * V above which `auto` takes the fused CUDA path (256 MiB of fp32 logits)
"""Without Triton, M * V above this (16 MiB of fp32 logits) takes the chunked path, below it the reference."""


# --- reference: pure PyTorch; test oracle, benchmark baseline, CPU fallback for small shapes ---------
def mlm_loss_reference(
    h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor,
    h_m: Tensor, weight_m: Tensor, bias_m: Tensor, alpha: float,
) -> Tensor:
    """Args:
        h: (M, D) online hidden states after the MLM transform at the masked positions.
        weight, bias: (V, D), (V,) online vocabulary projection (weight tied to word embeddings).
        labels: (M,) int64 original token ids.
        h_m, weight_m, bias_m: the momentum model's counterparts (no gradient flows into them).
        alpha: distillation weight in [0, 1].
    Returns:
        () loss; exactly 0 (connected to the graph) when M = 0.
    """
    if h.shape[0] == 0:
        return h.sum() * 0.0
    acc = torch.promote_types(h.dtype, torch.float32)  # softmax statistics in fp32 at least
    logp = F.log_softmax((h @ weight.t() + bias).to(acc), dim=-1)  # (M, V)
    ce = F.nll_loss(logp, labels)
    with torch.no_grad():
        soft = F.softmax((h_m @ weight_m.t() + bias_m).to(acc), dim=-1)  # (M, V)
    distill = -(soft * logp).sum(dim=-1).mean()
    return (1.0 - alpha) * ce + alpha * distill


# --- row maths of one chunk, PyTorch (the chunked CPU path) ------------------------------------------
# z, z_m are the chunk's GEMM outputs h W_c^T, h_m W_m,c^T (M, C) in the compute dtype; the biases are
# added here in the statistics dtype (as the reference adds an fp32 bias to a bf16 GEMM under autocast).
def _chunk_lse_torch(z: Tensor, z_m: Tensor, b: Tensor, b_m: Tensor, lse: Tensor) -> None:
    """lse (2, M) <- logaddexp(lse, [logsumexp(z + b), logsumexp(z_m + b_m)]) over the chunk's columns."""
    lse[0] = torch.logaddexp(lse[0], torch.logsumexp(z.to(lse.dtype) + b.to(lse.dtype), dim=1))
    lse[1] = torch.logaddexp(lse[1], torch.logsumexp(z_m.to(lse.dtype) + b_m.to(lse.dtype), dim=1))


def _chunk_grad_torch(z: Tensor, z_m: Tensor, b: Tensor, b_m: Tensor, lse: Tensor, labels: Tensor, col0: int,
                      alpha: float, scale: float, acc: Tensor, db: Tensor | None) -> None:
    """z (M, C) <- dL/dz = scale * (softmax - t) in place; acc (M,) += sum_v t z; db (C,) <- colsum dL/dz.
    In-place ops throughout: two (M, C) temporaries besides z and z_m."""
    M, C = z.shape
    zf = z.to(lse.dtype) + b.to(lse.dtype)  # (M, C) logits
    t = (z_m.to(lse.dtype) + b_m.to(lse.dtype)).sub_(lse[1, :, None]).exp_().mul_(alpha)  # (M, C) alpha * q
    # + (1 - alpha) at the label column of rows whose label falls in this chunk (no host sync)
    in_chunk = (labels >= col0) & (labels < col0 + C)
    col = (labels - col0).clamp_(0, C - 1)[:, None]
    t.scatter_add_(1, col, in_chunk.to(t.dtype).mul_(1.0 - alpha)[:, None])
    acc += torch.bmm(t[:, None, :], zf[:, :, None]).view(M)  # row dot products sum_v t z
    dz = zf.sub_(lse[0, :, None]).exp_().sub_(t).mul_(scale)  # (M, C), reusing the logits buffer
    if db is not None:
        db.copy_(dz.sum(dim=0))
    z.copy_(dz)


# --- Triton kernels: the same maths; statistics by rows, gradients by column tiles --------------------
if triton is not None:

    @triton.jit
    def _mlm_loss_fwd_kernel(
        Z_ptr,  # (M, C) online GEMM output h W_c^T of one vocabulary chunk, compute dtype
        Zm_ptr,  # (M, C) momentum GEMM output of the same chunk
        B_ptr,  # (C,) online bias of the chunk
        Bm_ptr,  # (C,) momentum bias of the chunk
        Lse_ptr,  # (2, M) fp32 running log-sum-exp (row 0 online, row 1 momentum), updated in place
        n_rows, n_cols, stride_z_row, stride_zm_row,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # one program per row: the reductions run along the row
        z_row = Z_ptr + row * stride_z_row
        zm_row = Zm_ptr + row * stride_zm_row
        mx, s = -float("inf"), 0.0
        mx_m, s_m = -float("inf"), 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            # masked lanes are -inf: exp(-inf - max) = 0; every block has >= 1 real column, so the
            # block max is finite and the rescale factor exp(mx - new) is never exp(nan)
            z = tl.load(z_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            z += tl.load(B_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            zm = tl.load(zm_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            zm += tl.load(Bm_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            new = tl.maximum(mx, tl.max(z, 0))
            s = s * tl.exp(mx - new) + tl.sum(tl.exp(z - new), 0)
            mx = new
            new_m = tl.maximum(mx_m, tl.max(zm, 0))
            s_m = s_m * tl.exp(mx_m - new_m) + tl.sum(tl.exp(zm - new_m), 0)
            mx_m = new_m
        # merge this chunk's lse into the running one (which starts at -inf: exp(-inf - finite) = 0)
        c = mx + tl.log(s)
        old = tl.load(Lse_ptr + row)
        top = tl.maximum(old, c)
        tl.store(Lse_ptr + row, top + tl.log(tl.exp(old - top) + tl.exp(c - top)))
        c_m = mx_m + tl.log(s_m)
        old_m = tl.load(Lse_ptr + n_rows + row)
        top_m = tl.maximum(old_m, c_m)
        tl.store(Lse_ptr + n_rows + row, top_m + tl.log(tl.exp(old_m - top_m) + tl.exp(c_m - top_m)))

    @triton.jit
    def _mlm_loss_bwd_kernel(
        Z_ptr,  # (M, C) online GEMM output of one chunk; overwritten with dL/dz (same dtype)
        Zm_ptr,  # (M, C) momentum GEMM output of the chunk
        B_ptr, Bm_ptr,  # (C,) online / momentum bias of the chunk
        Lse_ptr,  # (2, M) fp32 final log-sum-exp, online / momentum
        Labels_ptr,  # (M,) int64 token ids in [0, V)
        Part_ptr,  # (M, n_programs) fp32 out: sum_v t z over this program's columns
        Db_ptr,  # (C,) out: column sums of dL/dz (the bias gradient of the chunk)
        n_rows, n_cols, stride_z_row, stride_zm_row,
        col0,  # vocabulary index of the chunk's first column
        alpha, scale,  # distillation weight; 1/M (the mean)
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, HAS_DB: tl.constexpr,
    ):
        # one program per column tile, looping over all rows: the bias gradient is a plain fp32 column
        # sum in registers (deterministic, no atomics); the per-row terms go to a (M, tiles) partial
        pid = tl.program_id(0)
        cols = pid * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = cols < n_cols
        b = tl.load(B_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        b_m = tl.load(Bm_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        db = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for r0 in range(0, n_rows, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            rmask = rows < n_rows
            mask = rmask[:, None] & cmask[None, :]
            lse = tl.load(Lse_ptr + rows, mask=rmask, other=0.0)
            lse_m = tl.load(Lse_ptr + n_rows + rows, mask=rmask, other=0.0)
            target = tl.load(Labels_ptr + rows, mask=rmask, other=-1) - col0  # label column, or out of range
            z_off = rows.to(tl.int64)[:, None] * stride_z_row + cols[None, :]
            zm_off = rows.to(tl.int64)[:, None] * stride_zm_row + cols[None, :]
            z = tl.load(Z_ptr + z_off, mask=mask, other=0.0).to(tl.float32) + b[None, :]
            zm = tl.load(Zm_ptr + zm_off, mask=mask, other=-float("inf")).to(tl.float32) + b_m[None, :]
            q = tl.exp(zm - lse_m[:, None])  # momentum probabilities; 0 on masked lanes (-inf)
            t = alpha * q + tl.where(mask & (cols[None, :] == target[:, None]), 1.0 - alpha, 0.0)
            tl.store(Part_ptr + rows * tl.num_programs(0) + pid, tl.sum(t * z, 1), mask=rmask)  # t = 0 where masked
            dz = tl.where(mask, (tl.exp(z - lse[:, None]) - t) * scale, 0.0)
            db += tl.sum(dz, 0)
            tl.store(Z_ptr + z_off, dz.to(Z_ptr.dtype.element_ty), mask=mask)
        if HAS_DB:
            tl.store(Db_ptr + cols, db.to(Db_ptr.dtype.element_ty), mask=cmask)

    def _chunk_lse_triton(z: Tensor, z_m: Tensor, b: Tensor, b_m: Tensor, lse: Tensor) -> None:
        M, C = z.shape
        block = min(1024, triton.next_power_of_2(C))
        _mlm_loss_fwd_kernel[(M,)](z, z_m, b.contiguous(), b_m.contiguous(), lse, M, C, z.stride(0),
                                   z_m.stride(0), BLOCK_V=block,
                                   num_warps=4)

    def _chunk_grad_triton(z: Tensor, z_m: Tensor, b: Tensor, b_m: Tensor, lse: Tensor, labels: Tensor,
                           col0: int, alpha: float, scale: float, acc: Tensor, db: Tensor | None) -> None:
        M, C = z.shape
        block_v = min(64, triton.next_power_of_2(C))  # 64 tiles per 4,096-column chunk
        tiles = triton.cdiv(C, block_v)
        part = torch.empty(M, tiles, dtype=torch.float32, device=z.device)  # (M, tiles), tiny
        b, b_m = b.contiguous(), b_m.contiguous()
        _mlm_loss_bwd_kernel[(tiles,)](z, z_m, b, b_m, lse, labels, part, db if db is not None else b,
                                       M, C, z.stride(0), z_m.stride(0), col0, alpha, scale,
                                       BLOCK_M=32, BLOCK_V=block_v, HAS_DB=db is not None, num_warps=4)
        acc += part.sum(dim=1)


# --- launcher: the two chunked passes; validation lives in `mlm_loss` ----------------------------------
def _compute_dtype(h: Tensor) -> torch.dtype:
    """The GEMMs' dtype: the autocast dtype when autocast is on (as the reference's matmuls), else h's."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


def mlm_loss_forward(
    h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor,
    h_m: Tensor, weight_m: Tensor, bias_m: Tensor, alpha: float, *,
    chunk_size: int = CHUNK_SIZE, triton_rows: bool = False,
    grads: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss and its gradients in two passes over vocabulary chunks (see the module docstring).

    Args:
        h, weight, bias, labels, h_m, weight_m, bias_m, alpha: as `mlm_loss_reference`; M >= 1.
        chunk_size: vocabulary rows per chunk (C); the largest temporaries are two (M, C) buffers.
        triton_rows: row maths by the Triton kernels (CUDA, or the interpreter) instead of torch ops.
        grads: which of (dh, dweight, dbias) to compute.
    Returns:
        loss () fp32 (fp64 for fp64 inputs); dh (M, D) in h.dtype, dweight (V, D) in weight.dtype,
        dbias (V,) in bias.dtype, each of the mean loss (not yet scaled by an incoming gradient), or
        None where not asked for.
    """
    M, D = h.shape
    V = weight.shape[0]
    cd = _compute_dtype(h)
    chunk_lse = _chunk_lse_triton if triton_rows else _chunk_lse_torch
    chunk_grad = _chunk_grad_triton if triton_rows else _chunk_grad_torch
    need_h, need_w, need_b = grads
    sd = torch.promote_types(cd, torch.float32)  # statistics and sums: fp32 (fp64 for fp64 inputs)
    if triton_rows and sd != torch.float32:
        raise TypeError(f"mlm_loss: the Triton path takes fp32/bf16/fp16 GEMMs, got {cd}")
    with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen explicitly below
        hc, hmc = h.to(cd), h_m.to(cd)  # (M, D)
        labels = labels.contiguous()

        def gemms(c0: int, c1: int) -> tuple[Tensor, Tensor, Tensor]:
            w_c = weight[c0:c1].to(cd)  # (C, D); a cast of one chunk, never of the whole table
            z = hc @ w_c.t()  # (M, C); the bias is added by the row maths
            z_m = hmc @ weight_m[c0:c1].to(cd).t()  # (M, C)
            return w_c, z, z_m

        lse = torch.full((2, M), -float("inf"), dtype=sd, device=h.device)
        for c0 in range(0, V, chunk_size):
            c1 = min(c0 + chunk_size, V)
            _, z, z_m = gemms(c0, c1)
            chunk_lse(z, z_m, bias[c0:c1], bias_m[c0:c1], lse)
            del z, z_m  # free this chunk's buffers before the next chunk allocates its own

        acc = torch.zeros(M, dtype=sd, device=h.device)
        dh = torch.zeros(M, D, dtype=sd, device=h.device) if need_h else None
        dw = torch.empty(V, D, dtype=weight.dtype, device=weight.device) if need_w else None
        db = torch.empty(V, dtype=bias.dtype, device=bias.device) if need_b else None
        for c0 in range(0, V, chunk_size):
            c1 = min(c0 + chunk_size, V)
            w_c, z, z_m = gemms(c0, c1)
            chunk_grad(z, z_m, bias[c0:c1], bias_m[c0:c1], lse, labels, c0, float(alpha), 1.0 / M, acc,
                       db[c0:c1] if need_b else None)  # z is now dL/dz (M, C)
            # gradients of this chunk, written in place where the dtypes allow (no (C, D) temporary)
            if need_h and cd == sd:  # (M, D), summed over chunks in fp32 (sd)
                dh.addmm_(z, w_c)
            elif need_h:
                dh += z @ w_c
            if need_w and cd == dw.dtype:  # (C, D)
                torch.mm(z.t(), hc, out=dw[c0:c1])
            elif need_w:
                dw[c0:c1] = z.t() @ hc
            del w_c, z, z_m
        loss = (lse[0] - acc).mean()
    return loss, (dh.to(h.dtype) if need_h else None), dw, db


# --- autograd ------------------------------------------------------------------------------------------
class MlmLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, h_m, weight_m, bias_m, alpha, chunk_size, triton_rows):
        grads = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        loss, dh, dw, db = mlm_loss_forward(h, weight, bias, labels, h_m, weight_m, bias_m, alpha,
                                            chunk_size=chunk_size, triton_rows=triton_rows, grads=grads)
        ctx.save_for_backward(dh, dw, db)  # the gradients themselves, no (M, V) tensor
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("mlm_loss: a second backward through the same forward is not supported "
                               "(the gradients are computed in forward and scaled in place)")
        ctx.used = True
        dh, dw, db = ctx.saved_tensors
        # scaled in place: a (V, D) copy would double the largest buffer (Liger does the same)
        out = [g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in (dh, dw, db)]
        return (*out, None, None, None, None, None, None, None)


# --- public entry point ------------------------------------------------------------------------------
def mlm_loss(
    h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor,
    h_m: Tensor, weight_m: Tensor, bias_m: Tensor, alpha: float, *, chunk_size: int = CHUNK_SIZE,
) -> Tensor:
    """MLM + distillation loss over the masked positions; the maths is `mlm_loss_reference`'s.

    Args:
        h: (M, D) online hidden states at the masked positions (fp32/bf16/fp16), gradient flows.
        weight, bias: (V, D), (V,) online decoder (weight tied to the word embeddings), gradient flows.
        labels: (M,) int64 token ids in [0, V).
        h_m, weight_m, bias_m: (M, D), (V, D), (V,) momentum counterparts, no gradient.
        alpha: distillation weight in [0, 1].
        chunk_size: vocabulary rows per chunk on the chunked paths.
    Returns:
        () fp32 loss (the mean over the M rows); a graph-connected 0 when M = 0.
    Dispatch: Triton row kernels inside the chunked passes when the tensors are on CUDA, the op
    `mlm_loss` is enabled and (backend "triton", or M * V > FUSED_ABOVE); otherwise the chunked PyTorch
    path when M * V > CHUNKED_ABOVE (CPU) or FUSED_ABOVE (CUDA), else the reference.
    """
    if h.ndim != 2 or weight.ndim != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"mlm_loss: h {tuple(h.shape)} must be (M, D) and weight {tuple(weight.shape)} (V, D) "
                         "with the same D")
    if h_m.shape != h.shape or labels.shape != h.shape[:1] or weight_m.shape != weight.shape \
            or bias.shape != weight.shape[:1] or bias_m.shape != weight.shape[:1]:
        raise ValueError(
            f"mlm_loss: h {tuple(h.shape)}, h_m {tuple(h_m.shape)}, labels {tuple(labels.shape)}, "
            f"weight {tuple(weight.shape)}, weight_m {tuple(weight_m.shape)}, bias {tuple(bias.shape)}, "
            f"bias_m {tuple(bias_m.shape)} are inconsistent (expected (M, D), (M, D), (M,), (V, D), (V, D), (V,), (V,))"
        )
    if labels.dtype != torch.int64:
        raise TypeError(f"mlm_loss: labels must be int64, got {labels.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mlm_loss: alpha must be in [0, 1], got {alpha}")
    if chunk_size < 1:
        raise ValueError(f"mlm_loss: chunk_size must be >= 1, got {chunk_size}")
    M, V = h.shape[0], weight.shape[0]
    if M == 0:
        return mlm_loss_reference(h, weight, bias, labels, h_m, weight_m, bias_m, alpha)
    if not labels.is_cuda and (int(labels.min()) < 0 or int(labels.max()) >= V):
        raise ValueError(f"mlm_loss: labels must lie in [0, {V}), got [{int(labels.min())}, {int(labels.max())}]")
    # Under `auto`, the fused path is taken only where holding (M, V) logits costs real memory: at ALBEF's
    # shape (M=240, V=30522) the reference ran 1.34 ms vs 3.59 ms for the fused passes on an H200
    # (fp32; benchmarks/results/kernels.csv), with 29 MB of logits. A forced "triton" backend always fuses.
    if (use_triton("mlm_loss", h, weight, bias, labels, h_m, weight_m, bias_m) and _compute_dtype(h) in _TRITON_DTYPES
            and (_dispatch.backend() == "triton" or M * V > FUSED_ABOVE)):
        return MlmLossFunction.apply(h, weight, bias, labels, h_m, weight_m, bias_m, alpha, chunk_size, True)
    if M * V > (FUSED_ABOVE if h.is_cuda else CHUNKED_ABOVE):
        return MlmLossFunction.apply(h, weight, bias, labels, h_m, weight_m, bias_m, alpha, chunk_size, False)
    return mlm_loss_reference(h, weight, bias, labels, h_m, weight_m, bias_m, alpha)
