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
  triton     (CUDA, or the interpreter under use_backend("triton")) split-K ("flash-decoding"): the
             rows of a direction are X = [q; q_m] (2B rows sharing every key); program (row block of X,
             split s, direction) streams its chunk of the queue with an online log-sum-exp in registers
             and writes per-split (max, sum, O) partials; the B in-batch keys (and the (B, B) block) are
             the combine kernel's up to B = INBATCH_IN_COMBINE_MAX_B (fp32 logits), else one more launch
             of the split kernel (INBATCH) writing one more partial; a combine kernel (one program per
             sample and direction) merges them and writes dq and the loss and dT rows, and the last of
             its programs to arrive (an atomic counter, zeroed by the forward kernel) sums the rows in a
             fixed order.
  streaming  plain PyTorch, the same identity chunked over the queue (O(B*chunk + B*D) memory): the
             CPU path from B * (B + Q) >= STREAMING_MIN_LOGITS_CPU (faster there than the reference),
             elsewhere the fallback for large shapes (B * (B + Q) >= STREAMING_MIN_LOGITS) and for
             inputs the kernel does not cover.

Cost model (Triton, both directions): designed to read each queue once from HBM per call (the row
blocks of a split are launched side by side and share its keys through L2; at B = 64 one 128-row
block holds a whole direction), plus the partials, S * 4B * D * 4 bytes written and read once.
FLOPs 4 * 2B * N * D per direction (two tensor-core GEMMs per key tile, online and momentum rows), so
17.2 GFLOP at B = 64, Q = 65,536, D = 256: memory-bound below B ~ 150 on an H100 (report GB/s there),
compute-bound above (report TFLOP/s).
Launches: forward = split-K kernel + combine kernel, plus the INBATCH launch above B = 128 (no torch op;
tests/unit/test_itc_kernel.py counts them); backward = one kernel (both queries' gradients and temp's)
when eager, two elementwise torch ops (dot for temp, one product for both queries) under torch.compile,
which fuses them. At B = 64 the GPU
work is tens of us, so the host's launch overhead matters: the benchmark reports the eager time and the
time replayed from a CUDA graph, and whole-step capture is the lever. torch.compile: the fused paths
are registered as the op `torch.ops.albef_kernels.itc_loss` (fake implementation + backward), used
when compiling (no graph break); eager calls take an autograd.Function around the same code, whose
host path is cheaper than the registered op's Python dispatch.
Precision: fp32 accumulation throughout. bf16/fp16 queues run bf16/fp16 tensor-core dots (the queries
are rounded to the queue's dtype, softmax weights to the same before the P @ K product, as in
FlashAttention); fp32 queues use 3xTF32 dots (~fp32 accuracy); in the combine kernel (B <= 128) the
in-batch keys are fp32 CUDA-core dot products. The interpreter always computes fp32.
Envelope (Triton): D <= 256, features and queues fp32/bf16/fp16 (each its own dtype), every feature of
one call in one dtype and the queues in one dtype, no gradient needed to q_m, keys_m or queue (ALBEF's
momentum tensors carry none), index spans < 2^31. Anything else runs the streaming or reference path.
Non-finite features are outside the envelope of every path but the reference.

References: ALBEF (arXiv:2107.07651) ITC with momentum distillation; FlashAttention-2 (online softmax,
arXiv:2307.08691); Flash-Decoding (split-K for few query rows); Inf-CL (arXiv:2410.17243).
"""

import functools
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

    try:  # host-built TMA descriptors (Triton >= 3.3); without them the queue tiles load through pointers
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        TensorDescriptor = None
else:  # the reference and streaming paths still work without Triton
    triton = tl = None

STREAMING_MIN_LOGITS = 1 << 22
"""B * (B + Q) from which the PyTorch path streams off the CPU (a (B, N) fp32 matrix of 16 MiB; the
reference keeps about ten of them alive)."""
STREAMING_MIN_LOGITS_CPU = 1 << 13
"""The same on the CPU, where streaming is also the faster path: it reads each queue once (a chunk is
reused from cache for its second product) and computes the gradients in the forward, where the reference
copies the queue into [keys; queue] and reads it three times (two products forward, one backward).
Dev CPU, 2 threads, fwd+bwd of both directions, Q=65,536 (bench_itc_loss.py --cpu-memory --cpu-batch B
--dim D --cpu-rep 7): B=8, D=64 25.6 -> 17.6 ms; B=32, D=64 52.4 -> 28.7 ms; B=8, D=256 106.0 -> 36.8 ms.
Below ~8k logits the two were equal within noise in an ad-hoc sweep (B=8, Q=256: 0.6 ms each)."""
STREAMING_CHUNK = 2048
"""Keys per step of the streaming path: (2B, chunk) fp32 temporaries, 4 MiB at B = 256."""
MAX_TRITON_DIM = 256
INBATCH_IN_COMBINE_MAX_B = 128
"""Up to this batch the combine kernel streams the in-batch keys itself (each of its R * B programs loads
all B keys: 8 MB at B = 64, 0.5 GB at B = 512); above it they are a launch of the split kernel's INBATCH
specialisation."""


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


# --- streaming PyTorch path: the same identity, chunked over the keys (the CPU path; elsewhere a fallback)
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
            out = _from_softmax_sums(x[0], m[0] + torch.log(l[0]), o / l.unsqueeze(-1), keys_m.to(acc), t, alpha)
            for results, r in zip((losses, dqs, dtemps), out):
                results.append(r)
            sims.append(sim)
    return torch.stack(losses), torch.stack(sims), torch.stack(dqs), torch.stack(dtemps)


def _from_softmax_sums(q: Tensor, lse: Tensor, o: Tensor, keys_m: Tensor, t: Tensor, alpha: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """One direction's mean loss, d(mean loss)/dq and d(mean loss)/dT from the identity's per-row sums.

    Args:
        q: (B, D) online queries.  lse: (B,) log-sum-exp of their logits over all keys.
        o: (2, B, D) O (online rows) and O^m (momentum rows), the softmax-weighted means of the keys.
        keys_m: (B, D) in-batch keys (row i is the positive of row i).  t: () temperature.
    """
    B = q.shape[0]
    tgt = alpha * o[1] + (1.0 - alpha) * keys_m  # sum_j t_ij k_j
    g = (o[0] - tgt) / t  # dL_i/dq_i
    loss = (lse - (q * tgt).sum(-1) / t).mean()
    return loss, g / B, -(q * g).sum() / t / B


# --- SDPA path: O and LSE from PyTorch's fused attention kernels (a candidate, opt-in) --------------
# The identity's sums are an attention forward with queries [q; q_m] / T and K = V = the keys, so any
# flash-attention kernel that returns the log-sum-exp computes them (cuDNN's on Hopper is FA3-class).
# The queue is cut into equal chunks that go in as the attention's batch (a view, no copy) with the
# same queries for each, so a few hundred query rows still fill the GPU (split-K by batching); a ragged
# tail chunk and the B in-batch keys (whose logits are also the (B, B) block the hard-negative sampler
# needs) run separately, and the partial (O, LSE) merge in fp32. Not chosen by `_choose_path`: a
# benchmark candidate for the B = 64 target (bench_itc_loss.py --providers sdpa_cudnn ...) until a GPU
# run shows it beats the Triton path. Backward is the fused paths' (the forward holds dq and dT).
SDPA_BACKENDS = ("cudnn", "flash", "efficient", "cpu")
_SDPA_COPY_QUERIES: set[str] = set()  # backends seen to refuse the expanded (stride-0) query batch


def _attend(x: Tensor, keys: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """softmax(x keys^T) keys and its log-sum-exp per row, unscaled, for x (N, L, D), keys (N, M, D)
    (one head; N independent problems). Returns O (N, L, D) in x's dtype and LSE (N, L), fp32 at least."""
    xq, k = x.unsqueeze(1), keys.unsqueeze(1)  # (N, 1, L, D): batch, heads, sequence, dim
    aten = torch.ops.aten
    if backend == "cudnn":
        o, lse = aten._scaled_dot_product_cudnn_attention(xq, k, k, None, True, 0.0, False, False, scale=1.0)[:2]
    elif backend == "flash":
        o, lse = aten._scaled_dot_product_flash_attention(xq, k, k, 0.0, False, False, scale=1.0)[:2]
    elif backend == "efficient":
        o, lse = aten._scaled_dot_product_efficient_attention(xq, k, k, None, True, 0.0, False, scale=1.0)[:2]
    elif backend == "cpu":
        o, lse = aten._scaled_dot_product_flash_attention_for_cpu(xq, k, k, 0.0, False, scale=1.0)
    else:
        raise ValueError(f"SDPA backend must be one of {SDPA_BACKENDS}, got {backend!r}")
    L = x.shape[1]
    lse = lse.reshape(x.shape[0], -1)[:, :L]  # the efficient kernel pads L to a multiple of 32
    return o.reshape(x.shape), lse.to(torch.promote_types(x.dtype, torch.float32))


