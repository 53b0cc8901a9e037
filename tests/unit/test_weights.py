"""Weights in and out (albef_fast/weights.py): ALBEF pretrain / retrieval / LAVIS layouts written by an
independent writer here, pos_embed interpolation, transformers BERT, timm/DeiT ViT, safetensors
folders, the `convert` command, and the errors for bad files."""

import pickle
import zipfile

import pytest
import torch
import torch.nn.functional as F

from albef_fast import weights as W
from albef_fast.cli import main
from albef_fast.models.albef import ALBEF
from albef_fast.models.presets import get_preset
from albef_fast.task import PretrainTask

SUB = {"self_attn.out": "attention.output.dense", "self_norm": "attention.output.LayerNorm",
       "cross_attn.q": "crossattention.self.query", "cross_attn.out": "crossattention.output.dense",
       "cross_norm": "crossattention.output.LayerNorm", "fc1": "intermediate.dense", "fc2": "output.dense",
       "mlp_norm": "output.LayerNorm"}


def random_task(image_size=None, queue=16, seed=0):
    torch.manual_seed(seed)
    cfg = get_preset("albef_tiny", **({"image_size": image_size} if image_size else {}))
    task = PretrainTask(ALBEF(cfg), queue_size=queue)
    with torch.no_grad():
        for p in task.parameters():  # every tensor distinct and non-trivial, momentum != online
            p.add_(torch.randn_like(p) * 0.1)
        for b in task.buffers():
            if b.is_floating_point():
                b.normal_()
        task.queues.ptr.fill_(4)
    return task


def albef_writer(task, bert="text_encoder.bert.", head="text_encoder.cls.", lavis=False):
    """An independent writer of ALBEF's key layout (REFERENCE §5), straight from the modules."""
    out = {"temp": task.model.temp.detach(), "image_queue": task.queues.image.t(), "text_queue": task.queues.text.t(),
           "queue_ptr": task.queues.ptr.reshape(1)}
    for suffix, m in (("", task.model), ("_m", task.model_m)):
        def put(name, tensor):
            top, _, rest = name.partition(".")
            out[f"{top}{suffix}.{rest}"] = tensor.detach()

        for k, v in m.visual_encoder.state_dict().items():
            put(f"visual_encoder.{k}", v)
        for proj in ("vision_proj", "text_proj"):
            for k, v in getattr(m, proj).state_dict().items():
                put(f"{proj}.{k}", v)
        emb = m.text_encoder.embeddings
        pos = emb.position_embeddings.weight + (emb.token_type_embeddings.weight[0] if lavis else 0)
        put(bert + "embeddings.word_embeddings.weight", emb.word_embeddings.weight)
        put(bert + "embeddings.position_embeddings.weight", pos)
        if not lavis:
            put(bert + "embeddings.token_type_embeddings.weight", emb.token_type_embeddings.weight)
        put(bert + "embeddings.LayerNorm.weight", emb.norm.weight)
        put(bert + "embeddings.LayerNorm.bias", emb.norm.bias)
        put(bert + "embeddings.position_ids", torch.arange(emb.position_embeddings.num_embeddings)[None])
        layers = list(m.text_encoder.layers) + list(m.fusion_encoder.layers)
        for i, layer in enumerate(layers):
            p = f"{bert}encoder.layer.{i}."
            for kind in ("weight", "bias"):
                q, k, v = getattr(layer.self_attn.qkv, kind).chunk(3)
                put(p + f"attention.self.query.{kind}", q)
                put(p + f"attention.self.key.{kind}", k)
                put(p + f"attention.self.value.{kind}", v)
                for ours, theirs in SUB.items():
                    if ours.startswith("cross") and layer.cross_attn is None:
                        continue
                    put(p + f"{theirs}.{kind}", getattr(layer.get_submodule(ours), kind))
                if layer.cross_attn is not None:
                    k2, v2 = getattr(layer.cross_attn.kv, kind).chunk(2)
                    put(p + f"crossattention.self.key.{kind}", k2)
                    put(p + f"crossattention.self.value.{kind}", v2)
        if head:
            h = m.mlm_head
            for kind in ("weight", "bias"):
                put(head + f"predictions.transform.dense.{kind}", getattr(h.dense, kind))
                put(head + f"predictions.transform.LayerNorm.{kind}", getattr(h.norm, kind))
            put(head + "predictions.bias", h.bias)
            put(head + "predictions.decoder.weight", emb.word_embeddings.weight)
            put(head + "predictions.decoder.bias", h.bias)
    for k, v in task.model.itm_head.state_dict().items():
        out[f"itm_head.{k}"] = v
    return out


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_pretrain_layout_round_trip_matches_an_independent_writer():
    task = random_task()
    theirs = albef_writer(task)
    ours = W.to_albef_state_dict(task)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)
    fresh = PretrainTask(ALBEF(task.model.config), queue_size=16)
    report = W.load_albef_state_dict(fresh, theirs, strict=True)
    assert not report.missing and not report.unexpected
    assert_same_state(fresh, task)


