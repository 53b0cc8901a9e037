"""DALI on the GPU ("mixed" decoding): the same graph as the CPU one, checked against the PIL twin and
against DALI-CPU on the same params; output on the CUDA device. Needs CUDA and nvidia-dali (the torch
equalisation that the graph calls is checked on CUDA without DALI too)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from albef_fast.data import transforms as tr
from albef_fast.data.dali import DaliImagePipeline, dali_unavailable_reason

pytestmark = pytest.mark.gpu
needs_dali = pytest.mark.skipif(dali_unavailable_reason() is not None,
                                reason=f"nvidia-dali-cuda130 is not usable here: {dali_unavailable_reason()}")

GREY = 255 * 0.27


def _jpeg(seed: int, w: int = 320, h: int = 240) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1)
    arr = np.clip(arr + np.random.RandomState(seed).randint(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=92)
    return np.frombuffer(buf.getvalue(), np.uint8)


@needs_dali
def test_dali_gpu_matches_cpu_graph_and_pil():
    enc = [_jpeg(i) for i in range(16)]
    rng = random.Random(0)
    params = [tr.draw_pretrain_params(320, 240, rng) for _ in enc]
    gpu = DaliImagePipeline(256, "pretrain", 16, device="gpu")(enc, params)
    cpu = DaliImagePipeline(256, "pretrain", 16, device="cpu")(enc, params)
    assert gpu.is_cuda and gpu.shape == (16, 3, 256, 256) and gpu.dtype == torch.float32
    # nvJPEG and libjpeg-turbo round differently (IDCT, chroma upsampling): a few grey levels.
    assert (gpu.cpu() - cpu).abs().mean().item() * GREY < 4.0
    for e, p, g in zip(enc, params, gpu.cpu()):  # Equalize included: PIL's LUT on both paths
        ref = tr.apply_pretrain_params(Image.open(io.BytesIO(e.tobytes())).convert("RGB"), p, 256)
        assert (g - ref).abs().mean().item() * GREY < 5.0


def test_pil_equalize_on_cuda_matches_pil():
    from PIL import ImageOps

    from albef_fast.data.dali import pil_equalize, pil_equalize_batch

    rng = np.random.default_rng()
    for _ in range(20):
        a = np.clip(rng.normal(rng.uniform(30, 220), rng.uniform(1, 60), (97, 131, 3)), 0, 255).astype(np.uint8)
        got = pil_equalize(torch.from_numpy(a).cuda()).cpu().numpy()
        assert np.array_equal(got, np.asarray(ImageOps.equalize(Image.fromarray(a))))
    # the batched path DALI's operator takes: one stack of a batch's Equalize samples
    stack = [np.clip(rng.normal(rng.uniform(30, 220), rng.uniform(1, 60), (64, 48, 3)), 0, 255).astype(np.uint8)
             for _ in range(9)]
    got = pil_equalize_batch([torch.from_numpy(a).cuda() for a in stack])
    for a, g in zip(stack, got):
        assert np.array_equal(g.cpu().numpy(), np.asarray(ImageOps.equalize(Image.fromarray(a))))


@needs_dali
def test_dali_gpu_equalize_matches_pil_exactly():
    # The DLPack operator on DALI's GPU stream: uint8-exact on an uncropped image (normalisation rounding only).
    rng = np.random.default_rng()
    arrs = [np.clip(rng.normal(128, rng.uniform(5, 60), (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(8)]
    enc = []
    for a in arrs:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        enc.append(np.frombuffer(buf.getvalue(), np.uint8))
    params = [tr.AugParams(0, 0, 64, 64, False, (("Equalize", 1),))] * len(enc)
    out = DaliImagePipeline(64, "pretrain", 8, device="gpu")(enc, params).cpu()
    for a, p, g in zip(arrs, params, out):
        assert (g - tr.apply_pretrain_params(Image.fromarray(a), p, 64)).abs().max().item() < 1e-5


@needs_dali
def test_dali_gpu_eval_transform():
    enc = [_jpeg(i) for i in range(4)]
    out = DaliImagePipeline(256, "none", 4, device="gpu")(enc, [None] * 4)
    ref = tr.ImageTransform(256, "none")(Image.open(io.BytesIO(enc[0].tobytes())).convert("RGB"))
    assert out.is_cuda and (out[0].cpu() - ref).abs().mean().item() * GREY < 4.0
