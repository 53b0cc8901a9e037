"""Benchmark of the one-launch EMA (kernels/ema.py) over a whole momentum model.

    python benchmarks/kernels/bench_ema.py                                   # one GPU: albef_base, all providers
    python benchmarks/kernels/bench_ema.py --providers torch reference_loop  # the CPU (no Triton there)

The tensors have exactly the shapes of the preset's momentum model (356 tensors, 209.9 M parameters
for albef_base; shapes read from a model built on the meta device), fp32, fresh random values.
Providers, same tensors, same run:
  triton          ema_update_triton_: one launch over all tensors (pointer table)
  torch           ema_update_reference_: torch._foreach_lerp_ (the PyTorch reference, multi-tensor)
  torch_compile   torch.compile of that reference
  reference_loop  ALBEF's formulation, one allocating update per parameter:
                  p_m.data = p_m.data * m + p.data * (1 - m)   (the baseline in PERFORMANCE.md)
  torch_flat      one lerp_ over a single flat buffer of the same size: what a flat-buffer design could
                  reach with PyTorch, i.e. the ceiling for one elementwise op on this card
Figures: ms at p50/p20/p80 (do_bench on CUDA: events, L2 flushed; wall clock on the CPU), GB/s on the
12 bytes per parameter that must move (read p_m and p, write p_m), and the peak extra memory of one call.
Rows are appended to benchmarks/results/kernels.csv (or --csv) after each provider.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from albef_kernels.ema import ema_update_reference_, ema_update_triton_

from albef_fast.models.albef import ALBEF
from albef_fast.models.presets import get_preset
from benchmarks._harness import Row, append_rows, cpu_peak_rss_mib, device_name, peak_memory_mib, time_fn

DECAY = 0.995


def momentum_shapes(preset: str) -> list[tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        twin = ALBEF(get_preset(preset)).momentum_copy()
    return [tuple(p.shape) for p in twin.parameters()]


def reference_loop(momentum: list[torch.Tensor], online: list[torch.Tensor], decay: float) -> None:
    with torch.no_grad():
        for p_m, p in zip(momentum, online):
            p_m.data = p_m.data * decay + p.data * (1.0 - decay)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="albef_base")
    p.add_argument("--providers", nargs="+",
                   default=["triton", "torch", "torch_compile", "reference_loop", "torch_flat"])
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--csv", default=str(ROOT / "benchmarks/results/kernels.csv"))
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_name(dev)}  torch {torch.__version__}", flush=True)
    shapes = momentum_shapes(args.preset)
    n = sum(torch.Size(s).numel() for s in shapes)
    nbytes = 12.0 * n
    g = torch.Generator(device=dev).manual_seed(0)
    momentum = [torch.randn(s, device=dev, generator=g) for s in shapes]
    online = [torch.randn(s, device=dev, generator=g) for s in shapes]
    config = f"{args.preset},tensors={len(shapes)},decay={DECAY}"
    print(f"{args.preset}: {len(shapes)} tensors, {n / 1e6:.1f} M parameters, {nbytes / 1e9:.2f} GB moved per update")

    for name in args.providers:
        if name == "triton":
            if dev.type != "cuda":
                print("triton: skipped (needs CUDA; the interpreter is far too slow at this size)")
                continue
            fn = lambda: ema_update_triton_(momentum, online, DECAY)
        elif name == "torch":
            fn = lambda: ema_update_reference_(momentum, online, DECAY)
        elif name == "torch_compile":
            compiled = torch.compile(ema_update_reference_)
            fn = lambda compiled=compiled: compiled(momentum, online, DECAY)
        elif name == "reference_loop":
            fn = lambda: reference_loop(momentum, online, DECAY)
        elif name == "torch_flat":
            flat_m, flat_p = torch.randn(n, device=dev, generator=g), torch.randn(n, device=dev, generator=g)
            fn = lambda flat_m=flat_m, flat_p=flat_p: flat_m.lerp_(flat_p, 1.0 - DECAY)
        else:
            raise SystemExit(f"unknown provider {name!r}")
        fn()  # compilation, plan tables, allocations outside the timing
        if dev.type == "cuda":
            torch.cuda.synchronize()
            p50, p20, p80 = time_fn(fn, warmup=args.warmup, rep=args.rep)
            mem, mem_unit, mem_metric = peak_memory_mib(fn), "MiB", "peak_memory"
        else:
            p50, p20, p80 = time_fn(fn, device="cpu", rep=5)
            mem, mem_unit, mem_metric = cpu_peak_rss_mib(fn), "MiB", "peak_rss"
        common = {"op": "ema", "provider": name, "mode": "fwd", "x_name": "params", "x": n, "dtype": "fp32",
                  "shape_config": config}
        rows = [
            Row(metric="time", unit="ms", p50=p50, p20=p20, p80=p80, **common),
            Row(metric="bandwidth", unit="GB/s", p50=nbytes / p50 / 1e6, p20=nbytes / p80 / 1e6,
                p80=nbytes / p20 / 1e6, **common),
            Row(metric=mem_metric, unit=mem_unit, p50=mem, p20=mem, p80=mem, **common),
        ]
        append_rows(args.csv, rows)
        print(f"{name:15s} {p50:8.3f} ms (p20 {p20:.3f}, p80 {p80:.3f})  {nbytes / p50 / 1e6:7.1f} GB/s  "
              f"peak extra {mem:8.1f} MiB", flush=True)
        if name == "torch_flat":
            del flat_m, flat_p
    print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    main()