def test_albef_base_pretrain_layout_has_the_official_844_keys():
    with torch.device("meta"):
        task = PretrainTask(ALBEF(get_preset("albef_base")), queue_size=65536)
    sd = W.to_albef_state_dict(task)
    assert len(sd) == 844
    assert sd["image_queue"].shape == (256, 65536) and sd["queue_ptr"].shape == (1,)
    assert sd["visual_encoder.pos_embed"].shape == (1, 257, 768)
    assert sd["text_encoder.bert.encoder.layer.11.crossattention.self.key.weight"].shape == (768, 768)
    assert "text_encoder.bert.encoder.layer.5.crossattention.self.key.weight" not in sd
    assert sum(k.split(".")[0].endswith("_m") for k in sd) == 419


def test_retrieval_layout_loads_without_mlm_head_and_reports_it():
    task = random_task()
    sd = {k.replace("text_encoder.bert.", "text_encoder.").replace("text_encoder_m.bert.", "text_encoder_m."): v
          for k, v in albef_writer(task).items() if ".cls." not in k}
    sd["idx_queue"] = torch.full((1, 16), -100)
    fresh = PretrainTask(ALBEF(task.model.config), queue_size=16)
    report = W.load_albef_state_dict(fresh, sd)
    assert sorted(report.missing) == sorted(f"{p}.mlm_head.{k}" for p in ("model", "model_m")
                                            for k in ("bias", "dense.weight", "dense.bias", "norm.weight", "norm.bias"))
    assert "idx_queue" in report.ignored and not report.unexpected
    torch.testing.assert_close(fresh.model.fusion_encoder.layers[1].cross_attn.kv.weight,
                               task.model.fusion_encoder.layers[1].cross_attn.kv.weight, rtol=0, atol=0)
    exported = W.to_albef_state_dict(task, layout="retrieval")
    assert not any(".cls." in k or ".bert." in k for k in exported) and exported["idx_queue"].shape == (1, 16)


def test_lavis_flavour_folds_token_type_and_keeps_the_text_output():
    task = random_task().eval()
    sd = W.to_albef_state_dict(task, flavour="lavis")
    theirs = albef_writer(task, lavis=True)
    assert sd.keys() == theirs.keys() and not any("token_type" in k for k in sd)
    torch.testing.assert_close(sd["text_encoder.bert.embeddings.position_embeddings.weight"],
                               theirs["text_encoder.bert.embeddings.position_embeddings.weight"], rtol=0, atol=0)
    fresh = PretrainTask(ALBEF(task.model.config), queue_size=16).eval()
    report = W.load_albef_state_dict(fresh, sd)
    assert any("LAVIS" in n for n in report.notes) and not report.missing
    assert not fresh.model.text_encoder.embeddings.token_type_embeddings.weight.any()
    ids = torch.randint(1000, 3000, (2, 7))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    torch.testing.assert_close(fresh.model.encode_text(ids, mask), task.model.encode_text(ids, mask))


@pytest.mark.parametrize("old, new", [(48, 64), (64, 96)])  # 6x6 -> 8x8 (like 224 -> 256 px), 8 -> 12 (256 -> 384)
def test_pos_embed_is_interpolated_bicubically_like_albef(old, new):
    src = random_task(image_size=old)
    dst = PretrainTask(ALBEF(get_preset("albef_tiny", image_size=new)), queue_size=16)
    report = W.load_albef_state_dict(dst, albef_writer(src))
    assert len(report.interpolated) == 2  # online and momentum
    pe = src.model.visual_encoder.pos_embed.detach()
    s_old, s_new = old // 8, new // 8
    grid = pe[:, 1:].reshape(1, s_old, s_old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(s_new, s_new), mode="bicubic", align_corners=False)
    expected = torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, s_new * s_new, -1)], dim=1)
    torch.testing.assert_close(dst.model.visual_encoder.pos_embed.detach(), expected, rtol=0, atol=0)


