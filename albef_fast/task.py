"""PretrainTask: the ALBEF model, its momentum twin, the feature queues and the three objectives.

`forward(batch, alpha)` computes the losses and changes no state. `after_step(output)` is called once
after each optimizer step and does everything ALBEF does inside its forward: the EMA update of the
momentum model, the enqueue of this step's momentum features, and the temperature clamp. ALBEF runs
the EMA and the clamp at the start of the *next* forward, i.e. after the same optimizer step, so the
two orders compute the same thing, but this one stays correct under gradient accumulation or a
second (evaluation) forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from albef_kernels import ema_update_, itc_loss_bidirectional, mlm_loss, sample_hard_negatives
from torch import Tensor, nn

from albef_fast.data.batch import Batch
from albef_fast.models.albef import ALBEF
from albef_fast.models.queue import FeatureQueues


class PretrainOutput(NamedTuple):
    """A named tuple, so that wrappers that look for tensors in a module's outputs (DDP, DeepSpeed ZeRO-3's
    backward hooks) find them."""

    loss: Tensor
    """() itc_loss + itm_loss + mlm_loss (ALBEF weights each by 1)."""
    itc_loss: Tensor
    itm_loss: Tensor
    mlm_loss: Tensor
    temp: Tensor
    """() the temperature this forward used (detached; for logging)."""
    image_feat_m: Tensor
    """(B, embed_dim) momentum image features, enqueued by `after_step`."""
    text_feat_m: Tensor
    """(B, embed_dim) momentum text features, enqueued by `after_step`."""


def itm_loss(logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
    """Cross-entropy over (3B, 2) logits, averaged over the pairs with weight 1. With every pair valid
    this is ALBEF's plain mean over 3B; pairs whose hard negative does not exist (B = 1) weigh 0."""
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="none")
    return (ce * weight).sum() / weight.sum()


