"""Scale-out on the CPU: 2 processes (gloo) under DDP and DeepSpeed ZeRO-1/2/3 against one process.

The reference is one process running the same global batch as 2 accumulated micro-batches (micro-batch
a of the one process = the micro-batch of rank a: data/sharding.py). With dropout off and a
deterministic hard negative (tests/dist_worker.py) both compute the same function, so:

* DDP, ZeRO-1 and ZeRO-2 reproduce it bitwise on this CPU (same reduction order: the sum of the two
  micro-batch gradients);
* ZeRO-3 reduce-scatters gradients in another order: losses agree to 1e-6 and every tensor of every rank
  to 1e-6 absolute, except the attention key biases. Their gradient is exactly zero in exact arithmetic
  (softmax is shift-invariant), so what Adam normalises there is rounding noise: those slices are only
  held to Adam's bound, |change| <= lr per step.

After k steps the momentum weights of every rank equal the one-process EMA (momentum 0.5 here, so that
a lost or partial EMA update shows). A rank killed mid-run leaves a clear error on the survivor and a
checkpoint from which 2 processes (or 1 with accumulation) continue to the uninterrupted result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from albef_fast.config import load_config
from albef_fast.data.dataset import ResumableBatchSampler
from albef_fast.data.sharding import AccumulationBatchSampler
from albef_fast.distributed.deepspeed_config import deepspeed_config
from albef_fast.distributed.env import DistEnv, env_from_launcher
from albef_fast.train.metrics import read_metrics
from tests.dist_worker import load_dump, run

STEPS, LR = 4, 1e-4


def discard(*runs: Path) -> None:
    """Delete a passed test's run folders (checkpoints: ~0.3 GB per ZeRO run) so the suite's disk use
    stays bounded; a failing test keeps them for inspection."""
    for out in runs:
        shutil.rmtree(out, ignore_errors=True)
        for dumped in out.parent.glob(f"{out.name}-rank*"):  # state dumps and error reports
            dumped.unlink()


def needs_deepspeed(strategy: str) -> None:
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")


def overrides(out: Path, cache: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"data.cache_dir={cache}", "data.scenes_train=48", "data.scenes_eval=6",
            "data.batch_size=2", "data.num_workers=0", "loss.queue_size=16", "loss.momentum=0.5",
            f"optim.lr={LR}", "optim.warmup_lr=1e-5", "optim.warmup_steps=3", "optim.warmup_step_iters=1",
            f"optim.max_steps={STEPS}",
            "progress=false", "log_every=1", "checkpoint_every=2", "eval.before_training=false",
            "eval.after_training=false", "device=cpu", "precision=fp32", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, global batch 4 as 2 accumulated micro-batches of 2: (losses per step, final state)."""
    root = tmp_path_factory.mktemp("dist")
    assert run(1, overrides(root / "one", root / "cache", "optim.grad_accum_steps=2"), dump=root / "one") == [0]
    return root, read_metrics(root / "one" / "metrics.jsonl"), load_dump(root / "one", 0)


def key_bias_mask(name: str, t: torch.Tensor) -> torch.Tensor | None:
    """True on the attention key-bias entries of a fused qkv / kv bias."""
    if name.endswith("qkv.bias"):
        D = t.shape[0] // 3
        return torch.arange(t.shape[0]).ge(D) & torch.arange(t.shape[0]).lt(2 * D)
    if name.endswith(".kv.bias"):
        return torch.arange(t.shape[0]).lt(t.shape[0] // 2)
    return None


def assert_same_run(rows, state, ref_rows, ref_state, *, exact: bool) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    for r, q in zip(rows, ref_rows):
        for k in ("loss", "itc_loss", "itm_loss", "mlm_loss", "temp"):
            assert r[k] == q[k] if exact else r[k] == pytest.approx(q[k], rel=1e-6), (r["step"], k, r[k], q[k])
    assert state.keys() == ref_state.keys()
    for name, want in ref_state.items():
        got = state[name].reshape(want.shape)
        if exact or not want.is_floating_point():
            assert torch.equal(got, want), name
            continue
        mask = key_bias_mask(name, want)
        if mask is not None:
            torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=LR * STEPS, msg=name)
            got, want = got[~mask], want[~mask]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero2-offload", "zero3"])
