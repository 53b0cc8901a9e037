"""Image-text contrastive loss with momentum distillation (REFERENCE §2 steps 4-5), streamed over the queue.

For online queries q (B, D), momentum queries q_m (B, D), keys K = [k_m; queue] (N = B + Q, D):
    s   = q   K^T / temp          (B, N)   online similarities (gradient to q and temp)
    s_m = q_m K^T / temp          (B, N)   momentum similarities (no gradient)
    t   = alpha * softmax(s_m) + (1 - alpha) * onehot(i)      soft targets, positive = column i
    L   = mean_i  -sum_j t_ij * log_softmax(s)_ij
ALBEF averages the two directions: (L(image->text) + L(text->image)) / 2, where the image->text keys are
the momentum text features plus the text queue, and vice versa.

Identity that makes one pass enough (PERFORMANCE.md §1b; targets are constants, as in ALBEF). With
p = softmax(s_i), p^m = softmax(s^m_i), O_i = sum_j p_j k_j, O^m_i = sum_j p^m_j k_j (both (D,)), and
tgt_i = alpha O^m_i + (1 - alpha) k_i, using sum_j t_ij = 1:
    L_i       = LSE(s_i) - sum_j t_ij s_ij            = LSE_i - q_i . tgt_i / T
    dL_i/dq_i = sum_j (p_ij - t_ij) k_j / T           = (O_i - tgt_i) / T
    dL_i/dT   = -sum_j (p_ij - t_ij) q_i.k_j / T^2    = -(q_i . dL_i/dq_i) / T
So the loss and both gradients need, per row, one streaming softmax-weighted sum of the keys for the
online and for the momentum query: a FlashAttention forward with queries [q; q_m] (2B rows), K = V =
the keys, scale 1/T. Forward therefore also produces dq and dT (saved, O(B*D)); backward only scales
them by the incoming gradient.

Paths, all behind `itc_loss` (one direction) and `itc_loss_bidirectional` (both, one launch):
  reference  `itc_loss_reference`: several (B, N) fp32 tensors; the oracle, kept as written.
  triton     (CUDA, or the interpreter under use_backend("triton")) split-K ("flash-decoding"): program
             (rows, split s, direction) streams its chunk of the keys with an online log-sum-exp in
             registers and writes per-split (max, sum, O) partials; a combine kernel (one program per
             row and direction) merges the splits and writes loss rows, dq and dT rows; one torch sum
             reduces the rows. Split 0 also streams the in-batch keys and writes the (B, B) block.
  streaming  plain PyTorch, the same identity chunked over the queue (O(B*chunk + B*D) memory): the
             CPU fallback for large shapes (B * (B + Q) >= STREAMING_MIN_LOGITS) and for inputs the
             kernel does not cover.

Cost model (Triton, both directions): designed to read each queue once from HBM per call (the row
blocks of a split are launched side by side and share its keys through L2), plus the partials, S * 4B * D * 4 bytes written
and read once. FLOPs 4 * 2B * N * D per direction (two tensor-core GEMMs per key tile, online and
momentum rows), so 17.2 GFLOP at B = 64, Q = 65,536, D = 256: memory-bound below B ~ 150 on an H100
(report GB/s there), compute-bound above (report TFLOP/s).
Launches: forward = split-K kernel + combine kernel + one torch sum; backward = two elementwise ops.
At B = 64 the GPU work is ~20-30 us, so the host's launch overhead matters: the benchmark reports the
eager time and the time replayed from a CUDA graph.
Precision: fp32 accumulation throughout. bf16/fp16 queues run bf16/fp16 tensor-core dots (the queries
are rounded to the queue's dtype, softmax weights to the same before the P @ K product, as in
FlashAttention); fp32 queues use 3xTF32 dots (~fp32 accuracy). The interpreter always computes fp32.
Envelope (Triton): D <= 256, features and queues fp32/bf16/fp16 (each its own dtype), every feature of
one call in one dtype and the queues in one dtype, no gradient needed to q_m, keys_m or queue (ALBEF's
momentum tensors carry none), index spans < 2^31. Anything else runs the streaming or reference path.
Non-finite features are outside the envelope of every path but the reference.

References: ALBEF (arXiv:2107.07651) ITC with momentum distillation; FlashAttention-2 (online softmax,
arXiv:2307.08691); Flash-Decoding (split-K for few query rows); Inf-CL (arXiv:2410.17243).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from albef_kernels import _dispatch
from albef_kernels._dispatch import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # the reference and streaming paths still work without Triton
    triton = tl = None

STREAMING_MIN_LOGITS = 1 << 22
"""B * (B + Q) from which the PyTorch path streams (a (B, N) fp32 matrix of 16 MiB; the reference
keeps about ten of them alive)."""
STREAMING_CHUNK = 2048
"""Keys per step of the streaming path: (2B, chunk) fp32 temporaries, 4 MiB at B = 256."""
MAX_TRITON_DIM = 256


# --- reference: pure PyTorch; test oracle, benchmark baseline, small-shape CPU path ------------------
def itc_loss_reference(
    q: Tensor, q_m: Tensor, keys_m: Tensor, queue: Tensor, temp: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """Args:
        q: (B, D) L2-normalised online features (requires grad).
        q_m: (B, D) L2-normalised momentum features of the same samples.
        keys_m: (B, D) momentum features of the other modality (in-batch keys; row i is positive for q_i).
        queue: (Q, D) momentum features of the other modality from earlier steps.
        temp: () temperature (may require grad).
        alpha: distillation weight in [0, 1].
    Returns:
        loss: () mean over the batch.
        sim_inbatch: (B, B) detached s[:, :B], the logits of the in-batch keys.
    """
    B = q.shape[0]
    acc = torch.promote_types(q.dtype, torch.float32)
    # fp32 at least, also under autocast: ALBEF runs ITC in fp32 and it costs ~1 GFLOP per direction
    with torch.autocast(q.device.type, enabled=False):
        keys = torch.cat([keys_m, queue], dim=0).to(acc)  # (N, D)
        sim = q.to(acc) @ keys.t() / temp  # (B, N)
        with torch.no_grad():
            sim_m = q_m.to(acc) @ keys.t() / temp  # (B, N)
            targets = alpha * F.softmax(sim_m, dim=1)
            targets[:, :B] += (1.0 - alpha) * torch.eye(B, device=q.device, dtype=targets.dtype)
        loss = -(F.log_softmax(sim, dim=1) * targets).sum(dim=1).mean()
    return loss, sim[:, :B].detach()


# --- streaming PyTorch path: the same identity, chunked over the keys (CPU fallback for large shapes) --
Direction = tuple[Tensor, Tensor, Tensor, Tensor]  # (q, q_m, keys_m, queue) of one direction


@torch.no_grad()
def itc_loss_streaming_forward(
    directions: list[Direction], temp: Tensor, alpha: float, *, chunk: int = STREAMING_CHUNK
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss, in-batch block and gradients of each direction without any (B, B + Q) tensor.

    Args:
        directions: R tuples (q, q_m, keys_m, queue) of shapes (B, D), (B, D), (B, D), (Q, D).
        temp: () temperature tensor.
        alpha: distillation weight.
        chunk: keys per step (memory (2B, chunk) per temporary).
    Returns:
        loss: (R,) mean loss of each direction.
        sim: (R, B, B) in-batch logits s[:, :B].
        dq: (R, B, D) gradient of each direction's loss to its q.
        dtemp: (R,) gradient of each direction's loss to temp.
    """
    losses, sims, dqs, dtemps = [], [], [], []
    for q, q_m, keys_m, queue in directions:
        B = q.shape[0]
        acc = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            t = temp.to(acc)
            x = torch.stack([q, q_m]).to(acc)  # (2, B, D): online and momentum rows share every key
            xs = (x / t).view(2 * B, -1)  # scaled once: s = (x / T) K^T
            m = x.new_full((2 * B,), -math.inf)  # running max of each row's logits
            l = x.new_zeros(2 * B)  # running sum of exp(s - m)
            o = x.new_zeros(2 * B, x.shape[-1])  # running sum of exp(s - m) * k
            sim = None
            for keys in (keys_m, *queue.split(chunk)):
                if keys.shape[0] == 0:  # an empty queue splits into one empty chunk
                    continue
                k = keys.to(acc)
                s = xs @ k.t()  # (2B, C)
                if sim is None:
                    sim = s[:B].clone()
                m_new = torch.maximum(m, s.amax(dim=-1))
                scale = torch.exp(m - m_new)  # rescale what was summed under the old max
                p = s.sub_(m_new.unsqueeze(-1)).exp_()  # in place: one (2B, C) buffer per chunk
                l = l * scale + p.sum(dim=-1)
                o = torch.addmm(o * scale.unsqueeze(-1), p, k)
                m = m_new
            m, l, o = m.view(2, B), l.view(2, B), o.view(2, B, -1)
            lse = m[0] + torch.log(l[0])
            o = o / l.unsqueeze(-1)  # O and O^m
            tgt = alpha * o[1] + (1.0 - alpha) * keys_m.to(acc)
            qa = x[0]
            losses.append((lse - (qa * tgt).sum(-1) / t).mean())
            g = (o[0] - tgt) / t  # dL_i/dq_i
            dqs.append(g / B)
            dtemps.append(-(qa * g).sum() / t / B)
            sims.append(sim)
    return torch.stack(losses), torch.stack(sims), torch.stack(dqs), torch.stack(dtemps)


