"""The DALI graph, run on the CPU (device_id=None), against its PIL twin: same drawn params -> same crop,
flip and RandomAugment ops (each op's direction checked against the opposite sign), pixel arithmetic
within a few grey levels; the loader's backends agree; backend choice; the PIL fallback on a DALI failure."""

from __future__ import annotations

import gc
import io
import json
import os
import random
import signal
import time

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
    "Equalize": 0.5,  # PIL's LUT, computed exactly (see test_equalize_is_pils_exactly)
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
    out = pipe([enc] * len(params), params)
    for p, got in zip(params, out):
        ref = tr.apply_pretrain_params(img, p, 64)
        assert (got - ref).abs().mean().item() * GREY < 3.0, p


def test_pipelined_executor_gives_the_synchronous_output(pipe):
    """The benchmark candidate (`_build(pipelined=True)`, DALI's asynchronous executor, two batches in
    flight, driven as bench_dataloader.py's dali-pipelined stage drives it) computes exactly what the
    loader's synchronous pipeline computes, batch for batch and in order."""
    from albef_fast.data.dali import _build, as_torch, feed

    rng = random.Random(1)
    imgs = [Image.fromarray(_random_image(np.random.default_rng(i), 40 + 3 * i, 56)) for i in range(12)]
    batches = [([_png(im) for im in imgs[k : k + 4]], [tr.draw_pretrain_params(56, 40 + 3 * j, rng)
                for j in range(k, k + 4)]) for k in range(0, 12, 4)]
    expected = [pipe(enc, params) for enc, params in batches]
    streamed = _build(32, 64, "pretrain", "cpu", 1, None, pipelined=True)
    got = []
    for k, (enc, params) in enumerate(batches):
        feed(streamed, enc, params, "pretrain", 64)
        if k >= 1:  # the first schedule_run runs two iterations: both batches fed first
            streamed.schedule_run()
            got.append(as_torch(streamed.outputs()[0], None))
    got.append(as_torch(streamed.outputs()[0], None))
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(expected, got))


def _random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Fresh random uint8 images of several kinds: uniform, few levels, narrow/wide normal, mostly flat."""
    kind = rng.integers(0, 4)
    if kind == 0:
        a = rng.integers(0, 256, (h, w, 3))
    elif kind == 1:
        a = rng.integers(0, rng.integers(1, 5), (h, w, 3)) * rng.integers(1, 60)
    elif kind == 2:
        a = rng.normal(rng.uniform(30, 220), rng.uniform(1, 60), (h, w, 3))
    else:
        a = rng.choice([0, 7, 100, 255], (h, w, 3), p=[0.9, 0.05, 0.03, 0.02])
    return np.clip(a, 0, 255).astype(np.uint8)


def test_equalize_is_pils_exactly():
    from PIL import ImageOps

    from albef_fast.data.dali import _equalize_torch, equalize_lut, pil_equalize, pil_equalize_batch

    rng = np.random.default_rng()  # fresh images every run; the LUT is integer arithmetic: exact
    for _ in range(300):
        a = _random_image(rng, *rng.integers(1, 40, 2))
        ref = np.asarray(ImageOps.equalize(Image.fromarray(a)))
        assert np.array_equal(pil_equalize(torch.from_numpy(a)).numpy(), ref), a  # numpy path (CPU)
        assert np.array_equal(_equalize_torch(torch.from_numpy(a)).numpy(), ref), a  # torch path (CUDA's)
    # a stack at once (how the GPU path equalises a batch's samples): each image as on its own, with
    # images whose histograms differ (one flat, one sparse) so that a shared histogram would show
    stack = [_random_image(rng, 17, 23) for _ in range(5)] + [np.full((17, 23, 3), 9, np.uint8)]
    got = _equalize_torch(torch.from_numpy(np.stack(stack))).numpy()
    for a, g in zip(stack, got):
        assert np.array_equal(g, np.asarray(ImageOps.equalize(Image.fromarray(a))))
    assert [t.shape for t in pil_equalize_batch([torch.from_numpy(a) for a in stack[:2]])] == [(17, 23, 3)] * 2
    with pytest.raises(ValueError, match="uint8"):
        pil_equalize(torch.zeros(4, 4, 3))
    with pytest.raises(ValueError, match="\\(C, 256\\) int64"):
        equalize_lut(torch.zeros(3, 255, dtype=torch.int64))


def test_dali_equalize_matches_pil_exactly(pipe):
    # Equalize alone on an uncropped 64x64 image: the resize is the identity on both paths, so the DALI graph
    # must give PIL's uint8 pixels; the only difference allowed is float rounding of the normalisation
    # (1e-5 in normalised units is < 0.001 grey level, one grey level is 0.0145).
    rng = np.random.default_rng()
    imgs = [Image.fromarray(_random_image(rng, 64, 64)) for _ in range(12)]
    params = [tr.AugParams(0, 0, 64, 64, False, (("Equalize", 1),))] * len(imgs)
    out = pipe([_png(im) for im in imgs], params)
    for im, p, got in zip(imgs, params, out):
        ref = tr.apply_pretrain_params(im, p, 64)
        assert (got - ref).abs().max().item() < 1e-5


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


def _epoch(samples, backend, workers=0, augment="pretrain", **kw):
    ds = PretrainDataset(samples, tr.ImageTransform(32, augment), max_text_len=10,
                         image_mode="decoded" if backend == "pil" else "encoded")
    sampler = ResumableBatchSampler(len(ds), 4, seed=7)
    sampler.set_epoch(0)
    return list(build_loader(ds, sampler, backend, num_workers=workers, pin_memory=False, **kw)), ds


BATCH_FIELDS = ("image", "text_ids", "text_mask", "mlm_ids", "mlm_positions", "mlm_labels")


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in BATCH_FIELDS)


@pytest.mark.parametrize("workers", [0, 1])
def test_encoded_batches_carry_the_files_in_one_shared_tensor(corpus, workers):
    """A batch's files travel as one uint8 tensor plus offsets (shared memory from a worker, not pickled
    arrays); `encoded` gives back each sample's validated file exactly."""
    ds = PretrainDataset(corpus, tr.ImageTransform(32, "pretrain"), max_text_len=10, image_mode="encoded")
    sampler = ResumableBatchSampler(len(ds), 4, seed=7)
    sampler.set_epoch(0)
    loader = build_loader(ds, sampler, "dali_cpu", num_workers=workers, pin_memory=False)
    batches = list(loader.loader)
    assert [len(b.encoded) for b in batches] == [4, 4]
    for batch in batches:
        assert batch.data.dtype == torch.uint8 and batch.data.is_shared() == (workers > 0)
        assert batch.offsets.tolist()[-1] == batch.data.numel()
        for got, (index, seed) in zip(batch.encoded, batch.keys):
            assert np.array_equal(got, ds[(index, seed)]["encoded"])


