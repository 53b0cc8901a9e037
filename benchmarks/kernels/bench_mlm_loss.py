"""Benchmark of the masked, vocabulary-chunked MLM head with distillation (kernels/mlm_loss.py).

    python benchmarks/kernels/bench_mlm_loss.py                  # one GPU: time + memory, fp32 and bf16 autocast
    python benchmarks/kernels/bench_mlm_loss.py --cpu-memory     # the CPU memory comparison

Shapes: ALBEF-base at batch 64: B=64 captions of L=25 tokens, 15 % masked -> M=240 rows, D=768 (preset
hidden_size), V=30,522 (preset vocab_size), alpha=0.4. Each call is forward + backward with gradients
to h, the (tied) decoder weight and the bias. Providers, same inputs, same run:
  triton         mlm_loss on the Triton path (cuBLAS GEMMs per vocabulary chunk + the two row kernels)
  chunked        the same two chunked passes with the row maths in torch ops (the CPU fallback path)
  torch          mlm_loss_reference: (M, V) logits, log-softmax, softmax of the momentum logits
  torch_compile  torch.compile of that reference
  all_token      ALBEF's formulation: both vocabulary projections over all B*L tokens, CE with
                 ignore_index=-100, soft CE averaged over the masked tokens (the memory baseline of
                 PERFORMANCE.md: "no B x L x V tensor; memory <= 1/5")
--precision: fp32 (PyTorch's default matmul precision, TF32 off) and/or bf16 (autocast bf16 with fp32
parameters, the training setting). Figures: ms p50/p20/p80 (do_bench), effective TFLOP/s on the masked
reference's 8*M*D*V FLOPs (4 GEMMs; the chunked paths do 12*M*D*V, all_token 8*B*L*D*V), and the
peak extra CUDA memory of one call (the parameter gradients included: every provider makes them).
--cpu-memory: torch vs chunked vs all_token at the same shapes on the CPU, fp32: peak resident-memory
growth of one forward + backward in a forked child (`cpu_peak_rss_mib`), the ratios, and the time.
Rows are appended to benchmarks/results/kernels.csv (or --csv) after each provider.
"""

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from albef_kernels import mlm_loss, mlm_loss_reference
from albef_kernels._dispatch import use_backend
from albef_kernels.mlm_loss import CHUNK_SIZE, MlmLossFunction

from albef_fast.models.presets import get_preset
from benchmarks._harness import Row, append_rows, cpu_peak_rss_mib, device_name, peak_memory_mib, time_fn

ALPHA = 0.4


def mlm_loss_all_tokens(hidden, weight, bias, labels_full, hidden_m, weight_m, bias_m, alpha):
    """ALBEF's formulation: (B, L, V) logits for every token, online and momentum; the loss counts the
    masked tokens only (labels_full = -100 elsewhere)."""
    V = weight.shape[0]
    logits = (hidden @ weight.t() + bias).float()  # (B, L, V)
    ce = F.cross_entropy(logits.view(-1, V), labels_full.view(-1))  # ignore_index=-100
    with torch.no_grad():
        soft = F.softmax((hidden_m @ weight_m.t() + bias_m).float(), dim=-1)  # (B, L, V)
    distill = -(soft * F.log_softmax(logits, dim=-1)).sum(dim=-1)  # (B, L)
    distill = distill[labels_full != -100].mean()
    return (1.0 - alpha) * ce + alpha * distill


