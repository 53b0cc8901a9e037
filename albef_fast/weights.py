"""Weights in and out: ALBEF checkpoints, Hugging Face BERT, DeiT / timm ViT, and our own
safetensors folders (REFERENCE §1.1, §1.2, §5).

Our parameter names differ from ALBEF's where projections are fused; everything else is identical.
One table (`albef_names`) maps each of our keys to the ALBEF key(s) it is made of, and both
directions are derived from it:

    ours (relative to ALBEF model)                     ALBEF (pretraining layout)
    text_encoder.embeddings.norm.*                     text_encoder.bert.embeddings.LayerNorm.*
    text_encoder.layers.{i}.self_attn.qkv.*            ...encoder.layer.{i}.attention.self.{query,key,value}.* (cat dim 0)
    text_encoder.layers.{i}.self_attn.out / self_norm  ...attention.output.dense / attention.output.LayerNorm
    text_encoder.layers.{i}.fc1 / fc2 / mlp_norm       ...intermediate.dense / output.dense / output.LayerNorm
    fusion_encoder.layers.{j}.*                        ...encoder.layer.{text_layers + j}.*, and
      cross_attn.q / cross_attn.kv / cross_attn.out    ...crossattention.self.query / .{key,value} (cat) / .output.dense
      cross_norm                                       ...crossattention.output.LayerNorm
    mlm_head.dense / norm / bias                       text_encoder.cls.predictions.transform.dense / .LayerNorm / .bias
    mlm_head.decoder.weight (tied to word embeddings)  text_encoder.cls.predictions.decoder.{weight,bias} (tied aliases)
    visual_encoder.*, vision_proj, text_proj, itm_head, temp: same names
    model_m.<module>.*  (momentum twin)                <albef module>_m.*
    queues.image / queues.text (Q, D), queues.ptr ()   image_queue / text_queue (D, Q), queue_ptr (1,)

Our own training checkpoints (`checkpoint-latest.pt` of `albef-fast pretrain`, albef_fast/train/
checkpoint.py) are read by `load_training_checkpoint` into a PretrainTask (weights, momentum model,
queues; the optimizer/RNG/position run state is not weights and is not converted), from which every
export below applies.

Layouts: "pretrain" (ALBEF.pth, 844 keys at full size, `bert.` + `cls.`), "retrieval" (mscoco.pth
etc.: no `bert.`, no MLM head, an idx_queue), "hf_bert" (transformers' BertForMaskedLM state_dict:
`bert.` + `cls.`, text weights only). Flavour "lavis": LAVIS's ALBEF has no token-type embedding
(REFERENCE §7.2); on export row 0 of ours is folded into the position embeddings, which is exact
because ALBEF always adds row 0; on import the token-type table is set to zero.

Every load reports missing keys (ours) and unexpected keys (theirs) by name; a shape mismatch is an
error naming both keys and shapes; a corrupt or truncated file is a `WeightsError` naming the file.
`.pth` files are read with `torch.load(weights_only=True)`, so a checkpoint cannot execute code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef_fast.models.albef import ALBEF
from albef_fast.models.presets import ModelConfig

Layout = Literal["pretrain", "retrieval", "hf_bert"]
Flavour = Literal["albef", "lavis"]
FORMAT = "albef-fast/weights-v1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
TIED = "mlm_head.decoder.weight"  # alias of text_encoder.embeddings.word_embeddings.weight

# Momentum module names: ours (under model_m.) -> ALBEF's top-level module it lives in.
_SUBLAYER = {
    "self_attn.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "self_attn.out": ("attention.output.dense",),
    "self_norm": ("attention.output.LayerNorm",),
    "cross_attn.q": ("crossattention.self.query",),
    "cross_attn.kv": ("crossattention.self.key", "crossattention.self.value"),
    "cross_attn.out": ("crossattention.output.dense",),
    "cross_norm": ("crossattention.output.LayerNorm",),
    "fc1": ("intermediate.dense",),
    "fc2": ("output.dense",),
    "mlp_norm": ("output.LayerNorm",),
}
_LAYER = re.compile(r"^(text|fusion)_encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class WeightsError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass
class LoadReport:
    """What a load did. Key names: `missing` in our naming (left as initialised), `unexpected` and
    `ignored` in the checkpoint's naming (`ignored` = known extras such as position_ids)."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors"]
        for name in ("missing", "unexpected", "ignored", "interpolated"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"{name} ({len(keys)}): " + ", ".join(keys))
        return "\n".join(lines + self.notes)