# --- Triton kernels --------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _itc_loss_fwd_kernel(
        Q0_ptr, QM0_ptr, K0_ptr, QU0_ptr,  # direction 0: q, q_m, keys_m (B, D) features; queue (Q, D)
        Q1_ptr, QM1_ptr, K1_ptr, QU1_ptr,  # direction 1 (the same tensors again when there is one)
        Temp_ptr,  # () temperature
        PartM_ptr,  # (R, 2, S, B) fp32: per split, running max of s * log2(e) of each row
        PartL_ptr,  # (R, 2, S, B) fp32: per split, sum of exp2(s*log2e - max)
        PartO_ptr,  # (R, 2, S, B, D) fp32: per split, sum of exp2(...) * k (unnormalised O)
        Sim_ptr,  # (R, B, B) fp32: in-batch logits of the online rows
        stride_q0, stride_qm0, stride_k0, stride_qu0,  # row strides (the last dim is contiguous)
        stride_q1, stride_qm1, stride_k1, stride_qu1,
        B, Q, CHUNK, S,  # batch, queue rows, queue rows per split, number of splits
        D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        LOWP_DOT: tl.constexpr,  # dots in the queue's 16-bit dtype (else fp32 inputs)
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 inputs ("tf32x3" on GPU, "ieee")
    ):
        # program id 0 runs fastest: the row blocks (online and momentum) of one split and direction
        # are launched side by side and read the same keys, which then come from L2.
        pid_r = tl.program_id(0)
        pid_s = tl.program_id(1)
        dirn = tl.program_id(2)
        n_rb = tl.cdiv(B, BLOCK_M)
        kind = pid_r // n_rb  # 0: online rows q, 1: momentum rows q_m
        rb = pid_r % n_rb
        if dirn == 0:
            Kb_ptr, stride_kb, Qu_ptr, stride_qu = K0_ptr, stride_k0, QU0_ptr, stride_qu0
            if kind == 0:
                X_ptr, stride_x = Q0_ptr, stride_q0
            else:
                X_ptr, stride_x = QM0_ptr, stride_qm0
        else:
            Kb_ptr, stride_kb, Qu_ptr, stride_qu = K1_ptr, stride_k1, QU1_ptr, stride_qu1
            if kind == 0:
                X_ptr, stride_x = Q1_ptr, stride_q1
            else:
                X_ptr, stride_x = QM1_ptr, stride_qm1
        if LOWP_DOT:
            dot_ty = QU0_ptr.dtype.element_ty
        else:
            dot_ty = tl.float32

        offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < B
        d_ok = offs_d < D  # constant-folded when D == BLOCK_D
        # padded rows load zeros: finite logits, never stored
        x = tl.load(X_ptr + offs_m[:, None] * stride_x + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(dot_ty)
        inv_t = 1.0 / tl.load(Temp_ptr).to(tl.float32)
        scale = inv_t * 1.4426950408889634  # log2(e): the online softmax runs on exp2
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        if pid_s == 0:  # the in-batch keys (column j = key j, the positive of row j)
            for start in range(0, B, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                n_ok = offs_n < B
                k = tl.load(Kb_ptr + offs_n[:, None] * stride_kb + offs_d[None, :],
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(dot_ty)
                s = tl.dot(x, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) fp32
                if kind == 0:
                    tl.store(Sim_ptr + dirn * B * B + offs_m[:, None] * B + offs_n[None, :], s * inv_t,
                             mask=row_ok[:, None] & n_ok[None, :])
                s = tl.where(n_ok[None, :], s * scale, float("-inf"))  # padded keys get no weight
                m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has one real key
                corr = tl.exp2(m_i - m_new)  # rescale of the sums taken under the old max
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * corr + tl.sum(p, 1)
                acc = acc * corr[:, None] + tl.dot(p.to(dot_ty), k, input_precision=PRECISION)
                m_i = m_new

        lo = pid_s * CHUNK
        hi = tl.minimum(lo + CHUNK, Q)
        for start in range(lo, hi, BLOCK_N):  # this split's queue rows
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            k = tl.load(Qu_ptr + offs_n[:, None] * stride_qu + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(dot_ty)
            s = tl.dot(x, tl.trans(k), input_precision=PRECISION)
            s = tl.where(n_ok[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            corr = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * corr + tl.sum(p, 1)
            acc = acc * corr[:, None] + tl.dot(p.to(dot_ty), k, input_precision=PRECISION)
            m_i = m_new

        part = ((dirn * 2 + kind) * S + pid_s) * B + offs_m  # (BLOCK_M,) index into (R, 2, S, B)
        tl.store(PartM_ptr + part, m_i, mask=row_ok)
        tl.store(PartL_ptr + part, l_i, mask=row_ok)
        tl.store(PartO_ptr + part.to(tl.int64)[:, None] * D + offs_d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _merge_splits(PartM_ptr, PartL_ptr, PartO_ptr, base, B, S, offs_d, d_ok,
                      D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        # Merge the S partials of one row: O = sum_s w_s O_s / sum_s w_s l_s with w_s = 2^(m_s - max);
        # returns (O (BLOCK_D,), log2-sum-exp2 of the row's scaled logits). `base` indexes split 0.
        mx = tl.full([], float("-inf"), tl.float32)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mx = tl.maximum(mx, tl.max(tl.load(PartM_ptr + base + offs_s * B, mask=offs_s < S,
                                               other=float("-inf")), 0))
        l_sum = tl.zeros([], tl.float32)
        o = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_ok = offs_s < S
            idx = base + offs_s * B
            w = tl.exp2(tl.load(PartM_ptr + idx, mask=s_ok, other=float("-inf")) - mx)  # 0 when padded
            l_sum += tl.sum(w * tl.load(PartL_ptr + idx, mask=s_ok, other=0.0), 0)
            o_s = tl.load(PartO_ptr + idx.to(tl.int64)[:, None] * D + offs_d[None, :],
                          mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            o += tl.sum(w[:, None] * o_s, 0)
        return o / l_sum, mx + tl.log2(l_sum)

    @triton.jit
    def _itc_loss_combine_kernel(
        PartM_ptr, PartL_ptr, PartO_ptr,  # partials of the forward kernel
        Q0_ptr, K0_ptr, Q1_ptr, K1_ptr,  # online queries and in-batch keys of each direction (B, D)
        stride_q0, stride_k0, stride_q1, stride_k1,
        Temp_ptr,  # () temperature
        Dq_ptr,  # (R, B, D) fp32: gradient of each direction's mean loss to its q
        Rows_ptr,  # (2, R, B) fp32: loss_i / B and dL_i/dT / B
        alpha, B, S,
        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        i = tl.program_id(0)
        dirn = tl.program_id(1)
        R = tl.num_programs(1)
        if dirn == 0:
            q_row, k_row = Q0_ptr + i * stride_q0, K0_ptr + i * stride_k0
        else:
            q_row, k_row = Q1_ptr + i * stride_q1, K1_ptr + i * stride_k1
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(q_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        k = tl.load(k_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        inv_t = 1.0 / tl.load(Temp_ptr).to(tl.float32)

        o, lse2 = _merge_splits(PartM_ptr, PartL_ptr, PartO_ptr, (dirn * 2 * S) * B + i, B, S, offs_d,
                                d_ok, D, BLOCK_S, BLOCK_D)
        o_m, _ = _merge_splits(PartM_ptr, PartL_ptr, PartO_ptr, ((dirn * 2 + 1) * S) * B + i, B, S, offs_d,
                               d_ok, D, BLOCK_S, BLOCK_D)
        tgt = alpha * o_m + (1.0 - alpha) * k  # sum_j t_ij k_j
        loss = lse2 * 0.6931471805599453 - tl.sum(q * tgt, 0) * inv_t  # LSE_i - q.tgt / T
        g = (o - tgt) * inv_t  # dL_i / dq_i
        dtemp = -tl.sum(q * g, 0) * inv_t  # dL_i / dT
        tl.store(Dq_ptr + (dirn * B + i) * D + offs_d, g / B, mask=d_ok)
        tl.store(Rows_ptr + dirn * B + i, loss / B)
        tl.store(Rows_ptr + (R + dirn) * B + i, dtemp / B)

    if not _dispatch.interpreting():  # autotune needs a GPU driver; the interpreter keeps one config
        _itc_loss_fwd_kernel = triton.autotune(
            # fp32 keys with 3xTF32 dots need ~4x the shared memory of bf16 ones: at D=256 only the
            # small tiles fit in Hopper's 227 KB (checked by compiling for sm_90 offline; the
            # autotuner drops the configs that do not fit).
            configs=[
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
                triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
                triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
                triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
                triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
            ],
            key=["B", "CHUNK", "D", "LOWP_DOT"],
        )(_itc_loss_fwd_kernel)


# --- launchers: shape/dtype/device validation lives here, not in the kernels --------------------------
_LOWP = (torch.bfloat16, torch.float16)
_TRITON_DTYPES = (torch.float32, *_LOWP)
_QUEUE_ALIGN = 128  # a split's queue rows are a multiple of every BLOCK_N


def _validate(directions: list[Direction]) -> None:
    first = directions[0][0]
    for r, (q, q_m, keys_m, queue) in enumerate(directions):
        if (q.ndim != 2 or q.shape != q_m.shape or q.shape != keys_m.shape or queue.ndim != 2
                or queue.shape[1:] != q.shape[1:] or q.shape != first.shape):
            raise ValueError(
                f"itc_loss expects q, q_m, keys_m of one shape (B, D) and queue (Q, D), the same B and D in "
                f"both directions; got q={tuple(q.shape)}, q_m={tuple(q_m.shape)}, "
                f"keys_m={tuple(keys_m.shape)}, "
                f"queue={tuple(queue.shape)} (direction {r})"
            )
    if first.shape[0] == 0:
        raise ValueError("itc_loss needs at least one query row (B >= 1), got B=0")


def _triton_fits(directions: list[Direction], temp: Tensor) -> bool:
    """Inside the kernel's envelope (see the module docstring)."""
    feats = [t for d in directions for t in d[:3]]
    queues = [d[3] for d in directions]
    B, D = feats[0].shape
    Q = max(qu.shape[0] for qu in queues)
    return (
        D <= MAX_TRITON_DIM
        and len({t.dtype for t in feats}) == 1 and feats[0].dtype in _TRITON_DTYPES
        and len({t.dtype for t in queues}) == 1 and queues[0].dtype in _TRITON_DTYPES
        and len({qu.shape[0] for qu in queues}) == 1
        and temp.numel() == 1 and temp.is_floating_point()
        and len({t.device for t in (*feats, *queues, temp)}) == 1
        # int32 element offsets inside the kernels (the partials of O use int64)
        and all((t.shape[0] - 1) * t.stride(0) + D < 2**31 for t in (*feats, *queues) if t.shape[0])
        and 4 * B * (Q // _QUEUE_ALIGN + 1) < 2**31
    )


def _row_major(t: Tensor) -> Tensor:
    """Rows may be strided (a slice of a bigger buffer); elements inside a row must be contiguous."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _num_splits(rows: int, Q: int, device: torch.device, directions: int) -> int:
    """Queue splits so that the programs (2 row kinds x row blocks x splits x directions) cover the GPU
    about twice. More splits: more parallelism, but more partials (S * 4B * D * 4 bytes) to write and
    merge; benchmarks/kernels/bench_itc_loss.py --splits measures the trade-off."""
    if Q == 0:
        return 1
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8  # the interpreter: a handful of programs
    programs_per_split = 2 * triton.cdiv(rows, 64) * directions  # at the smaller BLOCK_M
    return max(1, min(triton.cdiv(Q, _QUEUE_ALIGN), target // programs_per_split))


def itc_loss_forward(
    directions: list[Direction], temp: Tensor, alpha: float, *, splits: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton forward of one or two directions in one launch (+ combine + one sum).

    Args:
        directions: R in {1, 2} tuples (q, q_m, keys_m, queue): (B, D) features, (Q, D) queue.
        temp: () temperature on the same device (read by the kernel, never by the host).
        alpha: distillation weight.
        splits: number of queue splits (default: fill the GPU about twice).
    Returns:
        loss (R,), sim (R, B, B) fp32, dq (R, B, D) fp32, dtemp (R,) fp32, as
        `itc_loss_streaming_forward`.
    """
    R = len(directions)
    if R not in (1, 2):
        raise ValueError(f"itc_loss_forward takes 1 or 2 directions, got {R}")
    _validate(directions)
    if not _triton_fits(directions, temp):
        raise ValueError("itc_loss_forward: inputs outside the Triton envelope (see the module docstring)")
    dirs = [tuple(_row_major(t) for t in d) for d in directions]
    if R == 1:
        dirs = dirs * 2  # the kernel takes two directions; grid axis 2 launches only the first
    (q0, qm0, k0, qu0), (q1, qm1, k1, qu1) = dirs
    B, D = q0.shape
    Q = qu0.shape[0]
    device = q0.device
    S = splits or _num_splits(B, Q, device, R)
    chunk = triton.cdiv(triton.cdiv(Q, S), _QUEUE_ALIGN) * _QUEUE_ALIGN if Q else _QUEUE_ALIGN
    S = max(1, triton.cdiv(Q, chunk))
    temp32 = temp.detach().reshape(()).to(torch.float32)
    interp = _dispatch.interpreting()
    lowp = qu0.dtype in _LOWP and not interp  # bf16 tl.dot is wrong in the interpreter: fp32 there
    BLOCK_D = max(16, triton.next_power_of_2(D))
    # fp32 dots as 3xTF32 on the GPU (~fp32 accuracy at tensor-core speed); 16-bit dots take the default
    precision = "ieee" if interp else ("tf32" if lowp else "tf32x3")

    part_m = torch.empty(R, 2, S, B, device=device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_o = torch.empty(R, 2, S, B, D, device=device, dtype=torch.float32)
    sim = torch.empty(R, B, B, device=device, dtype=torch.float32)
    meta = {} if not interp else {"BLOCK_M": 16, "BLOCK_N": 16}
    grid = lambda META: (2 * triton.cdiv(B, META["BLOCK_M"]), S, R)  # noqa: E731
    _itc_loss_fwd_kernel[grid](
        q0, qm0, k0, qu0, q1, qm1, k1, qu1, temp32, part_m, part_l, part_o, sim,
        q0.stride(0), qm0.stride(0), k0.stride(0), qu0.stride(0),
        q1.stride(0), qm1.stride(0), k1.stride(0), qu1.stride(0),
        B, Q, chunk, S, D=D, BLOCK_D=BLOCK_D, LOWP_DOT=lowp, PRECISION=precision, **meta,
    )
    dq = torch.empty(R, B, D, device=device, dtype=torch.float32)
    rows = torch.empty(2, R, B, device=device, dtype=torch.float32)
    _itc_loss_combine_kernel[(B, R)](
        part_m, part_l, part_o, q0, k0, q1, k1, q0.stride(0), k0.stride(0), q1.stride(0), k1.stride(0),
        temp32, dq, rows, float(alpha), B, S, D=D, BLOCK_S=min(16, triton.next_power_of_2(S)),
        BLOCK_D=BLOCK_D, num_warps=4 if BLOCK_D >= 128 else 1,
    )
    loss, dtemp = rows.sum(dim=-1)  # (2, R): the mean loss and dL/dT of each direction (fixed order)
    return loss, sim, dq, dtemp


# --- autograd ---------------------------------------------------------------------------------------
class ITCLossFunction(torch.autograd.Function):
    """Forward computes the loss and the gradients (to q of each direction and to temp); backward
    scales them by the incoming gradient. Inputs: temp, alpha, path ("triton" | "streaming"), then
    q, q_m, keys_m, queue for each direction. Outputs: loss (R,), sim (R, B, B) (not differentiable)."""

    @staticmethod
    def forward(ctx, temp: Tensor, alpha: float, path: str, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        directions = [tuple(tensors[i:i + 4]) for i in range(0, len(tensors), 4)]
        forward = itc_loss_forward if path == "triton" else itc_loss_streaming_forward
        loss, sim, dq, dtemp = forward(directions, temp, alpha)
        ctx.save_for_backward(dq, dtemp)
        ctx.temp_meta = (temp.shape, temp.dtype)
        ctx.q_dtypes = [d[0].dtype for d in directions]
        ctx.mark_non_differentiable(sim)
        return loss, sim

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, grad_sim: Tensor | None):
        dq, dtemp = ctx.saved_tensors
        g = grad_loss.to(dq.dtype)  # (R,)
        grads: list[Tensor | None] = [None, None, None]
        if ctx.needs_input_grad[0]:
            shape, dtype = ctx.temp_meta
            grads[0] = torch.dot(dtemp, g).reshape(shape).to(dtype)
        need_q = [ctx.needs_input_grad[3 + 4 * r] for r in range(len(ctx.q_dtypes))]
        scaled = dq * g[:, None, None] if any(need_q) else None  # one launch for both directions
        for r, q_dtype in enumerate(ctx.q_dtypes):
            grads += [scaled[r].to(q_dtype) if need_q[r] else None, None, None, None]
        return tuple(grads)


# --- public entry points ----------------------------------------------------------------------------
def _kernels_enabled(op: str) -> bool:
    """The op is neither switched off (ALBEF_KERNELS=torch, kernels.disable) nor forced to the reference."""
    return _dispatch.backend() != "torch" and op not in _dispatch._disabled


def _choose_path(directions: list[Direction], temp: Tensor) -> str:
    tensors = [t for d in directions for t in d]
    if torch.is_grad_enabled() and any(t.requires_grad for d in directions for t in d[1:]):
        return "reference"  # a gradient to the momentum side is outside the fused identity
    if use_triton("itc_loss", *tensors, temp) and _triton_fits(directions, temp):
        return "triton"
    q, queue = directions[0][0], directions[0][3]
    B, Q = q.shape[0], queue.shape[0]
    if _kernels_enabled("itc_loss") and B * (B + Q) >= STREAMING_MIN_LOGITS:
        return "streaming"
    return "reference"


def _as_tensor(temp: Tensor | float, like: Tensor) -> Tensor:
    return temp if isinstance(temp, Tensor) else torch.tensor(float(temp), device=like.device)


def itc_loss(
    q: Tensor, q_m: Tensor, keys_m: Tensor, queue: Tensor, temp: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """Contrastive loss of one direction; see `itc_loss_reference` for arguments and shapes.

    Runs the Triton kernel on CUDA tensors (unless switched off), the streaming PyTorch path for
    large shapes elsewhere, the reference otherwise; all agree to rounding."""
    directions = [(q, q_m, keys_m, queue)]
    _validate(directions)
    temp = _as_tensor(temp, q)
    path = _choose_path(directions, temp)
    if path == "reference":
        return itc_loss_reference(q, q_m, keys_m, queue, temp, alpha)
    loss, sim = ITCLossFunction.apply(temp, alpha, path, q, q_m, keys_m, queue)
    return loss[0], sim[0]


def itc_loss_bidirectional(
    image_feat: Tensor, image_feat_m: Tensor, text_feat: Tensor, text_feat_m: Tensor,
    image_queue: Tensor, text_queue: Tensor, temp: Tensor, alpha: float,
) -> tuple[Tensor, Tensor]:
    """Both ITC directions of ALBEF, in one kernel launch on the Triton path.

    Args:
        image_feat, text_feat: (B, D) L2-normalised online features (require grad).
        image_feat_m, text_feat_m: (B, D) momentum features.
        image_queue, text_queue: (Q, D) momentum feature queues.
        temp: () temperature (may require grad).
        alpha: distillation weight in [0, 1].
    Returns:
        loss: (2,) [image->text, text->image] mean losses; ALBEF's ITC loss is loss.mean().
        sim: (2, B, B) detached in-batch logits [sim_i2t, sim_t2i] (row = query, column = key).
    """
    directions = [(image_feat, image_feat_m, text_feat_m, text_queue),
                  (text_feat, text_feat_m, image_feat_m, image_queue)]
    _validate(directions)
    temp = _as_tensor(temp, image_feat)
    path = _choose_path(directions, temp)
    if path == "reference":
        out = [itc_loss_reference(*d, temp, alpha) for d in directions]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
    args = [t for d in directions for t in d]
    return ITCLossFunction.apply(temp, alpha, path, *args)
