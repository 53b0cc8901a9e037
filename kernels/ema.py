"""Momentum (EMA) update of the whole momentum model in one kernel launch.

Math, per element of every pair (p_m, p) of momentum and online tensors, in fp32:
    p_m <- decay * p_m + (1 - decay) * p  =  p_m + w * (p - p_m),   w = 1 - decay
(torch.lerp's form; for w >= 0.5 it switches to p - (p - p_m) * (1 - w), so w = 0 and w = 1 are exact).

Cost model: reads p_m and p, writes p_m: 12 bytes per parameter and no FLOPs worth counting, so the
bound is HBM bandwidth. ALBEF-base has ~210 M momentum parameters: 2.5 GB, 0.75 ms on an H100
(3.35 TB/s), 0.53 ms on an H200 (4.8 TB/s). Report GB/s.

Design: one multi-tensor launch. Each program updates one BLOCK of one tensor; a small table on the
device says which tensor (index) and which block (number) each program owns, and a second table
holds the tensors' data addresses and sizes. Triton turns an int64 address into a pointer
(`.to(tl.pointer_type(tl.float32))`, int-to-ptr; the interpreter supports it as a bitcast, so CI runs the
same kernel). A `tl.multiple_of(ptr, 16)` hint on the pointer (when every address is 16-byte aligned,
as PyTorch's allocations are) and an unmasked path for full blocks (a size loaded at run time would
otherwise defeat vectorisation; only a tensor's last block is masked) give 128-bit loads and stores:
checked in the sm_90 PTX (`ld.global.v4.b32`; a hint on the integer address does not give them).
The tables (~8 bytes per 4,096 parameters) are built once and cached under the tensors' addresses and
sizes: `load_state_dict` copies in place (same addresses, same table), while `.to()`, `.cuda()` or any
reallocation gives a new key and a fresh table, never a stale address.

Why not a flat buffer (momentum parameters as views into one allocation, updated as one tensor): it
also needs the *online* parameters flat, which belong to the optimizer (and to ZeRO, which flattens
and partitions them its own way); and `module.to()`/`.cuda()`/`.float()` replace each parameter's
storage, silently turning the views back into separate tensors. The pointer table needs neither and
leaves every parameter where its owner put it.

Envelope: fp32 momentum and online tensors, each contiguous, all on one CUDA device (the momentum
model and the fp32 master weights). Anything else (another dtype, a non-contiguous tensor, CPU
tensors) runs the reference. Block count per launch < 2^31.

References: ALBEF (arXiv:2107.07651) `_momentum_update`; apex/PyTorch `multi_tensor_apply` (the
chunk-table idea); PERFORMANCE.md §4c.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from albef_kernels._dispatch import log, triton_available, use_triton
from torch import Tensor

if triton_available():
    import triton
    import triton.language as tl
else:  # the reference still works without Triton
    triton = tl = None


# --- reference: pure PyTorch; test oracle, benchmark baseline, CPU fallback -------------------------
@torch.no_grad()
def ema_update_reference_(momentum: list[Tensor], online: list[Tensor], decay: float) -> None:
    """In place: momentum[i] <- decay * momentum[i] + (1 - decay) * online[i] (one multi-tensor
    `torch._foreach_lerp_`; on CUDA a handful of fused launches for all tensors)."""
    torch._foreach_lerp_(momentum, online, 1.0 - decay)


# --- Triton kernel -----------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _lerp(m, p, weight):
        # torch.lerp's two forms: exact at weight 0 (m unchanged) and at weight 1 (p), like the reference
        d = p - m
        return tl.where(weight < 0.5, m + weight * d, p - d * (1.0 - weight))

    @triton.jit
    def _ema_fwd_kernel(
        Addr_ptr,  # (2, T) int64: data addresses; row 0 momentum tensors, row 1 online tensors
        Numel_ptr,  # (T,) int64: elements of tensor t
        Tensor_ptr,  # (P,) int32: tensor index of program p
        Block_ptr,  # (P,) int32: block number of program p inside its tensor
        n_tensors,
        weight,  # 1 - decay, fp32
        BLOCK: tl.constexpr,
        ALIGNED: tl.constexpr,  # every address is 16-byte aligned (true for PyTorch's own allocations)
    ):
        pid = tl.program_id(0)
        t = tl.load(Tensor_ptr + pid)
        start = tl.load(Block_ptr + pid).to(tl.int64) * BLOCK
        n = tl.load(Numel_ptr + t)
        m_base = tl.load(Addr_ptr + t).to(tl.pointer_type(tl.float32))  # int-to-ptr
        p_base = tl.load(Addr_ptr + n_tensors + t).to(tl.pointer_type(tl.float32))
        if ALIGNED:  # the hint on the pointer itself is what lets the compiler emit 128-bit accesses
            m_base = tl.multiple_of(m_base, 16)
            p_base = tl.multiple_of(p_base, 16)
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:  # full block: no mask, vectorised
            m = tl.load(m_base + offs)
            p = tl.load(p_base + offs)
            tl.store(m_base + offs, _lerp(m, p, weight))
        else:  # the tensor's last, partial block
            mask = offs < n
            m = tl.load(m_base + offs, mask=mask, other=0.0)
            p = tl.load(p_base + offs, mask=mask, other=0.0)
            tl.store(m_base + offs, _lerp(m, p, weight), mask=mask)


# --- launcher: plan (cached tables) + launch ---------------------------------------------------------
BLOCK = 4096
NUM_WARPS = 8  # 16 fp32 per thread: four 128-bit loads of each input in flight
_PLANS: OrderedDict[tuple, tuple[Tensor, Tensor, Tensor, Tensor, int, bool]] = OrderedDict()
_MAX_PLANS = 8
_fallback_logged = False


def _plan(momentum: list[Tensor], online: list[Tensor], block: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int, bool]:
    """(addresses (2, T), numels (T,), tensor index (P,), block number (P,), programs P, aligned) for
    the non-empty tensors, cached under their addresses, sizes and the block size."""
    addrs_m = [m.data_ptr() for m in momentum]
    addrs_p = [p.data_ptr() for p in online]
    numels = [m.numel() for m in momentum]
    key = (momentum[0].device, block, tuple(addrs_m), tuple(addrs_p), tuple(numels))
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    keep = [i for i, n in enumerate(numels) if n > 0]
    owned = {}
    for i in keep:  # two momentum entries on one storage would race (and the maths would apply twice)
        if addrs_m[i] in owned:
            raise ValueError(f"ema_update_: momentum tensors {owned[addrs_m[i]]} and {i} share memory "
                             f"(address {addrs_m[i]:#x}); pass each tensor once")
        owned[addrs_m[i]] = i
    addr = torch.tensor([[addrs_m[i] for i in keep], [addrs_p[i] for i in keep]], dtype=torch.int64)
    aligned = bool((addr % 16 == 0).all())
    numel = torch.tensor([numels[i] for i in keep], dtype=torch.int64)
    blocks = (numel + block - 1) // block  # (T,)
    tensor_of = torch.repeat_interleave(torch.arange(len(keep), dtype=torch.int32), blocks)  # (P,)
    first = torch.cumsum(blocks, 0) - blocks  # first program of each tensor
    block_of = (torch.arange(int(blocks.sum())) - first.repeat_interleave(blocks)).to(torch.int32)  # (P,)
    if tensor_of.numel() >= 2**31:
        raise ValueError(f"ema_update_: {tensor_of.numel()} blocks of {block} exceed one launch's grid")
    device = momentum[0].device
    plan = (addr.to(device), numel.to(device), tensor_of.to(device), block_of.to(device),
            int(tensor_of.numel()), aligned)
    _PLANS[key] = plan
    if len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


def _triton_supported(momentum: list[Tensor], online: list[Tensor]) -> bool:
    device = momentum[0].device
    return all(t.dtype == torch.float32 and t.is_contiguous() and t.device == device
               for t in (*momentum, *online))


@torch.no_grad()
def ema_update_triton_(momentum: list[Tensor], online: list[Tensor], decay: float, *, block: int = BLOCK) -> None:
    """One launch of `_ema_fwd_kernel` over all tensors. Expects what `ema_update_` validates plus fp32,
    contiguous tensors on one device; `block` (a power of two) is the elements per program."""
    if not momentum:
        return
    if block <= 0 or block & (block - 1):
        raise ValueError(f"ema_update_triton_: block must be a power of two, got {block}")
    addr, numel, tensor_of, block_of, programs, aligned = _plan(momentum, online, block)
    if programs == 0:
        return
    _ema_fwd_kernel[(programs,)](addr, numel, tensor_of, block_of, addr.shape[1], 1.0 - decay,
                                 BLOCK=block, ALIGNED=aligned, num_warps=NUM_WARPS if block >= 4096 else 4)


# --- public entry point ------------------------------------------------------------------------------
@torch.no_grad()
def ema_update_(momentum: list[Tensor], online: list[Tensor], decay: float) -> None:
    """EMA of `online` into `momentum`, in place: momentum[i] <- decay * momentum[i] + (1 - decay) * online[i].

    Args:
        momentum: tensors of the momentum model (fp32 on the fast path), updated in place.
        online: the paired online tensors, same length and pairwise the same shapes.
        decay: in [0, 1]; ALBEF uses 0.995.
    Dispatch: one Triton launch when every tensor is a CUDA fp32 contiguous tensor and the op `ema`
    is enabled; otherwise the `torch._foreach_lerp_` reference.
    """
    if len(momentum) != len(online):
        raise ValueError(f"ema_update_: {len(momentum)} momentum tensors but {len(online)} online tensors")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update_: decay must be in [0, 1], got {decay}")
    for i, (m, p) in enumerate(zip(momentum, online)):
        if m.shape != p.shape:
            raise ValueError(f"ema_update_: tensor {i} has momentum shape {tuple(m.shape)}, online {tuple(p.shape)}")
    if not momentum:
        return
    if use_triton("ema", *momentum, *online):
        if _triton_supported(momentum, online):
            ema_update_triton_(momentum, online, decay)
            return
        global _fallback_logged
        if not _fallback_logged:
            _fallback_logged = True
            log.info("ema: tensors are not all fp32, contiguous and on one device; using the reference")
    ema_update_reference_(momentum, online, decay)
