"""Which process this is, and the process group.

Launchers describe the job with environment variables: torchrun and the deepspeed launcher set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; under SLURM (`srun`, one task per GPU) they
are derived from SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID, with MASTER_ADDR/MASTER_PORT
exported by the batch script (README, "Running at scale"). No variables: one process.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger("albef_fast")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_from_launcher(environ: dict[str, str] | None = None) -> DistEnv:
    """The rank, world size and local rank the launcher gave this process (see the module docstring)."""
    env = os.environ if environ is None else environ

    def read(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise ValueError(f"environment variable {name}={env[name]!r} must be an integer") from None

    if "WORLD_SIZE" in env:
        world = read("WORLD_SIZE")
        rank = read("RANK") if "RANK" in env else 0
        local = read("LOCAL_RANK") if "LOCAL_RANK" in env else 0
    elif int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        # inside an `srun` step (the batch script itself, outside srun, is one process even when the
        # allocation has several tasks)
        missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID") if k not in env]
        if missing:
            raise ValueError(f"SLURM_STEP_NUM_TASKS={env['SLURM_STEP_NUM_TASKS']} but {missing} are not set: start "
                             "one task per GPU with srun (configs/launch/slurm_pretrain.sbatch)")
        world, rank, local = read("SLURM_STEP_NUM_TASKS"), read("SLURM_PROCID"), read("SLURM_LOCALID")
    else:
        return DistEnv()
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise ValueError(f"{world} processes but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun or "
                         "deepspeed, or export them in the SLURM batch script (README, 'Running at scale')")
    return DistEnv(rank, world, local)


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed compiles a shared-memory collective op at its first init_distributed on the CPU
    (about a minute, per venv). Plain gloo collectives are used instead when the build is skipped
    (ENVIRONMENT.md §4). `import deepspeed.comm.torch` returns the torch module (attribute shadowing),
    hence sys.modules."""
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


_WAIT_GROUP: Any = None  # gloo group of `wait_for_main`, made by init_process_group
_WAIT_TIMEOUT_S = 0.0


def init_process_group(env: DistEnv, device: torch.device, backend: str, timeout_s: float,
                       *, deepspeed: bool, wait_timeout_s: float | None = None) -> None:
    """Join the job's process group (env:// rendezvous), also for one process (DDP and DeepSpeed need a
    group). A collective that waits more than `timeout_s` raises instead of hanging (a dead or stuck rank).
    `wait_timeout_s` (default `timeout_s`): how long `wait_for_main` waits for rank 0's solo work."""
    global _WAIT_GROUP, _WAIT_TIMEOUT_S
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    if not env.is_distributed:  # DeepSpeed needs a process group even for one process
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    timeout = timedelta(seconds=timeout_s)
    if deepspeed:
        import deepspeed as ds

        if device.type == "cpu":
            skip_deepspeed_shm_build()
        ds.init_distributed(dist_backend=backend, timeout=timeout)
    elif not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    # all ranks create it, in the same order, right after the default group
    _WAIT_TIMEOUT_S = wait_timeout_s or timeout_s
    _WAIT_GROUP = dist.new_group(backend="gloo", timeout=timedelta(seconds=_WAIT_TIMEOUT_S))
    log.info("process group: rank %d of %d (local rank %d), backend %s", env.rank, env.world_size, env.local_rank,
             dist.get_backend())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy_process_group() -> None:
    global _WAIT_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # every group, the wait group too
    _WAIT_GROUP = None


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather_rows(x: Tensor) -> Tensor:
    """(A, N, ...) per rank -> (A, W*N, ...): each rank's rows, in rank order, for every leading index,
    without gradient (ALBEF's concat_all_gather). One collective. The identity for one process."""
    W = world_size()
    if W == 1:
        return x
    out = x.new_empty((W * x.shape[0], *x.shape[1:]))  # rank-major: (W*A, N, ...)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(out, x.contiguous())
    return out.unflatten(0, (W, x.shape[0])).transpose(0, 1).flatten(1, 2)  # (A, W*N, ...)


def all_reduce_mean(x: Tensor) -> Tensor:
    """The mean of `x` over ranks (a new tensor); the identity for one process."""
    W = world_size()
    if W == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / W


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (a host-side collective); [obj] for one process."""
    W = world_size()
    if W == 1:
        return [obj]
    out: list[Any] = [None] * W
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


class MainRankWaitError(RuntimeError):
    """The other ranks waited longer than distributed.eval_timeout_s for rank 0's solo work."""


def wait_for_main(what: str) -> None:
    """The other ranks wait here while rank 0 works alone (`what`: an evaluation, writing weights or a
    checkpoint, generating data), then all go on together.

    The wait is a barrier on a separate gloo group with its own, longer timeout (`init_process_group`'s
    wait_timeout_s = distributed.eval_timeout_s), not on the training group: a retrieval evaluation on rank 0
    may take longer than distributed.timeout_s, which is sized for one training collective. The waiting
    ranks issue no NCCL work, so no NCCL watchdog fires; if rank 0's process exits its sockets close and
    the wait ends with an error at once (a lost node or a hung rank 0 is only noticed after the timeout).
    Over several nodes gloo picks its network interface itself; set GLOO_SOCKET_IFNAME where that is wrong.

    Args:
        what: the solo work, for the error message.
    """
    if world_size() == 1:
        return
    if _WAIT_GROUP is None:
        raise RuntimeError("wait_for_main needs init_process_group first")
    try:
        dist.barrier(group=_WAIT_GROUP)
    except RuntimeError as exc:
        raise MainRankWaitError(
            f"rank {dist.get_rank()}: the wait for rank 0's {what} failed ({exc}). Either a rank died (see its "
            f"error) or the {what} took longer than distributed.eval_timeout_s={_WAIT_TIMEOUT_S:g}") from exc