def _sdpa_chunk(Q: int, rows: int, device: torch.device) -> int:
    """Queue rows per chunk: about two programs per SM at 128 query rows per program, chunks of at
    least 512 rows (a multiple of 128)."""
    target = 2 * _sm_count(device) if device.type == "cuda" else 4
    chunks = max(1, target // math.ceil(rows / 128))
    return max(512, math.ceil(Q / chunks / 128) * 128)


def _attend_chunks(xq: Tensor, queue: Tensor, size: int, name: str) -> list[tuple[Tensor, Tensor]]:
    """(O, LSE) of the queries xq (2B, D) against the queue in chunks of `size` rows: the equal chunks as
    one batched call ((n, 2B, D) and (n, 2B), the queue a view, the queries expanded with stride 0),
    then the ragged tail if any ((1, 2B, D) and (1, 2B))."""
    Q, D = queue.shape
    n_main = Q // size
    parts = []
    if n_main:
        xb, kb = xq.expand(n_main, -1, -1), queue[: n_main * size].view(n_main, size, D)
        if name in _SDPA_COPY_QUERIES:
            xb = xb.contiguous()
        try:
            parts.append(_attend(xb, kb, name))
        except RuntimeError:  # a kernel that refuses a stride-0 batch: copy the queries (from then on)
            if name in _SDPA_COPY_QUERIES or xb.stride(0) != 0:
                raise
            parts.append(_attend(xb.contiguous(), kb, name))
            _SDPA_COPY_QUERIES.add(name)  # only once the copy worked: not for an error of another kind
    if Q > n_main * size:
        parts.append(_attend(xq[None], queue[n_main * size:][None], name))
    return parts


@torch.no_grad()
def itc_loss_sdpa_forward(
    directions: list[Direction], temp: Tensor, alpha: float, *, backend: str | None = None,
    chunk: int | None = None, fuse: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`itc_loss_streaming_forward`'s contract, the queue's share computed by `_attend`.

    Args:
        backend: one of SDPA_BACKENDS (default: "cudnn" on CUDA, "cpu" elsewhere). "flash" takes
            16-bit queues only.
        chunk: queue rows per batched attention problem (default `_sdpa_chunk`).
        fuse: the in-batch keys, the merge and the identity's tail in the Triton combine kernel (one
            launch for both directions) instead of torch ops; default: where the Triton path could run
            (CUDA, or the interpreter under use_backend("triton")) and the chunks divide the queue.
    The queries are rounded to the queue's dtype for the attention (as the Triton path does on the
    GPU); the in-batch logits, the merge and the tail are fp32.
    """
    q0, queue0 = directions[0][0], directions[0][3]
    B, D = q0.shape
    Q = queue0.shape[0]
    size = chunk or _sdpa_chunk(Q, 2 * B, q0.device)
    name = backend or ("cudnn" if q0.is_cuda else "cpu")
    if fuse is None:
        fuse = (Q % size == 0 and _dispatch.enabled("itc_loss", *(t for d in directions for t in d), temp)
                and _triton_fits(directions, temp))
    elif fuse and Q % size:
        raise ValueError(f"the fused SDPA tail needs chunks that divide the queue: Q={Q}, chunk={size}")
    if fuse:
        return _sdpa_fused(directions, temp, alpha, size, name)
    losses, sims, dqs, dtemps = [], [], [], []
    for q, q_m, keys_m, queue in directions:
        acc = torch.promote_types(q.dtype, torch.float32)
        queue = _row_major(queue)
        with torch.autocast(q.device.type, enabled=False):
            t = temp.to(acc)
            x = torch.cat([q, q_m]).to(acc)  # (2B, D)
            xs = x / t
            km = keys_m.to(acc)
            s_b = xs @ km.t()  # (2B, B) in-batch logits, fp32
            lses = [torch.logsumexp(s_b, dim=1)[None]]
            outs = [(torch.softmax(s_b, dim=1) @ km)[None]]
            for o, lse in _attend_chunks(xs.to(queue.dtype), queue, size, name):
                outs.append(o.to(acc))
                lses.append(lse)
            lse_parts = torch.cat(lses)  # (P, 2B)
            lse = torch.logsumexp(lse_parts, dim=0)  # (2B,)
            w = torch.exp(lse_parts - lse)  # each part's share of the row's softmax mass
            o = torch.einsum("pr,prd->rd", w, torch.cat(outs)).view(2, B, D)
            out = _from_softmax_sums(x[:B], lse[:B], o, km, t, alpha)
        for results, r in zip((losses, dqs, dtemps), out):
            results.append(r)
        sims.append(s_b[:B])
    return torch.stack(losses), torch.stack(sims), torch.stack(dqs), torch.stack(dtemps)


def _sdpa_fused(directions: list[Direction], temp: Tensor, alpha: float, size: int, name: str
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The SDPA path with the Triton combine kernel: per direction the scaled queries (one cat, one
    divide, one cast) and the batched attention, then one combine launch for both directions (in-batch
    keys, merge, loss, dq, dT). The chunks divide the queue (no tail)."""
    R = len(directions)
    dirs = [tuple(_row_major(t) for t in d) for d in directions]
    B, D = dirs[0][0].shape
    device = dirs[0][0].device
    S = dirs[0][3].shape[0] // size  # the chunks (the queue splits into them exactly)
    partials = []
    for q, q_m, _, queue in dirs:
        acc = torch.promote_types(q.dtype, torch.float32)
        xq = (torch.cat([q, q_m]).to(acc) / temp.to(acc)).to(queue.dtype)  # (2B, D) [q; q_m] / T, rounded once
        parts = _attend_chunks(xq, queue, size, name)
        if parts:
            o, lse = parts[0]
            partials.append((lse, lse, o.contiguous()))  # no sum: O is normalised (HAS_L=False)
        else:  # an empty queue: the in-batch keys alone (S = 0; the pointers are never read)
            partials.append((q, q, q))
    if R == 1:
        dirs, partials = dirs * 2, partials * 2
    lse0 = partials[0][0]
    loss = torch.empty(R, device=device, dtype=torch.float32)
    dtemp = torch.empty(R, device=device, dtype=torch.float32)
    dq = torch.empty(R, B, D, device=device, dtype=torch.float32)
    sim = torch.empty(R, B, B, device=device, dtype=torch.float32)
    rows = torch.empty(2 * R * B, device=device, dtype=torch.float32)
    counters = torch.zeros(R, device=device, dtype=torch.int32)
    _combine(partials, lse0.stride(0) if S else 0, 2 * B * D, math.log2(math.e), False, dirs, temp, sim, rows,
             dq, loss, dtemp, counters, alpha, S, max(16, triton.next_power_of_2(D)))
    return loss, sim, dq, dtemp


