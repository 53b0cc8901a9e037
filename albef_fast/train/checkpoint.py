"""Checkpoints of everything that defines a run, written atomically.

One file holds the task (online model, momentum model, queues and pointer), the optimizer, the
position (step, epoch, batch within the epoch), every RNG state and the resolved config. It is
written to a temporary name, flushed to disk, then renamed over `checkpoint-latest.pt`: a crash
never leaves a half-written latest checkpoint. Only tensors and plain Python values are stored, so
it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "checkpoint-latest.pt"
FORMAT = "albef-fast/checkpoint-v1"


@dataclass
class RunPosition:
    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    batch: int = 0
    """Optimizer steps of `epoch` already completed (each one global batch)."""


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, Python, NumPy) as tensors and plain values."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "cached_gaussian": float(np_state["gauss"])},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": n["key"].numpy().astype(np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["cached_gaussian"]})


def write_atomic(path: Path, state: dict[str, Any] | bytes) -> Path:
    """torch.save `state` (or write raw bytes) to a temporary name, fsync, rename: `path` is either the
    old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if isinstance(state, bytes):
            f.write(state)
        else:
            torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_checkpoint(output_dir: str | Path, task: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    position: RunPosition, config: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write `checkpoint-latest.pt` atomically; `extra` adds entries (distributed runs: world size,
    strategy, every rank's RNG state)."""
    state = {
        "format": FORMAT,
        "task": task.state_dict(),
        "optimizer": optimizer.state_dict(),
        "position": {"step": position.step, "epoch": position.epoch, "batch": position.batch},
        "rng": rng_state(),
        "config": config,
        **(extra or {}),
    }
    return write_atomic(Path(output_dir) / LATEST, state)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: missing, truncated, corrupt or of another format."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint file (on the CPU, tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or corrupt file, or not a checkpoint at all
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an albef-fast checkpoint (format {FORMAT})")
    return state


def load_checkpoint(path: str | Path, task: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, restore_rng: bool = True) -> tuple[RunPosition, dict[str, Any]]:
    """Restore a checkpoint written by `save_checkpoint`; returns the run position and the whole state
    read (its "config", and the distributed entries where present)."""
    state = read_checkpoint(path)
    try:
        task.load_state_dict(state["task"])
    except RuntimeError as exc:  # shape or key mismatch: a checkpoint of another model or queue size
        raise CheckpointError(f"checkpoint {path} does not fit this run: {exc}") from exc
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        if "fused" in optimizer.defaults:  # the implementation is this run's choice, not saved state: a
            for group in optimizer.param_groups:  # checkpoint from another device or version keeps its own
                group["fused"] = optimizer.defaults["fused"]
    if restore_rng:
        restore_rng_state(state["rng"])
    return RunPosition(**state["position"]), state
