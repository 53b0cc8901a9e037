"""Images/s of each image backend with the ALBEF pretraining augmentation (RandomResizedCrop 256 bicubic,
flip, RandomAugment(2, 7), CLIP normalisation), through the real loader: read -> decode -> augment ->
caption tokenisation and MLM masking -> collate. The PIL backend is the baseline, run in the same process.

    python benchmarks/bench_dataloader.py                          # pil and dali_cpu on this CPU
    python benchmarks/bench_dataloader.py --backends pil dali --workers 8 --dali-threads 4   # on a GPU

Overlap of the DALI stage with the training step: ``--step-ms 300 --dali-prefetch 0 2`` makes the
consumer sleep 300 ms per batch (a stand-in for a GPU step, which leaves the host thread idle as a sleep
does) and runs each DALI backend synchronously (prefetch 0) and with its background thread (prefetch 2);
images/s then include the step, so the ideal is batch / max(step, decode time) vs batch / (step + decode).

The images are generated JPEGs (seeded, textured, quality 90) of --src-size, written to a temporary
folder and read through the page cache: this measures the pipeline, not the disk. Each backend runs
--epochs timed epochs after one warm-up batch; p50/p20/p80 are over the epochs. For the GPU backend the
clock stops after a CUDA synchronisation at the end of each epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import Row, append_rows, device_name  # noqa: E402

from albef_fast.data.dataset import PretrainDataset, ResumableBatchSampler, load_sources  # noqa: E402
from albef_fast.data.loader import build_loader  # noqa: E402
from albef_fast.data.transforms import ImageTransform  # noqa: E402


def make_corpus(folder: Path, n: int, width: int, height: int) -> Path:
    rs = np.random.RandomState(0)
    yy, xx = np.mgrid[0:height, 0:width]
    entries = []
    for i in range(n):
        base = np.stack([(xx * (1 + i % 3)) % 256, (yy * (1 + i % 5)) % 256, ((xx + yy) * (i % 7 + 1)) % 256], -1)
        arr = np.clip(base + rs.randint(-25, 25, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=90)
        entries.append({"image": f"{i:05d}.jpg", "caption": f"a generated picture number {i} with stripes"})
    ann = folder / "train.json"
    ann.write_text(json.dumps(entries))
    return ann


def measure(samples, backend: str, args, prefetch: int) -> list[float]:
    ds = PretrainDataset(samples, ImageTransform(args.size, "pretrain"), image_mode="decoded" if backend == "pil" else "encoded")
    sampler = ResumableBatchSampler(len(ds), args.batch, seed=0)
    loader = build_loader(ds, sampler, backend, num_workers=args.workers, pin_memory=False,
                          dali_threads=args.dali_threads, dali_prefetch=prefetch,
                          dali_hw_decoder_load=args.hw_decoder_load)
    sampler.set_epoch(0, len(sampler) - 1)
    for _ in loader:  # warm-up: workers started, DALI pipeline built, caches filled
        pass
    rates = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch + 1)
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            n += batch.size
            if args.step_ms:
                time.sleep(args.step_ms / 1000)  # the training step (see the module docstring)
        if backend == "dali":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    bad = {k: v for k, v in ds.events.totals().items() if v}
    if bad:
        print(f"  {backend}: data events {bad}")
    return rates


def breakdown(samples, backend: str, args) -> list[tuple[str, list[float]]]:
    """Where a DALI backend's time goes: each stage alone, images/s (one rate per epoch, sorted).

    host          the DataLoader of encoded batches (workers: read, validate, draw params, tokenise, mask);
                  also the main process's CPU time per batch spent receiving them
    dali          the DALI stage alone on those batches held in memory (no workers, no prefetch thread)
    dali-no-eq    the same with every Equalize op replaced by Identity (Equalize is a Python operator)
    dali-no-ra    the same with no RandomAugment op (decode, crop-resize, flip, normalise)
    dali-pipelined  the dali stage on DALI's default asynchronous executor with two batches in flight
                  (feed + schedule_run, outputs one behind), against the synchronous executor the loader
                  drives: whether overlapping consecutive batches inside DALI is worth a streaming loader
    The slowest of host and dali bounds the loader; dali vs dali-no-eq / -no-ra prices the ops.
    """
    import dataclasses

    from albef_fast.data.dali import DaliImagePipeline

    ds = PretrainDataset(samples, ImageTransform(args.size, "pretrain"), image_mode="encoded")
    sampler = ResumableBatchSampler(len(ds), args.batch, seed=0)
    loader = build_loader(ds, sampler, backend, num_workers=args.workers, pin_memory=False,
                          dali_threads=args.dali_threads, dali_prefetch=0)  # (its pipeline is unused)
    pipe = DaliImagePipeline(args.size, "pretrain", args.batch, device="gpu" if backend == "dali" else "cpu",
                             num_threads=args.dali_threads, hw_decoder_load=args.hw_decoder_load)
    sync = torch.cuda.synchronize if backend == "dali" else (lambda: None)

    def timed(fn) -> list[float]:
        fn()  # warm-up: workers started, pipeline built
        rates = []
        for _ in range(args.epochs):
            t0 = time.perf_counter()
            n = fn()
            sync()
            rates.append(n / (time.perf_counter() - t0))
        return sorted(rates)

    held: list = []
    host_cpu: list[float] = []  # the main process's CPU ms per batch while it takes them from the workers

    def host() -> int:
        held.clear()
        sampler.set_epoch(0)
        c0 = time.process_time()
        held.extend(loader.loader)  # the DaliLoader's DataLoader of EncodedBatch
        host_cpu.append((time.process_time() - c0) * 1e3 / max(1, len(held)))
        return sum(len(b.encoded) for b in held)

    def without(drop: set[str] | None):
        def strip(p):
            keep = () if drop is None else tuple(op for op in p.ops if op[0] not in drop)
            return dataclasses.replace(p, ops=keep)
        batches = [(b.encoded, b.params if drop == set() else [strip(p) for p in b.params]) for b in held]

        def run() -> int:
            for encoded, params in batches:
                pipe(encoded, params)
            return sum(len(e) for e, _ in batches)
        return run

    def pipelined():
        from albef_fast.data.dali import _build, as_torch, feed

        device_id = torch.cuda.current_device() if backend == "dali" else None
        streamed = _build(args.batch, args.size, "pretrain", "gpu" if backend == "dali" else "cpu", args.dali_threads,
                          device_id, args.hw_decoder_load, pipelined=True)
        depth, started = 2, False  # DALI's first schedule_run runs `depth` iterations, so it needs them fed

        def run() -> int:
            nonlocal started
            in_flight, n = 0, 0
            for b in held:
                feed(streamed, b.encoded, b.params, "pretrain", args.size)
                in_flight += 1
                if not started and in_flight < depth:
                    continue
                streamed.schedule_run()
                started = True
                if in_flight > depth - 1:
                    (o,) = streamed.outputs()
                    n += len(as_torch(o, device_id))
                    in_flight -= 1
            for _ in range(in_flight):  # drain: the next call starts with nothing in flight
                if not started:  # fewer batches than the depth: nothing scheduled yet
                    break
                (o,) = streamed.outputs()
                n += len(as_torch(o, device_id))
            return n
        return run

    out = [("host", timed(host))]
    print(f"  {backend} stage host: main-process CPU {float(np.median(host_cpu[1:] or host_cpu)):.2f} ms per batch "
          f"(receiving the workers' batches)")
    for name, drop in (("dali", set()), ("dali-no-eq", {"Equalize"}), ("dali-no-ra", None)):
        out.append((name, timed(without(drop))))
    if len(held) >= 2:
        out.append(("dali-pipelined", timed(pipelined())))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", nargs="+", default=["pil", "dali_cpu"], choices=["pil", "dali_cpu", "dali"])
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--src-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: everything in this process)")
    p.add_argument("--dali-threads", type=int, default=1)
    p.add_argument("--hw-decoder-load", type=float, default=None,
                   help="share of JPEGs for the GPU's hardware decoder (default: DALI's, 0.65)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--dali-prefetch", type=int, nargs="+", default=[2],
                   help="batches the DALI stage decodes ahead in its thread; several values: one run each")
    p.add_argument("--step-ms", type=float, default=0.0, help="simulated training step per batch (sleep)")
    p.add_argument("--breakdown", action="store_true",
                   help="for each DALI backend, also time its stages alone (host workers, DALI stage, ops)")
    p.add_argument("--csv", default=None, help="append rows here (benchmarks/results/dataloader.csv)")
    args = p.parse_args()
    torch.set_num_threads(max(1, args.dali_threads))
    machine = device_name("cuda" if "dali" in args.backends and torch.cuda.is_available() else "cpu")
    print(f"machine: {machine}; cpus visible: {os.cpu_count()}; torch {torch.__version__}")
    print(f"{args.images} JPEGs {args.src_size[0]}x{args.src_size[1]} -> {args.size}px pretrain augmentation, "
          f"batch {args.batch}, workers {args.workers}, dali threads {args.dali_threads}, {args.epochs} epochs, "
          f"simulated step {args.step_ms:g} ms")
    try:
        print(f"load average (1, 5, 15 min): {os.getloadavg()}")
    except OSError:
        pass
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ann = make_corpus(Path(tmp), args.images, *args.src_size)
        samples = load_sources([str(ann)]).samples
        baseline = None
        runs = [(b, None) for b in args.backends if b == "pil"]
        runs += [(b, k) for b in args.backends if b != "pil" for k in args.dali_prefetch]
        for backend, prefetch in runs:
            rates = sorted(measure(samples, backend, args, prefetch or 0))
            p50, p20, p80 = float(np.median(rates)), rates[0], rates[-1]
            baseline = baseline or (p50 if backend == "pil" else None)
            rel = f"  ({p50 / baseline:.2f}x pil)" if baseline and backend != "pil" else ""
            name = backend if prefetch is None else f"{backend}/prefetch={prefetch}"
            print(f"{name:20s} {p50:8.1f} images/s  (min {p20:.1f}, max {p80:.1f}){rel}")
            rows.append(Row(op="dataloader", provider=name, mode="pretrain", metric="throughput", unit="images/s",
                            x_name="workers", x=args.workers, p50=p50, p20=p20, p80=p80, dtype="uint8->fp32",
                            shape_config=f"src={args.src_size[0]}x{args.src_size[1]},size={args.size},B={args.batch},"
                                         f"dali_threads={args.dali_threads},hw_load={args.hw_decoder_load},n={args.images},"
                                         f"step_ms={args.step_ms:g}",
                            gpu=machine))
        for backend in [b for b in args.backends if b != "pil"] if args.breakdown else []:
            for stage, rates in breakdown(samples, backend, args):
                p50 = float(np.median(rates))
                print(f"  {backend} stage {stage:14s} {p50:8.1f} images/s  (min {rates[0]:.1f}, max {rates[-1]:.1f})")
                rows.append(Row(op="dataloader_stage", provider=f"{backend}:{stage}", mode="pretrain",
                                metric="throughput", unit="images/s", x_name="workers", x=args.workers, p50=p50,
                                p20=rates[0], p80=rates[-1], dtype="uint8->fp32",
                                shape_config=f"src={args.src_size[0]}x{args.src_size[1]},size={args.size},"
                                             f"B={args.batch},dali_threads={args.dali_threads},hw_load={args.hw_decoder_load},"
                                             f"n={args.images}",
                                gpu=machine))
    if args.csv:
        append_rows(args.csv, rows)


if __name__ == "__main__":
    main()