# --- Triton kernels --------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _itc_loss_fwd_kernel(
        Q0_ptr, QM0_ptr, QU0,  # direction 0: q, q_m (B, D) features; queue (Q, D): a pointer, or a TMA
        Q1_ptr, QM1_ptr, QU1,  # descriptor with USE_TMA; direction 1 likewise
        K0_ptr, K1_ptr,  # in-batch keys of each direction (B, D) (INBATCH only)
        Sim_ptr,  # (R, B, B) fp32: in-batch logits of the online rows (INBATCH only)
        Temp_ptr,  # () temperature
        Work_ptr,  # fp32 workspace: PartM, PartL (R, S, ROWS) each, PartO (R, S, ROWS, D); see _triton_forward
        PO,  # with USE_TMA: a TMA descriptor of PartO as (R * S * ROWS, D), block [BLOCK_M, BLOCK_D]
        Count_ptr,  # (R,) int32: the combine kernel's arrival counters, zeroed here
        stride_q0, stride_qm0, stride_qu0, stride_k0,  # row strides (the last dim is contiguous)
        stride_q1, stride_qm1, stride_qu1, stride_k1,
        B, Q, CHUNK, S, ROWS,  # batch, queue rows, queue rows per split, partial slots, rows per slot
        D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        LOWP_DOT: tl.constexpr,  # dots in the queue's 16-bit dtype (else fp32 inputs)
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 inputs ("tf32x3" on GPU, "ieee")
        QUEUE_DTYPE: tl.constexpr,  # the queues' element type
        USE_TMA: tl.constexpr,  # queue tiles in and the O partial out through TMA descriptors, or pointers
        INBATCH: tl.constexpr,  # this launch streams the B in-batch keys into slot S - 1 (grid (rows, 1, R))
    ):
        # The rows of a direction are X = [q; q_m] (2B rows): online and momentum queries share every
        # key, so one program takes up to BLOCK_M of them and loads each key tile once for both (at
        # B = 64 a 128-row block holds the whole direction: 2 x S programs in all). Program id 0 runs
        # fastest: the row blocks of one split are launched side by side and share its keys in L2.
        # The queue splits and the in-batch keys are separate specialisations (INBATCH): each compiled
        # kernel holds one loop in registers (with the O partial stored through TMA: 88 B of spill at
        # 128 x 64 on sm_90 against ~1.1 KB with both loops in one kernel and a pointer store, and 496 B
        # with both as branches of one kernel; benchmarks/kernels/sm90_resources.py; in the SASS the queue
        # loop was (1 LDL) and is spill-free, the spills sat in the in-batch loop and the epilogue), and every
        # queue split does the same work (split 0 used to carry the B in-batch keys on the critical path).
        pid_r = tl.program_id(0)
        pid_s = tl.program_id(1)
        dirn = tl.program_id(2)
        if dirn == 0:
            Q_ptr, QM_ptr, stride_q, stride_qm, Qu, stride_qu = Q0_ptr, QM0_ptr, stride_q0, stride_qm0, QU0, stride_qu0
        else:
            Q_ptr, QM_ptr, stride_q, stride_qm, Qu, stride_qu = Q1_ptr, QM1_ptr, stride_q1, stride_qm1, QU1, stride_qu1
        if LOWP_DOT:
            dot_ty = QUEUE_DTYPE
        else:
            dot_ty = tl.float32
        if (pid_r == 0) & (pid_s == 0) & (not INBATCH):  # the combine kernel runs after this one (same stream)
            tl.store(Count_ptr + dirn, 0)

        offs_r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)  # row of X
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_r < 2 * B
        is_m = offs_r >= B  # a momentum row
        offs_i = tl.where(is_m, offs_r - B, offs_r)  # its sample
        d_ok = offs_d < D  # constant-folded when D == BLOCK_D
        # a block may straddle q and q_m: two masked loads, each row from one of them; padded rows load
        # zeros (finite partials, never read)
        on_ok = (row_ok & (offs_r < B))[:, None] & d_ok[None, :]
        mo_ok = (row_ok & is_m)[:, None] & d_ok[None, :]
        x = (tl.load(Q_ptr + offs_i[:, None] * stride_q + offs_d[None, :], mask=on_ok, other=0.0)
             + tl.load(QM_ptr + offs_i[:, None] * stride_qm + offs_d[None, :], mask=mo_ok, other=0.0))
        x = x.to(dot_ty)
        inv_t = 1.0 / tl.load(Temp_ptr).to(tl.float32)
        scale = inv_t * 1.4426950408889634  # log2(e): the online softmax runs on exp2
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        if INBATCH:  # key j is sample j's positive; its logits with the online rows are the (B, B) block
            if dirn == 0:
                Kb_ptr, stride_kb = K0_ptr, stride_k0
            else:
                Kb_ptr, stride_kb = K1_ptr, stride_k1
            slot = S - 1
            for start in range(0, B, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                n_ok = offs_n < B
                k = tl.load(Kb_ptr + offs_n[:, None] * stride_kb + offs_d[None, :],
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(dot_ty)
                s = tl.dot(x, tl.trans(k), input_precision=PRECISION)
                tl.store(Sim_ptr + dirn * B * B + offs_i[:, None] * B + offs_n[None, :], s * inv_t,
                         mask=(row_ok & (offs_r < B))[:, None] & n_ok[None, :])  # online rows only
                m_i, l_i, acc = _softmax_tile(s, n_ok, scale, k, m_i, l_i, acc, dot_ty, PRECISION)
        else:
            slot = pid_s
            lo = pid_s * CHUNK
            hi = tl.minimum(lo + CHUNK, Q)
            for start in range(lo, hi, BLOCK_N):  # this split's queue rows
                offs_n = start + tl.arange(0, BLOCK_N)
                n_ok = offs_n < hi
                if USE_TMA:  # rows past Q and columns past D arrive as zeros; no address registers per element
                    k = Qu.load([start, 0]).to(dot_ty)
                else:
                    k = tl.load(Qu + offs_n[:, None] * stride_qu + offs_d[None, :],
                                mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(dot_ty)
                s = tl.dot(x, tl.trans(k), input_precision=PRECISION)
                m_i, l_i, acc = _softmax_tile(s, n_ok, scale, k, m_i, l_i, acc, dot_ty, PRECISION)

        # the partials of (direction, slot): rows [q; q_m] contiguous, ROWS (a multiple of every BLOCK_M)
        # per slot, so a program's tile never reaches the next slot's rows
        n_part = S * ROWS * tl.num_programs(2)  # elements of PartM (and of PartL)
        row0 = (dirn * S + slot) * ROWS
        tl.store(Work_ptr + row0 + offs_r, m_i, mask=row_ok)
        tl.store(Work_ptr + n_part + row0 + offs_r, l_i, mask=row_ok)
        if USE_TMA:  # columns past D are clipped; the padded rows are written and never read
            PO.store([row0 + pid_r * BLOCK_M, 0], acc)
        else:
            tl.store(Work_ptr + 2 * n_part + (row0 + offs_r)[:, None] * D + offs_d[None, :], acc,
                     mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _softmax_tile(s, n_ok, scale, k, m_i, l_i, acc, DOT_TY: tl.constexpr, PRECISION: tl.constexpr):
        # one tile of keys k (BLOCK_N, BLOCK_D) with raw logits s = x k^T (BLOCK_M, BLOCK_N) into the rows'
        # running (max, sum, O), in log2 units (scale = log2(e) / T); keys outside n_ok get no weight
        s = tl.where(n_ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has one real key
        corr = tl.exp2(m_i - m_new)  # rescale of the sums taken under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(DOT_TY), k, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _online_step(m, l, o, t, k):
        # one tile of keys k (BLOCK_K, BLOCK_D) with log2-scaled logits t (BLOCK_K,) (-inf: no key) into a
        # row's running (max, sum, O)
        m_new = tl.maximum(m, tl.max(t, 0))
        corr = tl.exp2(m - m_new)
        p = tl.exp2(t - m_new)
        return m_new, l * corr + tl.sum(p, 0), o * corr + tl.sum(p[:, None] * k, 0)

    @triton.jit
    def _merge_splits(PM_ptr, PL_ptr, PO_ptr, r, stride_ms, stride_os, S, m_scale, m0, l0, o0, offs_d, d_ok,
                      D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_L: tl.constexpr):
        # Merge row r's S partials into the running (m0, l0, o0) (log2 units): O = sum_s w_s O_s / sum_s
        # w_s l_s with w_s = 2^(m_s - max). Partial s: max PM[s * stride_ms + r] * m_scale (m_scale =
        # log2(e) for a natural log-sum-exp), sum PL[...] (1 without HAS_L: O_s normalised), O
        # PO[s * stride_os + r * D + d] in any float dtype. Returns (O (BLOCK_D,), log2-sum-exp2).
        mx = m0
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            m_s = tl.load(PM_ptr + offs_s * stride_ms + r, mask=offs_s < S, other=float("-inf")) * m_scale
            mx = tl.maximum(mx, tl.max(m_s, 0))
        c0 = tl.exp2(m0 - mx)
        l_sum = l0 * c0
        o = o0 * c0
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_ok = offs_s < S
            idx = offs_s * stride_ms + r
            w = tl.exp2(tl.load(PM_ptr + idx, mask=s_ok, other=float("-inf")) * m_scale - mx)  # 0 when padded
            if HAS_L:
                l_sum += tl.sum(w * tl.load(PL_ptr + idx, mask=s_ok, other=0.0), 0)
            else:
                l_sum += tl.sum(w, 0)
            o_s = tl.load(PO_ptr + offs_s[:, None] * stride_os + r * D + offs_d[None, :],
                          mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            o += tl.sum(w[:, None] * o_s, 0)
        return o / l_sum, mx + tl.log2(l_sum)

    @triton.jit
    def _itc_loss_combine_kernel(
        PM0_ptr, PL0_ptr, PO0_ptr,  # direction 0's queue partials (see _merge_splits): max, sum, O
        PM1_ptr, PL1_ptr, PO1_ptr,  # direction 1's
        stride_ms, stride_os, m_scale,  # per split: M/L stride, O stride (elements); max units (see above)
        Q0_ptr, QM0_ptr, K0_ptr, Q1_ptr, QM1_ptr, K1_ptr,  # q, q_m, in-batch keys of each direction (B, D)
        stride_q0, stride_qm0, stride_k0, stride_q1, stride_qm1, stride_k1,
        Temp_ptr,  # () temperature
        Sim_ptr,  # (R, B, B) fp32: in-batch logits of the online rows
        Rows_ptr,  # (2, R, B) fp32 scratch: each row's loss and dL/dT, summed by the last program
        Dq_ptr,  # (R, B, D) fp32: gradient of each direction's mean loss to its q
        Loss_ptr,  # (R,) fp32: mean loss of each direction
        Dtemp_ptr,  # (R,) fp32: dL/dT of each direction's mean loss
        Count_ptr,  # (R,) int32 arrival counters, zero on entry
        alpha, B, S,
        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_K: tl.constexpr, HAS_L: tl.constexpr,
        INBATCH: tl.constexpr,  # the in-batch keys here (else they are one of the S partials, sim written)
    ):
        # One program per (sample i, direction): with INBATCH the in-batch keys for its online and
        # momentum rows (fp32 logits, the (B, B) block's row i: B x D loads per program, so for small B),
        # merged with the partials, then the identity's loss, dq and dT rows.
        i = tl.program_id(0)
        dirn = tl.program_id(1)
        R = tl.num_programs(1)
        if dirn == 0:
            PM_ptr, PL_ptr, PO_ptr = PM0_ptr, PL0_ptr, PO0_ptr
            q_row, qm_row, K_ptr, stride_k = Q0_ptr + i * stride_q0, QM0_ptr + i * stride_qm0, K0_ptr, stride_k0
        else:
            PM_ptr, PL_ptr, PO_ptr = PM1_ptr, PL1_ptr, PO1_ptr
            q_row, qm_row, K_ptr, stride_k = Q1_ptr + i * stride_q1, QM1_ptr + i * stride_qm1, K1_ptr, stride_k1
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(q_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        qm = tl.load(qm_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        k_i = tl.load(K_ptr + i * stride_k + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        inv_t = 1.0 / tl.load(Temp_ptr).to(tl.float32)

        # the in-batch keys (key j is the positive of row j), BLOCK_K at a time
        m_on = tl.full([], float("-inf"), tl.float32)
        m_mo = tl.full([], float("-inf"), tl.float32)
        l_on = tl.zeros([], tl.float32)
        l_mo = tl.zeros([], tl.float32)
        o_on = tl.zeros([BLOCK_D], tl.float32)
        o_mo = tl.zeros([BLOCK_D], tl.float32)
        for b0 in range(0, B if INBATCH else 0, BLOCK_K):
            offs_b = b0 + tl.arange(0, BLOCK_K)
            b_ok = offs_b < B
            k = tl.load(K_ptr + offs_b[:, None] * stride_k + offs_d[None, :], mask=b_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            s_on = tl.sum(k * q[None, :], 1) * inv_t
            tl.store(Sim_ptr + (dirn * B + i) * B + offs_b, s_on, mask=b_ok)
            s_mo = tl.sum(k * qm[None, :], 1) * inv_t
            t_on = tl.where(b_ok, s_on * 1.4426950408889634, float("-inf"))  # log2 units; no key: -inf
            t_mo = tl.where(b_ok, s_mo * 1.4426950408889634, float("-inf"))
            m_on, l_on, o_on = _online_step(m_on, l_on, o_on, t_on, k)
            m_mo, l_mo, o_mo = _online_step(m_mo, l_mo, o_mo, t_mo, k)

        o, lse2 = _merge_splits(PM_ptr, PL_ptr, PO_ptr, i, stride_ms, stride_os, S, m_scale, m_on, l_on, o_on,
                                offs_d, d_ok, D, BLOCK_S, HAS_L)
        o_m, _ = _merge_splits(PM_ptr, PL_ptr, PO_ptr, B + i, stride_ms, stride_os, S, m_scale, m_mo, l_mo, o_mo,
                               offs_d, d_ok, D, BLOCK_S, HAS_L)
        tgt = alpha * o_m + (1.0 - alpha) * k_i  # sum_j t_ij k_j
        loss = lse2 * 0.6931471805599453 - tl.sum(q * tgt, 0) * inv_t  # LSE_i - q.tgt / T
        g = (o - tgt) * inv_t  # dL_i / dq_i
        dtemp = -tl.sum(q * g, 0) * inv_t  # dL_i / dT
        tl.store(Dq_ptr + (dirn * B + i) * D + offs_d, g / B, mask=d_ok)
        tl.store(Rows_ptr + dirn * B + i, loss / B)
        tl.store(Rows_ptr + (R + dirn) * B + i, dtemp / B)

        # The mean over rows without another launch: the last program of a direction to arrive sums
        # its B rows in a fixed order (deterministic). The barrier orders this program's row stores
        # before the counter's release; the acq_rel atomic makes every other program's rows visible to
        # the last one, whose loads are volatile (never a stale L1 line). The counters live in a
        # per-call buffer zeroed by the forward kernel (or a memset): no state kept between calls
        # (nothing to go wrong in a CUDA-graph pool).
        tl.debug_barrier()
        arrived = tl.atomic_add(Count_ptr + dirn, 1, sem="acq_rel")
        if arrived == B - 1:
            l_acc = tl.zeros([BLOCK_B], tl.float32)
            t_acc = tl.zeros([BLOCK_B], tl.float32)
            for b0 in range(0, B, BLOCK_B):
                offs_b = b0 + tl.arange(0, BLOCK_B)
                b_ok = offs_b < B
                l_acc += tl.load(Rows_ptr + dirn * B + offs_b, mask=b_ok, other=0.0, volatile=True)
                t_acc += tl.load(Rows_ptr + (R + dirn) * B + offs_b, mask=b_ok, other=0.0, volatile=True)
            tl.store(Loss_ptr + dirn, tl.sum(l_acc, 0))
            tl.store(Dtemp_ptr + dirn, tl.sum(t_acc, 0))

    @triton.jit
    def _itc_loss_bwd_kernel(
        Dq_ptr,  # (R, B*D) fp32: the forward's d(mean loss)/dq per direction
        Dtemp_ptr,  # (R,) fp32: the forward's d(mean loss)/dT per direction
        G_ptr,  # (R,) incoming gradient of each direction's loss (element stride stride_g: may be 0)
        Gq0_ptr, Gq1_ptr,  # (B*D,) gradient to q of each direction, in q's dtype
        Gt_ptr,  # (1,) gradient to temp, in temp's dtype
        n, R, stride_g, NEED_TEMP: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # The whole backward in one launch: grad_q[r] = g[r] * dq[r] for both directions, and program
        # (0, 0) also writes grad_temp = sum_r g[r] * dtemp[r] (the eager path's two torch ops were two
        # launches plus cuBLAS for a 2-element dot).
        pid = tl.program_id(0)
        dirn = tl.program_id(1)
        g = tl.load(G_ptr + dirn * stride_g).to(tl.float32)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        v = tl.load(Dq_ptr + dirn * n + offs, mask=ok, other=0.0) * g
        if dirn == 0:
            tl.store(Gq0_ptr + offs, v.to(Gq0_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(Gq1_ptr + offs, v.to(Gq1_ptr.dtype.element_ty), mask=ok)
        if NEED_TEMP:
            if (pid == 0) & (dirn == 0):
                offs_r = tl.arange(0, 2)
                r_ok = offs_r < R
                dt = tl.load(Dtemp_ptr + offs_r, mask=r_ok, other=0.0)
                gr = tl.load(G_ptr + offs_r * stride_g, mask=r_ok, other=0.0).to(tl.float32)
                tl.store(Gt_ptr, tl.sum(dt * gr, 0).to(Gt_ptr.dtype.element_ty))

    # Shared memory at BLOCK_D = 256 compiled for sm_90 offline (benchmarks/kernels/sm90_resources.py,
    # limit 232,448 B): every config below fits with 16-bit queues (53-213 KB); fp32 queues (3xTF32
    # dots) need ~2-3x more and only these four fit (98-229 KB), with pointer and with TMA queue loads.
    # The others are pruned before compiling rather than compiled and dropped by the autotuner (seconds
    # each on the GPU).
    _FP32_D256_FITS = {(64, 32, 4, 2), (64, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)}  # (M, N, warps, stages)

    def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
        lowp = kwargs.get("LOWP_DOT", named_args.get("LOWP_DOT"))
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        if lowp or block_d < 256:
            return configs
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in _FP32_D256_FITS]

    def _set_queue_block(nargs: dict) -> None:
        """Autotuner pre-hook: a queue's TMA descriptor loads the config's key tile [BLOCK_N, BLOCK_D], the
        O partial's stores its row tile [BLOCK_M, BLOCK_D]."""
        for name, rows in (("QU0", "BLOCK_N"), ("QU1", "BLOCK_N"), ("PO", "BLOCK_M")):
            if TensorDescriptor is not None and isinstance(nargs[name], TensorDescriptor):
                nargs[name].block_shape = [nargs[rows], nargs["BLOCK_D"]]

    def _config(m: int, n: int, warps: int, stages: int):
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages,
                             pre_hook=_set_queue_block)

    _FWD_CONFIGS = [
        _config(64, 32, 4, 2),
        _config(32, 64, 4, 2),
        _config(32, 32, 4, 2),
        _config(64, 64, 4, 2),
        _config(64, 64, 8, 3),
        _config(64, 32, 4, 3),
        # 8 warps at 64 rows: half the accumulator per thread
        _config(64, 32, 8, 2),
        _config(64, 64, 8, 2),
        # 128 rows: at B = 64 a whole direction [q; q_m] per program, each key tile loaded once (the
        # fastest on an H200 at B = 64 and 512 with pointer loads: benchmarks/results/kernels.csv)
        _config(128, 64, 8, 2),
        _config(128, 32, 8, 3),
    ]

    # QUEUE_DTYPE: with TMA the queues arrive as descriptors, whose dtype the autotuner's own per-tensor
    # dtype key does not see (bf16 and fp16 queues would share one tuned config). The autotuner skips
    # key names that are not parameters without a word; tests/unit/test_itc_kernel.py checks them.
    _AUTOTUNE_KEY = ["B", "CHUNK", "D", "LOWP_DOT", "USE_TMA", "QUEUE_DTYPE", "INBATCH"]
    # the INBATCH launch's fixed config by LOWP_DOT (fp32 features loaded, then rounded for 16-bit dots);
    # both fit sm_90's shared memory at D = 256 (tests/unit/test_itc_kernel.py compiles them)
    _INBATCH_CONFIG = {True: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
                       False: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)}
    if not _dispatch.interpreting():  # autotune needs a GPU driver; the interpreter keeps one config
        _itc_loss_fwd_kernel = triton.autotune(
            configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY,
            prune_configs_by={"early_config_prune": _prune_configs},
        )(_itc_loss_fwd_kernel)


# --- launchers: shape/dtype/device validation lives here, not in the kernels --------------------------
_LOWP = (torch.bfloat16, torch.float16)
_TRITON_DTYPES = (torch.float32, *_LOWP)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} if tl else {}
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
        # int32 element offsets inside the kernels, the workspace's included (the next line bounds it)
        and all((t.shape[0] - 1) * t.stride(0) + D < 2**31 for t in (*feats, *queues) if t.shape[0])
        # the workspace's int32 offsets: 2 directions x (queue splits + the in-batch slot) x ROWS x (D + 2)
        and 2 * (Q // _QUEUE_ALIGN + 2) * ((2 * B + 127) // 128 * 128) * (D + 2) < 2**31
    )


def _tma_ready(*queues: Tensor) -> bool:
    """Queue tiles can load (and the fp32 O partials store) through TMA descriptors: Triton has them, a
    Hopper-or-later GPU (or the interpreter, which emulates them), 16-bit queues (the case measured and
    tested on an H200; fp32 queues keep the pointer loads, `tma=True` forces TMA), each non-empty, 16-byte
    aligned, rows 16-byte strided, and D a multiple of 4 (the partials' fp32 rows, 16-byte strided)."""
    q = queues[0]
    if TensorDescriptor is None or q.shape[0] == 0 or q.dtype not in _LOWP or q.shape[1] % 4:
        return False
    if not _dispatch.interpreting() and not (q.is_cuda and _device_props(q.device).major >= 9):
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in queues)


def _row_major(t: Tensor) -> Tensor:
    """Rows may be strided (a slice of a bigger buffer); elements inside a row must be contiguous."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _device_props(device: torch.device):
    """The device's properties, looked up once (read on every forward: SM count, compute capability)."""
    return torch.cuda.get_device_properties(device)


def _sm_count(device: torch.device) -> int:
    return _device_props(device).multi_processor_count


def _num_splits(rows: int, Q: int, device: torch.device, directions: int) -> int:
    """Queue splits so that the programs (row blocks of [q; q_m] x splits x directions) cover the GPU
    about twice. More splits: more parallelism, but more partials (S * 4B * D * 4 bytes) to write and
    merge; benchmarks/kernels/bench_itc_loss.py --splits measures the trade-off."""
    if Q == 0:
        return 1
    target = 2 * _sm_count(device) if device.type == "cuda" else 8  # the interpreter: a few programs
    programs_per_split = triton.cdiv(2 * rows, 64) * directions  # at the smaller BLOCK_M
    return max(1, min(triton.cdiv(Q, _QUEUE_ALIGN), target // programs_per_split))


def _triton_forward(
    directions: list[Direction], temp: Tensor, alpha: float, splits: int | None = None,
    config: dict | None = None, stage: str = "both", combine_config: dict | None = None, tma: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The launches of the Triton path, inputs already checked (`itc_loss_forward`, `_choose_path`):
    two kernels, four outputs, a workspace and two counters allocated; no other torch op, so on a GPU
    the forward costs two launches. Tuning hooks (benchmarks/kernels/bench_itc_loss.py --breakdown):
    `config` = {BLOCK_M, BLOCK_N, num_warps, num_stages} launches the forward kernel with that config
    instead of the autotuner's, `combine_config` = {BLOCK_S, num_warps} the combine kernel's; `stage`
    "split" / "combine" launches only that kernel (for timing); `tma` forces the queue loads through TMA
    descriptors (True) or pointers (False) instead of `_tma_ready`'s choice."""
    R = len(directions)
    dirs = [tuple(_row_major(t) for t in d) for d in directions]
    if R == 1:
        dirs = dirs * 2  # the kernels take two directions; grid axis R launches only the first
    (q0, qm0, k0, qu0), (q1, qm1, k1, qu1) = dirs
    B, D = q0.shape
    Q = qu0.shape[0]
    device = q0.device
    S = splits or _num_splits(B, Q, device, R)
    chunk = triton.cdiv(triton.cdiv(Q, S), _QUEUE_ALIGN) * _QUEUE_ALIGN if Q else _QUEUE_ALIGN
    S = max(1, triton.cdiv(Q, chunk))
    # the in-batch keys: in the combine kernel for a small batch (B x D loads per program), else their
    # own launch of the split kernel (INBATCH), one more partial slot
    inbatch_launch = B > INBATCH_IN_COMBINE_MAX_B
    slots = S + inbatch_launch
    interp = _dispatch.interpreting()
    lowp = qu0.dtype in _LOWP and not interp  # bf16 tl.dot is wrong in the interpreter: fp32 there
    use_tma = _tma_ready(qu0, qu1) if tma is None else tma
    BLOCK_D = max(16, triton.next_power_of_2(D))
    # fp32 dots as 3xTF32 on the GPU (~fp32 accuracy at tensor-core speed); 16-bit dots take the default
    precision = "ieee" if interp else ("tf32" if lowp else "tf32x3")

    # one workspace: PartM, PartL (R, slots, ROWS), PartO (R, slots, ROWS, D), then the (2, R, B) rows; ROWS
    # >= 2B rows per (direction, slot), a multiple of every BLOCK_M (<= 128)
    rows = triton.cdiv(2 * B, 128) * 128
    n_part = R * slots * rows
    work = torch.empty((2 + D) * n_part + 2 * R * B, device=device, dtype=torch.float32)
    sim = torch.empty(R, B, B, device=device, dtype=torch.float32)
    # zeroed by the split-K kernel; a combine-only launch (timing) zeroes them itself (a memset)
    counters = (torch.zeros if stage == "combine" else torch.empty)(R, device=device, dtype=torch.int32)
    meta = {} if not interp else {"BLOCK_M": 16, "BLOCK_N": 16}
    kernel = _itc_loss_fwd_kernel
    if config is not None:
        if hasattr(kernel, "configs"):  # under the autotuner: the bare kernel
            kernel = kernel.fn
        if rows % config["BLOCK_M"]:
            raise ValueError(f"BLOCK_M must divide {rows} (the partial rows per slot), got {config['BLOCK_M']}")
        meta = dict(config)
    dq = torch.empty(R, B, D, device=device, dtype=torch.float32)
    loss = torch.empty(R, device=device, dtype=torch.float32)
    dtemp = torch.empty(R, device=device, dtype=torch.float32)
    part_o = work[2 * n_part:(2 + D) * n_part]
    qu0_arg, qu1_arg, po_arg = qu0, qu1, work
    if use_tma:  # block shapes: the config's (the autotuner's pre-hook sets them for each config it runs)
        block = [(config or meta).get("BLOCK_N", 64), BLOCK_D]
        qu0_arg = TensorDescriptor(qu0, [Q, D], [qu0.stride(0), 1], block)
        qu1_arg = qu0_arg if qu1 is qu0 else TensorDescriptor(qu1, [Q, D], [qu1.stride(0), 1], list(block))
        po_arg = TensorDescriptor(part_o, [n_part, D], [D, 1], [(config or meta).get("BLOCK_M", 64), BLOCK_D])
    if stage != "combine":
        launches = [(kernel, meta, po_arg, S, False)]
        if inbatch_launch:  # a fixed config (no autotuning of a launch this small): one that fits sm_90
            bare = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
            cfg = _INBATCH_CONFIG[lowp] if not interp else meta
            po_in = (TensorDescriptor(part_o, [n_part, D], [D, 1], [cfg["BLOCK_M"], BLOCK_D]) if use_tma
                     else po_arg)
            launches.append((bare, cfg, po_in, 1, True))
        for fn, cfg, po, n, inbatch in launches:
            grid = lambda META, n=n: (triton.cdiv(2 * B, META["BLOCK_M"]), n, R)  # noqa: E731
            fn[grid](
                q0, qm0, qu0_arg, q1, qm1, qu1_arg, k0, k1, sim, temp, work, po, counters,
                q0.stride(0), qm0.stride(0), qu0.stride(0), k0.stride(0),
                q1.stride(0), qm1.stride(0), qu1.stride(0), k1.stride(0),
                B, Q, chunk, slots, rows, D=D, BLOCK_D=BLOCK_D, LOWP_DOT=lowp, PRECISION=precision,
                QUEUE_DTYPE=_TL_DTYPES[qu0.dtype], USE_TMA=use_tma, INBATCH=inbatch, **cfg,
            )
    if stage != "split":
        per_dir = slots * rows  # one direction's PartM (and PartL) elements
        partials = [(work[r * per_dir:], work[n_part + r * per_dir:], part_o[r * per_dir * D:]) for r in (0, R - 1)]
        _combine(partials, rows, rows * D, 1.0, True, dirs, temp, sim, work[(2 + D) * n_part:], dq, loss, dtemp,
                 counters, alpha, slots, BLOCK_D, combine_config, inbatch=not inbatch_launch)
    return loss, sim, dq, dtemp


def _combine(partials, stride_ms: int, stride_os: int, m_scale: float, has_l: bool, dirs, temp: Tensor,
             sim: Tensor, rows: Tensor, dq: Tensor, loss: Tensor, dtemp: Tensor, counters: Tensor, alpha: float,
             S: int, BLOCK_D: int, combine_config: dict | None = None, inbatch: bool = True) -> None:
    """Launch the combine kernel over (B, R) programs: per direction, `partials` = (max, sum, O) of its
    S queue partials (see `_merge_splits`), `dirs` its (q, q_m, keys_m, queue) (both entries the same
    direction when R = 1); writes dq, loss and dtemp (and sim with `inbatch`: the in-batch keys in this
    kernel), using `rows` (2 R B fp32) and `counters` (zero)."""
    (q0, qm0, k0, _), (q1, qm1, k1, _) = dirs
    B, D = q0.shape
    R = loss.shape[0]
    # Up to 64 splits of a row per load (one pass at two directions and B >= 32, where S <= 64; more
    # passes for one direction or a small B): the merge is a chain of dependent loads per program, so
    # its time is latency. 8 warps when a row has many splits (B = 64: S = 64, 8.4 us against 13.1 us
    # for 16-split passes and 4 warps), 4 for many rows with few splits (B = 512: S = 8, 10.8 us with
    # BLOCK_S 16 and 4 warps against 18.8 us with 8 warps). H200, session 4, the kernel alone without
    # its last program's sum of the rows (and before it took over the in-batch keys).
    combine = combine_config or dict(
        BLOCK_S=min(64, max(16, triton.next_power_of_2(S))),
        num_warps=(8 if S > 16 else 4) if BLOCK_D >= 128 else 1)
    (pm0, pl0, po0), (pm1, pl1, po1) = partials
    _itc_loss_combine_kernel[(B, R)](
        pm0, pl0, po0, pm1, pl1, po1, stride_ms, stride_os, m_scale,
        q0, qm0, k0, q1, qm1, k1,
        q0.stride(0), qm0.stride(0), k0.stride(0), q1.stride(0), qm1.stride(0), k1.stride(0),
        temp, sim, rows, dq, loss, dtemp, counters, float(alpha), B, S, D=D, BLOCK_D=BLOCK_D,
        BLOCK_B=min(1024, triton.next_power_of_2(B)), BLOCK_K=16, HAS_L=has_l, INBATCH=inbatch, **combine,
    )


def itc_loss_forward(
    directions: list[Direction], temp: Tensor, alpha: float, *, splits: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton forward of one or two directions in one launch (+ the combine launch).

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
    return _triton_forward(directions, temp, alpha, splits)


# --- autograd: the same forward and backward behind two front doors --------------------------------
# Eager calls go through an autograd.Function; under torch.compile the wrapper calls the op registered
# with torch.library (fake implementation for shapes, registered backward), which Dynamo and CUDA-graph
# capture trace without a graph break. Eager calls avoid the registered op because its Python dispatch
# costs ~2x the whole launcher's host time (measured on the CPU with the kernels stubbed: ~130 vs ~40 us
# forward), and the eager ITC is host-bound at B = 64.
def _forward(directions: list[Direction], temp: Tensor, alpha: float, path: str) -> tuple[Tensor, ...]:
    if path == "triton":
        return _triton_forward(directions, temp, alpha)
    if path == "streaming":
        return itc_loss_streaming_forward(directions, temp, alpha)
    if path == "sdpa" or path.startswith("sdpa:"):  # "sdpa:<backend>" names the attention kernel
        return itc_loss_sdpa_forward(directions, temp, alpha, backend=path[5:] or None)
    raise ValueError(f"itc_loss path must be 'triton', 'streaming' or 'sdpa[:<backend>]', got {path!r}")


def _backward(dq: Tensor, dtemp: Tensor, grad_loss: Tensor | None, need_q: list[bool], need_temp: bool,
              q_dtypes: list[torch.dtype], temp_meta: tuple) -> tuple[list[Tensor | None], Tensor | None]:
    """The forward already holds d(mean loss)/dq and d/dT: scale them by the incoming gradient (two
    elementwise launches: the dot for temp, one product for the queries of both directions)."""
    if grad_loss is None:  # only the detached outputs were used
        return [None] * len(need_q), None
    g = grad_loss.to(dq.dtype)  # (R,)
    grad_temp = torch.dot(dtemp, g).reshape(temp_meta[0]).to(temp_meta[1]) if need_temp else None
    scaled = dq * g[:, None, None] if any(need_q) else None
    return [scaled[r].to(dt) if need_q[r] else None for r, dt in enumerate(q_dtypes)], grad_temp


def _triton_backward(dq: Tensor, dtemp: Tensor, grad_loss: Tensor | None, need_q: list[bool], need_temp: bool,
                     q_dtypes: list[torch.dtype], temp_meta: tuple) -> tuple[list[Tensor | None], Tensor | None]:
    """`_backward` in one Triton launch (the eager Triton path; the registered op keeps the torch ops,
    which torch.compile traces and fuses)."""
    if grad_loss is None:
        return [None] * len(need_q), None
    R, B, D = dq.shape
    grads = [torch.empty(B, D, device=dq.device, dtype=dt) for dt in q_dtypes]
    grad_temp = torch.empty(temp_meta[0], device=dq.device, dtype=temp_meta[1]) if need_temp else dtemp
    n = B * D
    BLOCK = min(4096, triton.next_power_of_2(n))
    _itc_loss_bwd_kernel[(triton.cdiv(n, BLOCK), R)](
        dq, dtemp, grad_loss, grads[0], grads[-1], grad_temp, n, R, grad_loss.stride(0),
        NEED_TEMP=need_temp, BLOCK=BLOCK, num_warps=4,
    )
    return [g if need else None for g, need in zip(grads, need_q)], grad_temp if need_temp else None


class ITCLossFunction(torch.autograd.Function):
    """Eager autograd. Inputs: temp, alpha, path ("triton" | "streaming"), then q, q_m, keys_m, queue
    of each direction. Outputs: loss (R,), sim (R, B, B) (not differentiable)."""

    @staticmethod
    def forward(ctx, temp: Tensor, alpha: float, path: str, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        directions = [tuple(tensors[i:i + 4]) for i in range(0, len(tensors), 4)]
        loss, sim, dq, dtemp = _forward(directions, temp, alpha, path)
        ctx.save_for_backward(dq, dtemp)
        ctx.temp_meta = (temp.shape, temp.dtype)
        ctx.q_dtypes = [d[0].dtype for d in directions]
        ctx.path = path
        ctx.mark_non_differentiable(sim)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for sim (a launch)
        return loss, sim

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor | None, grad_sim: Tensor | None):
        dq, dtemp = ctx.saved_tensors
        R = len(ctx.q_dtypes)
        need_q = [ctx.needs_input_grad[3 + 4 * r] for r in range(R)]
        backward = _triton_backward if ctx.path == "triton" else _backward
        grad_q, grad_temp = backward(dq, dtemp, grad_loss, need_q, ctx.needs_input_grad[0], ctx.q_dtypes,
                                     ctx.temp_meta)
        grads: list[Tensor | None] = [grad_temp, None, None]
        for r in range(R):
            grads += [grad_q[r], None, None, None]
        return tuple(grads)


@torch.library.custom_op("albef_kernels::itc_loss", mutates_args=())
def itc_loss_op(
    q0: Tensor, qm0: Tensor, k0: Tensor, qu0: Tensor, q1: Tensor, qm1: Tensor, k1: Tensor, qu1: Tensor,
    temp: Tensor, alpha: float, directions: int, path: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss, in-batch block and gradients of `directions` (1 or 2) ITC directions (for torch.compile).

    Args:
        q0, qm0, k0, qu0: direction 0 (q, q_m, keys_m (B, D); queue (Q, D)).
        q1, qm1, k1, qu1: direction 1 (ignored when directions == 1; pass direction 0 again).
        temp: () temperature.  alpha: distillation weight.  path: "triton" or "streaming".
    Returns:
        loss (R,), sim (R, B, B), dq (R, B, D), dtemp (R,) in promote_types(q.dtype, float32): the
        mean losses, the in-batch logits and the gradients of each mean loss to its q and to temp.
    """
    return _forward([(q0, qm0, k0, qu0), (q1, qm1, k1, qu1)][:directions], temp, alpha, path)


@itc_loss_op.register_fake
def _itc_loss_fake(q0, qm0, k0, qu0, q1, qm1, k1, qu1, temp, alpha, directions, path):
    B, D = q0.shape
    acc = torch.promote_types(q0.dtype, torch.float32)
    return (q0.new_empty(directions, dtype=acc), q0.new_empty(directions, B, B, dtype=acc),
            q0.new_empty(directions, B, D, dtype=acc), q0.new_empty(directions, dtype=acc))


def _itc_loss_setup_context(ctx, inputs, output) -> None:
    _, _, dq, dtemp = output
    ctx.save_for_backward(dq, dtemp)
    temp, directions = inputs[8], inputs[10]
    ctx.temp_meta = (temp.shape, temp.dtype)
    ctx.q_dtypes = [inputs[0].dtype, inputs[4].dtype][:directions]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for sim, dq, dtemp (three launches)


def _itc_loss_op_backward(ctx, grad_loss, grad_sim, grad_dq, grad_dtemp):
    dq, dtemp = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_q, grad_temp = _backward(dq, dtemp, grad_loss, [need[0], need[4]][:len(ctx.q_dtypes)], need[8],
                                  ctx.q_dtypes, ctx.temp_meta)
    grad_q += [None] * (2 - len(grad_q))
    return (grad_q[0], None, None, None, grad_q[1], None, None, None, grad_temp, None, None, None)


itc_loss_op.register_autograd(_itc_loss_op_backward, setup_context=_itc_loss_setup_context)


def itc_loss_fused(
    directions: list[Direction], temp: Tensor, alpha: float, path: str
) -> tuple[Tensor, Tensor]:
    """Loss (R,) of R = len(directions) directions, with gradients to each q and to temp, and the
    detached in-batch block (R, B, B), on `path` "triton" or "streaming": the autograd.Function when
    eager, the registered op under torch.compile."""
    if torch.compiler.is_compiling():
        d0 = directions[0]
        d1 = directions[1] if len(directions) == 2 else d0
        loss, sim, _, _ = itc_loss_op(*d0, *d1, temp, float(alpha), len(directions), path)
        return loss, sim
    return ITCLossFunction.apply(temp, alpha, path, *(t for d in directions for t in d))


# --- public entry points ----------------------------------------------------------------------------
def _choose_path(directions: list[Direction], temp: Tensor, *, log: bool = True) -> str:
    tensors = [t for d in directions for t in d]
    if torch.is_grad_enabled() and any(t.requires_grad for d in directions for t in d[1:]):
        return "reference"  # a gradient to the momentum side is outside the fused identity
    decide = use_triton if log else _dispatch.enabled
    triton_ok = decide("itc_loss", *tensors, temp)
    if triton_ok and _triton_fits(directions, temp):
        return "triton"
    q, queue = directions[0][0], directions[0][3]
    B, Q = q.shape[0], queue.shape[0]
    streaming_min = STREAMING_MIN_LOGITS_CPU if q.device.type == "cpu" else STREAMING_MIN_LOGITS
    if _dispatch.enabled("itc_loss") and B * (B + Q) >= streaming_min:
        return "streaming"
    return "reference"


def _as_tensor(temp: Tensor | float, like: Tensor) -> Tensor:
    return temp if isinstance(temp, Tensor) else torch.tensor(float(temp), device=like.device)


def _bidirectional(
    image_feat: Tensor, image_feat_m: Tensor, text_feat: Tensor, text_feat_m: Tensor,
    image_queue: Tensor, text_queue: Tensor,
) -> list[Direction]:
    return [(image_feat, image_feat_m, text_feat_m, text_queue),
            (text_feat, text_feat_m, image_feat_m, image_queue)]


def itc_loss_path(
    image_feat: Tensor, image_feat_m: Tensor, text_feat: Tensor, text_feat_m: Tensor,
    image_queue: Tensor, text_queue: Tensor, temp: Tensor | float,
) -> str:
    """"triton", "streaming" or "reference": the path `itc_loss_bidirectional` takes on these inputs
    now (backend, kernels.disable, device, the kernel's envelope, the shape, grad mode). Logs nothing."""
    directions = _bidirectional(image_feat, image_feat_m, text_feat, text_feat_m, image_queue, text_queue)
    _validate(directions)
    return _choose_path(directions, _as_tensor(temp, image_feat), log=False)


def itc_loss(
    q: Tensor, q_m: Tensor, keys_m: Tensor, queue: Tensor, temp: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """Contrastive loss of one direction; see `itc_loss_reference` for arguments and shapes.

    Runs the Triton kernel on CUDA tensors (unless switched off), the streaming PyTorch path from
    STREAMING_MIN_LOGITS_CPU logits on the CPU and STREAMING_MIN_LOGITS elsewhere, the reference
    otherwise; all agree to rounding."""
    directions = [(q, q_m, keys_m, queue)]
    _validate(directions)
    temp = _as_tensor(temp, q)
    path = _choose_path(directions, temp)
    if path == "reference":
        return itc_loss_reference(q, q_m, keys_m, queue, temp, alpha)
    loss, sim = itc_loss_fused(directions, temp, alpha, path)
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
    directions = _bidirectional(image_feat, image_feat_m, text_feat, text_feat_m, image_queue, text_queue)
    _validate(directions)
    temp = _as_tensor(temp, image_feat)
    path = _choose_path(directions, temp)
    if path == "reference":
        out = [itc_loss_reference(*d, temp, alpha) for d in directions]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
    return itc_loss_fused(directions, temp, alpha, path)