def test_two_processes_match_one_process(reference, strategy):
    """zero2-offload: the optimizer state on the host (DeepSpeed offload with the torch AdamW). zero3 also
    evaluates retrieval after training (every rank gathers, rank 0 evaluates a plain copy) and exports the
    weights folder."""
    needs_deepspeed(strategy)
    root, ref_rows, ref_state = reference
    out = root / strategy
    extra = [f"distributed.strategy={strategy.split('-')[0]}"]
    extra += ["distributed.offload_optimizer=true"] if strategy.endswith("offload") else []
    extra += ["eval.after_training=true", "eval.k_test=4"] if strategy == "zero3" else []
    assert run(2, overrides(out, root / "cache", *extra), dump=out) == [0, 0]
    rows = read_metrics(out / "metrics.jsonl")
    for rank in (0, 1):  # every rank holds the one-process weights, momentum weights and queues
        assert_same_run(rows, load_dump(out, rank), ref_rows, ref_state, exact=strategy != "zero3")
    # the EMA was exercised: momentum and online weights differ by much more than the tolerance
    gap = max((ref_state[f"model_m.{k[6:]}"] - v).abs().max().item() for k, v in ref_state.items()
              if k.startswith("model.") and f"model_m.{k[6:]}" in ref_state)
    assert gap > 2e-5  # 20x the tolerance
    if strategy.startswith("zero"):
        pointer = json.loads((out / "checkpoint-latest.json").read_text())
        assert pointer["step"] == STEPS and pointer["world_size"] == 2 and pointer["strategy"] == strategy[:5]
        from albef_fast.weights import load_pretrained

        exported = load_pretrained(out / "weights").state_dict()  # what convert / model.init_from read
        dumped = load_dump(out, 0)
        assert all(torch.equal(v, dumped[k].reshape(v.shape)) for k, v in exported.items())
    discard(out)


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_a_dead_rank_fails_clearly_and_the_run_resumes(reference, strategy):
    """Rank 1 dies during step 3 (after the step-2 checkpoint): rank 0 stops with an error that says
    what happened and where the checkpoint is, nobody hangs; 2 fresh processes finish the run."""
    needs_deepspeed(strategy)
    root, ref_rows, ref_state = reference
    out = root / f"dead-{strategy}"
    args = overrides(out, root / "cache", f"distributed.strategy={strategy}", "distributed.timeout_s=60")
    codes = run(2, args, dump=out, die_at_step=3, timeout=300)
    assert codes[1] == 17 and codes[0] not in (0, -999), codes  # -999: hung and killed
    err = Path(f"{out}-rank0.err").read_text()
    assert "DistributedRunError: rank 0 of 2 stopped at step 2" in err and "resumable" in err, err
    assert run(2, args, dump=out) == [0, 0]
    rows = read_metrics(out / "metrics.jsonl")  # the lines of the interrupted run after step 2 are gone
    for rank in (0, 1):
        assert_same_run(rows, load_dump(out, rank), ref_rows, ref_state, exact=strategy != "zero3")
    discard(out)


def test_a_ddp_checkpoint_resumes_on_one_process(reference):
    """Written by 2 processes at step 2, finished by 1 process with 2 accumulation steps (same global batch)."""
    root, ref_rows, ref_state = reference
    out = root / "ddp-to-one"
    first = overrides(out, root / "cache", "distributed.strategy=ddp", "optim.max_steps=2")
    assert run(2, first) == [0, 0]
    assert run(1, overrides(out, root / "cache", "optim.grad_accum_steps=2"), dump=out) == [0]
    assert_same_run(read_metrics(out / "metrics.jsonl"), load_dump(out, 0), ref_rows, ref_state, exact=True)
    discard(out)


