"""The task against a direct transcription of ALBEF's forward (REFERENCE §2), the text encoder and MLM
head against transformers' BertForMaskedLM, precision under autocast, and retrieval metrics."""

import pytest
import torch
import torch.nn.functional as F

from albef_fast.eval.retrieval import recall_metrics
from albef_fast.models.albef import ALBEF
from albef_fast.models.presets import ModelConfig, get_preset
from albef_fast.task import PretrainTask
from albef_fast.weights import load_hf_bert
from albef_kernels import itc_loss

from tests.helpers import tiny_batch


def albef_forward(task, batch, alpha, neg_image, neg_text):
    """ALBEF.forward of model_pretrain.py, transcribed with this model's modules: queues as (D, Q),
    separate positive and negative fusion passes, MLM logits on every position with -100 labels."""
    m, mm, temp = task.model, task.model_m, task.model.temp
    ids, mask, B = batch.text_ids, batch.text_mask, batch.size
    image_embeds = m.encode_image(batch.image)
    image_feat = F.normalize(m.vision_proj(image_embeds[:, 0]), dim=-1)
    text_embeds = m.encode_text(ids, mask)
    text_feat = F.normalize(m.text_proj(text_embeds[:, 0]), dim=-1)
    with torch.no_grad():
        image_embeds_m = mm.encode_image(batch.image)
        image_feat_m = F.normalize(mm.vision_proj(image_embeds_m[:, 0]), dim=-1)
        image_feat_all = torch.cat([image_feat_m.t(), task.queues.image.t()], dim=1)
        text_feat_m = F.normalize(mm.text_proj(mm.encode_text(ids, mask)[:, 0]), dim=-1)
        text_feat_all = torch.cat([text_feat_m.t(), task.queues.text.t()], dim=1)
        sim_i2t_m, sim_t2i_m = image_feat_m @ text_feat_all / temp, text_feat_m @ image_feat_all / temp
        sim_targets = torch.zeros_like(sim_i2t_m)
        sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, 1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, 1) + (1 - alpha) * sim_targets
    sim_i2t, sim_t2i = image_feat @ text_feat_all / temp, text_feat @ image_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, 1) * sim_i2t_targets, 1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, 1) * sim_t2i_targets, 1).mean()
    loss_ita = (loss_i2t + loss_t2i) / 2

    output_pos = m.fuse(text_embeds, mask, image_embeds)
    image_embeds_neg = image_embeds[neg_image]  # hard negative image for each text
    text_embeds_neg, text_atts_neg = text_embeds[neg_text], mask[neg_text]  # hard negative text per image
    output_neg = m.fuse(torch.cat([text_embeds, text_embeds_neg]), torch.cat([mask, text_atts_neg]),
                        torch.cat([image_embeds_neg, image_embeds]))
    vl = m.itm_head(torch.cat([output_pos[:, 0], output_neg[:, 0]]))
    itm_labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long()
    loss_itm = F.cross_entropy(vl, itm_labels)

    labels = torch.full_like(ids, -100).flatten()
    labels[batch.mlm_positions] = batch.mlm_labels
    labels = labels.view_as(ids)
    with torch.no_grad():
        logits_m = mm.mlm_head(mm.fuse(mm.encode_text(batch.mlm_ids, mask), mask, image_embeds_m))
    logits = m.mlm_head(m.fuse(m.encode_text(batch.mlm_ids, mask), mask, image_embeds))
    ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    distill = -torch.sum(F.log_softmax(logits, -1) * F.softmax(logits_m, -1), -1)[labels != -100].mean()
    loss_mlm = (1 - alpha) * ce + alpha * distill
    return loss_ita, loss_itm, loss_mlm


def test_task_matches_a_transcription_of_albef(monkeypatch):
    """With a momentum model that differs from the online one (so that swapping online and momentum
    features would show), fixed hard negatives, a filled queue and dropout off."""
    torch.manual_seed(0)
    task = PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=18).eval()
    with torch.no_grad():
        for p in task.model_m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = tiny_batch(task.model.config, B=6)
    neg_image, neg_text = torch.tensor([3, 0, 5, 1, 2, 4]), torch.tensor([1, 4, 0, 5, 3, 2])
    ok = torch.ones(6, dtype=torch.bool)
    monkeypatch.setattr(task, "hard_negatives", lambda sims: (neg_image, neg_text, ok, ok))
    out = task(batch, alpha=0.4)
    ita, itm, mlm = albef_forward(task, batch, 0.4, neg_image, neg_text)
    torch.testing.assert_close(out.itc_loss, ita, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.itm_loss, itm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mlm_loss, mlm, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.loss, list(task.model.parameters()), allow_unused=True)
    ref = torch.autograd.grad(ita + itm + mlm, list(task.model.parameters()), allow_unused=True)
    for (name, _), g, r in zip(task.model.named_parameters(), grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=name)


def test_text_encoder_and_mlm_head_match_transformers_bert():
    """Post-LN BERT with token-type row 0 and a tied decoder: our modules with BertForMaskedLM's weights
    give BertForMaskedLM's logits."""
    from transformers import BertConfig, BertForMaskedLM

    hf_cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40)
    hf = BertForMaskedLM(hf_cfg).eval()
    cfg = ModelConfig(vocab_size=97, hidden_size=32, text_layers=2, fusion_layers=0, num_heads=4,
                      intermediate_size=64, max_position=40, image_size=16, patch_size=8, vision_width=32,
                      vision_depth=1, vision_heads=4, embed_dim=16)
    model = ALBEF(cfg).eval()
    report = load_hf_bert(model, hf.state_dict())  # the converter (albef_fast/weights.py)
    assert not report.missing and not report.unexpected, report
    ids = torch.randint(1, 97, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    ours = model.mlm_head(model.encode_text(ids, mask))
    theirs = hf(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()  # padded positions' outputs are not used by either model
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_itc_runs_in_fp32_under_autocast(device):
    q, q_m, k, queue = (F.normalize(torch.randn(4, 16, device=device), dim=-1) for _ in range(4))
    temp = torch.tensor(0.07, device=device)
    ref_loss, ref_sim = itc_loss(q, q_m, k, queue, temp, 0.4)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, sim = itc_loss(q, q_m, k, queue, temp, 0.4)
    assert sim.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(sim, ref_sim)


def test_recall_metrics_on_a_hand_made_case():
    txt2img = [0, 0, 1, 1]
    score_i2t = torch.tensor([[0.1, 0.9, 0.5, 0.2],    # image 0: its caption 1 ranks first
                              [0.9, 0.1, 0.2, 0.3]])   # image 1: its best caption (3) ranks second
    score_t2i = torch.tensor([[0.2, 0.1], [0.1, 0.9], [0.3, 0.5], [0.7, 0.2]])  # captions 0, 2 right
    r = recall_metrics(score_i2t, score_t2i, txt2img)
    assert (r["txt_r1"], r["txt_r5"], r["img_r1"], r["img_r5"]) == (50.0, 100.0, 50.0, 100.0)
    assert r["r_mean"] == pytest.approx((50 + 100 + 100 + 50 + 100 + 100) / 6)
