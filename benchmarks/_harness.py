"""The one place kernel benchmarks time and measure things.

    from benchmarks._harness import time_fn, peak_memory_mib, append_rows, device_name, Row

- `time_fn(fn)`: quantiles (p50, p20, p80) in ms. On CUDA through `triton.testing.do_bench` (CUDA
  events, warm-up, L2 flush between runs); on the CPU wall clock over repeated calls.
- `peak_memory_mib(fn)`: extra device memory a call needs at its peak (CUDA allocator statistics).
  On the CPU, `cpu_peak_rss_mib(fn)` runs fn in a forked child and reports its peak resident-set growth.
- `append_rows(path, rows)`: appends `Row`s to a CSV with a fixed schema (STYLE.md B5), naming the
  device, versions and git revision, so that numbers from different machines never mix silently.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
QUANTILES = (0.5, 0.2, 0.8)


@dataclasses.dataclass
class Row:
    op: str
    provider: str
    mode: str
    metric: str
    unit: str
    x_name: str
    x: float
    p50: float
    p20: float
    p80: float
    dtype: str
    shape_config: str
    gpu: str = ""
    torch: str = ""
    triton: str = ""
    git_sha: str = ""
    timestamp: str = ""


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} CPU ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.machine()} CPU"


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def time_fn(fn: Callable[[], object], *, device: torch.device | str | None = None, warmup: int = 25,
            rep: int = 100, grad_to_none: list[torch.Tensor] | None = None) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds. On CUDA `warmup`/`rep` are milliseconds (do_bench); on the CPU
    they are call counts (capped so that a slow call still finishes)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=list(QUANTILES))
        return tuple(float(v) for v in q)
    fn()  # first call outside the timing (allocations, lazy init)
    times: list[float] = []
    budget = time.perf_counter() + 20.0
    for i in range(max(3, min(rep, 50))):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
        if time.perf_counter() > budget and i >= 2:
            break
    return quantiles_ms(times)


def quantiles_ms(times_ms: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) of wall-clock samples in ms."""
    qs = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else times_ms * 9
    return statistics.median(times_ms), qs[1], qs[7]


def peak_memory_mib(fn: Callable[[], object], device: torch.device | str = "cuda") -> float:
    """Peak CUDA memory allocated during fn() above what was allocated before it, in MiB."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def cpu_peak_rss_mib(fn: Callable[[], object]) -> float:
    """Peak resident-memory growth of fn() on the CPU, measured in a forked child (so that earlier
    allocations of this process do not hide it). Linux only."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork(); stay single-threaded
        try:
            with open("/proc/self/statm") as f:
                base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            fn()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            os.write(w, str(max(0, peak - base) / 2**20).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    if not out:
        raise RuntimeError("cpu_peak_rss_mib: the measured function failed in the child process")
    return float(out)


def append_rows(path: str | Path, rows: list[Row]) -> None:
    """Append rows (filling device, versions, git revision and time) to a CSV with the fixed schema."""
    if not rows:
        return
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    sha = git_sha()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in dataclasses.fields(Row)]
    new = not path.exists()
    if not new and path.read_text().splitlines()[:1] != [",".join(names)]:
        raise ValueError(f"{path} has another column layout than {names}")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        if new:
            w.writeheader()
        for row in rows:
            d = dataclasses.asdict(row)
            d.update(gpu=d["gpu"] or device_name(), torch=torch.__version__, triton=triton_version, git_sha=sha,
                     timestamp=stamp)
            w.writerow(d)