def make_inputs(B: int, L: int, M: int, D: int, V: int, device) -> dict:
    """Hidden states for all B*L tokens, M of them masked; word-embedding-like weight scales."""
    g = torch.Generator().manual_seed(0)
    hidden, hidden_m = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    W, W_m = torch.randn(V, D, generator=g) * 0.05, torch.randn(V, D, generator=g) * 0.05
    b, b_m = torch.randn(V, generator=g) * 0.1, torch.randn(V, generator=g) * 0.1
    pos = torch.randperm(B * L, generator=g)[:M].sort().values
    labels = torch.randint(V, (M,), generator=g)
    labels_full = torch.full((B * L,), -100, dtype=torch.int64)
    labels_full[pos] = labels
    d = {"hidden": hidden, "hidden_m": hidden_m, "W": W, "W_m": W_m, "b": b, "b_m": b_m, "labels": labels,
         "labels_full": labels_full.view(B, L), "h": hidden.flatten(0, 1)[pos].clone(),
         "h_m": hidden_m.flatten(0, 1)[pos].clone()}
    d = {k: v.to(device) for k, v in d.items()}
    for k in ("hidden", "W", "b", "h"):
        d[k].requires_grad_()
    return d


def provider_fn(name: str, x: dict, chunk: int, compiled: dict):
    masked = (x["h"], x["W"], x["b"], x["labels"], x["h_m"], x["W_m"], x["b_m"], ALPHA)
    if name == "triton":
        def loss():
            with use_backend("triton"):
                return mlm_loss(*masked, chunk_size=chunk)
        grads = [x["h"], x["W"], x["b"]]
    elif name == "chunked":
        loss, grads = (lambda: MlmLossFunction.apply(*masked, chunk, False)), [x["h"], x["W"], x["b"]]
    elif name == "torch":
        loss, grads = (lambda: mlm_loss_reference(*masked)), [x["h"], x["W"], x["b"]]
    elif name == "torch_compile":
        compiled.setdefault("ref", torch.compile(mlm_loss_reference))
        loss, grads = (lambda: compiled["ref"](*masked)), [x["h"], x["W"], x["b"]]
    elif name == "all_token":
        args = (x["hidden"], x["W"], x["b"], x["labels_full"], x["hidden_m"], x["W_m"], x["b_m"], ALPHA)
        loss, grads = (lambda: mlm_loss_all_tokens(*args)), [x["hidden"], x["W"], x["b"]]
    else:
        raise SystemExit(f"unknown provider {name!r}")
    return loss, grads


def clear(grads):
    for t in grads:
        t.grad = None


def gpu_rows(args, shape: dict) -> None:
    dev = torch.device("cuda")
    B, L, M, D, V = (shape[k] for k in "BLMDV")
    x = make_inputs(B, L, M, D, V, dev)
    flops = 8.0 * M * D * V
    compiled: dict = {}
    # torch.compile last (its compilation is the slow part), so a time limit costs only its rows
    stages = [[n for n in args.providers if n != "torch_compile"], [n for n in args.providers if n == "torch_compile"]]
    for stage in stages:
        for precision in args.precision:
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
            config = (f"B={B},L={L},M={M},D={D},V={V},chunk={args.chunk},alpha={ALPHA},"
                      + ("autocast bf16, fp32 params" if precision == "bf16"
                         else f"fp32, tf32={torch.backends.cuda.matmul.allow_tf32}"))
            peaks = {}
            for name in stage:
                loss, grads = provider_fn(name, x, args.chunk, compiled)

                def fn(loss=loss, amp=amp):
                    with amp:
                        out = loss()
                    out.backward()

                fn()  # compilation and cuBLAS workspaces outside the timing
                torch.cuda.synchronize()
                p50, p20, p80 = time_fn(fn, grad_to_none=grads, warmup=args.warmup, rep=args.rep)
                clear(grads)
                peaks[name] = mem = peak_memory_mib(fn)
                clear(grads)
                common = {"op": "mlm_loss", "provider": name, "mode": "full", "x_name": "M", "x": M,
                          "dtype": precision, "shape_config": config}
                append_rows(args.csv, [
                    Row(metric="time", unit="ms", p50=p50, p20=p20, p80=p80, **common),
                    Row(metric="throughput", unit="TFLOP/s", p50=flops / p50 / 1e9, p20=flops / p80 / 1e9,
                        p80=flops / p20 / 1e9, **common),
                    Row(metric="peak_memory", unit="MiB", p50=mem, p20=mem, p80=mem, **common),
                ])
                print(f"{precision} {name:14s} {p50:8.3f} ms (p20 {p20:.3f}, p80 {p80:.3f})  "
                      f"{flops / p50 / 1e9:6.1f} eff. TFLOP/s  peak extra {mem:8.1f} MiB", flush=True)
            report_ratios(args, peaks, "peak_memory_ratio", M, precision, config)


