"""Hard-negative sampling for ITM (REFERENCE §2 step 8), batched and free of host synchronisation.

ALBEF draws, for each row b, one index j != b with probability softmax(s_b)_j renormalised over
j != b (softmax, zero the diagonal, torch.multinomial), in a Python loop with 2B `.item()` calls. It
crashes with "invalid multinomial distribution" when a row has no mass left: B = 1, or when every
off-diagonal weight underflows to zero in fp32 (a dominant positive, > ~100 nats).

Here the same distribution is sampled by Gumbel-max in log space: argmax_j (s_bj + G_bj) over
j != b, with G_bj i.i.d. Gumbel(0, 1). Nothing underflows, identical rows give a uniform draw over
the other samples, and no host synchronisation happens.

Degenerate rows: when row b has no valid negative (B = 1, or every other logit is -inf/NaN), the
sampler returns index b itself and valid[b] = False; the ITM loss gives such pairs weight zero.
NaN logits count as -inf. A +inf logit makes the row's best score +inf, which is not finite, so that
row is also reported as (b, False) (the reference's rule, kept by the kernel).

Triton path (`sample_hard_negatives` on CUDA tensors, or the interpreter under use_backend("triton")):
one launch for a (B, B) matrix or a stack (R, B, B) of them (both ITM directions at once). Each
program takes BLOCK_R rows; the Gumbel noise comes from Philox (tl.rand) keyed by a 31-bit seed and
the element's offset (r * B + b) * B + j, so a draw is a pure function of (seed, position): the same
seed gives the same negatives, on any GPU, and the seed is an int drawn on the host from a CPU
generator (the global one by default, so torch.manual_seed makes runs reproducible), never read back
from the device. The uniform is clamped to [tiny, 1 - 1e-7] exactly as in the reference.
Cost: reads R*B*B logits once, ~20 integer ops per element for Philox; one launch, a few us at B = 64.
CUDA graphs and torch.compile: a host-drawn seed would be frozen into a captured graph (every replay
the same noise) and its host draw breaks Dynamo's graph. So while a CUDA graph is being captured, and
under torch.compile (through the op `torch.ops.albef_kernels.sample_hard_negatives`, registered with
a fake implementation), the seed is a (1,) tensor drawn on the device by its default generator (one
extra launch, which a graph makes cheap) and read by the kernel; captured generators advance with each
replay, so every replay draws afresh.
Envelope (Triton): float logits, B * B * R < 2^31, a CPU generator or none. A CUDA generator runs the
reference, which draws from it on the device (also without host synchronisation).

References: Gumbel-max trick (Gumbel 1954; Maddison et al. 2014, arXiv:1411.0030); Philox (Salmon et
al. 2011, "Parallel random numbers: as easy as 1, 2, 3"); PERFORMANCE.md §4c.
"""

import torch
from torch import Tensor

from albef_kernels._dispatch import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # the reference still works without Triton
    triton = tl = None