# --- the name table ------------------------------------------------------------------------------
def _prefixes(layout: Layout) -> tuple[str, str | None]:
    """(BERT prefix, MLM-head prefix) of a layout; the head prefix is None where there is no head."""
    return {"pretrain": ("text_encoder.bert.", "text_encoder.cls."),
            "retrieval": ("text_encoder.", None), "hf_bert": ("bert.", "cls.")}[layout]


def albef_names(key: str, cfg: ModelConfig, layout: Layout = "pretrain") -> tuple[str, ...] | None:
    """The ALBEF key(s) that our online-model key `key` (relative to `ALBEF`) is made of, concatenated
    on dim 0 in this order. None where the layout has no counterpart (MLM head in "retrieval",
    non-text modules in "hf_bert") or for the tied decoder alias."""
    bert, cls = _prefixes(layout)
    if key == TIED:
        return None
    if key.startswith("text_encoder.embeddings."):
        rest = key[len("text_encoder.embeddings."):]
        return (bert + "embeddings." + rest.replace("norm.", "LayerNorm.", 1),)
    if m := _LAYER.match(key):
        part, i, sub, kind = m.groups()
        index = int(i) + (cfg.text_layers if part == "fusion" else 0)
        if sub not in _SUBLAYER:
            raise WeightsError(f"no ALBEF name for {key!r} (sub-module {sub!r})")
        return tuple(f"{bert}encoder.layer.{index}.{s}.{kind}" for s in _SUBLAYER[sub])
    if key.startswith("mlm_head."):
        if cls is None:
            return None
        rest = key[len("mlm_head."):]
        rest = {"bias": "bias"}.get(rest) or "transform." + rest.replace("norm.", "LayerNorm.", 1)
        return (cls + "predictions." + rest,)
    return None if layout == "hf_bert" else (key,)


def _momentum_name(name: str) -> str:
    """text_encoder.bert.x -> text_encoder_m.bert.x (ALBEF's `_m` twins)."""
    head, _, rest = name.partition(".")
    return f"{head}_m.{rest}" if rest else f"{head}_m"


def _task_names(key: str, cfg: ModelConfig, layout: Layout) -> tuple[str, ...] | None:
    """albef_names for a PretrainTask key (model., model_m., queues.)."""
    if key.startswith("model."):
        return albef_names(key[len("model."):], cfg, layout)
    if key.startswith("model_m."):
        names = albef_names(key[len("model_m."):], cfg, layout)
        return None if names is None else tuple(_momentum_name(n) for n in names)
    return {"queues.image": ("image_queue",), "queues.text": ("text_queue",),
            "queues.ptr": ("queue_ptr",)}.get(key)


# --- import ------------------------------------------------------------------------------------------
def detect_layout(sd: Mapping[str, Tensor]) -> tuple[Layout, Flavour]:
    """Which ALBEF layout a state_dict is in, from its text keys."""
    if any(k.startswith("text_encoder.bert.") for k in sd):
        layout = "pretrain"
    elif any(k.startswith("text_encoder.encoder.") for k in sd):
        layout = "retrieval"
    elif any(k.startswith("bert.encoder.") for k in sd):
        layout = "hf_bert"
    else:
        raise WeightsError("not an ALBEF or BERT state_dict: no text_encoder.bert.*, text_encoder.encoder.* "
                           f"or bert.encoder.* keys (first keys: {list(sd)[:5]})")
    bert, _ = _prefixes(layout)
    flavour = "albef" if bert + "embeddings.token_type_embeddings.weight" in sd else "lavis"
    return layout, flavour


