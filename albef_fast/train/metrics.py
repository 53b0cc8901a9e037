"""Training metrics: device-side accumulation, one host synchronisation per logging interval, a
JSONL log, a progress bar and a PNG of the loss curves."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

LOSS_KEYS = ("loss", "itc_loss", "itm_loss", "mlm_loss")
TRACKED = (*LOSS_KEYS, "temp")  # averaged over the logging interval


class MetricsLogger:
    def __init__(self, path: str | Path, total_steps: int, start_step: int, progress: bool, *, write: bool = True,
                 reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Args:
            write: append rows to `path` (rank 0 of a distributed run; the other ranks only reduce).
            reduce: distributed runs: the mean over ranks of the interval's sums (a collective that
                every rank reaches at the same logging steps).
        """
        self.path = Path(path)
        self.write, self.reduce = write, reduce
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sums: Tensor | None = None
        self.count = 0
        self.samples = 0
        self.data_wait = 0.0
        self.t0 = time.perf_counter()
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1)

    def update(self, outputs: Sequence[Any], batch_size: int, data_wait: float) -> None:
        """Accumulate one step's TRACKED fields (averaged over its micro-batches' outputs) on their device,
        without synchronisation."""
        vals = torch.stack([torch.stack([getattr(o, k).detach().float() for k in TRACKED]) for o in outputs]).mean(0)
        self.sums = vals if self.sums is None else self.sums + vals
        self.count += 1
        self.samples += batch_size
        self.data_wait += data_wait
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, extra: dict[str, Any]) -> dict[str, Any]:
        """Write the means since the last call; the one host sync of the interval happens here."""
        if self.count == 0:
            return {}
        sums = self.sums if self.reduce is None else self.reduce(self.sums)
        means = (sums / self.count).tolist()  # host sync
        elapsed = time.perf_counter() - self.t0
        row = {"step": step, **dict(zip(TRACKED, means)),
               "samples_per_s": round(self.samples / elapsed, 2), "data_wait": round(self.data_wait / elapsed, 4),
               **extra, "time": round(time.time(), 3)}
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(itc=f"{row['itc_loss']:.3f}", itm=f"{row['itm_loss']:.3f}", mlm=f"{row['mlm_loss']:.3f}",
                                 sps=f"{row['samples_per_s']:.1f}", wait=f"{100 * row['data_wait']:.0f}%", refresh=False)
        self.sums, self.count, self.samples, self.data_wait = None, 0, 0, 0.0
        self.t0 = time.perf_counter()
        return row

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss curves (total and the three terms) against the step, as a PNG."""
    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes, LOSS_KEYS):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