# --- reference: pure PyTorch; test oracle, benchmark baseline, CPU path --------------------------------
def sample_hard_negatives_reference(sim: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Args:
        sim: (B, B) logits, row b = query b against the in-batch keys, positive on the diagonal.
        generator: optional RNG for the Gumbel noise (default: the global one of sim's device).
    Returns:
        index: (B,) int64, a negative key for each row (b itself where none exists).
        valid: (B,) bool, False where row b had no candidate.
    """
    B = sim.shape[0]
    logits = sim.float().masked_fill(torch.eye(B, dtype=torch.bool, device=sim.device), float("-inf"))
    logits = logits.masked_fill(torch.isnan(logits), float("-inf"))
    u = torch.rand(logits.shape, device=sim.device, generator=generator)
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))
    best, index = (logits + gumbel).max(dim=1)
    valid = torch.isfinite(best)
    index = torch.where(valid, index, torch.arange(B, device=sim.device))
    return index, valid


# --- Triton kernel ---------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit(do_not_specialize=["seed"])
    def _hard_negatives_kernel(
        Sim_ptr,  # (R, B, B) logits, row = query, positive on the diagonal (any strides)
        Index_ptr,  # (R, B) int64 out
        Valid_ptr,  # (R, B) bool out
        seed,  # 31-bit Philox key drawn on the host (unless SEED_FROM_PTR)
        Seed_ptr,  # (1,) int64 key drawn on the device (read when SEED_FROM_PTR)
        B, stride_r, stride_b, stride_j,
        BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
    ):
        if SEED_FROM_PTR:  # CUDA-graph replays and compiled graphs: a fresh key per replay
            seed = tl.load(Seed_ptr)
        pid = tl.program_id(0)
        r = tl.program_id(1)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_B)
        ok = (rows[:, None] < B) & (cols[None, :] < B)
        x = tl.load(Sim_ptr + r * stride_r + rows[:, None] * stride_b + cols[None, :] * stride_j, mask=ok,
                    other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("-inf"), x)  # NaN -> no mass
        x = tl.where(rows[:, None] == cols[None, :], float("-inf"), x)  # never the positive
        # Gumbel(0, 1) from a counter-based uniform: a pure function of (seed, element position)
        offsets = (r * B + rows[:, None]) * B + cols[None, :]
        u = tl.rand(seed, offsets)
        u = tl.minimum(tl.maximum(u, 1.1754943508222875e-38), 1.0 - 1e-7)  # as the reference's clamp
        z = x - tl.log(-tl.log(u))  # -inf stays -inf: padded, diagonal and NaN entries never win
        best = tl.max(z, 1)
        index = tl.argmax(z, 1)
        valid = (best > float("-inf")) & (best < float("inf"))
        index = tl.where(valid, index, rows)  # no candidate: the row itself, flagged invalid
        row_ok = rows < B
        tl.store(Index_ptr + r * B + rows, index.to(tl.int64), mask=row_ok)
        tl.store(Valid_ptr + r * B + rows, valid, mask=row_ok)


# --- launcher --------------------------------------------------------------------------------------------
_SEED_BOUND = 2**31 - 1


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 31-bit seed from a CPU generator (default: the global one); a host draw, no device sync."""
    return int(torch.randint(_SEED_BOUND, (), generator=generator))


def sample_hard_negatives_forward(sim: Tensor, seed: int | Tensor) -> tuple[Tensor, Tensor]:
    """Triton sampler for a (B, B) matrix or a stack (R, B, B), one launch.

    Args:
        sim: (B, B) or (R, B, B) float logits, positive on the diagonal; any strides.
        seed: the Philox key: an int in [0, 2^31 - 1), or a (1,) int64 tensor on sim's device holding
            one (read by the kernel, never by the host). Same key and shape -> same draws.
    Returns:
        index: (B,) or (R, B) int64; valid: same shape, bool (see the module docstring).
    """
    stacked = sim if sim.ndim == 3 else sim.unsqueeze(0)
    R, B, _ = stacked.shape
    if R * B * B >= 2**31:
        raise ValueError(f"sample_hard_negatives: R * B * B = {R * B * B} must be < 2^31 (Philox offsets)")
    from_ptr = isinstance(seed, Tensor)
    if from_ptr and (seed.shape != (1,) or seed.dtype != torch.int64 or seed.device != sim.device):
        raise ValueError(f"sample_hard_negatives: a seed tensor must be (1,) int64 on {sim.device}, got "
                         f"{tuple(seed.shape)} {seed.dtype} on {seed.device}")
    if not from_ptr and not 0 <= seed < _SEED_BOUND:
        raise ValueError(f"sample_hard_negatives: seed={seed} must be in [0, 2^31 - 1)")
    index = torch.empty(R, B, dtype=torch.int64, device=sim.device)
    valid = torch.empty(R, B, dtype=torch.bool, device=sim.device)
    BLOCK_B = max(16, triton.next_power_of_2(B))
    BLOCK_R = max(1, min(triton.next_power_of_2(B), 4096 // BLOCK_B))  # <= 4096 elements per program
    _hard_negatives_kernel[(triton.cdiv(B, BLOCK_R), R)](
        stacked, index, valid, 0 if from_ptr else seed, seed if from_ptr else index, B,
        stacked.stride(0), stacked.stride(1), stacked.stride(2),
        BLOCK_R=BLOCK_R, BLOCK_B=BLOCK_B, SEED_FROM_PTR=from_ptr, num_warps=4,
    )
    return (index, valid) if sim.ndim == 3 else (index[0], valid[0])


def draw_device_seed(device: torch.device) -> Tensor:
    """A (1,) int64 key drawn by the device's default generator: inside a CUDA graph it is a captured
    kernel whose draws advance with every replay (a host-drawn int would be frozen into the graph)."""
    return torch.randint(_SEED_BOUND, (1,), device=device)


# Registered with torch.library so that torch.compile traces the sampler as one node (the host draw of
# the eager path would break the graph); the key then comes from a device draw inside the graph.
@torch.library.custom_op("albef_kernels::sample_hard_negatives", mutates_args=())
def sample_hard_negatives_op(sim: Tensor, seed: Tensor) -> tuple[Tensor, Tensor]:
    """`sample_hard_negatives_forward(sim, seed)` with a (1,) int64 device key; (R, B, B) -> (R, B)."""
    return sample_hard_negatives_forward(sim, seed)


@sample_hard_negatives_op.register_fake
def _sample_hard_negatives_fake(sim: Tensor, seed: Tensor) -> tuple[Tensor, Tensor]:
    shape = sim.shape[:-1]
    return sim.new_empty(shape, dtype=torch.int64), sim.new_empty(shape, dtype=torch.bool)


# --- public entry point -----------------------------------------------------------------------------------
def sample_hard_negatives(sim: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One hard negative per row of `sim`; see `sample_hard_negatives_reference`.

    Args:
        sim: (B, B) logits, or (R, B, B) to sample R matrices (e.g. both ITM directions) in one launch.
        generator: RNG of the draws. Triton path: a CPU generator (default: the global CPU one) that
            yields the kernel's seed; with none, under torch.compile or while a CUDA graph is being
            captured, the seed is drawn on the device by its default generator instead (so replays
            draw afresh). Reference path: a generator on sim's device (default: global).
    Returns:
        index: (B,) or (R, B) int64, a negative key per row (the row itself where none exists).
        valid: same shape, bool, False where the row had no candidate.
    """
    if sim.ndim not in (2, 3) or sim.shape[-1] != sim.shape[-2]:
        raise ValueError(
            "sample_hard_negatives expects a square (B, B) matrix or a stack (R, B, B), "
            f"got {tuple(sim.shape)}"
        )
    if not sim.is_floating_point():
        raise ValueError(f"sample_hard_negatives expects float logits, got dtype {sim.dtype}")
    cpu_generator = generator is None or generator.device.type == "cpu"
    if use_triton("sample_hard_negatives", sim) and cpu_generator and sim.numel() < 2**31:
        if generator is None and torch.compiler.is_compiling():
            return sample_hard_negatives_op(sim, draw_device_seed(sim.device))
        if generator is None and sim.is_cuda and torch.cuda.is_current_stream_capturing():
            return sample_hard_negatives_forward(sim, draw_device_seed(sim.device))
        return sample_hard_negatives_forward(sim, draw_seed(generator))
    if sim.ndim == 2:
        return sample_hard_negatives_reference(sim, generator)
    draws = [sample_hard_negatives_reference(s, generator) for s in sim]
    return torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws])
