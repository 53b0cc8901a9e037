"""Typed configuration: the dataclasses are the schema, YAML files and `key.sub=value` arguments
only override them. Defaults are the paper's pretraining recipe (REFERENCE §3.1, §3.4); the embedded
CPU demo is the `demo` run preset below.

    cfg = load_config("configs/pretrain_4m.yaml", ["optim.lr=2e-4", "data.batch_size=48"])

An unknown key is an error that lists the valid keys; values are converted by the field's type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from albef_fast.models.presets import MODEL_PRESETS


@dataclass(kw_only=True)
class ModelSection:
    preset: str = "albef_base"
    """Architecture preset: albef_base (the paper's shapes) or albef_tiny (tests and the CPU demo)."""
    image_size: int | None = None
    """Override the preset's input resolution (e.g. 384 for fine-tuning); None keeps the preset's."""
    init_vit: str | None = None
    """Fresh runs: DeiT / timm ViT-B/16 weights for the vision encoder (ALBEF pretraining starts from
    deit_base_patch16_224; pos_embed is interpolated to the image size)."""
    init_bert: str | None = None
    """Fresh runs: transformers BertForMaskedLM weights (a bert-base-uncased folder or its weights file)
    for the text and fusion encoders and the MLM head; cross-attention keeps its fresh initialisation."""
    init_from: str | None = None
    """Fresh runs: start from a whole model: an official ALBEF checkpoint, an albef-fast weights folder
    (`albef-fast convert`) or a training run (its queues are not taken)."""

    def __post_init__(self) -> None:
        if self.preset not in MODEL_PRESETS:
            raise ValueError(f"model.preset={self.preset!r} is unknown; valid: {sorted(MODEL_PRESETS)}")


@dataclass(kw_only=True)
class DataConfig:
    source: Literal["json", "scenes"] = "json"
    """json: ALBEF JSON files in train_files; scenes: the embedded generated scene dataset."""
    train_files: list[str] = field(default_factory=list)
    """Training sources, one per entry: an ALBEF JSON file (a list of {"image": path, "caption": str |
    [str, ...]}) or webdataset shards (a .tar, or a brace pattern like shards/{000000..000099}.tar)."""
    train_weights: list[float] = field(default_factory=list)
    """Mixture weight per train_files entry; empty: every sample once per epoch (plain shuffle)."""
    image_backend: Literal["auto", "dali", "dali_cpu", "pil"] = "auto"
    """Decode + augment: dali (GPU), dali_cpu, pil (loader workers); auto = dali on CUDA if installed, else pil."""
    dali_threads: int = 4
    """CPU threads of the DALI pipeline."""
    dali_hw_decoder_load: float | None = 1.0
    """Share of each batch's JPEGs that DALI's GPU decoder sends to the hardware JPEG engine (A100, H100,
    H200; ignored where there is none), the rest to nvJPEG's CPU+CUDA path; None: DALI's default (0.65).
    1.0 measured 3,789 images/s for the DALI stage against 3,101 at DALI's default (H200, 8 threads)."""
    eval_file: str | None = None
    """Optional retrieval JSON ({"image", "caption": [str, ...]}) for zero-shot retrieval before/after training."""
    cache_dir: str = "~/.cache/albef_fast"
    """Where generated data (the scene dataset) and the webdataset shard index cache (shard_index/) are written."""
    scenes_train: int = 6000
    scenes_eval: int = 300
    batch_size: int = 64
    """Per-process batch size (ALBEF: 64 per GPU)."""
    num_workers: int = 4
    augment: Literal["pretrain", "none"] = "pretrain"
    """pretrain: RandomResizedCrop(0.2-1) + flip + RandAugment(2, 7), as ALBEF; none: resize only."""
    max_text_len: int = 25
    """Token ids per caption including [CLS] (ALBEF: 25 -> 24 word pieces)."""
    max_words: int = 30
    """pre_caption keeps this many words."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_text_len", "max_words", "scenes_train", "scenes_eval", "dali_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.dali_hw_decoder_load is not None and not 0.0 <= self.dali_hw_decoder_load <= 1.0:
            raise ValueError(f"data.dali_hw_decoder_load must be in [0, 1] or null, got {self.dali_hw_decoder_load}")
        if self.train_weights and len(self.train_weights) != len(self.train_files):
            raise ValueError(f"data.train_weights needs one weight per data.train_files entry: got "
                             f"{len(self.train_weights)} weights for {len(self.train_files)} files")
        if any(not w > 0 for w in self.train_weights):
            raise ValueError(f"data.train_weights must all be > 0, got {self.train_weights}")


@dataclass(kw_only=True)
class LossConfig:
    queue_size: int = 65536
    """Momentum features kept per modality as ITC negatives. Must be a multiple of the global batch."""
    momentum: float = 0.995
    """EMA decay of the momentum model, applied once per optimizer step."""
    alpha: float = 0.4
    """Weight of the momentum pseudo-targets in ITC and MLM."""
    alpha_warmup: bool = True
    """Ramp alpha linearly from 0 over the first epoch (ALBEF pretraining)."""
    mlm_probability: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"loss.momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"loss.alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"loss.mlm_probability must be in (0, 1), got {self.mlm_probability}")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.02
    """Applied to every tensor except 1-D ones and biases (ALBEF's grouping: temp, pos_embed and
    embeddings are decayed)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    epochs: int = 30
    """Cosine schedule length in epochs (timm CosineLRScheduler semantics, REFERENCE §3.4)."""
    min_lr: float = 1e-5
    warmup_lr: float = 1e-5
    warmup_steps: int = 20
    """Linear warm-up in scheduler steps of `warmup_step_iters` iterations each, in the first epoch."""
    warmup_step_iters: int = 100
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (None: run all epochs)."""
    grad_accum_steps: int = 1
    """Micro-batches of data.batch_size per process and optimizer step. Global batch =
    data.batch_size x processes x grad_accum_steps; schedules, logging and checkpoints count optimizer
    steps. ALBEF: 1."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value before each step; 0 = off (ALBEF does not clip)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.warmup_step_iters < 1 or self.warmup_steps < 0:
            raise ValueError("optim.lr must be > 0, optim.epochs and optim.warmup_step_iters >= 1, "
                             f"optim.warmup_steps >= 0 (got {self.lr}, {self.epochs}, "
                             f"{self.warmup_step_iters}, {self.warmup_steps})")
        if self.grad_accum_steps < 1 or self.grad_clip < 0:
            raise ValueError(f"optim.grad_accum_steps must be >= 1 and optim.grad_clip >= 0, got "
                             f"{self.grad_accum_steps}, {self.grad_clip}")


@dataclass(kw_only=True)
class EvalConfig:
    k_test: int = 128
    """Candidates re-ranked by the ITM head in retrieval (ALBEF: 128 Flickr, 256 COCO)."""
    batch_size: int = 64
    before_training: bool = True
    after_training: bool = True

    def __post_init__(self) -> None:
        if self.k_test < 1 or self.batch_size < 1:
            raise ValueError(f"eval.k_test and eval.batch_size must be >= 1, got {self.k_test}, {self.batch_size}")


@dataclass(kw_only=True)
class KernelConfig:
    backend: Literal["auto", "triton", "torch"] = "auto"
    """Fused operators: auto = Triton on CUDA tensors, the PyTorch reference elsewhere; torch = always
    the reference. The environment variable ALBEF_KERNELS overrides this."""
    disable: list[str] = field(default_factory=list)
    """Ops routed to their PyTorch reference whatever the backend, e.g. [itc_loss, mlm_loss]."""
    attention: Literal["auto", "flash_attn", "torch_flash", "sdpa", "math"] = "auto"
    """Attention backend for the ViT, text and fusion layers (albef_fast/models/attention.py): auto =
    flash-attn if installed, else PyTorch's flash kernels, on CUDA in bf16; SDPA on the CPU."""


@dataclass(kw_only=True)
class DistributedConfig:
    strategy: Literal["auto", "none", "ddp", "zero1", "zero2", "zero3"] = "auto"
    """How the processes a launcher started share the work (albef_fast/distributed):
    none = one process; ddp = torch DistributedDataParallel; zero1/2/3 = DeepSpeed ZeRO stage 1
    (optimizer state), 2 (+ gradients) or 3 (+ parameters) partitioned across ranks;
    auto = ddp when launched with several processes (WORLD_SIZE > 1), else none."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend; auto = nccl on CUDA, gloo on the CPU."""
    timeout_s: float = 1800.0
    """A collective that waits longer than this fails (a rank died or hangs) instead of hanging forever."""
    eval_timeout_s: float = 21600.0
    """How long the other ranks wait while rank 0 works alone: retrieval evaluation, writing the weights or
    a checkpoint, generating the demo data. Waited on a separate gloo group, so it may exceed timeout_s."""
    offload_optimizer: bool = False
    """zero2/zero3: keep the optimizer state in host memory (DeepSpeed offload_optimizer: cpu)."""
    keep_checkpoints: int = 2
    """DeepSpeed strategies: checkpoint folders kept (the newest ones; >= 1)."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.eval_timeout_s <= 0 or self.keep_checkpoints < 1:
            raise ValueError(f"distributed.timeout_s and eval_timeout_s must be > 0 and distributed.keep_checkpoints "
                             f">= 1, got {self.timeout_s}, {self.eval_timeout_s}, {self.keep_checkpoints}")


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = "runs/albef"
    seed: int = 42
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU. Momentum weights and queues are always fp32."""
    log_every: int = 10
    """Steps between metric lines (the only host synchronisation of the loop)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (one is also written at the end)."""
    resume: bool = True
    """Continue from output_dir/checkpoint-latest.pt if it exists."""
    progress: bool = True
    """Show a progress bar with the loss terms, samples/s and ETA."""

    def __post_init__(self) -> None:
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise ValueError(f"log_every and checkpoint_every must be >= 1, got {self.log_every}, "
                             f"{self.checkpoint_every}")
        if self.checkpoint_every % self.log_every:
            # so that a resumed run's logging windows line up with the uninterrupted run's
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be a multiple of "
                             f"log_every={self.log_every}")


