"""Benchmark of the fused ITC loss (kernels/itc_loss.py), both directions, forward + backward.

    python benchmarks/kernels/bench_itc_loss.py --batch 64 512 --queue-dtype bf16 fp32     # one GPU
    python benchmarks/kernels/bench_itc_loss.py --cpu-memory        # the CPU memory check
    python benchmarks/kernels/bench_itc_loss.py --batch 64 --breakdown   # GPU time per kernel and config

GPU providers, each timed as forward + backward of ALBEF's ITC (gradients to the image and text
features and to the temperature), same inputs, same run:
  triton         itc_loss_bidirectional on the Triton path (one split-K launch + combine + one sum)
  torch          itc_loss_reference per direction (the eager formulation, the baseline)
  torch_compile  torch.compile of the same reference
  triton_s<S>    (with --splits) the kernel at a forced number of queue splits, for tuning
  sdpa_<backend> the SDPA path (O and LSE from PyTorch's fused attention: cudnn, flash, efficient),
                 a candidate for the B = 64 target; a backend that refuses the shapes is reported
Each is timed twice: eagerly (do_bench; includes the host's launch overhead whenever the host is the
slower side) and replayed from a CUDA graph (do_bench_cudagraph; GPU time alone).
Features are fp32 (as the model produces them); --queue-dtype sets the two queues' dtype. Figures:
ms at p50/p20/p80 (do_bench: CUDA events, L2 flushed), TFLOP/s on the fixed count of the one-pass
algorithm 16 * B * (B + Q) * D (PERFORMANCE.md §1b; the reference does fewer FLOPs but more traffic),
GB/s on the bytes that must move at least once (both queues and the features), and the peak extra
CUDA memory of one call.

--cpu-memory: B = 256, Q = 65,536, D = 256, fp32, forward + backward of both directions on the CPU:
the reference against the streaming PyTorch path, peak resident-memory growth of each in a forked
child (`cpu_peak_rss_mib`) and the ratio (target <= 0.1), plus wall-clock time.
Rows go to benchmarks/results/kernels.csv (or --csv) with the device and versions.
"""

import argparse
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from albef_kernels import itc_loss_bidirectional, itc_loss_path, itc_loss_reference  # noqa: E402
from albef_kernels._dispatch import use_backend  # noqa: E402
from albef_kernels.itc_loss import itc_loss_fused  # noqa: E402
from benchmarks._harness import (  # noqa: E402
    Row, append_rows, cpu_peak_rss_mib, device_name, peak_memory_mib, time_fn,
)

itc_module = importlib.import_module("albef_kernels.itc_loss")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ALPHA = 0.4


def make_inputs(B: int, Q: int, D: int, queue_dtype: torch.dtype, device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device)

    return dict(
        image_feat=unit(B, D).requires_grad_(), image_feat_m=unit(B, D),
        text_feat=unit(B, D).requires_grad_(), text_feat_m=unit(B, D),
        image_queue=unit(Q, D).to(queue_dtype), text_queue=unit(Q, D).to(queue_dtype),
        temp=torch.tensor(0.07, device=device, requires_grad=True),
    )


def reference_both(image_feat, image_feat_m, text_feat, text_feat_m, image_queue, text_queue, temp):
    i2t, _ = itc_loss_reference(image_feat, image_feat_m, text_feat_m, text_queue, temp, ALPHA)
    t2i, _ = itc_loss_reference(text_feat, text_feat_m, image_feat_m, image_queue, temp, ALPHA)
    return (i2t + t2i) / 2


def fused_both(image_feat, image_feat_m, text_feat, text_feat_m, image_queue, text_queue, temp):
    with use_backend("triton"):
        loss, _ = itc_loss_bidirectional(image_feat, image_feat_m, text_feat, text_feat_m, image_queue,
                                         text_queue, temp, ALPHA)
    return loss.mean()


