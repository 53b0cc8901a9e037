"""The reference side of the parity harness. Runs INSIDE the isolated reference environment
(.venv-lavis or .venv-albef), never inside ours: it imports no albef_fast module, only torch and the
reference code. Written for this project; it drives the reference's own forward, it copies none of it.

    python reference_side.py {lavis|original} WORKDIR [--albef-dir PATH] [--time-steps N]

Reads WORKDIR/inputs.pt (written by albef_fast.parity.harness): the reference model's config, the
state_dict in the reference's key layout (made by our converter), images, token ids, attention mask,
the MLM-masked ids and labels, the hard-negative indices, alpha and the dtype ("float32", or
"float64" for the harness's fp64 oracle: default dtype, model and images in fp64). Builds the reference pretraining
model with those sizes, loads the weights strictly, switches dropout off (eval mode), injects the
tokenisation, the MLM mask and the negatives, runs ONE forward of the reference's own
`forward` (which does the EMA update, the ITC/ITM/MLM losses and the enqueue), backpropagates the
summed loss and writes WORKDIR/outputs.pt: features (captured by forward hooks), the in-batch
similarities, ITM logits, the three losses, the gradient of every parameter and the state after the
step (momentum weights, queues, pointer).

--time-steps N (benchmarks/bench_reference_step.py): after that step, N + 1 more training steps of the
reference as its training script runs them (forward with its own EMA, hard-negative draws and enqueue,
backward, AdamW step), each timed; the first is a warm-up. The injected MLM mask stays (the reference's
masking is a few elementwise ops); the negatives are drawn by the reference's own torch.multinomial loop.
outputs.pt then also holds "step_seconds" (N floats).

Import route (REFERENCE §7.1): the `lavis` and `lavis.models` package __init__s import every model
family and dataset builder, so both are registered as bare package modules (their __path__ set) and
only the ALBEF modules load; torchvision is replaced by a stub (timm 0.4.12 imports it at package
import but the ViT uses nothing from it); the tokenizer constructor, which downloads
bert-base-uncased, is replaced by one that returns the injected ids.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class _Anything:
    """Stands in for any torchvision attribute timm touches at import time."""

    def __getattr__(self, name: str) -> "_Anything":
        return self

    def __call__(self, *args, **kwargs) -> "_Anything":
        return self

    def __mro_entries__(self, bases):  # allows `class X(torchvision.Something)`
        return (object,)


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `torchvision` and every `torchvision.*` submodule as an empty stub module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda name: _Anything()  # type: ignore[method-assign]
        return module

    def exec_module(self, module):
        pass


def _install_stubs() -> None:
    sys.meta_path.insert(0, _StubFinder())
    warnings.filterwarnings("ignore", category=FutureWarning)  # fairscale's torch.cuda.amp decorators
    spec = importlib.util.find_spec("lavis")
    if spec is not None:  # only in the LAVIS environment
        root = Path(spec.origin).parent
        for name, path in (("lavis", root), ("lavis.models", root / "models")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
        # the model registry's decorator checks `issubclass(cls, lavis.models.BaseModel)`
        from lavis.models.base_model import BaseModel

        sys.modules["lavis.models"].BaseModel = BaseModel


class _Encoding:
    """What a HF tokenizer call returns, reduced to what the reference forwards read."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.input_ids, self.attention_mask = input_ids, attention_mask

    def to(self, device):
        return _Encoding(self.input_ids.to(device), self.attention_mask.to(device))


class _InjectedTokenizer:
    """Returns the harness's token ids whatever the captions: ALBEF's tokenisation ([CLS] w1..wn, no
    [SEP], padded to the longest caption) for both references (REFERENCE §7.2: LAVIS's own tokenizer
    appends [SEP] and pads to max_length=30)."""

    pad_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 101, 102, 103

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.ids, self.mask = ids, mask

    def __call__(self, captions, **kwargs) -> _Encoding:
        if len(captions) != self.ids.shape[0]:
            raise ValueError(f"{len(captions)} captions but {self.ids.shape[0]} injected rows")
        return _Encoding(self.ids.clone(), self.mask.clone())


class _InjectedMultinomial:
    """Replaces torch.multinomial during the forward: returns the harness's negatives in the
    reference's draw order (one image per text, then one text per image), and checks that each
    injected index has positive probability under the reference's own weights."""

    def __init__(self, order: list[int]) -> None:
        self.order, self.calls, self.zero_weight = list(order), 0, []

    def __call__(self, weights: torch.Tensor, num_samples: int, *args, **kwargs) -> torch.Tensor:
        if weights.ndim != 1 or num_samples != 1 or self.calls >= len(self.order):
            raise RuntimeError(f"unexpected multinomial call #{self.calls}: {tuple(weights.shape)}, {num_samples}")
        idx = self.order[self.calls]
        if not weights[idx] > 0:
            self.zero_weight.append(self.calls)
        self.calls += 1
        return torch.tensor([idx], device=weights.device)


