"""Run `train` in N processes on the CPU (gloo), as a launcher would, for tests/unit/test_distributed.py.

Each process gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT like under torchrun. At the
end of training (before the process group goes away) every rank writes the full task state it holds
(under ZeRO-3 gathered from the shards) to <dump>-rank<r>.pt, so the test can compare every rank with
a one-process run.

Two test seams (on by default) make runs with different numbers of processes comparable exactly: dropout
0, and a deterministic hard negative (the most similar non-matching item) instead of a random draw.
Everything else (data slots, gradient averaging, EMA, queue gathering, checkpoints) is the production
path.

Process end: faulthandler is on (a crash prints every thread's Python stack to the test's stderr), and
a rank whose run returned leaves with os._exit(0) once its output is flushed. The tests check what
training computed and wrote; interpreter teardown is not under test, and once in a CI run both ranks of
a finished-looking run aborted with "terminate called without an active exception" (a C++ thread
destroyed at exit), which 35 repeated runs did not reproduce.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import multiprocessing as mp
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deterministic_negatives(self, sims):
    B = sims.shape[-1]
    eye = torch.eye(B, dtype=torch.bool, device=sims.device)
    index = sims.float().masked_fill(eye, float("-inf")).argmax(-1)  # (2, B)
    valid = torch.full_like(index, B > 1, dtype=torch.bool)
    return index[1], index[0], valid[1], valid[0]


def _worker(rank: int, world: int, port: int, overrides: list[str], dump: str | None, die_at_step: int | None,
            seams: bool, slow_eval_s: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    faulthandler.enable()
    torch.set_num_threads(1)  # bitwise-deterministic CPU reductions

    from albef_fast.config import load_config
    from albef_fast.models import presets
    from albef_fast.task import PretrainTask
    from albef_fast.train import loop

    if seams:
        real_get_preset = presets.get_preset
        loop.get_preset = lambda name, **kw: dataclasses.replace(real_get_preset(name, **kw), hidden_dropout=0.0,
                                                                  attention_dropout=0.0)
        PretrainTask.hard_negatives = _deterministic_negatives

    engines: list[Any] = []
    real_build_engine = loop.build_engine

    def build_engine(*args, **kwargs):
        engines.append(real_build_engine(*args, **kwargs))
        if die_at_step is not None and rank == world - 1:  # this rank dies before the optimizer step die_at_step
            engine, real_step, seen = engines[-1], engines[-1].step, [0]

            def step():
                ran = real_step()
                seen[0] += ran
                if seen[0] == die_at_step:
                    os._exit(17)
                return ran

            engine.step = step
        return engines[-1]

    real_destroy = loop.destroy_process_group

    def destroy():  # runs in train's `finally`: dump only after a run that finished
        if dump is not None and engines and sys.exc_info()[0] is None:
            _dump(engines[-1], f"{dump}-rank{rank}.pt")
        real_destroy()

    loop.build_engine, loop.destroy_process_group = build_engine, destroy
    if slow_eval_s and rank == 0:  # rank 0's retrieval evaluation takes slow_eval_s longer
        import time

        from albef_fast.eval import retrieval

        real_evaluate = retrieval.evaluate_retrieval_file

        def slow_evaluate(*args, **kwargs):
            time.sleep(slow_eval_s)
            return real_evaluate(*args, **kwargs)

        retrieval.evaluate_retrieval_file = slow_evaluate
    try:
        loop.train(load_config("demo", overrides))
    except BaseException as exc:  # the test reads what each rank reported
        if dump is not None:
            Path(f"{dump}-rank{rank}.err").write_text(f"{type(exc).__name__}: {exc}")
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see the module docstring


def _dump(engine: Any, path: str) -> None:
    task = engine.task
    gathered: Any = None
    if getattr(engine, "stage", None) == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(task.parameters()), modifier_rank=None)
        gathered.__enter__()
    state = {k: v.detach().clone() for k, v in task.state_dict().items()}
    if gathered is not None:
        gathered.__exit__(None, None, None)
    torch.save(state, path)


def run(world: int, overrides: list[str], *, dump: str | Path | None = None, die_at_step: int | None = None,
        timeout: float = 600, seams: bool = True, slow_eval_s: float = 0.0) -> list[int]:
    """Start `world` processes running `train(load_config("demo", overrides))`; returns their exit codes.
    seams=False: dropout on and random hard negatives (the production draws). slow_eval_s: rank 0 sleeps
    this long before each retrieval evaluation."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, overrides, str(dump) if dump else None, die_at_step,
                                               seams, slow_eval_s))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = []
    for p in procs:
        if p.is_alive():  # a hang is a failure of its own
            p.kill()
            p.join()
            codes.append(-999)
        else:
            codes.append(p.exitcode)
    return codes


def load_dump(dump: str | Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(f"{dump}-rank{rank}.pt", weights_only=True)
