"""Time one ALBEF training step and break it down by component.

    python benchmarks/bench_train_step.py                          # CPU: albef_tiny and albef_base at batch 2, fp32
    python benchmarks/bench_train_step.py --preset albef_base --batch 64 --precision bf16   # one GPU

A step = forward (ViT, text on 2B rows, fusion on 4B rows: 3B ITM pairs + MLM, momentum passes) +
backward + AdamW + after_step (EMA, enqueue, clamp), on synthetic inputs of the pretraining shapes
(captions of 8-25 tokens). The breakdown times each component alone, on the same inputs, synchronised:
  vision    online ViT forward+backward and momentum ViT forward
  text      online text layers forward+backward on the clean and masked ids as one batch of 2B, momentum
            forward of the same (as PretrainTask.forward)
  fusion    online fusion forward+backward on 4B rows in one call (3B ITM pairs + B MLM inputs, the
            images' keys/values computed once), momentum MLM forward
  losses    ITC (both directions, one call), hard-negative sampling (both, one draw), ITM head + CE,
            MLM transform + vocabulary loss, fwd+bwd (the calls PretrainTask.forward makes)
  ema       the momentum update (one multi-tensor lerp)
  optimizer AdamW step
The parts need not add up exactly to the step (kernel overlap, allocator and Python overhead).
Rows are appended to benchmarks/results/train_step.csv with the device and versions.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from albef_fast.data.batch import Batch  # noqa: E402
from albef_fast.data.masking import mask_tokens  # noqa: E402
from albef_fast.models.albef import ALBEF  # noqa: E402
from albef_fast.models.presets import get_preset  # noqa: E402
from albef_fast.task import PretrainTask  # noqa: E402
from albef_fast.train.optim import build_optimizer  # noqa: E402
from albef_fast.config import OptimConfig  # noqa: E402
from albef_kernels import enabled, itc_loss_bidirectional, mlm_loss, sample_hard_negatives  # noqa: E402
from albef_kernels._dispatch import OPS  # noqa: E402
from albef_kernels.itc_loss import STREAMING_MIN_LOGITS, STREAMING_MIN_LOGITS_CPU  # noqa: E402
from benchmarks._harness import device_name, git_sha  # noqa: E402
from albef_fast.task import itm_loss  # noqa: E402

REF_GFLOP_PER_SAMPLE = 289.0  # PERFORMANCE.md §4b, ALBEF-base 256 px, L=25, reference formulation


def synthetic_batch(cfg, B: int, L: int, device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, L + 1, (B,), generator=g)
    lengths[0] = L
    ids = torch.randint(1000, cfg.vocab_size, (B, L), generator=g)
    ids[:, 0] = 101
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = ids * mask
    mlm_ids, selected = mask_tokens(ids, g)
    pos = selected.flatten().nonzero().squeeze(1)
    image = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    return Batch(image, ids, mask, mlm_ids, pos, ids.flatten()[pos]).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, warmup: int, repeat: int) -> float:
    """Median wall-clock seconds of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(preset: str, B: int, L: int, device: torch.device, precision: str, warmup: int, repeat: int,
          queue_size: int) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = get_preset(preset)
    task = PretrainTask(ALBEF(cfg), queue_size=queue_size).to(device).train()
    opt = build_optimizer(task.model, OptimConfig())
    batch = synthetic_batch(cfg, B, L, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    m, mm = task.model, task.model_m

    def step():
        with amp:
            out = task(batch, 0.4)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        task.after_step(out)

    def vision():
        with amp:
            e = m.encode_image(batch.image)
            with torch.no_grad():
                mm.encode_image(batch.image)
        e.float().sum().backward()

    ids2, mask2 = torch.cat([batch.text_ids, batch.mlm_ids]), torch.cat([batch.text_mask] * 2)

    def text():
        with amp:
            e = m.encode_text(ids2, mask2)
            with torch.no_grad():
                mm.encode_text(ids2, mask2)
        e.float().sum().backward()

    with torch.no_grad(), amp:
        img = m.encode_image(batch.image)
        txt = m.encode_text(batch.text_ids, batch.text_mask)
        feats = [m.image_feature(img), mm.image_feature(img), m.text_feature(txt), mm.text_feature(txt)]
        hid = m.fuse(txt, batch.text_mask, img).flatten(0, 1)
    txt4, mask4 = torch.cat([txt] * 4), torch.cat([batch.text_mask] * 4)
    index4 = torch.arange(B, device=device).repeat(4)  # each row's image, as the task gathers them

    def fusion():
        with amp:
            if task.reuse_image_kv:
                a = m.fuse(txt4, mask4, image_kv=m.image_kv(img), image_index=index4)
            else:
                a = m.fuse(txt4, mask4, img[index4])
            with torch.no_grad():
                mm.fuse(txt, batch.text_mask, img)
        a.float().sum().backward()

    def losses():
        fi, fim, ft, ftm = (f.detach().requires_grad_(i % 2 == 0) for i, f in enumerate(feats))
        h = hid.detach().requires_grad_()
        with amp:
            # as PretrainTask.forward: both ITC directions in one call, both samplers in one draw
            itc, sims = itc_loss_bidirectional(fi, fim, ft, ftm, task.queues.image, task.queues.text,
                                               m.temp, 0.4)
            index, valid = sample_hard_negatives(sims)  # (2, B): [i2t, t2i]
            neg_i, neg_t, v1, v2 = index[1], index[0], valid[1], valid[0]
            cls = h.view(B, L, -1)[:, 0]
            logits = m.itm_head(torch.cat([cls, cls[neg_i], cls[neg_t]]))
            w = torch.cat([torch.ones_like(v1, dtype=torch.float), v1.float(), v2.float()])
            lab = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(device)
            itm = itm_loss(logits, lab, w)
            hm = m.mlm_head.transform(h.index_select(0, batch.mlm_positions))
            mlm = mlm_loss(hm, m.mlm_head.weight, m.mlm_head.bias, batch.mlm_labels, hm.detach(),
                           mm.mlm_head.weight, mm.mlm_head.bias, 0.4)
        (itc.mean() + itm + mlm).backward()

    def ema():
        from albef_kernels import ema_update_

        ema_update_(*task.momentum_pairs(), 0.995)

    for p in task.model.parameters():  # gradients for the optimizer-only timing
        p.grad = torch.randn_like(p) * 1e-3

    def optimizer():
        opt.step()

    result = {}
    for name, fn in (("vision", vision), ("text", text), ("fusion", fusion), ("losses", losses),
                     ("ema", ema), ("optimizer", optimizer)):
        result[name] = timeit(fn, device, warmup, repeat)
    task.zero_grad(set_to_none=True)
    result["step"] = timeit(step, device, warmup, repeat)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        sync(device)
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", nargs="+", default=["albef_tiny", "albef_base"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=25)
    ap.add_argument("--queue-size", type=int, default=65536)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--csv", default=str(ROOT / "benchmarks/results/train_step.csv"))
    args = ap.parse_args()
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda" and precision == "fp32":
        precision = "fp32+tf32"  # fp32 storage, TF32 tensor-core matmuls (PyTorch's fast fp32 mode)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dev_name = device_name(device)
    print(f"device: {dev_name}; torch {torch.__version__}; precision {precision}; batch {args.batch}; "
          f"text length <= {args.text_len}; queue {args.queue_size}; median of {args.repeat} after {args.warmup} warm-up")
    probe = torch.empty(0, device=device)  # which path each fused op takes on this device
    print("kernel paths: " + ", ".join(f"{op}={'triton' if enabled(op, probe) else 'torch'}" for op in OPS)
          + f" (off Triton, itc_loss streams over the queue from {STREAMING_MIN_LOGITS_CPU:,} logits on the CPU,"
          f" {STREAMING_MIN_LOGITS:,} elsewhere)")
    cols = ["step", "vision", "text", "fusion", "losses", "ema", "optimizer"]
    print(f"{'preset':<12}" + "".join(f"{c + ' ms':>13}" for c in cols) + f"{'samples/s':>11}{'eff. MFU':>10}{'peak GiB':>10}")
    rows = []
    for preset in args.preset:
        r = bench(preset, args.batch, args.text_len, device, precision, args.warmup, args.repeat, args.queue_size)
        sps = args.batch / r["step"]
        # MFU only where the bf16 peak is the right denominator
        mfu = sps * REF_GFLOP_PER_SAMPLE * 1e9 / 989e12 if (preset == "albef_base" and precision == "bf16") else None
        print(f"{preset:<12}" + "".join(f"{1e3 * r[c]:>13.2f}" for c in cols) + f"{sps:>11.1f}"
              + (f"{100 * mfu:>9.1f}%" if mfu else f"{'-':>10}") + f"{r.get('peak_gib', float('nan')):>10.2f}")
        rows.append({"op": "train_step", "preset": preset, "batch": args.batch, "text_len": args.text_len,
                     "precision": precision, **{f"{c}_ms": round(1e3 * r[c], 3) for c in cols},
                     "samples_per_s": round(sps, 2), "peak_gib": round(r.get("peak_gib", float("nan")), 3),
                     "device": dev_name, "torch": torch.__version__, "git_sha": git_sha(),
                     "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    if precision == "bf16" and "albef_base" in args.preset:
        print("eff. MFU: samples/s x 289 GFLOP (reference FLOP count per sample, PERFORMANCE.md §4b) / 989 TFLOP/s "
              "(dense bf16 datasheet peak)")
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if not new and path.read_text().splitlines()[0] != ",".join(rows[0]):
        raise SystemExit(f"{path} has another column layout; write to a new file with --csv")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
