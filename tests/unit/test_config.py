"""Typed config: loading, overrides and the errors a user sees."""

from pathlib import Path

import pytest

from albef_fast.config import TrainConfig, from_dict, load_config, to_dict


def test_defaults_are_the_paper_recipe():
    cfg = TrainConfig()
    assert (cfg.model.preset, cfg.loss.queue_size, cfg.loss.momentum, cfg.optim.lr) == ("albef_base", 65536, 0.995, 1e-4)
    assert (cfg.data.batch_size, cfg.data.max_text_len, cfg.optim.epochs) == (64, 25, 30)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: albef_tiny\noptim:\n  lr: 2.0e-4\n  betas: [0.9, 0.98]\n")
    cfg = load_config(path, ["optim.lr=3e-4", "data.train_files=a.json,b.json", "optim.max_steps=none"])
    assert cfg.model.preset == "albef_tiny" and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.98)
    assert cfg.data.train_files == ["a.json", "b.json"] and cfg.optim.max_steps is None
    assert from_dict(to_dict(cfg)) == cfg


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'optim.lrr'.*valid keys of optim: lr, weight_decay"):
        load_config(None, ["optim.lrr=1"])
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'trainer'.*model, data, loss"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=fast", "optim.lr expects float"),
    ("data.batch_size=2.5", "data.batch_size expects int"),
    ("data.augment=heavy", r"data.augment='heavy' is not one of \['pretrain', 'none'\]"),
    ("model.preset=albef_huge", "model.preset='albef_huge' is unknown"),
    ("loss.momentum=1.5", r"loss.momentum must be in \[0, 1\)"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
    ("data.dali_hw_decoder_load=1.5", r"data.dali_hw_decoder_load must be in \[0, 1\] or null"),
    ("optim=3", "optim is a section"),
    ("resume=maybe", "resume expects true/false"),
    ("optim.lr", "must look like key.sub=value"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_unknown_kernel_op_is_named():
    import albef_kernels._dispatch as dispatch

    with pytest.raises(ValueError, match=r"unknown ops \['itc_los'\]; valid: \['itc_loss'"):
        dispatch.configure("auto", disable=["itc_los"])
    dispatch.configure("auto", disable=[])


def test_missing_config_file_names_presets():
    with pytest.raises(FileNotFoundError, match=r"neither a file nor a run preset \(\['demo'\]\)"):
        load_config("configs/nope.yaml")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert load_config(path).output_dir.startswith("runs/")