@pytest.mark.parametrize("workers", [0, 1])
def test_prefetch_thread_keeps_order_and_content(corpus, workers):
    sync, _ = _epoch(corpus, "dali_cpu", workers, dali_prefetch=0)
    for depth in (1, 3):
        ahead, _ = _epoch(corpus, "dali_cpu", workers, dali_prefetch=depth)
        assert len(ahead) == len(sync) == 2 and all(_same(a, b) for a, b in zip(sync, ahead))


def test_prefetch_thread_decodes_ahead_stops_early_and_resumes(corpus):
    import threading

    ds = PretrainDataset(corpus, tr.ImageTransform(32, "pretrain"), max_text_len=10, image_mode="encoded")
    sampler = ResumableBatchSampler(len(ds), 2, seed=7)  # 4 batches
    loader = build_loader(ds, sampler, "dali_cpu", num_workers=0, pin_memory=False, dali_prefetch=2)
    sampler.set_epoch(0)
    reference = [loader._decode(e) for e in loader.loader]  # synchronous, in this thread
    calls, second_done = [], threading.Event()
    real = loader.pipeline.__class__.__call__

    def counting(self, encoded, params):
        out = real(self, encoded, params)
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            second_done.set()
        return out

    loader.pipeline.__class__.__call__ = counting
    try:
        sampler.set_epoch(0)
        it = iter(loader)
        first = next(it)
        # Batch 2 is decoded while the consumer still holds batch 1 (no timing: just the event, 30 s at most).
        assert second_done.wait(30) and _same(first, reference[0])
        it.close()  # leave the epoch early: the thread stops
        assert not any(t.name in ("albef-dali-prefetch", "albef-data-fetch") for t in threading.enumerate())
        assert set(calls) == {"albef-dali-prefetch"}
        sampler.set_epoch(0, 1)  # resume at batch 1: the same tail
        tail = list(loader)
    finally:
        loader.pipeline.__class__.__call__ = real
    assert len(tail) == 3 and all(_same(a, b) for a, b in zip(reference[1:], tail))