def resize_pos_embed(pos_embed: Tensor, num_patches: int, key: str = "pos_embed") -> Tensor:
    """ALBEF's interpolate_pos_embed: keep the [CLS] row, resample the square patch grid bicubically
    (align_corners=False, no antialiasing) to `num_patches` (224 <-> 256 <-> 384 px).

    Args:
        pos_embed: (1, 1 + P_ckpt, D).
    Returns:
        (1, 1 + num_patches, D); the input itself when the grids agree.
    """
    old, new = pos_embed.shape[1] - 1, num_patches
    if old == new:
        return pos_embed
    s_old, s_new = round(old ** 0.5), round(new ** 0.5)
    if s_old * s_old != old or s_new * s_new != new:
        raise WeightsError(f"{key}: cannot interpolate a {old}-patch grid to {new} patches (not square)")
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, s_old, s_old, -1).permute(0, 3, 1, 2).float()  # (1, D, s, s)
    grid = F.interpolate(grid, size=(s_new, s_new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)  # (1, s_new^2, D)
    return torch.cat([cls, grid], dim=1)


def _assemble(our_key: str, names: tuple[str, ...], sd: Mapping[str, Tensor], target: Tensor,
              report: LoadReport) -> Tensor:
    parts = [sd[n] for n in names]
    value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if our_key.startswith("queues.") and our_key != "queues.ptr":
        value = value.t()  # ALBEF (D, Q) -> ours (Q, D)
    elif our_key == "queues.ptr":
        value = value.reshape(())
    elif our_key.endswith("visual_encoder.pos_embed") and value.shape != target.shape and value.ndim == 3:
        value = resize_pos_embed(value, target.shape[1] - 1, names[0])
        report.interpolated.append(f"{names[0]} {tuple(parts[0].shape)} -> {tuple(value.shape)}")
    if value.shape != target.shape:
        theirs = " + ".join(f"{n} {tuple(sd[n].shape)}" for n in names)
        raise WeightsError(f"shape mismatch: checkpoint {theirs} vs model {our_key} {tuple(target.shape)}")
    return value.to(target.dtype)


def _check_tied(sd: Mapping[str, Tensor], alias: str, source: str) -> None:
    if alias in sd and source in sd and not torch.equal(sd[alias], sd[source]):
        raise WeightsError(f"{alias} differs from {source}: the model ties them, so untied weights cannot be loaded")


def load_albef_state_dict(module: nn.Module, sd: Mapping[str, Tensor], *, layout: Layout | None = None,
                          load_queues: bool = True, strict: bool = False) -> LoadReport:
    """Load an ALBEF-layout state_dict (any layout/flavour, detected when `layout` is None) into an
    `ALBEF` model or a `PretrainTask`.

    Args:
        module: ALBEF (online weights only) or PretrainTask (online, momentum, queues).
        sd: the checkpoint's state_dict (`torch.load(path)["model"]`), ALBEF names.
        load_queues: False leaves the task's queues as they are (e.g. another queue size).
        strict: raise when any key is missing or unexpected.
    Returns:
        LoadReport. A PretrainTask whose checkpoint has no momentum weights gets the online weights
        copied into its momentum model (`reset_momentum_`), as ALBEF does after initialising.
    """
    from albef_fast.task import PretrainTask

    detected, flavour = detect_layout(sd)
    layout = layout or detected
    is_task = isinstance(module, PretrainTask)
    cfg: ModelConfig = module.model.config if is_task else module.config
    bert, cls = _prefixes(layout)
    report, new, used = LoadReport(), {}, set()
    target_sd = module.state_dict()
    for key, target in target_sd.items():
        if not load_queues and key.startswith("queues."):
            continue
        names = _task_names(key, cfg, layout) if is_task else albef_names(key, cfg, layout)
        if names is None:
            if not key.endswith(TIED):
                report.missing.append(key)
            continue
        present = [n in sd for n in names]
        if all(present):
            new[key] = _assemble(key, names, sd, target, report)
            used.update(names)
        elif any(present):
            raise WeightsError(f"checkpoint has only some of {names} (needed together for {key})")
        elif key.endswith("embeddings.token_type_embeddings.weight") and flavour == "lavis":
            new[key] = torch.zeros_like(target)  # LAVIS adds no token type: word + position only
            report.notes.append(f"{key}: absent (LAVIS flavour), set to zero")
        else:
            report.missing.append(key)
    # tied aliases and known extras
    for prefix in ("", "_m"):
        head = bert.split(".")[0] + prefix + bert[len(bert.split(".")[0]):]
        ignorable = [head + "embeddings.position_ids"]
        if cls is not None:
            chead = cls.split(".")[0] + prefix + cls[len(cls.split(".")[0]):]
            _check_tied(sd, chead + "predictions.decoder.weight", head + "embeddings.word_embeddings.weight")
            _check_tied(sd, chead + "predictions.decoder.bias", chead + "predictions.bias")
            ignorable += [chead + "predictions.decoder.weight", chead + "predictions.decoder.bias"]
        for k in ignorable:
            if k in sd and k not in used:
                used.add(k)
                report.ignored.append(k)
    for k in ("idx_queue", "bert.pooler.dense.weight", "bert.pooler.dense.bias"):
        if k in sd:
            used.add(k)
            report.ignored.append(k)
    report.unexpected = [k for k in sd if k not in used]
    if strict and (report.missing or report.unexpected):
        raise WeightsError(f"strict load failed:\n{report}")
    module.load_state_dict(new, strict=False)
    report.loaded = len(new)
    if is_task and not any(k.startswith("model_m.") for k in new) and new:
        module.reset_momentum_()
        report.notes.append("no momentum weights in the checkpoint: momentum model copied from the online model")
    return report


def load_hf_bert(model: ALBEF, sd: Mapping[str, Tensor]) -> LoadReport:
    """Initialise the text encoder, fusion encoder and MLM head from a transformers
    BertForMaskedLM / BertForPreTraining state_dict (bert-base-uncased), as ALBEF's `from_pretrained`:
    layers [0, text_layers) -> text encoder, the next ones -> fusion encoder; cross-attention is not
    in BERT and keeps BERT's fresh initialisation (reported as missing). TF-era names
    (`LayerNorm.gamma/beta`) are accepted. Call `PretrainTask.reset_momentum_()` afterwards."""
    sd = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
          for k, v in sd.items()}
    text_only = _Subset(model, ("text_encoder.", "fusion_encoder.", "mlm_head."))
    report = load_albef_state_dict(text_only, sd, layout="hf_bert")
    extra = [k for k in report.unexpected if k.startswith(("cls.seq_relationship.", "bert.pooler."))]
    report.unexpected = [k for k in report.unexpected if k not in extra]
    report.ignored += extra
    return report