def streaming_both(image_feat, image_feat_m, text_feat, text_feat_m, image_queue, text_queue, temp):
    directions = [(image_feat, image_feat_m, text_feat_m, text_queue),
                  (text_feat, text_feat_m, image_feat_m, image_queue)]
    loss, _ = itc_loss_fused(directions, temp, ALPHA, "streaming")
    return loss.mean()


def sdpa_both(backend: str):
    def loss_fn(image_feat, image_feat_m, text_feat, text_feat_m, image_queue, text_queue, temp):
        directions = [(image_feat, image_feat_m, text_feat_m, text_queue),
                      (text_feat, text_feat_m, image_feat_m, image_queue)]
        loss, _ = itc_loss_fused(directions, temp, ALPHA, f"sdpa:{backend}")
        return loss.mean()
    return loss_fn


def fwd_bwd(loss_fn, inputs):
    return lambda: loss_fn(**inputs).backward()


def cuda_graph_ms(fn, grads) -> tuple[float, float, float] | None:
    """The same call replayed from a CUDA graph: GPU time without the host's launch overhead (which
    do_bench's figure includes whenever the host is slower than the GPU). None if capture fails."""
    import triton.testing

    try:
        for t in grads:
            t.grad = None
        q = triton.testing.do_bench_cudagraph(fn, rep=50, quantiles=[0.5, 0.2, 0.8])
        return tuple(float(v) for v in q)
    except Exception as exc:  # e.g. an op that cannot be captured; the eager figure still stands
        print(f"  (no CUDA-graph timing: {type(exc).__name__}: {str(exc)[:120]})")
        torch.cuda.synchronize()
        return None


def gpu_rows(args) -> list[Row]:
    rows: list[Row] = []
    dev = torch.device("cuda")
    for qname in args.queue_dtype:
        for B in args.batch:
            inputs = make_inputs(B, args.queue, args.dim, DTYPES[qname], dev)
            N = B + args.queue
            flops = 16.0 * B * N * args.dim
            nbytes = 2 * args.queue * args.dim * DTYPES[qname].itemsize + 4 * B * args.dim * 4
            providers = {"triton": fused_both, "torch": reference_both,
                         **{f"sdpa_{b}": sdpa_both(b) for b in ("cudnn", "flash", "efficient")}}
            if "torch_compile" in args.providers and B in args.compile_batch:
                providers["torch_compile"] = torch.compile(reference_both)
            providers = {k: v for k, v in providers.items() if k in args.providers}
            split_fns = {}
            for S in args.splits:
                split_fns[f"triton_s{S}"] = S
            config = f"Q={args.queue},D={args.dim},features=fp32,queue={qname},alpha={ALPHA}"
            with use_backend("triton"):  # the triton provider must time the kernel, not a fallback
                names = ("image_feat", "image_feat_m", "text_feat", "text_feat_m", "image_queue", "text_queue",
                         "temp")
                path = itc_loss_path(*(inputs[k] for k in names))
            if path != "triton":
                raise SystemExit(f"B={B} queue={qname}: itc_loss would take the {path} path, not the kernel")
            grads = [inputs["image_feat"], inputs["text_feat"], inputs["temp"]]
            for name, target in [*providers.items(), *split_fns.items()]:
                if isinstance(target, int):  # forced split count: patch the heuristic for this run
                    saved = itc_module._num_splits
                    itc_module._num_splits = lambda *a, S=target: S
                    fn = fwd_bwd(fused_both, inputs)
                else:
                    saved, fn = None, fwd_bwd(target, inputs)
                try:
                    fn()  # compile / autotune outside the timing
                    torch.cuda.synchronize()
                    p50, p20, p80 = time_fn(fn, grad_to_none=grads, warmup=args.warmup, rep=args.rep)
                    mem = peak_memory_mib(fn)
                    graph_ms = cuda_graph_ms(fn, grads)
                except (RuntimeError, NotImplementedError) as exc:  # an SDPA backend that refuses the inputs
                    if not name.startswith("sdpa"):
                        raise
                    print(f"B={B:4d} queue={qname} {name:14s} failed: {str(exc)[:160]}", flush=True)
                    torch.cuda.synchronize()
                    continue
                finally:
                    if saved is not None:
                        itc_module._num_splits = saved
                common = dict(op="itc_loss", provider=name, mode="full", x_name="B", x=B, dtype=qname,
                              shape_config=config)
                rows += [
                    Row(metric="time", unit="ms", p50=p50, p20=p20, p80=p80, **common),
                    Row(metric="throughput", unit="TFLOP/s", p50=flops / p50 / 1e9, p20=flops / p80 / 1e9,
                        p80=flops / p20 / 1e9, **common),
                    Row(metric="bandwidth", unit="GB/s", p50=nbytes / p50 / 1e6, p20=nbytes / p80 / 1e6,
                        p80=nbytes / p20 / 1e6, **common),
                    Row(metric="peak_memory", unit="MiB", p50=mem, p20=mem, p80=mem, **common),
                ]
                if graph_ms is not None:
                    rows.append(Row(metric="time_cuda_graph", unit="ms", p50=graph_ms[0], p20=graph_ms[1],
                                    p80=graph_ms[2], **common))
                graph = f"{1e3 * graph_ms[0]:7.1f} us" if graph_ms else "    n/a"
                print(f"B={B:4d} queue={qname} {name:14s} {1e3 * p50:9.1f} us (p20 {1e3 * p20:.1f}, p80 "
                      f"{1e3 * p80:.1f})  in a CUDA graph {graph}  {flops / p50 / 1e9:7.1f} TFLOP/s  "
                      f"{nbytes / p50 / 1e6:7.1f} GB/s  peak {mem:8.1f} MiB", flush=True)
    return rows


