"""End to end on the CPU: the CLI runs a few steps, and a run stopped at step k and resumed logs the
same losses as an uninterrupted run."""

import json

import pytest
import torch

from albef_fast.cli import main
from albef_fast.config import load_config
from albef_fast.train.checkpoint import LATEST, load_checkpoint
from albef_fast.train.loop import train
from albef_fast.train.metrics import read_metrics


def small_run(tmp_path, name, *extra):
    return [
        f"output_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}", "data.scenes_train=48",
        "data.scenes_eval=6", "data.batch_size=8", "data.num_workers=0", "loss.queue_size=32", "eval.k_test=4",
        "optim.warmup_step_iters=2", "progress=false", "log_every=1", *extra,
    ]


def test_cli_pretrain_smoke_and_eval_retrieval(tmp_path, capsys):
    assert main(["pretrain", *small_run(tmp_path, "smoke", "optim.max_steps=3")]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "before:" in out and "after:" in out
    run = tmp_path / "smoke"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] == pytest.approx(r["itc_loss"] + r["itm_loss"] + r["mlm_loss"], rel=1e-4) for r in rows)
    assert (run / "losses.png").stat().st_size > 1000 and (run / LATEST).exists()
    assert json.loads((run / "config.json").read_text())["model"]["preset"] == "albef_tiny"
    assert main(["eval-retrieval", "--checkpoint", str(run / LATEST)]) == 0
    recalls = capsys.readouterr().out
    assert "image->text R@1/5/10" in recalls
    # the same model as a weights folder inside the run folder (as a ZeRO run writes output_dir/weights)
    assert main(["convert", "--checkpoint", str(run), "--output", str(run / "weights")]) == 0
    capsys.readouterr()
    assert main(["eval-retrieval", "--checkpoint", str(run / "weights")]) == 0
    assert capsys.readouterr().out == recalls


def test_cli_reports_config_errors(capsys):
    assert main(["pretrain", "optim.lrr=1"]) == 2
    assert "valid keys of optim: lr" in capsys.readouterr().err
    assert main(["pretrain", "loss.queue_size=1000"]) == 2  # demo batch 32 does not divide 1000
    assert "loss.queue_size=992 or 1024" in capsys.readouterr().err


@pytest.fixture
def one_thread():
    """Multi-threaded CPU reductions differ in the last bit from run to run (two uninterrupted runs
    differ by 1 ulp too); with one thread the CPU is bitwise deterministic and equality is exact."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, one_thread):
    """8 steps straight vs 5 steps, a new process state, then the remaining 3 (an epoch is 6 steps, so
    the resumed run continues mid-epoch and crosses an epoch boundary). Bitwise equality."""
    common = ["optim.epochs=3", "eval.before_training=false", "eval.after_training=false"]
    straight = train(load_config("demo", small_run(tmp_path, "straight", "optim.max_steps=8", *common)))
    assert straight.steps == 8
    train(load_config("demo", small_run(tmp_path, "resumed", "optim.max_steps=5", "checkpoint_every=5", *common)))
    torch.manual_seed(12345)  # perturb the global RNG: resume must restore it
    resumed = train(load_config("demo", small_run(tmp_path, "resumed", "optim.max_steps=8", *common)))
    assert resumed.steps == 8
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in ("loss", "itc_loss", "itm_loss", "mlm_loss", "lr", "alpha", "temp"):
            assert ra[key] == rb[key], (ra["step"], key)
    # and the final states agree exactly
    from albef_fast.models.albef import ALBEF
    from albef_fast.models.presets import get_preset
    from albef_fast.task import PretrainTask

    states = []
    for name in ("straight", "resumed"):
        task = PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=32)
        pos, _ = load_checkpoint(tmp_path / name / LATEST, task, restore_rng=False)
        states.append((pos, task.state_dict()))
    assert states[0][0] == states[1][0]
    for k, v in states[0][1].items():
        assert torch.equal(v, states[1][1][k]), k


def test_resume_refuses_a_run_with_other_settings(tmp_path, capsys):
    args = small_run(tmp_path, "run", "optim.max_steps=2", "eval.before_training=false", "eval.after_training=false")
    assert main(["pretrain", *args]) == 0
    assert main(["pretrain", *args, "data.batch_size=16"]) == 2
    assert "global batch (data.batch_size x processes x optim.grad_accum_steps): 8 -> 16" in capsys.readouterr().err


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / LATEST
    path.write_bytes(b"not a checkpoint")
    from albef_fast.models.albef import ALBEF
    from albef_fast.models.presets import get_preset
    from albef_fast.task import PretrainTask

    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
        load_checkpoint(path, PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=32))