class PretrainTask(nn.Module):
    reuse_image_kv: bool = True
    """Compute the online image's cross-attention keys/values once per fusion layer and step, gathered
    for the 4B rows of the ITM + MLM fusion call (exact). False: the image tokens are gathered and each
    row projects its own (tests, benchmarks). The momentum MLM pass has its own image and weights."""

    def __init__(self, model: ALBEF, *, queue_size: int, momentum: float = 0.995) -> None:
        super().__init__()
        self.model = model
        self.model_m = model.momentum_copy()
        self.queues = FeatureQueues(queue_size, model.config.embed_dim)
        self.momentum = momentum
        self._pairs: tuple[list[Tensor], list[Tensor]] | None = None

    def forward(self, batch: Batch, alpha: float) -> PretrainOutput:
        m, mm = self.model, self.model_m
        ids, mask = batch.text_ids, batch.text_mask
        B = ids.shape[0]

        # unimodal encoders, online and momentum. The captions and their masked copies (MLM) go
        # through each text encoder as one batch of 2B: rows are independent, so this is exactly the
        # two separate passes, with half the launches, larger GEMMs and one embedding gradient.
        pos, mlm_ids = batch.mlm_positions, batch.mlm_ids
        both_ids, both_mask = torch.cat([ids, mlm_ids]), torch.cat([mask, mask])
        image_embeds = m.encode_image(batch.image)  # (B, 1+P, Dv)
        image_feat = m.image_feature(image_embeds)  # (B, E) fp32, unit norm
        text_embeds, mlm_embeds = m.encode_text(both_ids, both_mask).split(B)  # (B, L, D) each
        text_feat = m.text_feature(text_embeds)  # (B, E)
        with torch.no_grad():
            image_embeds_m = mm.encode_image(batch.image)  # (B, 1+P, Dv)
            image_feat_m = mm.image_feature(image_embeds_m)
            text_embeds_m, mlm_embeds_m = mm.encode_text(both_ids, both_mask).split(B)
            text_feat_m = mm.text_feature(text_embeds_m)

        # ITC: online queries against momentum in-batch keys + queue, soft momentum targets
        # both directions in one call (one kernel launch on CUDA): (2,) [i2t, t2i] and (2, B, B) sims
        itc, sims = itc_loss_bidirectional(image_feat, image_feat_m, text_feat, text_feat_m,
                                           self.queues.image, self.queues.text, m.temp, alpha)
        loss_itc = itc.mean()

        # ITM: one positive pair per sample plus a hard negative image per text and a hard negative
        # text per image, drawn from the in-batch similarities. The 3B pairs and the online MLM pass
        # (masked captions with their own images) run as one fusion call of 4B rows.
        with torch.no_grad():
            neg_image, neg_text, valid_t2i, valid_i2t = self.hard_negatives(sims)
        texts = torch.cat([text_embeds, text_embeds, text_embeds[neg_text], mlm_embeds])  # (4B, L, D)
        masks = torch.cat([mask, mask, mask[neg_text], mask])
        own = torch.arange(B, device=ids.device)
        image_index = torch.cat([own, neg_image, own, own])
        if self.reuse_image_kv:  # the B images' cross-attention keys/values once per fusion layer
            fused = m.fuse(texts, masks, image_kv=m.image_kv(image_embeds), image_index=image_index)
        else:
            fused = m.fuse(texts, masks, image_embeds[image_index])
        itm_logits = m.itm_logits(fused[: 3 * B])  # (3B, 2)
        labels = torch.cat([ids.new_ones(B), ids.new_zeros(2 * B)])
        weight = torch.cat([image_feat.new_ones(B), valid_t2i.float(), valid_i2t.float()])
        loss_itm = itm_loss(itm_logits, labels, weight)

        # MLM with distillation, on the masked positions only (chosen by the loader)
        with torch.no_grad():
            h_m = mm.fuse(mlm_embeds_m, mask, image_embeds_m)  # (B, L, D)
            h_m = mm.mlm_head.transform(h_m.flatten(0, 1).index_select(0, pos))  # (M, D)
        h = m.mlm_head.transform(fused[3 * B :].flatten(0, 1).index_select(0, pos))  # (M, D)
        loss_mlm = mlm_loss(h, m.mlm_head.weight, m.mlm_head.bias, batch.mlm_labels,
                            h_m, mm.mlm_head.weight, mm.mlm_head.bias, alpha)

        return PretrainOutput(
            loss=loss_itc + loss_itm + loss_mlm, itc_loss=loss_itc, itm_loss=loss_itm, mlm_loss=loss_mlm,
            temp=m.temp.detach().clone().reshape(()), image_feat_m=image_feat_m, text_feat_m=text_feat_m,
        )

    def hard_negatives(self, sims: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Both ITM directions in one draw (one kernel launch on CUDA).

        Args:
            sims: (2, B, B) in-batch logits [image->text, text->image] from the ITC.
        Returns:
            neg_image (B,): a hard negative image for each text; neg_text (B,): a hard negative text
            for each image; valid_t2i, valid_i2t (B,) bool: False where no negative exists (B = 1).
        Tests and the parity harness replace this method to inject fixed negatives.
        """
        index, valid = sample_hard_negatives(sims)  # (2, B) each
        return index[1], index[0], valid[1], valid[0]

    def momentum_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """(momentum tensors, online tensors), paired by name. Built once: `.to()`, `.cuda()` and
        `load_state_dict` keep the Parameter objects, so the lists stay valid."""
        if self._pairs is None:
            online = dict(self.model.named_parameters())
            names, params_m = zip(*self.model_m.named_parameters())
            self._pairs = (list(params_m), [online[n] for n in names])
        return self._pairs

    @torch.no_grad()
    def reset_momentum_(self) -> None:
        """Copy the online weights into the momentum model (after loading pretrained weights into
        `model`, as ALBEF copies after loading DeiT and BERT)."""
        for p_m, p in zip(*self.momentum_pairs()):
            p_m.copy_(p)

    @torch.no_grad()
    def after_step(self, outputs: PretrainOutput | Sequence[PretrainOutput], *,
                   gather: Callable[[Tensor], Tensor] | None = None) -> None:
        """Once per optimizer step, after `optimizer.step()`: EMA, enqueue, temperature clamp.

        Args:
            outputs: the step's output, or one per micro-batch under gradient accumulation.
            gather: distributed runs: (A, B, E) local features -> (A, W*B, E), every rank's rows in
                rank order, without gradient (albef_fast/distributed/env.py gather_rows).
        """
        ema_update_(*self.momentum_pairs(), self.momentum)
        self.enqueue(outputs, gather=gather)
        self.model.clamp_temp_()

    @torch.no_grad()
    def enqueue(self, outputs: PretrainOutput | Sequence[PretrainOutput], *,
                gather: Callable[[Tensor], Tensor] | None = None) -> None:
        """Write the step's momentum features into the queues: micro-batch by micro-batch, and within
        one, rank by rank (ALBEF's order for one micro-batch per step)."""
        outs = [outputs] if isinstance(outputs, PretrainOutput) else list(outputs)
        image = torch.stack([o.image_feat_m for o in outs])  # (A, B, E)
        text = torch.stack([o.text_feat_m for o in outs])
        if gather is not None:  # one collective for both modalities
            image, text = gather(torch.cat([image, text], dim=-1)).split([image.shape[-1], text.shape[-1]], dim=-1)
        self.queues.enqueue(image.flatten(0, 1), text.flatten(0, 1))
