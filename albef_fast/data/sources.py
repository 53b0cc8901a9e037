"""Training-data sources: ALBEF JSON files and webdataset tar shards, read into one random-access sample
table, plus the weighted mixture of several sources (REFERENCE §3.2).

Why random access for tar shards. webdataset's own pipeline streams shards through a shuffle buffer,
so the data of step k depend on the buffer's history and a resumed run cannot replay them. Here each
shard is *indexed* once at start with the standard library's `tarfile` (one header read per member,
the image bytes are not read; the small caption members are): every sample becomes (shard, byte
offset, byte length) and the resumable sampler of `dataset.py` shuffles, shards across ranks and
workers, and resumes tar data exactly as it does JSON data. Member names are split into
(key, extension) with webdataset's own `base_plus_ext`, so the grouping is the library's convention
(``a/b/000123.jpg`` + ``a/b/000123.txt`` -> one sample ``a/b/000123``).

A webdataset sample needs one image member (jpg, jpeg, png, webp, bmp, tif, tiff) and a caption:
``txt`` (the whole text is one caption) or, if there is no txt, ``json`` with a "caption" (str or
list of str) as img2dataset writes it. Captions are cleaned at index time exactly as for JSON files
(`pre_caption`); empty ones are dropped and counted.

Index cache. Indexing reads every tar header (and the caption members), which takes long at 14M samples
on network storage, so `index_shard(..., cache_dir=...)` keeps each shard's index as one JSON file under
`cache_dir`, named by a hash of (absolute path, max_words, cache format) and holding the shard's byte size
and mtime (ns). A cached index is used only when path, size and mtime all match; a shard that changed is
re-indexed and its entry rewritten (atomically: written to a temporary file, then renamed); an entry that
cannot be read or does not have the expected form is rebuilt with a warning. An unwritable cache folder
costs a warning and the index is kept in memory only.

A shard cut in the middle of a member (an interrupted download or copy) keeps every complete sample
before the cut; the incomplete sample is skipped, counted and named in a warning. A path that is not
a tar archive at all is refused at start.

Mixing. `Mixture` fixes the composition of an epoch: source s contributes ``round(w_s * N)`` samples
(largest-remainder rounding, N = the summed source sizes), drawn as whole shuffled passes over that
source (so an up-weighted small source repeats, a down-weighted large one is subsampled and a
different subset is seen each epoch), and the concatenation is shuffled. Every draw comes from a
generator seeded by (seed, epoch, source, pass), so an epoch's order is a pure function of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from albef_fast.data.captions import pre_caption

log = logging.getLogger("albef_fast")

__all__ = ["IMAGE_EXTENSIONS", "Mixture", "ShardStats", "expand_sources", "index_shard", "is_shard"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def is_shard(path: str | Path) -> bool:
    """True for a webdataset shard name (``.tar``); everything else is read as ALBEF JSON."""
    return str(path).endswith(".tar")


def expand_sources(spec: str) -> list[str]:
    """Expand one `data.train_files` entry into its files: brace patterns as webdataset writes them
    (``shards/{000000..000099}.tar``, via the `braceexpand` package webdataset depends on).

    Args:
        spec: a path or a brace pattern.
    Returns:
        the paths, in order (one path when there is no brace).
    """
    if "{" not in spec:
        return [spec]
    from braceexpand import braceexpand

    return list(braceexpand(spec))


@dataclass
class ShardStats:
    """What indexing the tar shards kept and dropped."""

    shards: int = 0
    samples: int = 0
    """Samples kept (image + non-empty caption)."""
    no_image: int = 0
    """Keys with a caption but no image member."""
    no_caption: int = 0
    """Keys with an image but no txt/json caption, or only captions that clean to ""."""
    empty_captions_dropped: int = 0
    bad_caption_json: int = 0
    """json members that are not JSON or have no usable "caption" (and no txt)."""
    truncated_shards: list[str] = field(default_factory=list)
    """Shards that end in the middle of a member (the samples before the cut are kept)."""
    incomplete_samples: int = 0
    """Samples lost at such a cut."""


def _captions_from(ext_data: dict[str, bytes], stats: ShardStats) -> list[str] | None:
    if "txt" in ext_data:
        return [ext_data["txt"].decode("utf-8", errors="replace")]
    if "json" in ext_data:
        try:
            meta = json.loads(ext_data["json"])
            caption = meta["caption"] if isinstance(meta, dict) else None
        except (ValueError, KeyError):
            caption = None
        if isinstance(caption, str):
            return [caption]
        if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
            return caption
        stats.bad_caption_json += 1
    return None


ShardIndex = list[tuple[tuple[str, ...], int, int]]
CACHE_FORMAT = 1  # bump when the cached content or its meaning changes: old entries are then not found


def index_shard(
    path: str | Path, *, max_words: int = 30, stats: ShardStats | None = None, cache_dir: str | Path | None = None
) -> ShardIndex:
    """Index one webdataset tar shard (or read its index from `cache_dir`).

    Args:
        path: the .tar file.
        max_words: `pre_caption` word limit.
        stats: counters to add to (a fresh one when None); a cached index restores the shard's counts too.
        cache_dir: folder of the index cache (created if needed); None: no cache.
    Returns:
        one (cleaned captions, image byte offset, image byte length) per usable sample, in tar order.
    Raises:
        FileNotFoundError: the shard does not exist.
        ValueError: the file is not a tar archive (named).
    """
    path = Path(path)
    stats = stats if stats is not None else ShardStats()
    if not path.is_file():
        raise FileNotFoundError(f"webdataset shard {path} does not exist (or is not a file)")
    st = path.stat()
    key = {"format": CACHE_FORMAT, "path": str(path.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "max_words": max_words}
    cache = None
    if cache_dir is not None:
        name = hashlib.blake2b(f"{key['path']}|{max_words}|{CACHE_FORMAT}".encode(), digest_size=12).hexdigest()
        cache = Path(cache_dir).expanduser() / f"{name}.json"
    found = _read_cached(cache, key) if cache is not None and cache.exists() else None
    if found is not None:
        out, local = found
        if local.truncated_shards:
            log.warning("%s is cut in the middle of a member (index cache): %d complete samples before the cut",
                        path, len(out))
    else:
        local = ShardStats()
        out = _index_tar(path, max_words, local, st.st_size)
        if cache is not None:
            _write_cached(cache, key, out, local)
    for f in dataclasses.fields(ShardStats):
        setattr(stats, f.name, getattr(stats, f.name) + getattr(local, f.name))
    return out


def _read_cached(cache: Path, key: dict[str, Any]) -> tuple[ShardIndex, ShardStats] | None:
    """The cached index if `cache` holds one for exactly `key`; None if it is stale; rebuilt if corrupt."""
    try:
        entry = json.loads(cache.read_text(encoding="utf-8"))
        if entry["key"] != key:
            return None  # the shard changed (size or mtime), or a hash collision: re-index
        samples = [(tuple(c), int(o), int(n)) for c, o, n in entry["samples"]]
        if not all(isinstance(x, str) for c, _, _ in samples for x in c):
            raise TypeError("a caption is not a string")
        stats = ShardStats(**entry["stats"])
        if stats.samples != len(samples):
            raise ValueError(f"{stats.samples} samples counted, {len(samples)} stored")
        return samples, stats
    except (OSError, ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        log.warning("shard index cache %s for %s is unreadable (%s: %s); re-indexing the shard", cache, key["path"],
                    type(e).__name__, e)
        return None


def _write_cached(cache: Path, key: dict[str, Any], samples: ShardIndex, stats: ShardStats) -> None:
    entry = {"key": key, "stats": dataclasses.asdict(stats), "samples": [[list(c), o, n] for c, o, n in samples]}
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entry), encoding="utf-8")
        os.replace(tmp, cache)  # atomic: a reader sees the old entry or the new one, never half a file
    except OSError as e:
        log.warning("could not write the shard index cache %s (%s); the index is kept in memory only", cache, e)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _index_tar(path: Path, max_words: int, stats: ShardStats, file_size: int) -> ShardIndex:
    """Read the tar headers (and caption members) of one shard; see `index_shard`."""
    from webdataset.tariterators import base_plus_ext

    groups: dict[str, dict[str, Any]] = {}  # key -> {ext: (offset, size) for images, bytes for captions}
    order: list[str] = []
    truncated = False
    cut_key: str | None = None  # the sample whose member's data the cut runs through
    try:
        with tarfile.open(path, mode="r:") as tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.ReadError as e:  # a header cut in the middle, or garbage after a cut
                    if tar.offset == 0:
                        raise
                    truncated = True
                    log.debug("%s: stops at byte %d: %s", path, tar.offset, e)
                    break
                if member is None:
                    # tarfile also ends quietly on a header cut short: a complete archive ends in a zero block.
                    tar.fileobj.seek(tar.offset)
                    if tar.fileobj.read(512) != bytes(512):
                        truncated = True
                    break
                if not member.isfile():
                    continue
                key, ext = base_plus_ext(member.name)
                if member.offset_data + member.size > file_size:  # the member's data is cut
                    truncated, cut_key = True, key
                    break
                if key is None or ext is None:
                    continue
                ext = ext.lower()
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                if ext in IMAGE_EXTENSIONS:
                    groups[key].setdefault("image", (member.offset_data, member.size))
                elif ext in ("txt", "json"):
                    f = tar.extractfile(member)
                    groups[key][ext] = f.read() if f is not None else b""
    except tarfile.ReadError as e:
        raise ValueError(f"{path}: not a tar archive ({e}); webdataset shards must be uncompressed .tar files") from e

    out: list[tuple[tuple[str, ...], int, int]] = []
    for key in order:
        parts = groups[key]
        if key == cut_key:
            stats.incomplete_samples += 1
            continue
        raw = _captions_from(parts, stats)
        if "image" not in parts:
            stats.no_image += 1
            continue
        captions = []
        for c in raw or []:
            cleaned = pre_caption(c, max_words)
            if cleaned:
                captions.append(cleaned)
            else:
                stats.empty_captions_dropped += 1
        if not captions:
            stats.no_caption += 1
            continue
        offset, size = parts["image"]
        out.append((tuple(captions), offset, size))
    if truncated:
        if cut_key is not None and cut_key not in groups:
            stats.incomplete_samples += 1  # its first member is the one cut
        elif cut_key is None and order and ("image" not in groups[order[-1]] or
                                            not ({"txt", "json"} & groups[order[-1]].keys())):
            stats.incomplete_samples += 1  # cut in a header: the last sample lost members behind the cut
            stats.no_image -= "image" not in groups[order[-1]]
            stats.no_caption -= "image" in groups[order[-1]]
        stats.truncated_shards.append(str(path))
        log.warning("%s is cut in the middle of a member (%d bytes): kept the %d complete samples before the "
                    "cut, skipped the incomplete one", path, file_size, len(out))
    stats.shards += 1
    stats.samples += len(out)
    return out


def _allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` into integer parts proportional to `weights` (largest remainder, ties to the first)."""
    norm = sum(weights)
    exact = [total * w / norm for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


class Mixture:
    """The order of an epoch over several sources mixed with weights.

    Args:
        sizes: samples per source (m_s > 0); global index = offset_s + local index, sources in order.
        weights: one weight > 0 per source (any scale; normalised here).
        epoch_size: samples per epoch N; default sum(sizes).
        seed: run seed.
    """

    def __init__(
        self, sizes: Sequence[int], weights: Sequence[float], *, epoch_size: int | None = None, seed: int = 42
    ) -> None:
        if len(sizes) != len(weights):
            raise ValueError(f"need one weight per source: {len(sizes)} sources, {len(weights)} weights {list(weights)}")
        if any(m <= 0 for m in sizes):
            raise ValueError(f"every source needs at least one sample, got sizes {list(sizes)}")
        if any(not (w > 0 and math.isfinite(w)) for w in weights):
            raise ValueError(f"source weights must be finite and > 0, got {list(weights)}")
        self.sizes = [int(m) for m in sizes]
        self.offsets = [0]
        for m in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + m)
        self.epoch_size = int(epoch_size) if epoch_size is not None else sum(self.sizes)
        if self.epoch_size <= 0:
            raise ValueError(f"epoch_size must be > 0, got {epoch_size}")
        self.counts = _allocate(self.epoch_size, weights)
        self.seed = seed

    def order(self, epoch: int) -> Tensor:
        """(N,) int64 global sample indices of epoch `epoch`, in the order they are used."""
        from albef_fast.data.dataset import derive_seed  # dataset imports this module

        parts = []
        for s, (m, offset, count) in enumerate(zip(self.sizes, self.offsets, self.counts)):
            passes = []
            for p in range(math.ceil(count / m)):
                g = torch.Generator().manual_seed(derive_seed("mix", self.seed, epoch, s, p))
                passes.append(torch.randperm(m, generator=g))
            if passes:
                parts.append(torch.cat(passes)[:count] + offset)
        g = torch.Generator().manual_seed(derive_seed("mix-order", self.seed, epoch))
        joined = torch.cat(parts)
        return joined[torch.randperm(len(joined), generator=g)]