@pytest.fixture(scope="module")
def clipped_reference(reference):
    """The one-process reference with the global gradient norm clipped to 0.5 (the run's norms are larger)."""
    root, _, _ = reference
    out = root / "one-clip"
    assert run(1, overrides(out, root / "cache", "optim.grad_accum_steps=2", "optim.grad_clip=0.5"), dump=out) == [0]
    return root, read_metrics(out / "metrics.jsonl"), load_dump(out, 0)


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_gradient_clipping_matches_one_process(clipped_reference, reference, strategy):
    """optim.grad_clip under DDP (torch's clip_grad_norm_ on the averaged gradients: bitwise) and under
    DeepSpeed (its own clip of the reduced gradients, gradient_clipping in the generated config: another
    formula for the same factor, so held to the ZeRO-3 tolerance)."""
    needs_deepspeed(strategy)
    root, ref_rows, ref_state = clipped_reference
    _, _, unclipped = reference
    assert any(not torch.equal(ref_state[k], unclipped[k]) for k in ref_state)  # clipping acted
    out = root / f"clip-{strategy}"
    assert run(2, overrides(out, root / "cache", f"distributed.strategy={strategy}", "optim.grad_clip=0.5"),
               dump=out) == [0, 0]
    for rank in (0, 1):
        assert_same_run(read_metrics(out / "metrics.jsonl"), load_dump(out, rank), ref_rows, ref_state,
                        exact=strategy == "ddp")
    discard(out)


def test_ddp_resume_restores_every_rank_rng(reference):
    """With dropout on and random hard negatives (no test seams), 2+2 steps with a restart equal 4
    straight steps bitwise: each rank's RNG states and the data position come back."""
    root, _, _ = reference
    args = ["distributed.strategy=ddp"]
    assert run(2, overrides(root / "rng-straight", root / "cache", *args), dump=root / "rng-straight", seams=False) == [0, 0]
    out = root / "rng-resumed"
    assert run(2, overrides(out, root / "cache", *args, "optim.max_steps=2"), seams=False) == [0, 0]
    assert run(2, overrides(out, root / "cache", *args), dump=out, seams=False) == [0, 0]
    def losses(path):
        return [{k: r[k] for k in ("step", "loss", "itc_loss", "itm_loss", "mlm_loss", "temp")}
                for r in read_metrics(path / "metrics.jsonl")]

    assert losses(out) == losses(root / "rng-straight")
    for rank in (0, 1):
        straight, resumed = load_dump(root / "rng-straight", rank), load_dump(out, rank)
        assert all(torch.equal(v, resumed[k]) for k, v in straight.items())
    discard(out, root / "rng-straight")


def test_zero_checkpoints_refuse_another_world_size(reference):
    pytest.importorskip("deepspeed")
    root, _, _ = reference
    out = root / "zero1-refuse"
    assert run(2, overrides(out, root / "cache", "distributed.strategy=zero1", "optim.max_steps=2")) == [0, 0]
    codes = run(1, overrides(out, root / "cache", "distributed.strategy=zero1", "optim.grad_accum_steps=2"),
                dump=out)
    assert codes != [0]
    err = Path(f"{out}-rank0.err").read_text()
    assert "written by zero1 on 2 ranks; this run is zero1 on 1" in err, err
    discard(out)


