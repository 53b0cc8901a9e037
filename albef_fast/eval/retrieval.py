"""Zero-shot image-text retrieval as ALBEF evaluates it (REFERENCE §4.2).

1. Unimodal features for every image and caption; similarity = image_feat @ text_feat^T (no temperature).
2. Image->text: for each image, the `k_test` most similar captions are re-scored by the ITM head on
   the fused (caption, image) pair; the score is the raw match logit itm_head(CLS)[:, 1]. Captions
   outside the top k keep -100. Text->image likewise.
3. R@1/5/10: image->text counts an image as found at rank r if its best-ranked ground-truth caption is
   at r; text->image uses the rank of the caption's image. r_mean averages the six recalls.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import ContextManager, Sequence

import numpy as np
import torch
from torch import Tensor

from albef_fast.data.captions import PAD_ID, pre_caption, tokenize
from albef_fast.data.dataset import build_eval_items
from albef_fast.data.images import load_rgb
from albef_fast.data.transforms import ImageTransform
from albef_fast.models.albef import ALBEF


def _pad(seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, (ids != PAD_ID).long()


def recall_metrics(score_i2t: Tensor, score_t2i: Tensor, txt2img: Sequence[int]) -> dict[str, float]:
    """score_i2t: (N_img, N_txt), score_t2i: (N_txt, N_img), txt2img: image index of each caption."""
    txt2img_t = torch.as_tensor(list(txt2img))
    order = score_i2t.argsort(dim=1, descending=True)  # (N_img, N_txt) caption ids by rank
    rank_of = torch.empty_like(order)
    rank_of.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    gt = txt2img_t[None, :] == torch.arange(score_i2t.shape[0])[:, None]  # (N_img, N_txt)
    i2t_rank = rank_of.masked_fill(~gt, order.shape[1]).min(dim=1).values.numpy()
    order_t = score_t2i.argsort(dim=1, descending=True)
    t2i_rank = (order_t == txt2img_t[:, None]).float().argmax(dim=1).numpy()
    out = {}
    for name, ranks in (("txt", i2t_rank), ("img", t2i_rank)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = float(100.0 * np.mean(ranks < k))
        out[f"{name}_r_mean"] = (out[f"{name}_r1"] + out[f"{name}_r5"] + out[f"{name}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


@torch.no_grad()
def evaluate_retrieval(
    model: ALBEF, image_paths: Sequence[str | Path], captions: Sequence[str], txt2img: Sequence[int], *,
    image_size: int, k_test: int = 128, batch_size: int = 64, max_text_len: int = 30,
    device: torch.device | str = "cpu", autocast: ContextManager | None = None,
) -> dict[str, float]:
    """Args:
        image_paths: N_img image files; captions: N_txt captions (cleaned here with pre_caption, which
            leaves already-cleaned captions unchanged);
        txt2img: (N_txt,) index of each caption's image.
    Returns:
        txt_r1/5/10 (image->text), img_r1/5/10 (text->image), their means and r_mean, in percent.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    amp = autocast or nullcontext()
    transform = ImageTransform(image_size, "none")
    try:
        ids, mask = _pad(tokenize([pre_caption(c) for c in captions], max_length=max_text_len))
        ids, mask = ids.to(device), mask.to(device)
        text_embeds, text_feats = [], []
        for s in range(0, len(captions), batch_size):
            with amp:
                emb = model.encode_text(ids[s:s + batch_size], mask[s:s + batch_size])
                text_feats.append(model.text_feature(emb))
            text_embeds.append(emb)
        text_embeds, text_feats = torch.cat(text_embeds), torch.cat(text_feats)  # (N_txt, L, D), (N_txt, E)

        image_embeds, image_feats = [], []
        for s in range(0, len(image_paths), batch_size):
            pixels = torch.stack([transform(load_rgb(str(p))) for p in image_paths[s:s + batch_size]])
            with amp:
                emb = model.encode_image(pixels.to(device))
                image_feats.append(model.image_feature(emb))
            image_embeds.append(emb)
        image_embeds, image_feats = torch.cat(image_embeds), torch.cat(image_feats)  # (N_img, 1+P, Dv), (N_img, E)

        sims = image_feats @ text_feats.t()  # (N_img, N_txt)
        score_i2t = _rerank(model, sims, text_embeds, mask, image_embeds, k_test, batch_size, amp, queries="image")
        score_t2i = _rerank(model, sims.t(), text_embeds, mask, image_embeds, k_test, batch_size, amp, queries="text")
    finally:
        model.train(was_training)
    return recall_metrics(score_i2t.cpu(), score_t2i.cpu(), txt2img)


def _rerank(model: ALBEF, sims: Tensor, text_embeds: Tensor, mask: Tensor, image_embeds: Tensor, k: int,
            batch_size: int, amp: ContextManager, queries: str) -> Tensor:
    """ITM match logits for each query's top-k candidates; -100 elsewhere. sims: (N_query, N_cand)."""
    k = min(k, sims.shape[1])
    scores = torch.full(sims.shape, -100.0, device=sims.device)
    top = sims.topk(k, dim=1).indices  # (N_query, k)
    per_chunk = max(1, batch_size // k)  # queries per fusion call
    for s in range(0, sims.shape[0], per_chunk):
        q = torch.arange(s, min(s + per_chunk, sims.shape[0]), device=sims.device)
        cand = top[q].flatten()  # (n*k,)
        query = q.repeat_interleave(k)
        t_idx, i_idx = (cand, query) if queries == "image" else (query, cand)
        with amp:
            fused = model.fuse(text_embeds[t_idx], mask[t_idx], image_embeds[i_idx])
            logit = model.itm_logits(fused)[:, 1].float()
        scores[query, cand] = logit
    return scores


def evaluate_retrieval_file(model: ALBEF, path: str | Path, **kwargs) -> dict[str, float]:
    """`evaluate_retrieval` on an ALBEF retrieval JSON ({"image", "caption": [str, ...]} entries)."""
    images, captions, txt2img = build_eval_items(path)
    return evaluate_retrieval(model, images, captions, txt2img, **kwargs)


def format_recalls(r: dict[str, float]) -> str:
    return (f"image->text R@1/5/10 {r['txt_r1']:.1f}/{r['txt_r5']:.1f}/{r['txt_r10']:.1f}  "
            f"text->image R@1/5/10 {r['img_r1']:.1f}/{r['img_r5']:.1f}/{r['img_r10']:.1f}  (r_mean {r['r_mean']:.1f})")
