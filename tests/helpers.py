"""Shared test inputs."""

import torch

from albef_fast.data.batch import Batch
from albef_fast.data.masking import mask_tokens


def tiny_batch(cfg, B=6, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, 3000, (B, L), generator=g) * mask
    ids[:, 0] = 101
    mlm_ids, selected = mask_tokens(ids, g, probability=0.3)
    pos = selected.flatten().nonzero().squeeze(1)
    image = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    return Batch(image, ids, mask, mlm_ids, pos, ids.flatten()[pos])
