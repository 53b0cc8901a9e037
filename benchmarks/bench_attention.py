"""Forward+backward time and peak memory of the ViT and of the fusion stack, per attention backend,
and of the fusion stack with and without the reuse of the image's cross-attention keys/values.

    python benchmarks/bench_attention.py                                   # CPU: albef_tiny B=8, fp32
    python benchmarks/bench_attention.py --preset albef_base --batch 2     # CPU, reduced base batch
    python benchmarks/bench_attention.py --preset albef_base --batch 64 --precision bf16   # one GPU

Parts (each a forward + backward of fresh leaves, synchronised):
  vit          the online ViT (all blocks), image (B, 3, S, S) -> tokens, backward of a random cotangent
  fusion       the online fusion call of one step, as PretrainTask.forward makes it: 4B rows, the 3B
               ITM pairs (positive, hard-negative image per text, hard-negative text per image) and the
               B MLM inputs, over image tokens (B, 1+P, Dv) and text-encoder outputs (B, L, D) as leaves.
               `plain`: every row projects its own (gathered) image to keys/values; `reuse`: keys/values
               once per layer for the B images, gathered by index for the 4B rows.
Backends: math, sdpa, torch_flash (CUDA), flash_attn (CUDA, when installed). Captions have 8-25 tokens.
On the CPU the comparison uses CPU time (process_time, all threads), which other jobs on a shared
machine disturb far less than wall time; wall-time quantiles are recorded too. "saved" is the exact
size of the activations autograd keeps for the backward (device independent).
The model runs in train mode (dropout on, as in a training step). Rows go to --csv (the schema of
benchmarks/_harness.py); the summary printed at the end compares each row with the sdpa / plain
baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import albef_fast.models.attention as attn  # noqa: E402
from albef_fast.models.albef import ALBEF  # noqa: E402
from albef_fast.models.presets import get_preset  # noqa: E402
from benchmarks._harness import Row, append_rows, cpu_peak_rss_mib, device_name, peak_memory_mib, time_fn  # noqa: E402


def build_inputs(cfg, B: int, L: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    image = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randn(B, cfg.num_patches + 1, cfg.vision_width, generator=g)
    text = torch.randn(B, L, cfg.hidden_size, generator=g)
    neg_image = (torch.arange(B) + 1 + torch.randint(0, max(B - 1, 1), (B,), generator=g)) % B
    neg_text = (torch.arange(B) + 1 + torch.randint(0, max(B - 1, 1), (B,), generator=g)) % B
    to = dict(device=device)
    return (image.to(**to), tokens.to(**to, dtype=dtype), text.to(**to, dtype=dtype), mask.to(**to),
            neg_image.to(**to), neg_text.to(**to))


def vit_forward(model, image):
    def forward():
        out = model.encode_image(image)
        return out.float().square().mean()
    return forward


def fusion_forward(model, tokens, text, mask, neg_image, neg_text, reuse: bool):
    B = mask.shape[0]
    ar = torch.arange(B, device=mask.device)
    index = torch.cat([ar, neg_image, ar, ar])

    def forward():
        img = tokens.detach().requires_grad_()
        txt = text.detach().requires_grad_()
        texts = torch.cat([txt, txt, txt[neg_text], txt])  # ITM pairs, then the MLM inputs
        masks = torch.cat([mask, mask, mask[neg_text], mask])
        if reuse:
            out = model.fuse(texts, masks, image_kv=model.image_kv(img), image_index=index)
        else:
            out = model.fuse(texts, masks, img[index])
        return out[: 3 * B, 0].float().square().mean() + out[3 * B :].float().square().mean()
    return forward


def saved_activations_mib(forward, exclude: set[int]) -> float:
    """MiB of distinct tensor storages autograd saves for the backward of forward() (parameters
    excluded): the activation memory, exact and independent of the allocator and the device."""
    sizes: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            sizes[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(sizes.values()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="albef_tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-len", type=int, default=25)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--backends", nargs="+", default=None, help="default: math sdpa (+ torch_flash, flash_attn on CUDA)")
    p.add_argument("--parts", nargs="+", default=["vit", "fusion"], choices=["vit", "fusion"])
    p.add_argument("--repeat", type=int, default=10, help="CPU: timed calls; CUDA: do_bench rep in ms x 10")
    p.add_argument("--no-memory", action="store_true", help="skip the (forked, CPU) memory probe")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: torch threads (1: OpenMP spin-waits on a busy machine would inflate CPU time)")
    p.add_argument("--csv", default=str(ROOT / "benchmarks/results/attention.csv"))
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(args.threads)
    backends = args.backends or (["math", "sdpa"] + (["torch_flash"] if device.type == "cuda" else [])
                                 + (["flash_attn"] if device.type == "cuda" and attn.flash_attn_available() else []))
    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    model = ALBEF(cfg).to(device).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    image, tokens, text, mask, neg_image, neg_text = build_inputs(cfg, args.batch, args.text_len, device, torch.float32)
    print(f"# {device_name(device)}; torch {torch.__version__}; {args.preset} B={args.batch} L<={args.text_len} "
          f"{args.precision}; flash-attn {'installed' if attn.flash_attn_available() else 'absent'}; "
          f"torch varlen {'yes' if attn.torch_varlen_available() else 'no'}")

    cases = []
    for backend in backends:
        if "vit" in args.parts:
            cases.append(("vit", backend, "-", vit_forward(model, image)))
        if "fusion" in args.parts:
            for reuse in (False, True):
                cases.append(("fusion", backend, "reuse" if reuse else "plain",
                              fusion_forward(model, tokens, text, mask, neg_image, neg_text, reuse)))

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rows, results = [], {}
    for part, backend, variant, forward in cases:
        cpu_s: list[float] = []

        def run(forward=forward, backend=backend, cpu_s=cpu_s):
            t0 = time.process_time()  # CPU seconds of all threads: robust to other jobs on a shared machine
            with attn.use_backend(backend), autocast:
                loss = forward()
            loss.backward()
            model.zero_grad(set_to_none=True)
            cpu_s.append(time.process_time() - t0)

        try:
            if device.type == "cuda":
                t = time_fn(run, device=device, warmup=100, rep=50 * args.repeat)
                mem = peak_memory_mib(run, device)
            else:
                t = time_fn(run, device=device, rep=args.repeat)
                mem = float("nan") if args.no_memory else cpu_peak_rss_mib(run)
            with attn.use_backend(backend), autocast:
                saved = saved_activations_mib(forward, params)
            cpu_ms = 1e3 * statistics.median(cpu_s[1:] or cpu_s)
        except Exception as e:  # e.g. a flash kernel that does not take this shape: report, go on
            print(f"{part:7s} {backend:12s} {variant:6s} FAILED: {type(e).__name__}: {str(e)[:200]}")
            continue
        ms = t[0] if device.type == "cuda" else cpu_ms
        results[(part, backend, variant)] = (ms, mem, saved)
        shape = f"{args.preset} B={args.batch} L={args.text_len} {variant}"
        op = f"attention_{part}"
        rows.append(Row(op, backend, "fwd+bwd", "time", "ms", "batch", args.batch, *t, args.precision, shape))
        rows.append(Row(op, backend, "fwd+bwd", "peak_memory", "MiB", "batch", args.batch, mem, mem, mem,
                        args.precision, shape))
        if device.type == "cpu":
            rows.append(Row(op, backend, "fwd+bwd", "cpu_time", "ms", "batch", args.batch, cpu_ms, cpu_ms, cpu_ms,
                            args.precision, shape))
        rows.append(Row(op, backend, "fwd", "saved_activations", "MiB", "batch", args.batch, saved, saved, saved,
                        args.precision, shape))
        cpu = f"  CPU time {cpu_ms:.1f} ms" if device.type == "cpu" else ""
        print(f"{part:7s} {backend:12s} {variant:6s} {t[0]:10.2f} ms (p20 {t[1]:.2f}, p80 {t[2]:.2f}){cpu}  "
              f"peak {mem:9.1f} MiB  saved for backward {saved:9.1f} MiB")

    print("# relative to sdpa (same part and variant) and, for fusion, reuse relative to plain (same backend); "
          + ("time = CUDA time" if device.type == "cuda" else "time = CPU time (process_time), peak = forked-child RSS"))
    for (part, backend, variant), (ms, mem, saved) in results.items():
        base = results.get((part, "sdpa", variant))
        line = f"{part:7s} {backend:12s} {variant:6s}"
        if base:
            line += f"  vs sdpa: time x{ms / base[0]:.3f}, peak x{mem / base[1]:.3f}, saved x{saved / base[2]:.3f}"
        if variant == "reuse" and (part, backend, "plain") in results:
            plain = results[(part, backend, "plain")]
            line += (f"  | reuse/plain: time x{ms / plain[0]:.3f}, peak x{mem / plain[1]:.3f}, "
                     f"saved x{saved / plain[2]:.3f}")
        print(line)
    append_rows(args.csv, rows)
    print(f"# {len(rows)} rows appended to {args.csv}")


if __name__ == "__main__":
    main()