EXTRA_CONFIGS = [  # (BLOCK_M, BLOCK_N, warps, stages) tried by --breakdown beside the autotuner's list
    (64, 128, 8, 2), (64, 128, 8, 3), (128, 128, 8, 2), (32, 128, 4, 2), (64, 64, 8, 4), (128, 64, 8, 3),
    (32, 64, 4, 3), (32, 32, 4, 4),
]


def host_profile(fn, B: int, calls: int = 50) -> None:
    """The host's time per eager call (launches only; the GPU runs behind) and where it goes (cProfile)."""
    import cProfile
    import pstats
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    print(f"B={B:4d} host time per eager fwd+bwd call: {host_us:.1f} us", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def with_inbatch_limit(limit: int, fn):
    """fn() with the kernel's in-batch threshold (INBATCH_IN_COMBINE_MAX_B) set to `limit`."""
    saved, itc_module.INBATCH_IN_COMBINE_MAX_B = itc_module.INBATCH_IN_COMBINE_MAX_B, limit
    try:
        return fn()
    finally:
        itc_module.INBATCH_IN_COMBINE_MAX_B = saved


def breakdown_rows(args) -> list[Row]:
    """Where the GPU time of the Triton path goes (CUDA-graph replay, so without host overhead): the
    split-K kernel alone (queue tiles through TMA where `_tma_ready` allows, and through pointers), the
    combine kernel alone (and at its former config), the backward (Triton kernel against the torch ops),
    the op's forward (both), the op's forward + backward with a given upstream gradient and with a mean;
    with --sweep the split-K kernel at each config (autotuner's list + extras). Then the SDPA candidate per
    backend: its attention calls of both directions alone, its forward with the tail fused (the combine
    kernel) and in torch ops, and its forward + backward."""
    rows: list[Row] = []
    dev = torch.device("cuda")
    for B in args.batch:
        inputs = make_inputs(B, args.queue, args.dim, torch.bfloat16, dev)
        directions = [(inputs["image_feat"], inputs["image_feat_m"], inputs["text_feat_m"], inputs["text_queue"]),
                      (inputs["text_feat"], inputs["text_feat_m"], inputs["image_feat_m"], inputs["image_queue"])]
        temp = inputs["temp"]
        upstream = torch.full((2,), 0.5, device=dev)
        config = f"Q={args.queue},D={args.dim},features=fp32,queue=bf16,alpha={ALPHA}"

        def op_fwd_bwd():
            with use_backend("triton"):
                loss, _ = itc_loss_bidirectional(*(inputs[k] for k in ("image_feat", "image_feat_m", "text_feat",
                                                   "text_feat_m", "image_queue", "text_queue", "temp")), ALPHA)
            loss.backward(upstream)

        _, _, dq, dtemp = itc_module._triton_forward(directions, temp, ALPHA)
        bwd_args = (dq, dtemp, upstream, [True, True], True, [torch.float32] * 2, (temp.shape, temp.dtype))
        stages = {
            "split_kernel": lambda: itc_module._triton_forward(directions, temp, ALPHA, stage="split"),
            "split_kernel_pointers": lambda: itc_module._triton_forward(directions, temp, ALPHA, stage="split",
                                                                        tma=False),
            "combine_kernel": lambda: itc_module._triton_forward(directions, temp, ALPHA, stage="combine"),
            "combine_BS16_w4": lambda: itc_module._triton_forward(directions, temp, ALPHA, stage="combine",
                                                                  combine_config=dict(BLOCK_S=16, num_warps=4)),
            "backward_triton": lambda: itc_module._triton_backward(*bwd_args),
            "backward_torch_ops": lambda: itc_module._backward(*bwd_args),
            "forward": lambda: itc_module._triton_forward(directions, temp, ALPHA),
            "fwd_bwd_upstream": op_fwd_bwd,
            "fwd_bwd_mean": fwd_bwd(fused_both, inputs),
        }
        # the in-batch keys in the combine kernel against their own launch (INBATCH_IN_COMBINE_MAX_B's choice)
        for name, limit in (("forward_inbatch_in_combine", 1 << 30), ("forward_inbatch_launch", 0)):
            stages[name] = lambda limit=limit, dirs=directions, t=temp: with_inbatch_limit(
                limit, lambda: itc_module._triton_forward(dirs, t, ALPHA))
        for b in ("cudnn", "flash", "efficient"):  # the SDPA candidate: its attention calls alone, then whole
            chunk = itc_module._sdpa_chunk(args.queue, 2 * B, dev)
            n = args.queue // chunk
            xs = [torch.cat([d[0], d[1]]).detach().to(torch.bfloat16).expand(n, -1, -1) for d in directions]
            keys = [d[3][: n * chunk].view(n, chunk, -1) for d in directions]
            stages[f"sdpa_{b}_attention"] = lambda b=b, xs=xs, keys=keys: [
                itc_module._attend(x, k, b) for x, k in zip(xs, keys)]
            for fuse in (True, False):  # the tail in the Triton combine kernel, or in torch ops
                stages[f"sdpa_{b}_forward_{'fused' if fuse else 'torch_tail'}"] = (
                    lambda b=b, fuse=fuse, dirs=directions, t=temp: itc_module.itc_loss_sdpa_forward(
                        dirs, t, ALPHA, backend=b, fuse=fuse))
            stages[f"sdpa_{b}_fwd_bwd_mean"] = fwd_bwd(sdpa_both(b), inputs)
        sweep = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                 for c in itc_module._FWD_CONFIGS] + EXTRA_CONFIGS if args.sweep else []
        for m, n, w, st in sweep:
            cfg = dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
            stages[f"split_M{m}_N{n}_w{w}_s{st}"] = lambda cfg=cfg: itc_module._triton_forward(
                directions, temp, ALPHA, config=cfg, stage="split")
        for name, fn in stages.items():
            try:
                fn()  # compile / autotune outside the timing
                torch.cuda.synchronize()
            except Exception as exc:  # a config that does not fit (shared memory)
                print(f"B={B:4d} {name:28s} failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                torch.cuda.synchronize()
                continue
            q = cuda_graph_ms(fn, [inputs["image_feat"], inputs["text_feat"], temp])
            if q is None:
                continue
            p50, p20, p80 = q
            rows.append(Row(op="itc_loss_stage", provider=name, mode="full", metric="time_cuda_graph", unit="ms",
                            x_name="B", x=B, p50=p50, p20=p20, p80=p80, dtype="bf16", shape_config=config))
            print(f"B={B:4d} {name:28s} {1e3 * p50:8.1f} us in a CUDA graph (p20 {1e3 * p20:.1f}, "
                  f"p80 {1e3 * p80:.1f})", flush=True)
        host_profile(op_fwd_bwd, B)
        cache = getattr(itc_module._itc_loss_fwd_kernel, "cache", {})
        for key, cfg in cache.items():
            print(f"autotuner: key {key} -> {cfg}", flush=True)
    return rows


def cpu_memory_rows(args) -> list[Row]:
    B, Q, D = args.cpu_batch, args.queue, args.dim
    inputs = make_inputs(B, Q, D, torch.float32, "cpu")
    config = f"Q={Q},D={D},features=fp32,queue=fp32,alpha={ALPHA},fwd+bwd both directions"
    rows, peaks = [], {}
    for name, loss_fn in (("torch", reference_both), ("streaming", streaming_both)):
        fn = fwd_bwd(loss_fn, inputs)
        peaks[name] = peak = cpu_peak_rss_mib(fn)
        p50, p20, p80 = time_fn(fn, device="cpu", rep=args.cpu_rep,
                                grad_to_none=[inputs["image_feat"], inputs["text_feat"], inputs["temp"]])
        common = dict(op="itc_loss", provider=name, mode="full", x_name="B", x=B, dtype="fp32",
                      shape_config=config)
        rows += [Row(metric="peak_rss", unit="MiB", p50=peak, p20=peak, p80=peak, **common),
                 Row(metric="time", unit="ms", p50=p50, p20=p20, p80=p80, **common)]
        print(f"CPU B={B} Q={Q} D={D} {name:10s} peak RSS growth {peak:8.1f} MiB   time {p50:8.1f} ms "
              f"(p20 {p20:.1f}, p80 {p80:.1f}, {torch.get_num_threads()} threads)", flush=True)
    ratio = peaks["streaming"] / peaks["torch"]
    print(f"streaming / reference peak memory = {ratio:.4f} (target <= 0.1) on {device_name('cpu')}")
    rows.append(Row(op="itc_loss", provider="streaming/torch", mode="full", metric="peak_rss_ratio", unit="x",
                    x_name="B", x=B, p50=ratio, p20=ratio, p80=ratio, dtype="fp32", shape_config=config))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[64, 512])
    p.add_argument("--queue", type=int, default=65536)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queue-dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--providers", nargs="+", default=["triton", "torch", "torch_compile"],
                   help="triton torch torch_compile sdpa_cudnn sdpa_flash sdpa_efficient")
    p.add_argument("--compile-batch", type=int, nargs="+", default=[64], help="batches with torch_compile")
    p.add_argument("--splits", type=int, nargs="*", default=[], help="extra triton runs, forced splits")
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--cpu-memory", action="store_true", help="the CPU peak-memory comparison instead")
    p.add_argument("--breakdown", action="store_true", help="GPU time per kernel (see breakdown_rows) instead")
    p.add_argument("--sweep", action="store_true", help="with --breakdown: also every split-K config")
    p.add_argument("--cpu-batch", type=int, default=256)
    p.add_argument("--cpu-rep", type=int, default=3)
    p.add_argument("--csv", default=str(ROOT / "benchmarks/results/kernels.csv"))
    args = p.parse_args()
    print(f"device: {device_name()}  torch {torch.__version__}", flush=True)
    if args.cpu_memory:
        rows = cpu_memory_rows(args)
    elif torch.cuda.is_available():
        rows = breakdown_rows(args) if args.breakdown else gpu_rows(args)
    else:
        raise SystemExit("no CUDA device: run with --cpu-memory on the CPU")
    append_rows(args.csv, rows)
    print(f"{len(rows)} rows appended to {args.csv}")


if __name__ == "__main__":
    main()