def test_prefetch_thread_raises_in_the_consumer(corpus, monkeypatch):
    from albef_fast.data.dataset import BadDataError

    ds = PretrainDataset(corpus, tr.ImageTransform(32, "pretrain"), max_text_len=10, image_mode="encoded")
    sampler = ResumableBatchSampler(len(ds), 2, seed=7)
    loader = build_loader(ds, sampler, "dali_cpu", num_workers=0, pin_memory=False, dali_prefetch=2)
    real, seen = PretrainDataset.__getitem__, []

    def failing(self, key):
        seen.append(key)
        if len(seen) == 5:  # the first sample of the third batch
            raise BadDataError("simulated broken data")
        return real(self, key)

    monkeypatch.setattr(PretrainDataset, "__getitem__", failing)
    sampler.set_epoch(0)
    got = []
    with pytest.raises(BadDataError, match="simulated"):
        for batch in loader:
            got.append(batch)
    assert len(got) == 2  # the two batches before the failure arrive first
    with pytest.raises(ValueError, match="prefetch must be an int >= 0"):
        build_loader(ds, sampler, "dali_cpu", num_workers=0, pin_memory=False, dali_prefetch=-1)


def test_loader_backends_agree(corpus):
    pil, _ = _epoch(corpus, "pil")
    dali, _ = _epoch(corpus, "dali_cpu", workers=1)
    assert len(pil) == len(dali) == 2
    for a, b in zip(pil, dali):
        for f in ("text_ids", "text_mask", "mlm_ids", "mlm_positions", "mlm_labels"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f  # text is the loader's, backend-free
        assert a.image.shape == b.image.shape
        # Same crops/flips/ops; only the resampling arithmetic differs (0.7-0.8 grey levels seen).
        assert (a.image - b.image).abs().mean().item() * GREY < 2.0


def test_dali_failure_falls_back_to_pil(corpus, monkeypatch):
    pil, _ = _epoch(corpus, "pil")

    def broken(self, encoded, params):
        raise RuntimeError("simulated nvJPEG failure")

    monkeypatch.setattr(DaliImagePipeline, "__call__", broken)
    dali, ds = _epoch(corpus, "dali_cpu")
    assert ds.events.totals()["dali_batch_fallback"] == 2
    for a, b in zip(pil, dali):
        assert torch.equal(a.image, b.image)  # the PIL twin from the same params: bit-identical


def _in_forked_child(work, timeout: float = 20.0) -> None:
    """Run `work()` in a forked child with the cycle collector off until the fork; fail if the child
    dies, raises or hangs."""
    gc.disable()  # what is garbage now stays pending until after the fork
    try:
        pid = os.fork()
        if pid == 0:  # the child leaves without pytest's teardown, whatever happens
            code = 1
            try:
                work()
                code = 0
            finally:
                os._exit(code)
    finally:
        gc.enable()
    deadline = time.monotonic() + timeout
    while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    if not done[0]:  # without the fork hook the child may hang in DALI's shutdown instead of crashing
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"forked child hung for {timeout:.0f} s")
    status = done[1]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
        f"forked child failed (exit {os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}, "
        f"signal {os.WTERMSIG(status) if os.WIFSIGNALED(status) else None})")


def test_pipeline_garbage_is_not_shut_down_in_a_forked_child():
    """A DALI pipeline that is cyclic garbage when a loader worker forks is finalised wherever the cycle
    collector runs next, possibly in the child, where DALI's shutdown joins threads that exist only in the
    parent: SIGSEGV or a hang (DataLoader workers forked after the DALI tests died of it). The child must
    exit cleanly; the parent shuts the pipeline down as usual."""
    pipe = DaliImagePipeline(16, "none", 2, device="cpu", num_threads=2)
    pipe([_png(_picture(32))] * 2, [None, None])  # built and run: DALI's threads exist
    inner = pipe._pipe
    inner.self_reference = inner  # only the cycle collector frees it
    del pipe, inner
    _in_forked_child(gc.collect)
    gc.collect()


def test_a_forked_child_decodes_with_an_inherited_pipeline():
    """The wrapper drops its inherited pipeline in a forked child and builds its own on first use."""
    pipe = DaliImagePipeline(16, "none", 2, device="cpu", num_threads=2)
    files = [_png(_picture(32))] * 2
    want = pipe(files, [None, None])

    def decode():
        got = pipe(files, [None, None])
        if not torch.equal(got, want):
            raise AssertionError("the child's pipeline decoded differently")

    _in_forked_child(decode, timeout=60)
    torch.testing.assert_close(pipe(files, [None, None]), want)  # the parent's pipeline is untouched


def test_choose_backend():
    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu) == "pil"
    assert choose_backend("dali_cpu", cpu) == "dali_cpu"
    with pytest.raises(RuntimeError, match="GPU"):
        choose_backend("dali", cpu)
    with pytest.raises(ValueError, match="valid"):
        choose_backend("opencv", cpu)