@pytest.mark.parametrize(("eval_timeout_s", "slow_eval_s"), [(120, 20), (15, 40)])
def test_rank0_evaluation_may_outlast_the_collective_timeout(reference, eval_timeout_s, slow_eval_s):
    """Rank 0 evaluates retrieval for longer than distributed.timeout_s (10 s; slowed by 20 s) while rank 1
    waits. The wait is on its own group with distributed.eval_timeout_s: with 120 s the run ends normally;
    with 15 s and an evaluation slowed by 40 s rank 1 stops with an error that names the evaluation and the
    setting (rank 0 then finds it gone). 15 s leaves the checkpoint-write wait room under CI load."""
    root, _, _ = reference
    out = root / f"slow-eval-{eval_timeout_s}"
    args = overrides(out, root / "cache", "distributed.strategy=ddp", "optim.max_steps=1", "eval.after_training=true",
                     "eval.k_test=4", "distributed.timeout_s=10", f"distributed.eval_timeout_s={eval_timeout_s}")
    codes = run(2, args, dump=out, slow_eval_s=slow_eval_s, timeout=300)
    if eval_timeout_s > slow_eval_s:
        assert codes == [0, 0]
    else:
        assert codes[0] not in (0, -999) and codes[1] not in (0, -999), codes
        err = Path(f"{out}-rank1.err").read_text()
        assert "MainRankWaitError: rank 1: the wait for rank 0's retrieval evaluation after training failed" in err
        assert "distributed.eval_timeout_s=15" in err, err
    discard(out)


# --- units (no processes) ------------------------------------------------------------------------------------

def test_accumulation_slots_are_the_ranks_slots():
    """One process x 2 accumulation steps takes, step by step, exactly what 2 ranks take."""
    def make(r, w):
        return ResumableBatchSampler(40, 3, seed=7, rank=r, world_size=w)

    one = AccumulationBatchSampler(make, rank=0, world_size=1, accum_steps=2)
    ranks = [AccumulationBatchSampler(make, rank=r, world_size=2, accum_steps=1) for r in (0, 1)]
    for s in (one, *ranks):
        s.set_epoch(1, start_step=2)
    micro = list(one)
    assert one.steps_per_epoch == ranks[0].steps_per_epoch == 40 // 6 and len(micro) == 2 * (40 // 6 - 2)
    assert micro[0::2] == list(ranks[0]) and micro[1::2] == list(ranks[1])
    flat = [i for b in micro for i, _ in b]
    assert len(set(flat)) == len(flat)  # no sample twice in an epoch


def test_env_from_launcher():
    assert env_from_launcher({}) == DistEnv()
    env = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert env_from_launcher(env) == DistEnv(2, 4, 0)
    slurm = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "MASTER_ADDR": "h",
             "MASTER_PORT": "1"}
    assert env_from_launcher(slurm) == DistEnv(5, 8, 1)
    # the batch script itself (outside srun) is one process, whatever the allocation's task count
    assert env_from_launcher({"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}) == DistEnv()
    with pytest.raises(ValueError, match="start one task per GPU with srun"):
        env_from_launcher({"SLURM_STEP_NUM_TASKS": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="MASTER_ADDR/MASTER_PORT are not set"):
        env_from_launcher({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ValueError, match="inconsistent launcher environment"):
        env_from_launcher({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


def test_deepspeed_config_follows_the_train_config():
    cfg = load_config(None, ["distributed.strategy=zero3", "data.batch_size=48", "optim.grad_accum_steps=2",
                             "optim.grad_clip=1.0", "precision=bf16", "distributed.offload_optimizer=true"])
    ds = deepspeed_config(cfg, world_size=8, device=torch.device("cpu"))
    assert ds["train_micro_batch_size_per_gpu"] == 48 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 48 * 2 * 8 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # bf16 compute, fp32 parameters and collectives (no lower-precision communication)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in ds and ds["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ValueError, match="offload_optimizer needs strategy zero2 or zero3"):
        deepspeed_config(load_config(None, ["distributed.strategy=zero1", "distributed.offload_optimizer=true"]), 2,
                         torch.device("cpu"))


def test_queue_divisibility_uses_the_global_batch(tmp_path, capsys):
    from albef_fast.cli import main

    # 2 per micro-batch x 3 accumulation steps = 6 does not divide 16
    args = overrides(tmp_path / "q", tmp_path / "cache", "optim.grad_accum_steps=3")
    assert main(["pretrain", *args]) == 2
    assert "not a multiple of the global batch 6" in capsys.readouterr().err
