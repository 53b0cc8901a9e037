"""Bad input never stops a run and never changes the batch stream's shape: each kind of bad image is
replaced deterministically (and counted) or converted, on the PIL backend and on the DALI graph (CPU);
bad captions are dropped at load or cut; malformed annotations are refused at start, naming the file."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from albef_fast.data.captions import UNK_ID, build_tokenizer
from albef_fast.data.dataset import PretrainDataset, ResumableBatchSampler, Sample, load_caption_json
from albef_fast.data.images import BadSampleError, decode_rgb, encoded_image
from albef_fast.data.loader import build_loader
from albef_fast.data.quality import DataEvents
from albef_fast.data.transforms import ImageTransform

BACKENDS = [("pil", "decoded"), ("dali_cpu", "encoded")]


def _rgb(seed: int, w: int = 48, h: int = 36) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 5, yy * 7, (xx + yy) * 3], -1) % 256
    arr = (arr + np.random.RandomState(seed).randint(0, 30, (h, w, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _jpeg(seed: int = 0, **kw) -> bytes:
    return _save(_rgb(seed, **kw), "JPEG", quality=90)


# Converted (usable) images: every backend must produce the same kind of output as for plain RGB.
GOOD_VARIANTS = {
    "grayscale_jpeg": lambda: _save(_rgb(1).convert("L"), "JPEG"),
    "cmyk_jpeg": lambda: _save(_rgb(2).convert("CMYK"), "JPEG"),
    "rgba_png": lambda: _save(_rgb(3).convert("RGBA"), "PNG"),
    "palette_png": lambda: _save(_rgb(4).convert("P"), "PNG"),
    "gray16_png": lambda: _save(Image.fromarray((np.arange(48 * 36).reshape(36, 48) * 30).astype(np.uint16)), "PNG"),
    "gif": lambda: _save(_rgb(5), "GIF"),
    "webp": lambda: _save(_rgb(6), "WEBP"),
    "bmp": lambda: _save(_rgb(7), "BMP"),
    "tiff": lambda: _save(_rgb(8), "TIFF"),
    "png": lambda: _save(_rgb(9), "PNG"),
}

# Unusable images and the event they must be counted as.
BAD_VARIANTS = {
    "zero_byte": (lambda: b"", "unreadable"),
    "corrupt": (lambda: b"\x00\x01garbage" * 100, "unreadable"),
    "corrupt_header_jpeg": (lambda: b"\xff\xd8\xff\xe0" + b"\x13" * 500, "unreadable"),
    "truncated_jpeg": (lambda: _jpeg(10, w=200, h=150)[:1500], "truncated"),
    "truncated_png": (lambda: _save(_rgb(11, 200, 150), "PNG")[:3000], "truncated"),
}


def _dataset(tmp_path, files: dict[str, bytes], backend_mode: str, size: int = 24, augment: str = "pretrain"):
    samples = []
    for name, data in files.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        samples.append(Sample(str(path), (f"a caption for {name}",)))
    return PretrainDataset(samples, ImageTransform(size, augment), max_text_len=10, image_mode=backend_mode)


@pytest.mark.parametrize("backend,mode", BACKENDS)
def test_converted_formats_and_modes_decode(tmp_path, backend, mode):
    files = {f"{k}.img": make() for k, make in GOOD_VARIANTS.items()}
    ds = _dataset(tmp_path, files, mode, augment="none")
    sampler = ResumableBatchSampler(len(ds), len(ds), seed=0)
    sampler.set_epoch(0)
    (batch,) = list(build_loader(ds, sampler, backend, num_workers=0, pin_memory=False))
    assert batch.image.shape == (len(files), 3, 24, 24) and batch.image.dtype == torch.float32
    totals = ds.events.totals()
    assert totals["replaced"] == 0
    non_rgb = {"grayscale_jpeg", "cmyk_jpeg", "rgba_png", "palette_png", "gray16_png", "gif"}
    if backend == "pil":
        assert totals["converted_mode"] == len(non_rgb)
    else:  # DALI gets JPEG L/RGB and PNG RGB/RGBA raw; everything else is converted on the host
        assert totals["converted_mode"] == 2 and totals["transcoded"] == len(files) - 3
    # Whatever the path, each file decodes to the picture PIL's convert("RGB") gives (DALI's cubic
    # resize differs from PIL's by a fraction of a grey level on average).
    names, order = list(files), sampler.permutation(0).tolist()  # batch row b holds sample order[b]
    for b, i in enumerate(order):
        ref = ImageTransform(24, "none")(Image.open(io.BytesIO(files[names[i]])).convert("RGB"))
        err = (batch.image[b] - ref).abs().mean().item()
        assert err < 0.03, (names[i], err)


@pytest.mark.parametrize("backend,mode", BACKENDS)
def test_bad_images_replaced_and_counted(tmp_path, backend, mode, caplog):
    good = {f"good{i}.jpg": _jpeg(20 + i) for i in range(6)}
    bad = {f"{k}.jpg": make() for k, (make, _) in BAD_VARIANTS.items()}
    files = {**good, **bad, "missing.jpg": None}
    ds = _dataset(tmp_path, files, mode)
    n_bad = len(bad) + 1
    sampler = ResumableBatchSampler(len(ds), 4, seed=3)
    loader = build_loader(ds, sampler, backend, num_workers=0, pin_memory=False)
    with caplog.at_level(logging.WARNING, logger="albef_fast"):
        sampler.set_epoch(0)
        batches = list(loader)
    assert len(batches) == len(files) // 4 and all(b.size == 4 for b in batches)  # nothing dropped
    totals = ds.events.totals()
    expected = {"missing": 1, "unreadable": 3, "truncated": 2}
    # Every bad sample of the epoch was met once (12 samples, 3 full batches: all used), plus any bad
    # replacement drawn for it; each is replaced.
    for kind, n in expected.items():
        assert totals[kind] >= n, (kind, totals)
    assert totals["replaced"] == sum(totals[k] for k in ("missing", "unreadable", "truncated", "too_large"))
    assert totals["replaced"] >= n_bad
    assert "missing.jpg does not exist" in caplog.text and "truncated" in caplog.text
    # The replacements are a function of the seeds: a resumed epoch replays them exactly.
    sampler.set_epoch(0, 1)
    tail = list(loader)
    for a, b in zip(batches[1:], tail):
        assert torch.equal(a.image, b.image) and torch.equal(a.text_ids, b.text_ids)


def test_bad_samples_counted_across_workers(tmp_path):
    files = {f"good{i}.jpg": _jpeg(i) for i in range(6)} | {"zero.jpg": b"", "missing.jpg": None}
    ds = _dataset(tmp_path, files, "decoded")
    sampler = ResumableBatchSampler(len(ds), 2, seed=0)
    serial = []
    for workers in (0, 2):
        ds.events = DataEvents()
        loader = build_loader(ds, sampler, "pil", num_workers=workers, pin_memory=False)
        sampler.set_epoch(0)
        serial.append((list(loader), ds.events.totals()))
    (b0, t0), (b2, t2) = serial
    assert t0 == t2 and t0["missing"] >= 1 and t0["unreadable"] >= 1  # worker rows reach the main process
    assert all(torch.equal(x.image, y.image) for x, y in zip(b0, b2))


def test_event_counters_resume_from_a_checkpoint(tmp_path):
    # Epoch 0 counted with two loader workers; the totals go through torch.save/load(weights_only=True) into
    # a fresh dataset (as a resumed run builds one), which then counts epoch 1: the result equals the
    # totals of one uninterrupted run over both epochs.
    files = {f"good{i}.jpg": _jpeg(i) for i in range(6)} | {"zero.jpg": b"", "missing.jpg": None}

    def run_epochs(ds, epochs, workers):
        sampler = ResumableBatchSampler(len(ds), 2, seed=0)
        loader = build_loader(ds, sampler, "pil", num_workers=workers, pin_memory=False)
        for epoch in epochs:
            sampler.set_epoch(epoch)
            list(loader)

    straight = _dataset(tmp_path, files, "decoded")
    run_epochs(straight, [0, 1], workers=0)
    first = _dataset(tmp_path, files, "decoded")
    run_epochs(first, [0], workers=2)
    state = first.events.state_dict()
    assert all(type(v) is int for v in state.values()) and state["missing"] >= 1 and state["unreadable"] >= 1
    torch.save({"data_events": state}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["data_events"]
    resumed = _dataset(tmp_path, files, "decoded")
    resumed.events.load_state_dict(loaded)
    run_epochs(resumed, [1], workers=2)
    assert resumed.events.state_dict() == straight.events.state_dict()
    assert resumed.events.totals()["missing"] > state["missing"]  # epoch 1 counted on top, not instead


def test_event_counters_refuse_a_bad_state():
    events = DataEvents(rows=3)
    events.record("missing", "x.jpg")
    with pytest.raises(ValueError, match="unknown event names \\['bogus'\\]"):
        events.load_state_dict({"missing": 1, "bogus": 2})
    with pytest.raises(ValueError, match="'missing' must be an int >= 0, got -1"):
        events.load_state_dict({"missing": -1})
    with pytest.raises(ValueError, match="must be a dict"):
        events.load_state_dict([("missing", 1)])
    assert events.totals()["missing"] == 1  # a refused state changes nothing
    events.load_state_dict({"truncated": 4})  # kinds missing from an older state start at zero
    assert events.state_dict() == {name: 4 if name == "truncated" else 0 for name in events.state_dict()}


def test_all_bad_data_stops_with_a_clear_error(tmp_path):
    from albef_fast.data.dataset import BadDataError

    ds = _dataset(tmp_path, {"a.jpg": b"", "b.jpg": b"xx"}, "decoded")
    with pytest.raises(BadDataError, match="looks broken"):
        ds[(0, 1)]


def test_very_large_jpeg_is_drafted(tmp_path):
    big = _save(_rgb(0, 3000, 2000).resize((3000, 2000)), "JPEG", quality=80)
    img, converted = decode_rgb(big, "big.jpg", min_side=300)
    assert not converted and img.size == (750, 500)  # libjpeg decoded it at 1/4 scale, shorter side >= 300
    ds = _dataset(tmp_path, {"big.jpg": big}, "decoded", size=64)
    assert ds[(0, 0)]["image"].shape == (3, 64, 64) and ds.events.totals()["replaced"] == 0


def test_decompression_bomb_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # images > 200 px count as bombs
    with pytest.raises(BadSampleError) as e:
        decode_rgb(_jpeg(0), "bomb.jpg")
    assert e.value.kind == "too_large" and "bomb.jpg" in str(e.value)
    with pytest.raises(BadSampleError) as e:
        encoded_image(_jpeg(0), "bomb.jpg", min_side=10)
    assert e.value.kind == "too_large"


def test_jpeg_with_trailing_bytes_is_not_called_truncated():
    data = _jpeg(3) + b"\x00" * 5000  # some cameras append data after the end-of-image marker
    enc, w, h, event = encoded_image(data, "trailer.jpg", min_side=8)
    assert (w, h) == (48, 36) and event is None and len(enc) == len(data)


def test_caption_edge_cases(tmp_path):
    ann = tmp_path / "caps.json"
    long = " ".join(f"word{i}" for i in range(200))
    ann.write_text(json.dumps([
        {"image": "a.jpg", "caption": ""},
        {"image": "b.jpg", "caption": "   \t\n "},
        {"image": "c.jpg", "caption": long},
        {"image": "d.jpg", "caption": "Ein Café in Zürich — 東京の猫 🐱 naïve"},
        {"image": "e.jpg", "caption": ["", "fine one"]},
    ], ensure_ascii=False), encoding="utf-8")
    samples, stats = load_caption_json([ann])
    assert [s.image.rsplit("/", 1)[1] for s in samples] == ["c.jpg", "d.jpg", "e.jpg"]
    assert stats.samples_skipped == 2 and stats.empty_captions_dropped == 3
    assert len(samples[0].captions[0].split()) == 30  # overlong: cut to max_words ...
    ids = build_tokenizer(None, 25).encode(samples[0].captions[0]).ids
    assert len(ids) == 25  # ... and to max_text_len tokens
    non_ascii = build_tokenizer(None, 25).encode(samples[1].captions[0]).ids
    assert len(non_ascii) > 5 and non_ascii.count(UNK_ID) <= 2  # kept, tokenised (the emoji may be [UNK])


def test_non_utf8_annotation_refused(tmp_path):
    ann = tmp_path / "latin1.json"
    ann.write_bytes('[{"image": "a.jpg", "caption": "café"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.json.*UTF-8"):
        load_caption_json([ann])