def load_vit(model: ALBEF, sd: Mapping[str, Tensor]) -> LoadReport:
    """Initialise the vision encoder from a DeiT / timm ViT state_dict (`checkpoint["model"]` of
    deit_base_patch16_224), interpolating pos_embed to the model's grid; the classifier (`head.*`)
    is reported as unexpected and dropped, as ALBEF's strict=False load drops it."""
    report, new = LoadReport(), {}
    target = model.visual_encoder.state_dict()
    for key, t in target.items():
        if key not in sd:
            report.missing.append("visual_encoder." + key)
            continue
        value = sd[key]
        if key == "pos_embed" and value.shape != t.shape and value.ndim == 3:
            value = resize_pos_embed(value, t.shape[1] - 1, key)
            report.interpolated.append(f"{key} {tuple(sd[key].shape)} -> {tuple(value.shape)}")
        if value.shape != t.shape:
            raise WeightsError(f"shape mismatch: checkpoint {key} {tuple(sd[key].shape)} vs model "
                               f"visual_encoder.{key} {tuple(t.shape)}")
        new[key] = value.to(t.dtype)
    report.unexpected = [k for k in sd if k not in target]
    model.visual_encoder.load_state_dict(new, strict=False)
    report.loaded = len(new)
    return report


class _Subset(nn.Module):
    """A view of an ALBEF model restricted to some key prefixes (for partial loads)."""

    def __init__(self, model: ALBEF, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.__dict__["_model"], self.__dict__["_prefixes"] = model, prefixes
        self.config = model.config

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return {k: v for k, v in self._model.state_dict().items() if k.startswith(self._prefixes)}

    def load_state_dict(self, sd, strict: bool = True, assign: bool = False):  # type: ignore[override]
        return self._model.load_state_dict(sd, strict=False)


# --- export ------------------------------------------------------------------------------------------
def to_albef_state_dict(module: nn.Module, *, layout: Layout = "pretrain", flavour: Flavour = "albef",
                        tensors: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Our weights in ALBEF's naming.

    Args:
        module: ALBEF or PretrainTask (then momentum weights and queues are included).
        layout: "pretrain" (model_pretrain.py), "retrieval" (model_retrieval.py: no MLM head, with an
            idx_queue of -100) or "hf_bert" (text weights of a BertForMaskedLM).
        flavour: "lavis" folds token_type_embeddings[0] into position_embeddings and drops the table.
        tensors: optional values to export instead of the module's state (same keys, e.g. gradients).
    Returns:
        state_dict in ALBEF's key order conventions; tied aliases are the same tensor objects.
    """
    from albef_fast.task import PretrainTask

    is_task = isinstance(module, PretrainTask)
    cfg: ModelConfig = module.model.config if is_task else module.config
    src = dict(module.state_dict()) if tensors is None else dict(tensors)
    bert, cls = _prefixes(layout)
    out: dict[str, Tensor] = {}
    for key, value in src.items():
        names = _task_names(key, cfg, layout) if is_task else albef_names(key, cfg, layout)
        if names is None:
            continue
        if key.startswith("queues.") and key != "queues.ptr":
            value = value.t().contiguous()
        elif key == "queues.ptr":
            value = value.reshape(1)
        for name, part in zip(names, value.chunk(len(names), dim=0) if len(names) > 1 else (value,)):
            out[name] = part.contiguous() if len(names) > 1 else part
    for prefix in ("model.", "model_m.") if is_task else ("",):
        m = "_m" if prefix == "model_m." else ""
        rename = _momentum_name if m else (lambda n: n)
        word = rename(bert + "embeddings.word_embeddings.weight")
        if word not in out:
            continue
        out[rename(bert + "embeddings.position_ids")] = torch.arange(cfg.max_position)[None]
        if cls is not None and rename(cls + "predictions.bias") in out:
            out[rename(cls + "predictions.decoder.weight")] = out[word]
            out[rename(cls + "predictions.decoder.bias")] = out[rename(cls + "predictions.bias")]
        if flavour == "lavis":
            tt = out.pop(rename(bert + "embeddings.token_type_embeddings.weight"))
            pos = rename(bert + "embeddings.position_embeddings.weight")
            out[pos] = out[pos] + tt[0]
    if layout == "retrieval" and is_task:
        out["idx_queue"] = torch.full((1, module.queues.size), -100, dtype=torch.long)
    return out


# --- files ---------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file: .safetensors, or a torch pickle (.pth/.pt/.bin) read with
    weights_only=True and unwrapped from "model" / "state_dict" / "module" where present."""
    path = Path(path)
    if path.is_dir():  # our weights folder, or a Hugging Face model folder
        path = next((path / n for n in (WEIGHTS_FILE, "pytorch_model.bin") if (path / n).is_file()), path / WEIGHTS_FILE)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises SafetensorError / OSError on bad headers and truncation
            raise WeightsError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, or a pickle that needs code execution
        raise WeightsError(f"{path} is not a readable weights-only torch checkpoint (corrupt, truncated, or "
                           f"it stores objects other than tensors and plain values): {exc}") from exc
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds no state_dict of tensors (top-level type {type(obj).__name__})")
    return obj


def save_state_dict(sd: Mapping[str, Tensor], path: str | Path) -> Path:
    """Write a state_dict as .safetensors (tied tensors stored as copies) or, for any other suffix,
    as a torch file `{"model": sd}` (the wrapper ALBEF's scripts read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(path))
    else:
        torch.save({"model": dict(sd)}, path)
    return path


def save_pretrained(module: nn.Module, folder: str | Path) -> Path:
    """A Hugging Face style folder: `config.json` (model config, queue size) + `model.safetensors`
    (our names; the tied decoder alias is not stored). Works for ALBEF and PretrainTask."""
    from albef_fast.task import PretrainTask

    is_task = isinstance(module, PretrainTask)
    model = module.model if is_task else module
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file() and not _is_weights_folder(folder):
        # e.g. a training run's folder: its config.json is the run's config, not to be overwritten
        raise WeightsError(f"{folder / CONFIG_FILE} exists and is not a weights config ({FORMAT}): "
                           "choose another output folder")
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "architecture": "ALBEF", "model": asdict(model.config),
              "queue_size": module.queues.size if is_task else None,
              "momentum": module.momentum if is_task else None}
    sd = {k: v for k, v in module.state_dict().items() if not k.endswith(TIED)}
    save_state_dict(sd, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_pretrained(folder: str | Path) -> nn.Module:
    """Rebuild what `save_pretrained` wrote: a PretrainTask when a queue size is recorded, else ALBEF."""
    from albef_fast.task import PretrainTask

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{folder / CONFIG_FILE} is missing or not valid JSON: {exc}") from exc
    if config.get("format") != FORMAT:
        raise WeightsError(f"{folder / CONFIG_FILE}: format {config.get('format')!r} is not {FORMAT!r}")
    model = ALBEF(ModelConfig(**config["model"]))
    module: nn.Module = model
    if config.get("queue_size"):
        module = PretrainTask(model, queue_size=config["queue_size"], momentum=config["momentum"])
    _load_exact(module, read_state_dict(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
    return module


def _load_exact(module: nn.Module, sd: Mapping[str, Tensor], source: Path) -> None:
    """Load a state_dict in our own names that must cover `module` exactly (the tied decoder alias may
    be absent); any missing or unexpected key, or a shape mismatch, is a WeightsError naming it."""
    target = module.state_dict()
    missing = [k for k in target if k not in sd and not k.endswith(TIED)]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected:
        raise WeightsError(f"{source}: missing {missing}, unexpected {unexpected}")
    for k, v in sd.items():
        if v.shape != target[k].shape:
            raise WeightsError(f"shape mismatch: {source} {k} {tuple(v.shape)} vs model {tuple(target[k].shape)}")
    module.load_state_dict(sd, strict=False)


# --- our own training checkpoints ------------------------------------------------------------------
def is_training_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a checkpoint written by `albef-fast pretrain` (albef_fast/train/checkpoint.py)
    or a run folder holding one. A file is opened memory-mapped, so asking costs no full read."""
    from albef_fast.train.checkpoint import FORMAT as TRAIN_FORMAT
    from albef_fast.train.checkpoint import LATEST

    path = Path(path)
    if path.is_dir():
        return (path / LATEST).is_file()
    if not path.is_file() or path.suffix == ".safetensors":
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch zip archive, or unreadable: read_state_dict reports it
        return False
    return isinstance(obj, dict) and obj.get("format") == TRAIN_FORMAT


def _is_weights_folder(folder: Path) -> bool:
    """A folder written by `save_pretrained` (a run folder also holds a config.json: the run's config)."""
    try:
        return json.loads((folder / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_training_checkpoint(path: str | Path) -> nn.Module:
    """A checkpoint of our own training runs as a PretrainTask, for export (`albef-fast convert`).

    Args:
        path: `checkpoint-latest.pt` written by `albef-fast pretrain` (albef_fast/train/checkpoint.py,
            read with its `read_checkpoint`: weights_only=True, format checked), or the run folder.
    Returns:
        PretrainTask built from the run's own config (model preset and image size, loss.queue_size,
        loss.momentum), holding the checkpoint's online model, momentum model, queues and pointer.
        The optimizer state, RNG states and run position are run state, not weights: not converted.
    Raises:
        WeightsError: unreadable file, another format, a config that does not parse, or task weights
        that do not fit that config (missing/unexpected keys or shapes, named).
    """
    from albef_fast.config import from_dict
    from albef_fast.models.presets import get_preset
    from albef_fast.task import PretrainTask
    from albef_fast.train.checkpoint import LATEST, CheckpointError, read_checkpoint

    path = Path(path)
    if path.is_dir():
        path = path / LATEST
    try:
        state = read_checkpoint(path)
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from exc
    try:
        cfg = from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: the run config stored in the checkpoint cannot be read: {exc}") from exc
    overrides = {"image_size": cfg.model.image_size} if cfg.model.image_size else {}
    task = PretrainTask(ALBEF(get_preset(cfg.model.preset, **overrides)), queue_size=cfg.loss.queue_size,
                        momentum=cfg.loss.momentum)
    if not isinstance(state.get("task"), dict):
        raise WeightsError(f"{path}: no task state_dict in the checkpoint")
    _load_exact(task, state["task"], path)
    return task


def initialise_task(task: nn.Module, *, albef: str | None = None, vit: str | None = None,
                    bert: str | None = None) -> list[str]:
    """The initialisation of a fresh pretraining run (`model.init_*` in the config).

    ALBEF pretrains from DeiT-B/16 for the vision encoder and bert-base-uncased for the text and fusion
    encoders (REFERENCE §1), then copies the online weights into the momentum model; skipping the DeiT
    weights costs ~12 points of Flickr R@1 (ALBEF#71). `albef` starts from a whole model instead: an
    official ALBEF checkpoint (any layout), an albef-fast weights folder, or one of our training runs; its
    queues are not taken (the new run's queue size may differ).

    Args:
        task: the PretrainTask to fill, before the optimizer and the engine are built.
        albef, vit, bert: paths (files, or folders for our weights and Hugging Face models).
    Returns:
        one line per source: what was loaded, missing and unexpected (keys named).
    Raises:
        WeightsError: an unreadable file, or one from which nothing fits the model.
    """
    lines = []

    def take(name: str, report: LoadReport) -> None:
        if report.loaded == 0:
            raise WeightsError(f"{name}: no tensor of this file fits the model ({report})")
        lines.append(f"{name}: " + str(report).replace("\n", "; "))

    if albef:
        path = Path(albef)
        from albef_fast.task import PretrainTask

        ours = is_training_checkpoint(path)
        if ours or (path.is_dir() and _is_weights_folder(path)):
            src = load_training_checkpoint(path) if ours else load_pretrained(path)
            sd = src.state_dict()
            if not isinstance(src, PretrainTask):  # a folder holding a bare ALBEF model
                sd = {"model." + k: v for k, v in sd.items()}
            own = task.state_dict()
            bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
            if bad:
                raise WeightsError(f"{path}: shape mismatch for {bad[:5]} (another preset or image size?)")
            keep = {k: v for k, v in sd.items() if k in own and not k.startswith("queues.")}
            result = task.load_state_dict(keep, strict=False)
            missing = [k for k in result.missing_keys if not k.startswith("queues.") and not k.endswith(TIED)]
            if not any(k.startswith("model_m.") for k in keep):
                task.reset_momentum_()
            take(str(path), LoadReport(loaded=len(keep), missing=missing, unexpected=list(result.unexpected_keys)))
        else:
            take(str(path), load_albef_state_dict(task, read_state_dict(path), load_queues=False))
    if vit:
        take(vit, load_vit(task.model, read_state_dict(vit)))
    if bert:
        take(bert, load_hf_bert(task.model, read_state_dict(bert)))
    if vit or bert:
        task.reset_momentum_()  # ALBEF: momentum encoders start as copies of the initialised ones
    return lines
