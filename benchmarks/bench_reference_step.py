"""One training step of the reference code against ours, on the CPU, same inputs, same run.

    python benchmarks/bench_reference_step.py                       # albef_tiny, B=8, L=25, Q=65,536
    python benchmarks/bench_reference_step.py --preset albef_base --batch 4 --steps 3

PERFORMANCE.md's CPU target: our tiny-config train step in <= 0.5x the time of the reference
formulation. The reference is LAVIS's ALBEF (salesforce-lavis 1.0.2, in .venv-lavis: `make parity-env`),
driven by albef_fast/parity/reference_side.py --time-steps: its own forward (EMA, ITC against the queue,
the per-row torch.multinomial hard-negative loop, ITM, MLM with the momentum distillation, enqueue),
backward and an AdamW step. Ours: PretrainTask forward, backward, the training loop's AdamW
(`build_optimizer`: ALBEF's parameter groups, PyTorch's fused implementation), after_step (EMA, enqueue,
clamp), with the default CPU paths (`kernels.backend=auto`, attention auto = SDPA on the CPU). Both
sides start from the same weights and queue (converted by our converter), take the same images,
captions and MLM mask, run in eval mode (dropout off on both) with the same number of threads, and
time steps after one warm-up step. Then one AdamW step alone, ours (fused) against PyTorch's default
(the reference's), on the same parameters. p50/p20/p80 over the timed steps; rows appended to
benchmarks/results/reference_step.csv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._harness import Row, append_rows, device_name, quantiles_ms  # noqa: E402

from albef_fast.config import OptimConfig  # noqa: E402
from albef_fast.parity.harness import make_case, reference_inputs, run_reference  # noqa: E402
from albef_fast.train.optim import build_optimizer, param_groups  # noqa: E402


def time_ours(case, steps: int) -> list[float]:
    task, batch = case.task, case.batch
    opt = build_optimizer(task.model, OptimConfig(lr=1e-4, weight_decay=0.02))  # the training loop's
    seconds = []
    for i in range(steps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = task(batch, case.alpha)
        out.loss.backward()
        opt.step()
        task.after_step(out)
        if i:
            seconds.append(time.perf_counter() - t0)
    return seconds


def time_optimizer_steps(case, steps: int) -> dict[str, list[float]]:
    """One AdamW step alone on fresh random gradients: ours (fused) and PyTorch's default (the
    reference's), same parameters and groups, so the step's optimizer share can be read off."""
    params = [p for p in case.task.model.parameters() if p.requires_grad]
    groups = param_groups(case.task.model, 0.02)
    optimizers = {"AdamW fused (ours)": build_optimizer(case.task.model, OptimConfig(lr=1e-4, weight_decay=0.02)),
                  "AdamW default": torch.optim.AdamW(groups, lr=1e-4)}
    seconds: dict[str, list[float]] = {name: [] for name in optimizers}
    for i in range(steps + 1):  # the first is a warm-up
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        for name, opt in optimizers.items():
            t0 = time.perf_counter()
            opt.step()
            if i:
                seconds[name].append(time.perf_counter() - t0)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="albef_tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-len", type=int, default=25)
    p.add_argument("--queue-size", type=int, default=65536)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv", default=str(ROOT / "benchmarks/results/reference_step.csv"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["PARITY_THREADS"] = str(args.threads)  # read by reference_side.py
    case = make_case(args.preset, batch_size=args.batch, max_len=args.text_len, queue_size=args.queue_size)
    machine = device_name("cpu")
    shape = f"{args.preset} B={args.batch} L={args.text_len} Q={args.queue_size} threads={args.threads}"
    print(f"machine: {machine}; {shape}; fp32, eval mode (dropout off), {args.steps} timed steps after 1 warm-up")
    ref = run_reference(reference_inputs(case, "lavis"), "lavis", None, extra_args=["--time-steps", str(args.steps)])
    ours = time_ours(case, args.steps)
    rows = []
    results = {"reference (LAVIS ALBEF)": ref["step_seconds"], "albef-fast": ours}
    for name, seconds in results.items():
        p50, p20, p80 = quantiles_ms([1e3 * s for s in seconds])
        print(f"{name:24s} {p50:9.1f} ms/step  (p20 {p20:.1f}, p80 {p80:.1f})")
        rows.append(Row("train_step", name, "fwd+bwd+step", "time", "ms", "batch", args.batch, p50, p20, p80,
                        "fp32", shape, gpu=machine))
    ratio = statistics.median(ours) / statistics.median(ref["step_seconds"])
    print(f"albef-fast / reference = {ratio:.2f}x the time (target <= 0.5x)")
    for name, seconds in time_optimizer_steps(case, args.steps).items():  # after the steps: weights moved
        p50, p20, p80 = quantiles_ms([1e3 * s for s in seconds])
        print(f"{name:24s} {p50:9.1f} ms/step  (p20 {p20:.1f}, p80 {p80:.1f}), the optimizer step alone")
        rows.append(Row("optimizer_step", name, "step", "time", "ms", "batch", args.batch, p50, p20, p80,
                        "fp32", shape, gpu=machine))
    append_rows(args.csv, rows)


if __name__ == "__main__":
    main()
