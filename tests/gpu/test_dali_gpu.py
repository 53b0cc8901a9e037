"""DALI on the GPU ("mixed" decoding): the same graph as the CPU one, checked against the PIL twin and
against DALI-CPU on the same params; output on the CUDA device. Needs CUDA and nvidia-dali."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu
dali = pytest.importorskip("nvidia.dali", reason="nvidia-dali-cuda130 is not installed on this machine")

from albef_fast.data import transforms as tr  # noqa: E402
from albef_fast.data.dali import DaliImagePipeline  # noqa: E402

GREY = 255 * 0.27


def _jpeg(seed: int, w: int = 320, h: int = 240) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1)
    arr = np.clip(arr + np.random.RandomState(seed).randint(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=92)
    return np.frombuffer(buf.getvalue(), np.uint8)


def test_dali_gpu_matches_cpu_graph_and_pil():
    enc = [_jpeg(i) for i in range(16)]
    rng = random.Random(0)
    params = [tr.draw_pretrain_params(320, 240, rng) for _ in enc]
    gpu = DaliImagePipeline(256, "pretrain", 16, device="gpu")(enc, params)
    cpu = DaliImagePipeline(256, "pretrain", 16, device="cpu")(enc, params)
    assert gpu.is_cuda and gpu.shape == (16, 3, 256, 256) and gpu.dtype == torch.float32
    # nvJPEG and libjpeg-turbo round differently (IDCT, chroma upsampling): a few grey levels.
    assert (gpu.cpu() - cpu).abs().mean().item() * GREY < 4.0
    for e, p, g in zip(enc, params, gpu.cpu()):
        if any(n == "Equalize" for n, _ in p.ops):
            continue  # DALI's equalisation formula differs from PIL's (see tests/unit/test_data_dali.py)
        ref = tr.apply_pretrain_params(Image.open(io.BytesIO(e.tobytes())).convert("RGB"), p, 256)
        assert (g - ref).abs().mean().item() * GREY < 5.0


def test_dali_gpu_eval_transform():
    enc = [_jpeg(i) for i in range(4)]
    out = DaliImagePipeline(256, "none", 4, device="gpu")(enc, [None] * 4)
    ref = tr.ImageTransform(256, "none")(Image.open(io.BytesIO(enc[0].tobytes())).convert("RGB"))
    assert out.is_cuda and (out[0].cpu() - ref).abs().mean().item() * GREY < 4.0