def report_ratios(args, peaks: dict, metric: str, M: int, dtype: str, config: str) -> None:
    rows = []
    for fast in ("triton", "chunked"):
        for base in ("all_token", "torch"):
            if fast in peaks and base in peaks and peaks[base] > 0:
                r = peaks[fast] / peaks[base]
                target = "  (target <= 0.2)" if base == "all_token" else ""
                print(f"{dtype} peak memory {fast}/{base} = {r:.3f}{target}")
                rows.append(Row(op="mlm_loss", provider=f"{fast}/{base}", mode="full", metric=metric, unit="x",
                                x_name="M", x=M, p50=r, p20=r, p80=r, dtype=dtype, shape_config=config))
    append_rows(args.csv, rows)


def cpu_memory(args, shape: dict) -> None:
    B, L, M, D, V = (shape[k] for k in "BLMDV")
    x = make_inputs(B, L, M, D, V, "cpu")
    config = f"B={B},L={L},M={M},D={D},V={V},chunk={args.chunk},alpha={ALPHA},fp32"
    names = ("torch", "chunked", "all_token")
    fns = {name: provider_fn(name, x, args.chunk, {}) for name in names}
    # every peak before any timing: a forked child inherits the parent's malloc heap, and memory freed
    # by an earlier call in the parent would be reused without showing as resident-set growth
    peaks = {name: cpu_peak_rss_mib(lambda loss=loss: loss().backward()) for name, (loss, _) in fns.items()}
    for name, (loss, grads) in fns.items():
        clear(grads)
        p50, p20, p80 = time_fn(lambda loss=loss: loss().backward(), device="cpu", rep=args.cpu_rep, grad_to_none=grads)
        clear(grads)
        peak = peaks[name]
        common = {"op": "mlm_loss", "provider": name, "mode": "full", "x_name": "M", "x": M, "dtype": "fp32",
                  "shape_config": config}
        append_rows(args.csv, [Row(metric="peak_rss", unit="MiB", p50=peak, p20=peak, p80=peak, **common),
                               Row(metric="time", unit="ms", p50=p50, p20=p20, p80=p80, **common)])
        print(f"CPU {name:10s} peak RSS growth {peak:8.1f} MiB   time {p50:8.1f} ms (p20 {p20:.1f}, p80 {p80:.1f}, "
              f"{torch.get_num_threads()} threads)", flush=True)
    report_ratios(args, peaks, "peak_rss_ratio", M, "fp32", config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="albef_base")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=25)
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--chunk", type=int, default=CHUNK_SIZE)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--providers", nargs="+", default=["triton", "chunked", "torch", "torch_compile", "all_token"])
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--cpu-memory", action="store_true", help="the CPU peak-memory comparison instead")
    p.add_argument("--cpu-rep", type=int, default=3)
    p.add_argument("--csv", default=str(ROOT / "benchmarks/results/kernels.csv"))
    args = p.parse_args()
    cfg = get_preset(args.preset)
    shape = {"B": args.batch, "L": args.length, "M": round(args.batch * args.length * args.mask_prob),
             "D": cfg.hidden_size, "V": cfg.vocab_size}
    print(f"device: {device_name('cpu' if args.cpu_memory else None)}  torch {torch.__version__}  shape {shape}",
          flush=True)
    if args.cpu_memory:
        cpu_memory(args, shape)
    elif torch.cuda.is_available():
        gpu_rows(args, shape)
    else:
        raise SystemExit("no CUDA device: run with --cpu-memory on the CPU")
    print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    main()
