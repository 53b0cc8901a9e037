"""Benchmark of hard-negative sampling for ITM (kernels/hard_negatives.py), both directions per call.

    python benchmarks/kernels/bench_hard_negatives.py --batch 64 512        # one GPU
    python benchmarks/kernels/bench_hard_negatives.py --batch 64 --providers torch albef_loop   # CPU smoke

Providers, each drawing one negative per row for the (2, B, B) stack [sim_i2t, sim_t2i]:
  triton         sample_hard_negatives on the stack: one launch, seed drawn on the host (no sync)
  torch          sample_hard_negatives_reference per direction (batched Gumbel-max, no sync)
  torch_compile  torch.compile of that reference
  albef_loop     ALBEF's formulation: softmax, zero the diagonal, then per row torch.multinomial and
                 `.item()` (2B host synchronisations); written from REFERENCE §2, the baseline of
                 PERFORMANCE.md's sampler target
Figures: ms at p50/p20/p80 (do_bench on CUDA; also replayed from a CUDA graph, i.e. without the host's
launch overhead, except albef_loop whose host syncs cannot be captured), GB/s on the 2 * B * B * 4
bytes of logits read.
Rows go to benchmarks/results/kernels.csv (or --csv) with the device and versions.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from albef_kernels import sample_hard_negatives, sample_hard_negatives_reference  # noqa: E402
from albef_kernels._dispatch import use_backend  # noqa: E402
from benchmarks._harness import Row, append_rows, device_name, time_fn  # noqa: E402
from benchmarks.kernels.bench_itc_loss import cuda_graph_ms  # noqa: E402


def triton_both(sims):
    with use_backend("triton"):
        return sample_hard_negatives(sims)


def reference_both(sims):
    return [sample_hard_negatives_reference(s) for s in sims]


def albef_loop(sims):
    out = []
    for sim in sims:
        B = sim.shape[0]
        weights = F.softmax(sim.float(), dim=1)
        weights.fill_diagonal_(0)
        out.append([int(torch.multinomial(weights[b], 1).item()) for b in range(B)])  # a host sync per row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[64, 512])
    p.add_argument("--providers", nargs="+", default=["triton", "torch", "torch_compile", "albef_loop"])
    p.add_argument("--csv", default=str(ROOT / "benchmarks/results/kernels.csv"))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and "triton" in args.providers:
        raise SystemExit("no CUDA device: the triton provider would time the interpreter; use torch ones")
    print(f"device: {device_name()}  torch {torch.__version__}", flush=True)
    compiled = torch.compile(reference_both) if "torch_compile" in args.providers else None
    fns = {"triton": triton_both, "torch": reference_both, "torch_compile": compiled,
           "albef_loop": albef_loop}
    rows = []
    for B in args.batch:
        g = torch.Generator().manual_seed(0)
        sims = (torch.randn(2, B, B, generator=g) * 3).to(device)
        nbytes = sims.numel() * 4
        for name in args.providers:
            fn = fns[name]
            fn(sims)  # compile outside the timing
            p50, p20, p80 = time_fn(lambda: fn(sims), device=device)
            common = dict(op="sample_hard_negatives", provider=name, mode="fwd", x_name="B", x=B,
                          dtype="fp32", shape_config="both directions (2, B, B)")
            rows += [Row(metric="time", unit="ms", p50=p50, p20=p20, p80=p80, **common),
                     Row(metric="bandwidth", unit="GB/s", p50=nbytes / p50 / 1e6, p20=nbytes / p80 / 1e6,
                         p80=nbytes / p20 / 1e6, **common)]
            capturable = device == "cuda" and name != "albef_loop"  # the loop's host syncs cannot be captured
            graph_ms = cuda_graph_ms(lambda: fn(sims), []) if capturable else None
            if graph_ms is not None:
                rows.append(Row(metric="time_cuda_graph", unit="ms", p50=graph_ms[0], p20=graph_ms[1],
                                p80=graph_ms[2], **common))
            graph = f"{1e3 * graph_ms[0]:.1f} us" if graph_ms else "n/a"
            print(f"B={B:4d} {name:14s} {1e3 * p50:10.1f} us (p20 {1e3 * p20:.1f}, p80 {1e3 * p80:.1f})  "
                  f"in a CUDA graph {graph}", flush=True)
    append_rows(args.csv, rows)
    print(f"{len(rows)} rows appended to {args.csv}")


if __name__ == "__main__":
    main()
