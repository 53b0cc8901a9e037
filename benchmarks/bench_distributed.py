"""Scale-out figures: throughput with 1 and N processes, and the bytes each ZeRO stage keeps per rank.

    python benchmarks/bench_distributed.py throughput [--procs 2] [--steps 40]   # albef_tiny, CPU (gloo)
    python benchmarks/bench_distributed.py zero-bytes [--preset albef_base]      # 2 CPU processes per strategy
    python benchmarks/bench_distributed.py gpu-step [--batch 64]                 # one GPU: loop vs DeepSpeed

throughput: launches `albef-fast pretrain` through torchrun (the production path), one thread per process,
the same micro-batch per process, and reads samples/s from the run's metrics.jsonl (the first logging
interval, with start-up, is dropped). With equal work per process, the step time that N processes add
over one process is the price of the collectives (and of sharing the machine): reported as the
communication share 1 - t_1 / t_N.

zero-bytes: builds the task under each strategy in 2 processes, runs one optimizer step, and adds up the
tensors the engine keeps on each rank: parameters (online + momentum; ZeRO-3: the local shards), the
optimizer's fp32 master partition, the optimizer state (Adam m and v), and the gradients held after
the step's backward. Printed next to the formulas of PERFORMANCE.md §5 for this configuration (fp32
parameters, bf16 autocast: see albef_fast/distributed/deepspeed_config.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._harness import Row, append_rows, device_name

CSV = ROOT / "benchmarks/results/distributed.csv"


# --- throughput -------------------------------------------------------------------------------------------
def run_pretrain(procs: int, strategy: str, steps: int, batch: int, workdir: Path) -> float:
    out = workdir / f"{strategy}-{procs}"
    args = [f"output_dir={out}", f"data.cache_dir={workdir / 'cache'}", "data.scenes_train=2048", "data.scenes_eval=8",
            f"data.batch_size={batch}", "data.num_workers=1", f"optim.max_steps={steps}", "log_every=10",
            f"checkpoint_every={10 * steps}", "eval.before_training=false", "eval.after_training=false",
            "progress=false", "resume=false", "device=cpu", "precision=fp32", "loss.queue_size=2048",
            f"distributed.strategy={strategy}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "albef_fast.cli", "pretrain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return sum(r["samples_per_s"] for r in rows) / len(rows)


def throughput(args: argparse.Namespace) -> None:
    machine = device_name("cpu").replace(f"({torch.get_num_threads()} threads)", "(1 thread per process)")
    print(f"machine: {machine}, {os.cpu_count()} cores; albef_tiny, micro-batch {args.batch} per process, "
          f"{args.steps} steps, fp32, gloo")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one = run_pretrain(1, "none", args.steps, args.batch, Path(tmp))
        t1 = args.batch / one
        print(f"{'processes':>9} {'strategy':>9} {'samples/s':>10} {'step ms':>9} {'comm. share':>12}")
        print(f"{1:>9} {'none':>9} {one:>10.1f} {1e3 * t1:>9.1f} {'-':>12}")
        rows.append(Row("train_step", "none", "fwd+bwd+step", "throughput", "samples/s", "processes", 1, one, one, one,
                        "fp32", f"albef_tiny B={args.batch}/process", gpu=machine))
        for strategy in args.strategies:
            sps = run_pretrain(args.procs, strategy, args.steps, args.batch, Path(tmp))
            tN = args.procs * args.batch / sps
            print(f"{args.procs:>9} {strategy:>9} {sps:>10.1f} {1e3 * tN:>9.1f} {100 * (1 - t1 / tN):>11.0f}%")
            rows.append(Row("train_step", strategy, "fwd+bwd+step", "throughput", "samples/s", "processes", args.procs,
                            sps, sps, sps, "fp32", f"albef_tiny B={args.batch}/process", gpu=machine))
    append_rows(args.csv, rows)


# --- bytes per rank ---------------------------------------------------------------------------------------
def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _account(rank: int, world: int, port: int, strategy: str, preset: str, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from albef_fast.config import load_config
    from albef_fast.distributed.engine import build_engine
    from albef_fast.distributed.env import env_from_launcher, init_process_group
    from albef_fast.models.albef import ALBEF
    from albef_fast.models.presets import get_preset
    from albef_fast.task import PretrainTask
    from albef_fast.train.optim import build_optimizer

    cfg = load_config(None, [f"distributed.strategy={strategy}", "data.batch_size=1", "precision=fp32"])
    env, device = env_from_launcher(), torch.device("cpu")
    init_process_group(env, device, "gloo", 600, deepspeed=strategy.startswith("zero"))
    torch.manual_seed(0)
    model_cfg = get_preset(preset)
    task = PretrainTask(ALBEF(model_cfg), queue_size=world)
    engine = build_engine(cfg, task, build_optimizer(task.model, cfg.optim), env, device)
    batch = _random_batch(model_cfg, 1, 12, device, seed=rank)
    out = engine.forward_backward(batch, 0.4, torch.autocast("cpu", enabled=False))
    grads = _bytes(p.grad for p in task.parameters())
    opt = engine.optimizer
    for name in ("averaged_gradients",):  # ZeRO-1/2 partitioned gradients
        held = getattr(opt, name, None)
        if isinstance(held, dict):
            grads += _bytes(t for ts in held.values() for t in (ts or []))
    engine.step()
    engine.after_step([out])
    if strategy == "zero3":
        params = _bytes(p.ds_tensor for p in task.parameters())
    else:
        params = _bytes(task.parameters())
    inner = getattr(opt, "optimizer", opt)
    states = _bytes(v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
    master = 0
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        master += _bytes(getattr(opt, name, None) or [])
    psi = sum(getattr(p, "ds_numel", p.numel()) for p in task.model.parameters())  # ZeRO-3: full sizes
    psi_m = sum(getattr(p, "ds_numel", p.numel()) for p in task.model_m.parameters())
    Path(result_dir, f"{strategy}-{rank}.json").write_text(json.dumps(
        {"params": params, "master": master, "states": states, "grads": grads, "psi": psi, "psi_m": psi_m}))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def zero_bytes(args: argparse.Namespace) -> None:
    import multiprocessing as mp
    import socket

    world, gib = 2, 2**30
    print(f"machine: {device_name('cpu')}; {args.preset}, {world} processes, one step, fp32 parameters "
          "(bf16 only as autocast)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=_account, args=(r, world, port, strategy, args.preset, tmp)) for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            if any(p.exitcode for p in procs):
                raise SystemExit(f"{strategy}: a process failed")
            r = json.loads(Path(tmp, f"{strategy}-0.json").read_text())
            total = r["params"] + r["master"] + r["states"] + r["grads"]
            psi, psi_m, N = r["psi"], r["psi_m"], world
            # fp32 parameters and gradients (4 + 4 bytes), Adam m and v (8), DeepSpeed's fp32 master copy (4)
            formula = {"ddp": 16 * psi, "zero1": 8 * psi + 12 * psi / N, "zero2": 4 * psi + 16 * psi / N,
                       "zero3": 20 * psi / N}[strategy] + (4 * psi_m / N if strategy == "zero3" else 4 * psi_m)
            print(f"{strategy:>6}: params {r['params'] / gib:6.3f}  master {r['master'] / gib:6.3f}  "
                  f"adam {r['states'] / gib:6.3f}  grads {r['grads'] / gib:6.3f}  = {total / gib:6.3f} GiB/rank;  "
                  f"formula {formula / gib:6.3f} GiB (Psi={psi / 1e6:.1f}M, Psi_m={psi_m / 1e6:.1f}M, N={N})")
            rows.append(Row("model_states", strategy, "after one step", "bytes_per_rank", "GiB", "processes", world,
                            total / gib, total / gib, total / gib, "fp32", f"{args.preset}; formula {formula / gib:.3f}"))
    append_rows(args.csv, rows)


# --- one GPU: the one-process loop against DeepSpeed --------------------------------------------------------
def _random_batch(model_cfg, B: int, L: int, device: torch.device, seed: int):
    from albef_fast.data.batch import Batch
    from albef_fast.data.masking import mask_tokens

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, 30000, (B, L), generator=g) * mask
    ids[:, 0] = 101
    mlm_ids, sel = mask_tokens(ids, g, probability=0.15)
    pos = sel.flatten().nonzero().squeeze(1)
    image = torch.randn(B, 3, model_cfg.image_size, model_cfg.image_size, generator=g)
    return Batch(image, ids, mask, mlm_ids, pos, ids.flatten()[pos]).to(device)


def gpu_step(args: argparse.Namespace) -> None:
    """ms per optimizer step (forward, backward, step, EMA + enqueue) of albef_base at batch B, bf16, on one
    GPU, for each strategy, in one process and one run (DeepSpeed with one rank: its engine overhead)."""
    import albef_kernels._dispatch as kernel_dispatch

    import albef_fast.models.attention as attention_backend
    from albef_fast.config import load_config
    from albef_fast.distributed.engine import build_engine
    from albef_fast.distributed.env import DistEnv, init_process_group
    from albef_fast.models.albef import ALBEF
    from albef_fast.models.presets import get_preset
    from albef_fast.task import PretrainTask
    from albef_fast.train.loop import autocast_for
    from albef_fast.train.optim import build_optimizer

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    kernel_dispatch.configure("auto", [])
    attention_backend.configure("auto")
    machine = device_name(device)
    print(f"machine: {machine}; torch {torch.__version__}; {args.preset}, batch {args.batch}, text <= 25, bf16, "
          f"queue {args.queue_size}; median of {args.repeat} steps after {args.warmup}")
    rows, env, joined = [], DistEnv(), False
    for strategy in args.strategies:
        cfg = load_config(None, [f"distributed.strategy={strategy}", f"data.batch_size={args.batch}", "precision=bf16"])
        if strategy != "none" and not joined:
            init_process_group(env, device, "auto", 600, deepspeed=True)
            joined = True
        torch.manual_seed(0)
        model_cfg = get_preset(args.preset)
        task = PretrainTask(ALBEF(model_cfg), queue_size=args.queue_size).to(device)
        engine = build_engine(cfg, task, build_optimizer(task.model, cfg.optim), env, device)
        batch = _random_batch(model_cfg, args.batch, 25, device, 0)
        autocast = autocast_for("bf16" if device.type == "cuda" else "fp32", device)

        def step(engine=engine, batch=batch, autocast=autocast):
            out = engine.forward_backward(batch, 0.4, autocast)
            engine.step()
            engine.after_step([out])

        for _ in range(args.warmup):
            step()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
        times.sort()
        p50, p20, p80 = (times[int(q * (len(times) - 1))] for q in (0.5, 0.2, 0.8))
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        print(f"{strategy:>6}: {p50:8.1f} ms/step (p20 {p20:.1f}, p80 {p80:.1f}), {args.batch * 1e3 / p50:7.1f} "
              f"samples/s, peak {peak:.1f} GiB", flush=True)
        rows.append(Row("train_step", strategy, "fwd+bwd+step", "time", "ms", "batch", args.batch, p50, p20, p80,
                        "bf16" if device.type == "cuda" else "fp32", f"{args.preset} 1 device; peak {peak:.1f} GiB",
                        gpu=machine))
        engine = task = step = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    append_rows(args.csv, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--procs", type=int, default=2)
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--strategies", nargs="+", default=["ddp", "zero1", "zero2", "zero3"])
    z = sub.add_parser("zero-bytes")
    z.add_argument("--preset", default="albef_base")
    z.add_argument("--strategies", nargs="+", default=["ddp", "zero1", "zero2", "zero3"])
    g = sub.add_parser("gpu-step")
    g.add_argument("--preset", default="albef_base")
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--queue-size", type=int, default=65536)
    g.add_argument("--warmup", type=int, default=5)
    g.add_argument("--repeat", type=int, default=20)
    g.add_argument("--strategies", nargs="+", default=["none", "zero1", "zero2", "zero3"])
    g.add_argument("--device", default="cuda")
    g.add_argument("--csv", default=str(CSV))
    for p in (t, z):
        p.add_argument("--csv", default=str(CSV))
    args = ap.parse_args()
    {"throughput": throughput, "zero-bytes": zero_bytes, "gpu-step": gpu_step}[args.what](args)


if __name__ == "__main__":
    main()