# The embedded default: `albef-fast pretrain` with no --config. Trains albef_tiny on the generated
# scene dataset in about ten minutes on a 2-core CPU.
RUN_PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "model": {"preset": "albef_tiny"},
        "data": {"source": "scenes", "batch_size": 32, "num_workers": 1, "augment": "none"},
        "loss": {"queue_size": 2048},
        "optim": {"lr": 3e-4, "epochs": 6, "min_lr": 3e-5, "warmup_steps": 5, "warmup_step_iters": 20,
                  "weight_decay": 0.02},
        "eval": {"k_test": 16},
        "output_dir": "runs/demo",
        "checkpoint_every": 200,
    },
}


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            return _convert(value, arg, key)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}={value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} expects a list, got {value!r}")
        items = [_convert(v, args[0], key) for v in value]
        return items if origin is list else tuple(items)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{key} expects true/false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} expects {tp.__name__}, got {value!r}") from None
    return value


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> Any:
    """A copy of dataclass `obj` with `updates` (nested dicts) applied; validates keys and types."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, value in updates.items():
        if key not in names:
            raise ValueError(f"unknown config key {prefix + key!r}; valid keys{' of ' + prefix[:-1] if prefix else ''}: "
                             f"{', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix + key} is a section; set its fields, e.g. {prefix + key}.<field>=...")
            changes[key] = _merge(current, value, prefix + key + ".")
        else:
            changes[key] = _convert(value, hints[key], prefix + key)
    return dataclasses.replace(obj, **changes)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """["optim.lr=2e-4", "data.batch_size=48"] -> {"optim": {"lr": "2e-4"}, "data": {"batch_size": "48"}}."""
    tree: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ValueError(f"override {arg!r} must look like key.sub=value")
        key, value = arg.split("=", 1)
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {arg!r} conflicts with an earlier one")
        node[leaf] = value
    return tree


def load_config(config: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- run preset name or YAML file <- dotted overrides."""
    cfg = TrainConfig()
    if config is not None:
        if str(config) in RUN_PRESETS:
            cfg = _merge(cfg, RUN_PRESETS[str(config)])
        else:
            path = Path(config)
            if not path.is_file():
                raise FileNotFoundError(f"config {config!r} is neither a file nor a run preset ({sorted(RUN_PRESETS)})")
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{path}: the top level must be a mapping of sections")
            cfg = _merge(cfg, data)
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides))
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    return _merge(TrainConfig(), data)
