"""The DALI graph, run on the CPU (device_id=None), against its PIL twin: same drawn params -> same crop,
flip and RandomAugment ops (each op's direction checked against the opposite sign), pixel arithmetic
within a few grey levels; the loader's backends agree; backend choice; the PIL fallback on a DALI failure."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="nvidia-dali-cuda130 is pinned in the Makefile; not installed here")

from albef_fast.data import transforms as tr  # noqa: E402
from albef_fast.data.dali import DaliImagePipeline, affine_matrix  # noqa: E402
from albef_fast.data.dataset import PretrainDataset, ResumableBatchSampler, load_sources  # noqa: E402
from albef_fast.data.loader import build_loader, choose_backend  # noqa: E402

GREY = 255 * 0.27  # one normalised unit is ~1/0.27 of the 0..1 range: x GREY ~ grey levels


def _picture(size: int = 64) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.stack([xx * 4, yy * 4, (xx * 3 + yy * 2) % 256], -1).astype(np.uint8)
    arr[20:40, 10:30] = [200, 30, 90]
    return Image.fromarray(arr)


def _png(img: Image.Image) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return np.frombuffer(buf.getvalue(), np.uint8)


@pytest.fixture(scope="module")
def pipe():
    return DaliImagePipeline(64, "pretrain", 32, device="cpu", num_threads=1)


# Mean |DALI - PIL| in grey levels per op, with the reason for each bound.
OP_BOUNDS = {
    "Identity": 0.5,
    "AutoContrast": 1.5,  # rounding of the stretch
    "Equalize": 10.0,  # DALI (OpenCV's formula) and PIL build the equalisation LUT differently
    "Brightness": 1.0,
    "Sharpness": 1.0,  # the one-pixel border: PIL keeps it, DALI clamps
    "ShearX": 2.0, "ShearY": 2.0, "Rotate": 2.0,  # bilinear sample positions differ by half a pixel at most
    "TranslateX": 0.5, "TranslateY": 0.5,
}


def test_each_op_matches_the_pil_twin_and_its_direction(pipe):
    img = _picture()
    cases = [(name, sign) for name in tr.RA_OPS for sign in (1, -1)]
    params = [tr.AugParams(0, 0, 64, 64, False, ((n, s),)) for n, s in cases]
    out = pipe([_png(img)] * len(cases), params)
    assert out.shape == (len(cases), 3, 64, 64) and out.dtype == torch.float32
    for (name, sign), got in zip(cases, out):
        ref = tr.apply_pretrain_params(img, tr.AugParams(0, 0, 64, 64, False, ((name, sign),)), 64)
        err = (got - ref).abs().mean().item() * GREY
        assert err < OP_BOUNDS[name], (name, sign, err)
        if name in tr.SIGNED_OPS:  # the opposite sign is far off: the directions agree
            opposite = tr.apply_pretrain_params(img, tr.AugParams(0, 0, 64, 64, False, ((name, -sign),)), 64)
            assert (got - opposite).abs().mean().item() * GREY > 10 * err + 5, (name, sign)


def test_crop_flip_and_two_ops_match(pipe):
    img = _picture()
    enc = _png(img)
    rng = random.Random(0)
    params = [tr.draw_pretrain_params(64, 64, rng) for _ in range(24)]
    params = [p for p in params if all(n != "Equalize" for n, _ in p.ops)]
    out = pipe([enc] * len(params), params)
    for p, got in zip(params, out):
        ref = tr.apply_pretrain_params(img, p, 64)
        assert (got - ref).abs().mean().item() * GREY < 3.0, p


def test_eval_transform_matches_pil():
    img = _picture(80)
    out = DaliImagePipeline(32, "none", 4, device="cpu", num_threads=1)([_png(img)] * 2, [None, None])
    ref = tr.ImageTransform(32, "none")(img)
    assert out.shape == (2, 3, 32, 32)
    assert (out[0] - ref).abs().mean().item() * GREY < 1.0


def test_affine_matrix_rejects_other_ops():
    with pytest.raises(ValueError, match="Brightness"):
        affine_matrix("Brightness", 1, 32)


@pytest.fixture
def corpus(tmp_path):
    entries = []
    for i in range(8):
        arr = np.random.RandomState(i).randint(0, 255, (50 + 3 * i, 70, 3), dtype=np.uint8)
        arr = (arr // 4 + np.mgrid[0 : 50 + 3 * i, 0:70][1][..., None] * 2).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.jpg", quality=92)
        entries.append({"image": f"{i}.jpg", "caption": [f"picture {i} of a thing", f"another caption {i}"]})
    (tmp_path / "a.json").write_text(json.dumps(entries))
    return load_sources([str(tmp_path / "a.json")]).samples


def _epoch(samples, backend, workers=0, augment="pretrain"):
    ds = PretrainDataset(samples, tr.ImageTransform(32, augment), max_text_len=10,
                         image_mode="decoded" if backend == "pil" else "encoded")
    sampler = ResumableBatchSampler(len(ds), 4, seed=7)
    sampler.set_epoch(0)
    return list(build_loader(ds, sampler, backend, num_workers=workers, pin_memory=False)), ds


def test_loader_backends_agree(corpus):
    pil, _ = _epoch(corpus, "pil")
    dali, _ = _epoch(corpus, "dali_cpu", workers=1)
    assert len(pil) == len(dali) == 2
    for a, b in zip(pil, dali):
        for f in ("text_ids", "text_mask", "mlm_ids", "mlm_positions", "mlm_labels"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f  # text is the loader's, backend-free
        assert a.image.shape == b.image.shape
        # Same crops/flips/ops; only the arithmetic differs (Equalize the most: see OP_BOUNDS).
        assert (a.image - b.image).abs().mean().item() * GREY < 6.0


def test_dali_failure_falls_back_to_pil(corpus, monkeypatch):
    pil, _ = _epoch(corpus, "pil")

    def broken(self, encoded, params):
        raise RuntimeError("simulated nvJPEG failure")

    monkeypatch.setattr(DaliImagePipeline, "__call__", broken)
    dali, ds = _epoch(corpus, "dali_cpu")
    assert ds.events.totals()["dali_batch_fallback"] == 2
    for a, b in zip(pil, dali):
        assert torch.equal(a.image, b.image)  # the PIL twin from the same params: bit-identical


def test_choose_backend():
    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu) == "pil"
    assert choose_backend("dali_cpu", cpu) == "dali_cpu"
    with pytest.raises(RuntimeError, match="GPU"):
        choose_backend("dali", cpu)
    with pytest.raises(ValueError, match="valid"):
        choose_backend("opencv", cpu)