def _bert_config(c: dict, BertConfig, type_embeddings: bool):
    return BertConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        num_hidden_layers=c["text_layers"] + c["fusion_layers"], num_attention_heads=c["num_heads"],
        intermediate_size=c["intermediate_size"], hidden_act="gelu", hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, max_position_embeddings=c["max_position"],
        type_vocab_size=c["type_vocab_size"], layer_norm_eps=c["layer_norm_eps"], pad_token_id=0,
        add_type_embeddings=type_embeddings, encoder_width=c["vision_width"], add_cross_attention=True,
        fusion_layer=c["text_layers"],
    )


def build_lavis(c: dict, tokenizer) -> nn.Module:
    from lavis.models.albef_models import AlbefBase
    from lavis.models.med import BertForMaskedLM
    from lavis.models.vit import VisionTransformerEncoder
    from transformers import BertConfig

    AlbefBase.init_tokenizer = classmethod(lambda cls: tokenizer)
    from lavis.models.albef_models.albef_pretrain import AlbefPretrain

    vit = VisionTransformerEncoder(
        img_size=c["image_size"], patch_size=c["patch_size"], embed_dim=c["vision_width"],
        depth=c["vision_depth"], num_heads=c["vision_heads"], mlp_ratio=c["vision_mlp_ratio"],
        qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    vit.vision_width = c["vision_width"]
    text = BertForMaskedLM(_bert_config(c, BertConfig, type_embeddings=False))
    return AlbefPretrain(vit, text, queue_size=c["queue_size"], embed_dim=c["embed_dim"],
                         temp=c["temp"], momentum=c["momentum"], alpha=c["alpha"])


def _allow_fp64_encoder_masks() -> None:
    """transformers 4.8.1 (the original ALBEF's pin) raises in `invert_attention_mask` for any dtype but
    fp16/fp32. For the fp64 run, fp64 takes the fp32 branch's formula ((1 - mask) * -1e9); ALBEF's
    image masks are all ones, so the constant multiplies zero either way."""
    from transformers.modeling_utils import ModuleUtilsMixin

    original = ModuleUtilsMixin.invert_attention_mask

    def invert(self, mask: torch.Tensor) -> torch.Tensor:
        if self.dtype != torch.float64:
            return original(self, mask)
        ext = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
        return (1.0 - ext.to(torch.float64)) * -1e9

    ModuleUtilsMixin.invert_attention_mask = invert


def build_original(c: dict, tokenizer, albef_dir: str, workdir: Path) -> nn.Module:
    sys.path.insert(0, albef_dir)
    import torch.distributed as dist
    from models import model_pretrain
    from models.vit import VisionTransformer
    from models.xbert import BertConfig, BertForMaskedLM

    if not dist.is_initialized():  # concat_all_gather needs a process group (REFERENCE §0)
        dist.init_process_group("gloo", init_method=f"file://{workdir / 'dist_init'}", rank=0, world_size=1)
    bert_cfg = _bert_config(c, BertConfig, type_embeddings=True).to_dict()
    (workdir / "bert_config.json").write_text(json.dumps(bert_cfg))
    # from_pretrained would download bert-base-uncased; every weight is loaded below anyway
    BertForMaskedLM.from_pretrained = classmethod(lambda cls, name, config: cls(config))
    config = {"mlm_probability": 0.15, "embed_dim": c["embed_dim"], "image_res": c["image_size"],
              "vision_width": c["vision_width"], "bert_config": str(workdir / "bert_config.json"),
              "temp": c["temp"], "queue_size": c["queue_size"], "momentum": c["momentum"]}
    model = model_pretrain.ALBEF(text_encoder="bert-base-uncased", tokenizer=tokenizer, config=config,
                                 init_deit=False)
    if (c["patch_size"], c["vision_width"], c["vision_depth"]) != (16, 768, 12):
        # ALBEF hard-codes ViT-B/16; build its own ViT class at the harness's size instead
        def vit():
            return VisionTransformer(
                img_size=c["image_size"], patch_size=c["patch_size"], embed_dim=c["vision_width"],
                depth=c["vision_depth"], num_heads=c["vision_heads"], mlp_ratio=c["vision_mlp_ratio"],
                qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        model.visual_encoder, model.visual_encoder_m = vit(), vit()
        model.model_pairs = [[model.visual_encoder, model.visual_encoder_m], [model.vision_proj, model.vision_proj_m],
                             [model.text_encoder, model.text_encoder_m], [model.text_proj, model.text_proj_m]]
        model.copy_params()
    return model


def _time_steps(model: nn.Module, flavour: str, inp: dict, image: torch.Tensor, steps: int) -> list[float]:
    """Wall-clock seconds of `steps` training steps of the reference (after one untimed warm-up step)."""
    import time

    B = inp["ids"].shape[0]
    params = [p for p in model.parameters() if p.requires_grad]  # the momentum encoders have none
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.02)  # ALBEF's optimizer
    seconds = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if flavour == "lavis":
            out = model({"image": image, "text_input": ["injected"] * B, "epoch": 2, "iters": 0,
                         "num_iters_per_epoch": 1})
            loss = out.loss_itc + out.loss_itm + out.loss_mlm
        else:
            loss = sum(model(image, _Encoding(inp["ids"], inp["mask"]), alpha=inp["alpha"]))
        loss.backward()
        opt.step()
        if i:
            seconds.append(time.perf_counter() - t0)
    return seconds


def main(argv: list[str]) -> int:
    flavour, workdir = argv[0], Path(argv[1])
    albef_dir = argv[argv.index("--albef-dir") + 1] if "--albef-dir" in argv else os.environ.get("ALBEF_REFERENCE_DIR")
    torch.set_num_threads(int(os.environ.get("PARITY_THREADS", "2")))
    if "--time-steps" in argv:  # the optimizer imports torch._dynamo, which cannot import under the stubs
        importlib.import_module("torch._dynamo")
    _install_stubs()
    inp = torch.load(workdir / "inputs.pt", weights_only=True)
    c = inp["config"]
    B = inp["ids"].shape[0]
    fp64 = inp.get("dtype", "float32") == "float64"
    if fp64:  # the fp64 oracle run: tensors the reference creates itself (its ITC targets) in fp64 too
        torch.set_default_dtype(torch.float64)
    tokenizer = _InjectedTokenizer(inp["ids"], inp["mask"])
    if flavour == "lavis":
        model = build_lavis(c, tokenizer)
    elif flavour == "original":
        if not albef_dir:
            raise SystemExit("original reference: pass --albef-dir or set ALBEF_REFERENCE_DIR")
        model = build_original(c, tokenizer, albef_dir, workdir)
        if fp64:
            _allow_fp64_encoder_masks()
    else:
        raise SystemExit(f"unknown reference {flavour!r}")
    result = model.load_state_dict(inp["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SystemExit(f"reference load: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    model.eval()  # dropout off on both sides
    image = inp["image"]
    if fp64:  # exact: every fp32 weight and pixel is an fp64 value
        model.double()
        image = image.double()

    captured: dict[str, list[torch.Tensor]] = {}
    for name in ("vision_proj", "text_proj", "vision_proj_m", "text_proj_m", "itm_head"):
        getattr(model, name).register_forward_hook(
            lambda mod, args, out, name=name: captured.setdefault(name, []).append(out.detach().clone()))
    mlm_ids, mlm_labels = inp["mlm_ids"], inp["mlm_labels"]
    model.mask = lambda input_ids, vocab_size, device, targets=None, masked_indices=None, probability_matrix=None: (
        mlm_ids.clone().to(device), mlm_labels.clone().to(device))
    draws = _InjectedMultinomial(inp["neg_image"].tolist() + inp["neg_text"].tolist())
    real_multinomial, torch.multinomial = torch.multinomial, draws
    try:
        if flavour == "lavis":
            model.alpha = inp["alpha"]  # ramp-up factor is 1 at epoch 2 of 1-iteration epochs
            out = model({"image": image, "text_input": ["injected"] * B, "epoch": 2, "iters": 0,
                         "num_iters_per_epoch": 1})
            loss_itc, loss_itm, loss_mlm = out.loss_itc, out.loss_itm, out.loss_mlm
            sims = {"sim_i2t": out.sims.sim_i2t.detach(), "sim_t2i": out.sims.sim_t2i.detach()}
        else:
            loss_mlm, loss_itc, loss_itm = model(image, _Encoding(inp["ids"], inp["mask"]), alpha=inp["alpha"])
            sims = {}
    finally:
        torch.multinomial = real_multinomial
    if draws.calls != 2 * B:
        raise SystemExit(f"the reference drew {draws.calls} negatives, expected {2 * B}")
    (loss_itc + loss_itm + loss_mlm).backward()

    for name in ("vision_proj", "text_proj", "vision_proj_m", "text_proj_m", "itm_head"):
        if len(captured.get(name, [])) != 1:
            raise SystemExit(f"{name} ran {len(captured.get(name, []))} times in the reference forward, expected 1")
    outputs = {
        "image_feat": F.normalize(captured["vision_proj"][0], dim=-1),
        "text_feat": F.normalize(captured["text_proj"][0], dim=-1),
        "image_feat_m": F.normalize(captured["vision_proj_m"][0], dim=-1),
        "text_feat_m": F.normalize(captured["text_proj_m"][0], dim=-1),
        "itm_logits": captured["itm_head"][0],
        "loss_itc": loss_itc.detach(), "loss_itm": loss_itm.detach(), "loss_mlm": loss_mlm.detach(),
        **sims,
        "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        "state_after": {k: v for k, v in model.state_dict().items()
                        if "_m." in k or k in ("image_queue", "text_queue", "queue_ptr")},
        "zero_weight_negatives": torch.tensor(draws.zero_weight, dtype=torch.long),
        "versions": {"torch": str(torch.__version__)},
    }
    import transformers
    outputs["versions"]["transformers"] = str(transformers.__version__)
    if "--time-steps" in argv:
        outputs["step_seconds"] = _time_steps(model, flavour, inp, image, int(argv[argv.index("--time-steps") + 1]))
    torch.save(outputs, workdir / "outputs.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
