"""Sources: webdataset shards (indexed for random access) against the webdataset library's own reader,
cut and non-tar shards, brace patterns, weighted mixtures, and exact resume over mixed tar + JSON data."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from albef_fast.data.dataset import (
    MixtureBatchSampler,
    PretrainDataset,
    ResumableBatchSampler,
    build_pretrain_loader,
    load_sources,
)
from albef_fast.data.images import read_image_bytes
from albef_fast.data.sources import Mixture, ShardStats, index_shard
from albef_fast.data.transforms import ImageTransform


def _jpeg(seed: int, w: int = 40, h: int = 30) -> bytes:
    arr = np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shard(path, start: int, n: int, *, json_caption_every: int = 0) -> list[dict]:
    """n samples; every json_caption_every-th gets its caption only from a .json member (img2dataset style)."""
    written = []
    with wds.TarWriter(str(path)) as sink:
        for i in range(start, start + n):
            sample = {"__key__": f"{i:06d}", "jpg": _jpeg(i)}
            caption = f"Shard caption {i}, with CAPS!"
            if json_caption_every and i % json_caption_every == 0:
                sample["json"] = json.dumps({"caption": caption, "url": "x"}).encode()
            else:
                sample["txt"] = caption
            sink.write(sample)
            written.append(sample)
    return written


def test_index_matches_webdataset_reader(tmp_path):
    shard = tmp_path / "s-000.tar"
    write_shard(shard, 0, 7, json_caption_every=3)
    stats = ShardStats()
    indexed = index_shard(shard, stats=stats)
    reference = list(wds.WebDataset(str(shard), shardshuffle=False))  # the library's own streaming reader
    assert len(indexed) == len(reference) == 7 and stats.samples == 7
    for (captions, offset, size), ref in zip(indexed, reference):
        assert read_image_bytes(str(shard), (offset, size)) == ref["jpg"]
        raw = ref["txt"].decode() if "txt" in ref else json.loads(ref["json"])["caption"]
        assert captions == (raw.lower().replace(",", "").replace("!", ""),)


def test_shard_cut_in_a_member_keeps_complete_samples(tmp_path):
    shard = tmp_path / "cut.tar"
    write_shard(shard, 0, 6)
    data = shard.read_bytes()
    whole = index_shard(shard)
    # Cut in the middle of the 4th sample's image data.
    cut_at = whole[3][1] + whole[3][2] // 2
    shard.write_bytes(data[:cut_at])
    stats = ShardStats()
    kept = index_shard(shard, stats=stats)
    assert kept == whole[:3] and stats.truncated_shards == [str(shard)] and stats.incomplete_samples == 1
    # Cut inside a header block, too.
    shard.write_bytes(data[: whole[2][1] + whole[2][2] + 700])
    stats = ShardStats()
    kept = index_shard(shard, stats=stats)
    assert len(kept) == 2 and stats.incomplete_samples == 1 and len(stats.truncated_shards) == 1


def _cache_files(folder):
    return sorted(folder.glob("*.json"))


def test_index_cache_reused_then_invalidated_when_the_shard_changes(tmp_path, monkeypatch):
    import os

    from albef_fast.data import sources

    shard, cache = tmp_path / "s-000.tar", tmp_path / "cache"
    write_shard(shard, 0, 5, json_caption_every=2)
    first_stats = ShardStats()
    first = index_shard(shard, stats=first_stats, cache_dir=cache)
    assert len(_cache_files(cache)) == 1

    reads = []
    real = sources._index_tar
    monkeypatch.setattr(sources, "_index_tar", lambda *a: reads.append(a[0]) or real(*a))
    again_stats = ShardStats()
    assert index_shard(shard, stats=again_stats, cache_dir=cache) == first and reads == []  # from the cache
    assert again_stats == first_stats  # the shard's counts come back with it
    assert index_shard(shard, max_words=3, cache_dir=cache) != first and reads == [shard]  # other max_words
    reads.clear()

    # Same size, new mtime (rewritten in place with other captions): re-indexed, and the entry replaced.
    st = shard.stat()
    with open(shard, "r+b") as f:
        data = f.read().replace(b"Shard caption 1,", b"Other caption 1,")
        f.seek(0)
        f.write(data)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert shard.stat().st_size == st.st_size
    changed = index_shard(shard, cache_dir=cache)
    assert reads == [shard] and changed[1][0] == ("other caption 1 with caps",) and changed[0] == first[0]
    assert index_shard(shard, cache_dir=cache) == changed and reads == [shard]  # the new entry is used

    # Other samples appended (new size): re-indexed.
    write_shard(shard, 0, 6)
    assert len(index_shard(shard, cache_dir=cache)) == 6 and len(reads) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_form", "empty"])
def test_corrupt_index_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    shard, cache = tmp_path / "s-000.tar", tmp_path / "cache"
    write_shard(shard, 0, 4)
    expected = index_shard(shard, cache_dir=cache)
    (entry,) = _cache_files(cache)
    text = entry.read_text()
    entry.write_text({"garbage": "\x00not json", "truncated": text[: len(text) // 2], "empty": "",
                      "wrong_form": text.replace('"samples": [[', '"samples": [[7, ')}[damage])
    with caplog.at_level("WARNING", logger="albef_fast"):
        assert index_shard(shard, cache_dir=cache) == expected
    assert "unreadable" in caplog.text and "re-indexing" in caplog.text and str(entry) in caplog.text
    caplog.clear()
    assert index_shard(shard, cache_dir=cache) == expected and "unreadable" not in caplog.text  # rewritten


def test_index_cache_keeps_a_cut_shard_counted(tmp_path, caplog):
    shard, cache = tmp_path / "cut.tar", tmp_path / "cache"
    write_shard(shard, 0, 4)
    _, offset, size = index_shard(shard)[2]
    shard.write_bytes(shard.read_bytes()[: offset + size // 2])  # cut inside the third image
    fresh, cached = ShardStats(), ShardStats()
    out = index_shard(shard, stats=fresh, cache_dir=cache)
    with caplog.at_level("WARNING", logger="albef_fast"):
        assert index_shard(shard, stats=cached, cache_dir=cache) == out
    assert cached == fresh and cached.truncated_shards == [str(shard)] and cached.incomplete_samples == 1
    assert len(out) == 2 and "cut in the middle" in caplog.text


def test_unwritable_index_cache_only_warns(tmp_path, caplog):
    shard, blocker = tmp_path / "s.tar", tmp_path / "file"
    write_shard(shard, 0, 3)
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level("WARNING", logger="albef_fast"):
        assert len(index_shard(shard, cache_dir=blocker / "cache")) == 3
    assert "could not write the shard index cache" in caplog.text


def test_load_sources_uses_the_index_cache(tmp_path):
    for k in range(2):
        write_shard(tmp_path / f"s-{k:03d}.tar", 10 * k, 3)
    spec = str(tmp_path / "s-{000..001}.tar")
    plain = load_sources([spec])
    cached = load_sources([spec], index_cache=tmp_path / "cache")
    assert len(_cache_files(tmp_path / "cache")) == 2
    again = load_sources([spec], index_cache=tmp_path / "cache")
    assert plain.samples == cached.samples == again.samples and plain.shard_stats == again.shard_stats


def test_not_a_tar_and_missing_shard_refused(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ValueError, match="bad.tar.*not a tar"):
        index_shard(bad)
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        index_shard(tmp_path / "nope.tar")


def test_shard_samples_without_image_or_caption_counted(tmp_path):
    shard = tmp_path / "odd.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "a", "jpg": _jpeg(0), "txt": "fine"})
        sink.write({"__key__": "b", "txt": "caption only"})
        sink.write({"__key__": "c", "jpg": _jpeg(1)})
        sink.write({"__key__": "d", "jpg": _jpeg(2), "txt": "   ...  "})
        sink.write({"__key__": "e", "jpg": _jpeg(3), "json": b"{not json"})
    stats = ShardStats()
    kept = index_shard(shard, stats=stats)
    assert [c for c, _, _ in kept] == [("fine",)]
    assert (stats.no_image, stats.no_caption, stats.empty_captions_dropped, stats.bad_caption_json) == (1, 3, 1, 1)


def test_load_sources_brace_pattern_and_json(tmp_path):
    for k in range(3):
        write_shard(tmp_path / f"part-{k:03d}.tar", 10 * k, 4)
    img = tmp_path / "j.jpg"
    img.write_bytes(_jpeg(99))
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps([{"image": "j.jpg", "caption": ["One", "Two"]}]))
    src = load_sources([str(tmp_path / "part-{000..002}.tar"), str(ann)])
    assert src.sizes == [12, 1] and src.shard_stats.shards == 3 and src.json_stats.files == 1
    assert src.samples[-1].captions == ("one", "two") and src.samples[-1].member is None
    assert src.samples[5].member is not None and src.samples[5].image.endswith("part-001.tar")
    with pytest.raises(ValueError, match="mixes"):
        load_sources([str(tmp_path / "{part-000.tar,a.json}")])


def test_mixture_counts_and_determinism():
    mix = Mixture([10, 1000, 50], [1.0, 1.0, 2.0], epoch_size=400, seed=3)
    assert mix.counts == [100, 100, 200]
    order = mix.order(0)
    assert len(order) == 400 and torch.equal(order, mix.order(0)) and not torch.equal(order, mix.order(1))
    src = np.searchsorted(np.array(mix.offsets[1:]), order.numpy(), side="right")
    assert np.bincount(src).tolist() == [100, 100, 200]
    small = order[src == 0]
    assert np.bincount(small.numpy(), minlength=10).tolist() == [10] * 10  # 10 whole passes over source 0
    big = order[src == 1]
    assert len(set(big.tolist())) == 100  # a subsample without repeats
    assert set(big.tolist()) != set(mix.order(1)[np.searchsorted(np.array(mix.offsets[1:]), mix.order(1).numpy(),
                                                                  side="right") == 1].tolist())
    with pytest.raises(ValueError, match="weight"):
        Mixture([5, 5], [1.0])
    with pytest.raises(ValueError, match="> 0"):
        Mixture([5, 5], [1.0, 0.0])


def test_mixture_sampler_ranks_and_resume():
    mix = Mixture([30, 7], [3.0, 1.0], seed=5)
    single = list(MixtureBatchSampler(mix, 6, seed=5))
    ranks = [list(MixtureBatchSampler(mix, 3, seed=5, rank=r, world_size=2)) for r in range(2)]
    for k, batch in enumerate(single):
        assert [p for pair in zip(ranks[0][k], ranks[1][k]) for p in pair] == batch
    resumed = MixtureBatchSampler(mix, 6, seed=5)
    resumed.set_epoch(0, 2)
    assert list(resumed) == single[2:]


def test_loader_over_shards_and_json_resumes_exactly(tmp_path):
    write_shard(tmp_path / "t-000.tar", 0, 9)
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    entries = []
    for i in range(4):
        (img_dir / f"{i}.jpg").write_bytes(_jpeg(50 + i))
        entries.append({"image": f"img/{i}.jpg", "caption": f"json sample {i}"})
    (tmp_path / "a.json").write_text(json.dumps(entries))
    src = load_sources([str(tmp_path / "t-000.tar"), str(tmp_path / "a.json")])
    ds = PretrainDataset(src.samples, ImageTransform(16, "pretrain"), max_text_len=10)
    sampler = MixtureBatchSampler(Mixture(src.sizes, [1.0, 1.0], seed=1), 3, seed=1)
    loader = build_pretrain_loader(ds, sampler, num_workers=0, pin_memory=False)
    sampler.set_epoch(1)
    full = list(loader)
    sampler.set_epoch(1, 2)
    tail = list(loader)
    assert len(full) == 4 and len(tail) == 2
    for a, b in zip(full[2:], tail):
        assert torch.equal(a.image, b.image) and torch.equal(a.text_ids, b.text_ids)
    plain = ResumableBatchSampler(len(ds), 3, seed=1)
    assert len(plain) == 4