def test_hf_bert_initialises_text_and_fusion_with_fresh_cross_attention():
    from transformers import BertConfig, BertForMaskedLM

    cfg = get_preset("albef_tiny")
    hf = BertForMaskedLM(BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=4,
                                    num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                                    max_position_embeddings=cfg.max_position)).eval()
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in hf.state_dict().items()}  # TF-era names
    model = ALBEF(cfg).eval()
    cross_before = model.fusion_encoder.layers[0].cross_attn.q.weight.clone()
    report = W.load_hf_bert(model, sd)
    assert sorted(report.missing) == sorted(f"fusion_encoder.layers.{j}.cross_{n}.{k}" for j in range(2)
                                            for n in ("attn.q", "attn.kv", "attn.out", "norm") for k in ("weight", "bias"))
    assert not report.unexpected
    torch.testing.assert_close(model.fusion_encoder.layers[0].cross_attn.q.weight, cross_before, rtol=0, atol=0)
    ids = torch.randint(1, cfg.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    # text layers + fusion layers without their cross-attention = BERT's 4 layers: compare layers 0-1
    hidden = hf.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    keep = mask.bool()
    torch.testing.assert_close(model.encode_text(ids, mask)[keep], hidden[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.fusion_encoder.layers[1].fc2.weight,
                               hf.bert.encoder.layer[3].output.dense.weight, rtol=0, atol=0)


def test_deit_vit_weights_load_with_interpolation_and_report_the_head():
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    cfg = get_preset("albef_tiny")
    deit = VisionTransformer(img_size=48, patch_size=8, embed_dim=cfg.vision_width, depth=cfg.vision_depth,
                             num_heads=cfg.vision_heads, num_classes=10, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    model = ALBEF(cfg)
    report = W.load_vit(model, deit.state_dict())
    assert report.unexpected == ["head.weight", "head.bias"] and not report.missing
    assert report.interpolated == ["pos_embed (1, 37, 128) -> (1, 65, 128)"]
    torch.testing.assert_close(model.visual_encoder.blocks[2].attn.qkv.weight, deit.blocks[2].attn.qkv.weight)


def test_safetensors_folder_round_trip(tmp_path):
    task = random_task().eval()
    W.save_pretrained(task, tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"config.json", "model.safetensors"}
    loaded = W.load_pretrained(tmp_path / "ckpt")
    assert_same_state(loaded, task)
    assert loaded.model.mlm_head.decoder.weight is loaded.model.text_encoder.embeddings.word_embeddings.weight
    W.save_pretrained(task.model, tmp_path / "model")
    assert isinstance(W.load_pretrained(tmp_path / "model"), ALBEF)


def test_shape_mismatch_names_the_key_and_both_shapes():
    sd = albef_writer(random_task())
    sd["text_proj.weight"] = torch.zeros(32, 128)
    with pytest.raises(W.WeightsError, match=r"text_proj.weight \(32, 128\).*model.text_proj.weight \(64, 128\)"):
        W.load_albef_state_dict(PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=16), sd)


def test_missing_and_unexpected_keys_are_reported_by_name():
    sd = albef_writer(random_task())
    del sd["itm_head.bias"]
    sd["something.else"] = torch.zeros(1)
    task = PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=16)
    report = W.load_albef_state_dict(task, sd)
    assert report.missing == ["model.itm_head.bias"] and report.unexpected == ["something.else"]
    with pytest.raises(W.WeightsError, match="itm_head.bias"):
        W.load_albef_state_dict(task, sd, strict=True)


def test_bad_files_give_clear_errors(tmp_path):
    sd = {"a": torch.randn(3)}
    torch.save({"model": sd}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(W.WeightsError, match="truncated.pth.*corrupt, truncated"):
        W.read_state_dict(tmp_path / "truncated.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(W.WeightsError, match="bad.safetensors.*corrupt or truncated"):
        W.read_state_dict(tmp_path / "bad.safetensors")
    with open(tmp_path / "code.pth", "wb") as f:  # a pickle that would run code: refused by weights_only
        pickle.dump({"model": zipfile.ZipFile}, f)
    with pytest.raises(W.WeightsError, match="code.pth"):
        W.read_state_dict(tmp_path / "code.pth")
    with pytest.raises(W.WeightsError, match="does not exist"):
        W.read_state_dict(tmp_path / "nothing.pth")
    torch.testing.assert_close(W.read_state_dict(tmp_path / "good.pth")["a"], sd["a"])


def test_convert_command_round_trips_albef_layout(tmp_path, capsys):
    task = random_task()
    torch.save({"model": albef_writer(task), "epoch": 3}, tmp_path / "ALBEF.pth")
    assert main(["convert", "--checkpoint", str(tmp_path / "ALBEF.pth"), "--preset", "albef_tiny",
                 "--output", str(tmp_path / "ours"), "--strict"]) == 0
    assert_same_state(W.load_pretrained(tmp_path / "ours"), task)
    assert main(["convert", "--checkpoint", str(tmp_path / "ours"), "--to", "albef",
                 "--output", str(tmp_path / "back.pth")]) == 0
    back = W.read_state_dict(tmp_path / "back.pth")
    theirs = albef_writer(task)
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    assert main(["convert", "--checkpoint", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _training_run(tmp_path, task):
    """A run folder as `albef-fast pretrain` leaves it: checkpoint-latest.pt written by the training
    code's own writer (optimizer state after one step, RNG, position, the run's config) and the run's
    config.json beside it."""
    import json

    from albef_fast.config import from_dict, to_dict
    from albef_fast.train.checkpoint import RunPosition, save_checkpoint

    cfg = to_dict(from_dict({"model": {"preset": "albef_tiny"}, "loss": {"queue_size": task.queues.size,
                                                                         "momentum": 0.99}}))
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-4)
    for p in task.model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # moves the weights and fills the optimizer state that must not leak into exports
    run = tmp_path / "run"
    save_checkpoint(run, task, optimizer, RunPosition(step=7, epoch=1, batch=2), cfg)
    (run / "config.json").write_text(json.dumps(cfg))
    return run


def test_training_checkpoint_converts_to_every_layout_and_back(tmp_path, capsys):
    task = random_task()
    run = _training_run(tmp_path, task)
    assert W.is_training_checkpoint(run) and W.is_training_checkpoint(run / "checkpoint-latest.pt")
    torch.save({"model": albef_writer(task)}, tmp_path / "ALBEF.pth")
    assert not W.is_training_checkpoint(tmp_path / "ALBEF.pth") and not W.is_training_checkpoint(tmp_path)

    loaded = W.load_training_checkpoint(run)
    assert_same_state(loaded, task)
    assert loaded.momentum == 0.99 and loaded.queues.size == 16

    # -> our safetensors folder (from the run folder), the ALBEF pretraining layout (from the file)
    assert main(["convert", "--checkpoint", str(run), "--output", str(tmp_path / "folder")]) == 0
    assert "read training checkpoint" in capsys.readouterr().out
    assert_same_state(W.load_pretrained(tmp_path / "folder"), task)
    assert main(["convert", "--checkpoint", str(run / "checkpoint-latest.pt"), "--to", "albef",
                 "--output", str(tmp_path / "ALBEF_out.pth")]) == 0
    theirs, out = albef_writer(task), W.read_state_dict(tmp_path / "ALBEF_out.pth")
    assert out.keys() == theirs.keys() and all(torch.equal(out[k], theirs[k]) for k in theirs)
    # -> LAVIS and retrieval layouts
    assert main(["convert", "--checkpoint", str(run), "--to", "lavis", "--output", str(tmp_path / "lavis.pth")]) == 0
    lavis, theirs_lavis = W.read_state_dict(tmp_path / "lavis.pth"), albef_writer(task, lavis=True)
    assert lavis.keys() == theirs_lavis.keys() and all(torch.equal(lavis[k], theirs_lavis[k]) for k in lavis)
    assert main(["convert", "--checkpoint", str(run), "--to", "albef-retrieval",
                 "--output", str(tmp_path / "retrieval.safetensors")]) == 0
    retrieval = W.read_state_dict(tmp_path / "retrieval.safetensors")
    assert "idx_queue" in retrieval and not any(".cls." in k or ".bert." in k for k in retrieval)
    # and back: the ALBEF file into our folder gives the training checkpoint's task again
    assert main(["convert", "--checkpoint", str(tmp_path / "ALBEF_out.pth"), "--preset", "albef_tiny", "--strict",
                 "--output", str(tmp_path / "back")]) == 0
    back = W.load_pretrained(tmp_path / "back")
    assert_same_state(back, task)


def test_training_checkpoint_errors_are_clear(tmp_path, capsys):
    task = random_task()
    run = _training_run(tmp_path, task)
    # the checkpoint defines the model: a preset or queue size given beside it is an error
    assert main(["convert", "--checkpoint", str(run), "--preset", "albef_base", "--output", str(tmp_path / "x")]) == 2
    assert "--preset: not with --checkpoint" in capsys.readouterr().err
    # exporting into the run folder would overwrite the run's config.json
    with pytest.raises(W.WeightsError, match="config.json exists and is not a weights config"):
        W.save_pretrained(task, run)
    # task weights that do not fit the run's config: the key and both shapes
    state = torch.load(run / "checkpoint-latest.pt", weights_only=True)
    state["task"]["model.text_proj.weight"] = torch.zeros(32, 128)
    torch.save(state, run / "checkpoint-latest.pt")
    with pytest.raises(W.WeightsError, match=r"model.text_proj.weight \(32, 128\) vs model \(64, 128\)"):
        W.load_training_checkpoint(run)
    # a truncated checkpoint inside a run folder
    data = (run / "checkpoint-latest.pt").read_bytes()
    (run / "checkpoint-latest.pt").write_bytes(data[: len(data) // 3])
    assert main(["convert", "--checkpoint", str(run), "--output", str(tmp_path / "y")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_pretrain_starts_from_deit_and_bert_weights(tmp_path, capsys):
    """model.init_vit / model.init_bert as ALBEF's pretraining initialisation: the run's first checkpoint
    (max_steps=0) holds the DeiT and BERT weights in the online and the momentum model."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer
    from transformers import BertConfig, BertForMaskedLM

    from albef_fast.cli import main
    from albef_fast.train.checkpoint import LATEST, read_checkpoint

    cfg = get_preset("albef_tiny")
    torch.manual_seed(3)
    hf = BertForMaskedLM(BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=4,
                                    num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                                    max_position_embeddings=cfg.max_position))
    (tmp_path / "bert").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bert" / "pytorch_model.bin")  # a Hugging Face folder
    deit = VisionTransformer(img_size=48, patch_size=8, embed_dim=cfg.vision_width, depth=cfg.vision_depth,
                             num_heads=cfg.vision_heads, num_classes=10, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")
    run = tmp_path / "run"
    args = [f"output_dir={run}", f"data.cache_dir={tmp_path / 'cache'}", "data.scenes_train=48", "data.scenes_eval=6",
            "data.batch_size=8", "data.num_workers=0", "loss.queue_size=32", "progress=false", "optim.max_steps=0",
            "eval.before_training=false", "eval.after_training=false"]
    assert main(["pretrain", *args, f"model.init_vit={tmp_path / 'deit.pth'}", f"model.init_bert={tmp_path / 'bert'}"]) == 0
    task = read_checkpoint(run / LATEST)["task"]
    for prefix in ("model.", "model_m."):
        torch.testing.assert_close(task[prefix + "visual_encoder.blocks.2.attn.qkv.weight"], deit.blocks[2].attn.qkv.weight,
                                   rtol=0, atol=0)
        torch.testing.assert_close(task[prefix + "fusion_encoder.layers.1.fc2.weight"],
                                   hf.bert.encoder.layer[3].output.dense.weight, rtol=0, atol=0)
    # init_from: a whole model, here that run (online and momentum weights, not its queues)
    assert main(["pretrain", *[a.replace("run", "run3") for a in args], f"model.init_from={run}", "seed=7"]) == 0
    again = read_checkpoint(tmp_path / "run3" / LATEST)["task"]
    assert all(torch.equal(again[k], v) for k, v in task.items() if not k.startswith("queues."))
    assert not torch.equal(again["queues.image"], task["queues.image"])  # seed 7's fresh queue
    assert main(["pretrain", *[a.replace("run", "run2") for a in args], f"model.init_vit={tmp_path / 'nothing.pth'}"]) == 2
    assert "nothing.pth does not exist" in capsys.readouterr().err


def test_init_from_a_folder_holding_a_bare_model(tmp_path):
    """model.init_from with a weights folder of an ALBEF model (no queues): the online and momentum models
    start from its weights."""
    from albef_fast.task import PretrainTask

    src = ALBEF(get_preset("albef_tiny"))
    W.save_pretrained(src, tmp_path / "w")
    task = PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=32)
    W.initialise_task(task, albef=str(tmp_path / "w"))
    for name, p in src.state_dict().items():
        torch.testing.assert_close(task.model.state_dict()[name], p, rtol=0, atol=0)
    torch.testing.assert_close(task.model_m.visual_encoder.pos_embed, src.visual_encoder.pos_embed, rtol=0, atol=0)
