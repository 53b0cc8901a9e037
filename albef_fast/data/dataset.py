"""Pretraining data: ALBEF-format caption JSON, a resumable sampler, the dataset, collation, the loader,
and the retrieval-evaluation item list (REFERENCE §3.2, §4.2).

Reproducibility design. ALBEF draws augmentation, caption choice and MLM masks from global RNGs (numpy
and torch in the loader workers, the main process's CPU generator for masking), so a step's data depend
on the worker count and cannot be replayed after a restart. Here the sampler hands out
``(sample_index, sample_seed)`` pairs, where the seed is a hash of ``(seed, epoch, position in the epoch's
permutation)``; the dataset derives every random draw of that sample from the seed alone. Hence a given
(epoch, step) produces bit-identical batches whether the run was interrupted or not and for any
``num_workers``; `ResumableBatchSampler.set_epoch(epoch, start_batch)` resumes mid-epoch.

Memory design. A 14M-sample list of Python objects in a Dataset is slowly copied into every forked
worker (reference-count writes defeat copy-on-write). `PretrainDataset` therefore stores image paths and
captions as UTF-8 bytes in a few numpy arrays (a handful of Python objects in all).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from albef_fast.data.batch import Batch
from albef_fast.data.captions import PAD_ID, build_tokenizer, pre_caption
from albef_fast.data.images import BadSampleError, ImageReadError, decode_rgb, encoded_image, read_image_bytes
from albef_fast.data.masking import mask_tokens
from albef_fast.data.quality import DataEvents
from albef_fast.data.sources import Mixture, ShardStats, expand_sources, index_shard, is_shard
from albef_fast.data.transforms import AugParams, ImageTransform, draw_pretrain_params

__all__ = [
    "BadDataError",
    "BadSampleError",
    "EncodedBatch",
    "MixtureBatchSampler",
    "SourceSet",
    "encoded_image",
    "load_sources",
    "EvalItems",
    "ImageReadError",
    "LoadStats",
    "PretrainDataset",
    "ResumableBatchSampler",
    "Sample",
    "build_eval_items",
    "build_pretrain_loader",
    "collate",
    "derive_seed",
    "load_caption_json",
]


# --------------------------------------------------------------------------------------------- seeds


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a fixed function of `parts` (same value in every process, Python and OS;
    unlike `hash()`, which is salted per process for strings).

    Args:
        parts: ints and short string tags, e.g. ("sample", seed, epoch, position).
    Returns:
        int in [0, 2**63).
    """
    # int() first: numpy 2 integers repr as "np.int64(42)" and would hash differently from 42.
    canonical = tuple(p if isinstance(p, str) else int(p) for p in parts)
    digest = hashlib.blake2b(repr(canonical).encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# ------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True, slots=True)
class Sample:
    """One image with its cleaned captions (at least one, none empty)."""

    image: str
    """Image path; relative paths of the JSON have been joined to its folder (kept as str: Path objects
    cost several times the memory at 14M samples). For a webdataset sample: the shard's path."""
    captions: tuple[str, ...]
    member: tuple[int, int] | None = None
    """For a webdataset sample: (byte offset, byte length) of the image member inside the shard."""


@dataclass
class LoadStats:
    """What `load_caption_json` kept and dropped, summed over the files."""

    files: int = 0
    entries: int = 0
    """JSON entries read."""
    kept: int = 0
    """Samples returned."""
    captions_kept: int = 0
    empty_captions_dropped: int = 0
    """Captions that clean to the empty string (e.g. whitespace or punctuation only)."""
    samples_skipped: int = 0
    """Entries left with no caption (empty caption list, or every caption empty after cleaning)."""


def _read_json_list(path: Path) -> list[Any]:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist (or is not a file)")
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text at byte {e.start}: {e.reason}") from e
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a JSON list of {{'image', 'caption'}} entries, got {type(data).__name__}"
        )
    return data


def _parse_entry(entry: Any, index: int, path: Path) -> tuple[str, list[str]]:
    """Validate one ALBEF entry; returns (image, raw captions as a list)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: entry {index} is a {type(entry).__name__}, expected an object")
    for key in ("image", "caption"):
        if key not in entry:
            raise ValueError(f"{path}: entry {index} has no {key!r} key (keys: {sorted(entry)})")
    image, caption = entry["image"], entry["caption"]
    if not isinstance(image, str) or not image:
        raise ValueError(f"{path}: entry {index}: 'image' must be a non-empty string, got {image!r}")
    if isinstance(caption, str):
        return image, [caption]
    if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        return image, caption
    raise ValueError(
        f"{path}: entry {index}: 'caption' must be a string or a list of strings, got {caption!r}"
    )


def _resolve(image: str, root: Path) -> str:
    p = Path(image)
    return str(p if p.is_absolute() else root / p)


def load_caption_json(
    paths: Sequence[str | Path], *, max_words: int = 30, image_root: str | Path | None = None
) -> tuple[list[Sample], LoadStats]:
    """Read ALBEF pretraining annotation files.

    Each file is a JSON list of ``{"image": str, "caption": str | list[str], ...}`` (extra keys ignored).
    Captions are cleaned with `pre_caption(c, max_words)`; captions that clean to "" are dropped and
    counted, and an entry left with no caption is skipped and counted.

    Args:
        paths: annotation files, read in order.
        max_words: `pre_caption` word limit (ALBEF: 30).
        image_root: folder that relative image paths are joined to; default: each JSON file's folder.
    Returns:
        samples: one `Sample` per kept entry, in file order.
        stats: totals over all files.
    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: malformed JSON (file, line, column), a bad entry (file, entry index), or a file with
            no usable sample (named).
    """
    samples: list[Sample] = []
    stats = LoadStats()
    for raw_path in paths:
        path = Path(raw_path)
        data = _read_json_list(path)
        # absolute() (not resolve()) so that a symlinked JSON keeps its images next to the link.
        root = Path(image_root) if image_root is not None else path.absolute().parent
        kept_before = len(samples)
        stats.files += 1
        stats.entries += len(data)
        for index, entry in enumerate(data):
            image, raw_captions = _parse_entry(entry, index, path)
            captions = []
            for raw in raw_captions:
                cleaned = pre_caption(raw, max_words)
                if cleaned:
                    captions.append(cleaned)
                else:
                    stats.empty_captions_dropped += 1
            if not captions:
                stats.samples_skipped += 1
                continue
            samples.append(Sample(_resolve(image, root), tuple(captions)))
            stats.captions_kept += len(captions)
        if len(samples) == kept_before:
            raise ValueError(f"{path}: no usable sample ({len(data)} entries, none with a non-empty caption)")
    stats.kept = len(samples)
    return samples, stats


@dataclass
class SourceSet:
    """Samples of several sources, concatenated in source order (see `load_sources`)."""

    samples: list[Sample]
    sizes: list[int]
    """Samples per source, in order."""
    names: list[str]
    """The `train_files` entry of each source."""
    json_stats: LoadStats
    shard_stats: ShardStats


def load_sources(
    specs: Sequence[str | Path], *, max_words: int = 30, image_root: str | Path | None = None,
    index_cache: str | Path | None = None,
) -> SourceSet:
    """Read every training source: each entry is an ALBEF JSON file or webdataset shards (a .tar path or
    a brace pattern such as ``data/{000000..000099}.tar``; `sources.py`).

    Args:
        specs: the `data.train_files` entries; each is one source for the mixture weights.
        max_words: `pre_caption` word limit.
        image_root: folder for relative JSON image paths (default: each JSON file's folder).
        index_cache: folder of the shard index cache (`sources.index_shard`); None: index every start.
    Returns:
        SourceSet with the samples of all sources concatenated in order.
    Raises:
        FileNotFoundError, ValueError: a missing, malformed or empty source, named.
    """
    samples: list[Sample] = []
    sizes: list[int] = []
    json_stats, shard_stats = LoadStats(), ShardStats()
    for spec in specs:
        before = len(samples)
        files = expand_sources(str(spec))
        if all(is_shard(f) for f in files):
            for f in files:
                for captions, offset, size in index_shard(f, max_words=max_words, stats=shard_stats,
                                                            cache_dir=index_cache):
                    samples.append(Sample(str(Path(f).absolute()), captions, (offset, size)))
        elif not any(is_shard(f) for f in files):
            found, stats = load_caption_json(files, max_words=max_words, image_root=image_root)
            samples.extend(found)
            for name in ("files", "entries", "kept", "captions_kept", "empty_captions_dropped", "samples_skipped"):
                setattr(json_stats, name, getattr(json_stats, name) + getattr(stats, name))
        else:
            raise ValueError(f"source {spec!r} mixes .tar shards and JSON files; give them as separate entries")
        if len(samples) == before:
            raise ValueError(f"source {spec!r} has no usable sample")
        sizes.append(len(samples) - before)
    if not samples:
        raise ValueError("no training source given (data.train_files is empty)")
    return SourceSet(samples, sizes, [str(s) for s in specs], json_stats, shard_stats)


class EvalItems(NamedTuple):
    """Retrieval-evaluation items (ALBEF `re_eval_dataset`). Unpacks as (images, captions, text_to_image)."""

    images: list[Path]
    """(N_img,) image paths, in file order."""
    captions: list[str]
    """(N_txt,) cleaned captions, flattened image by image."""
    text_to_image: list[int]
    """(N_txt,) index into `images` of each caption's image (the text->image ground truth)."""

    def image_to_texts(self) -> list[list[int]]:
        """(N_img,) lists of caption indices per image (the image->text ground truth), ascending."""
        out: list[list[int]] = [[] for _ in self.images]
        for t, i in enumerate(self.text_to_image):
            out[i].append(t)
        return out


def build_eval_items(
    path: str | Path, *, max_words: int = 30, image_root: str | Path | None = None
) -> EvalItems:
    """Flatten an ALBEF retrieval eval JSON (``[{"image": rel path, "caption": [str, ...]}, ...]``).

    As in ALBEF, every caption is kept even if it cleans to "" (dropping one would change the recall
    denominators) and an image with no caption stays in the gallery. Unlike ALBEF, a plain-string caption
    counts as one caption (ALBEF iterates it character by character, github issue #72).

    Args:
        path: eval annotation file.
        max_words: `pre_caption` word limit (ALBEF: 30).
        image_root: folder that relative image paths are joined to; default: the JSON file's folder.
    Returns:
        EvalItems(images (N_img,), captions (N_txt,), text_to_image (N_txt,)).
    """
    path = Path(path)
    data = _read_json_list(path)
    root = Path(image_root) if image_root is not None else path.absolute().parent
    images: list[Path] = []
    captions: list[str] = []
    text_to_image: list[int] = []
    for index, entry in enumerate(data):
        image, raw_captions = _parse_entry(entry, index, path)
        images.append(Path(_resolve(image, root)))
        for raw in raw_captions:
            captions.append(pre_caption(raw, max_words))
            text_to_image.append(index)
    if not images:
        raise ValueError(f"{path}: no image entry")
    return EvalItems(images, captions, text_to_image)


# ------------------------------------------------------------------------------------------- sampler


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches of ``(sample_index, sample_seed)`` with exact mid-epoch resume.

    Epoch e uses the permutation ``randperm(num_samples)`` of a torch.Generator seeded with
    ``derive_seed("perm", seed, e)``; the sample at permutation position p gets the seed
    ``derive_seed("sample", seed, e, p)``. Both are independent of rank, world size, batch size and
    num_workers, so the data of a step only depend on (seed, epoch, step) and the batch geometry.

    Multi-rank: global step k covers permutation positions ``[k*B*W, (k+1)*B*W)``; rank r takes every W-th
    of them starting at r (the striding of DistributedSampler). All ranks must use the same `seed`
    (ALBEF's per-rank seed 42 + rank must not be passed here). drop_last=True as in ALBEF: the tail
    ``num_samples % (B*W)`` of each permutation is not used that epoch.

    Args:
        num_samples: dataset size n.
        batch_size: per-rank batch size B.
        seed: run seed, shared by all ranks.
        rank, world_size: this process's rank r and the number of ranks W.
    """

    def __init__(
        self, num_samples: int, batch_size: int, *, seed: int = 42, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size * world_size > num_samples:
            raise ValueError(
                f"batch_size {batch_size} x world_size {world_size} is larger than the dataset "
                f"({num_samples} samples): with drop_last no batch would be produced"
            )
        super().__init__()
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0
        self._perm: tuple[int, Tensor] | None = None  # (epoch, permutation) cache

    def __len__(self) -> int:
        """Batches in a full epoch, n // (B*W), whatever `start_batch` is (schedules count on it)."""
        return self.num_samples // (self.batch_size * self.world_size)

    @property
    def remaining(self) -> int:
        """Batches the next iteration yields: len(self) - start_batch."""
        return len(self) - self.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and the first batch of the next iteration.

        Call before every `iter(loader)` (with persistent workers too: the batch sampler is iterated in the
        main process each time). The setting stays until the next call, so iterating twice without it
        repeats the same batches. To resume after `k` completed steps of `epoch`: `set_epoch(epoch, k)`.

        Args:
            epoch: epoch number (>= 0).
            start_batch: batch index in [0, len(self)] to start from.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def permutation(self, epoch: int) -> Tensor:
        """(n,) int64 permutation of epoch `epoch` (cached for the last epoch asked)."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed("perm", self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.num_samples, generator=g))
        return self._perm[1]

    def sample_seed(self, epoch: int, position: int) -> int:
        """Seed of the sample at `position` of epoch `epoch`'s permutation."""
        return derive_seed("sample", self.seed, epoch, position)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, B, W, r = self.epoch, self.batch_size, self.world_size, self.rank
        perm = self.permutation(epoch)
        for k in range(self.start_batch, len(self)):
            base = k * B * W
            positions = range(base + r, base + B * W, W)
            indices = perm[base + r : base + B * W : W].tolist()
            yield [(i, self.sample_seed(epoch, p)) for i, p in zip(indices, positions)]


class MixtureBatchSampler(ResumableBatchSampler):
    """`ResumableBatchSampler` over a weighted mixture of sources: the epoch's order is
    `Mixture.order(epoch)` (global sample indices, sources up- or down-sampled by their weights) instead
    of a plain permutation. Seeds, rank striding, workers and exact resume work as in the base class.

    Args:
        mixture: the sources' sizes and weights.
        batch_size, seed, rank, world_size: as `ResumableBatchSampler` (the mixture's own seed is used
            for the order; pass the same run seed to both).
    """

    def __init__(self, mixture: Mixture, batch_size: int, *, seed: int = 42, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(mixture.epoch_size, batch_size, seed=seed, rank=rank, world_size=world_size)
        self.mixture = mixture

    def permutation(self, epoch: int) -> Tensor:
        """(N,) int64 global sample indices of epoch `epoch` (cached for the last epoch asked)."""
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, self.mixture.order(epoch))
        return self._perm[1]


# ------------------------------------------------------------------------------------------- dataset


class BadDataError(RuntimeError):
    """So many samples in a row were unusable that the data, not a stray file, must be broken."""


# A bad sample is replaced by another one drawn from its seed; after this many bad replacements in a row
# the run stops with BadDataError (with ~50 % of the images bad this happens once in ~4,000 samples).
MAX_REPLACEMENTS = 12


class _StringTable:
    """Strings packed as UTF-8 into one bytes buffer + an offsets array (no per-string Python object)."""

    def __init__(self, strings: Sequence[str]):
        encoded = [s.encode("utf-8") for s in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")


ImageMode = Literal["decoded", "encoded"]


class PretrainDataset(Dataset):
    """Map-style pretraining dataset indexed by ``(sample_index, sample_seed)`` (see `ResumableBatchSampler`).

    From the sample seed three independent streams are derived: a `random.Random` for the caption choice
    (uniform over the sample's captions, as ALBEF's `random.choice`), one for the image augmentation, and a
    CPU torch.Generator for the MLM mask. Nothing reads global RNG state, so worker seeding is irrelevant.

    Bad samples. A sample whose image cannot be used (missing, empty, corrupt, truncated, too large; see
    `images.py`) is replaced by the sample ``derive_seed("replace", seed, attempt) % n`` with the seed
    ``derive_seed("replace-seed", seed, attempt)``, and the event is counted in `events`. The choice is a
    pure function of the original seed, so the batch keeps its size and a resumed run replays the same
    replacement: nothing else in the stream moves. Only `MAX_REPLACEMENTS` bad ones in a row raise
    `BadDataError` (the data is broken, not a file).

    Args:
        samples: from `load_caption_json` / `load_sources`.
        transform: the image pipeline (its size and augment also drive the encoded mode).
        max_text_len: token limit including [CLS] (ALBEF pretraining: 25).
        mlm_probability: MLM selection rate (ALBEF: 0.15).
        vocab_path: bert-base-uncased vocab.txt; None = the default lookup of `captions.bert_vocab_path`.
        image_mode: "decoded": items carry the transformed image tensor (PIL backend); "encoded": items
            carry the validated encoded bytes and the drawn `AugParams` for the DALI stage.
        events: counters for bad/converted samples (a fresh one when None).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: ImageTransform,
        *,
        max_text_len: int = 25,
        mlm_probability: float = 0.15,
        vocab_path: str | Path | None = None,
        image_mode: ImageMode = "decoded",
        events: DataEvents | None = None,
    ) -> None:
        if len(samples) == 0:
            raise ValueError("PretrainDataset needs at least one sample")
        if image_mode not in ("decoded", "encoded"):
            raise ValueError(f"image_mode must be 'decoded' or 'encoded', got {image_mode!r}")
        self.transform = transform
        self.image_mode: ImageMode = image_mode
        self.max_text_len = max_text_len
        self.mlm_probability = mlm_probability
        self.vocab_path = str(vocab_path) if vocab_path is not None else None
        self.events = events if events is not None else DataEvents()
        # Paths are deduplicated (all samples of a shard share its path): one id per sample.
        path_ids: dict[str, int] = {}
        ids = [path_ids.setdefault(s.image, len(path_ids)) for s in samples]
        self._paths = _StringTable(list(path_ids))
        self._path_id = np.asarray(ids, dtype=np.int64)
        self._member = np.asarray([s.member if s.member is not None else (-1, -1) for s in samples], dtype=np.int64)
        self._captions = _StringTable([c for s in samples for c in s.captions])
        self._caption_offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum([len(s.captions) for s in samples], out=self._caption_offsets[1:])
        # JPEGs at least twice this side are decoded at reduced scale: RandomResizedCrop's smallest box
        # (area 0.2, ratio 3/4) spans 0.39 of the shorter side, which then still has >= size pixels.
        self._min_side = math.ceil(transform.size * (2.6 if transform.augment == "pretrain" else 1.0))
        # Build (and validate) the tokenizer now so a bad vocabulary fails here, not in a worker. Workers
        # rebuild it through the lru_cache (forked workers inherit the cache, spawned ones re-create it).
        build_tokenizer(self.vocab_path, self.max_text_len)

    def __len__(self) -> int:
        return len(self._path_id)

    def sample(self, index: int) -> Sample:
        """The `Sample` stored at `index`."""
        lo, hi = self._caption_offsets[index], self._caption_offsets[index + 1]
        offset, size = (int(x) for x in self._member[index])
        return Sample(self._paths[int(self._path_id[index])], tuple(self._captions[j] for j in range(lo, hi)),
                      None if offset < 0 else (offset, size))

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        """One sample (or its deterministic replacement if its image is bad).

        Args:
            key: (sample_index, sample_seed).
        Returns:
            dict with "text_ids" (L,) int64 ([CLS] first, L <= max_text_len), "mlm_ids" (L,) int64,
            "mlm_selected" (L,) bool, "index" int (of the sample actually used), and
            "image" (3, S, S) float32 (decoded mode) or "encoded" (n,) uint8 + "params" AugParams | None
            (encoded mode).
        """
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(
                f"PretrainDataset is indexed by (sample_index, sample_seed) tuples, got {key!r}: "
                "use ResumableBatchSampler as the loader's batch_sampler"
            )
        index, sample_seed = int(key[0]), int(key[1])
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        errors = []
        for attempt in range(MAX_REPLACEMENTS + 1):
            try:
                return self._load(index, sample_seed)
            except BadSampleError as e:
                errors.append(str(e))
                self.events.record(e.kind, str(e))
                self.events.record("replaced")
                index = derive_seed("replace", sample_seed, attempt) % len(self)
                sample_seed = derive_seed("replace-seed", sample_seed, attempt)
        raise BadDataError(f"{len(errors)} samples in a row had unusable images, so the data (not one file) looks "
                           f"broken; check the paths and files. The last ones: {'; '.join(errors[-3:])}")

    def load_image(self, index: int, sample_seed: int) -> Tensor:
        """The decoded, transformed image of sample `index` with the PIL twin (raises BadSampleError);
        used by the DALI loader when DALI fails on a batch."""
        offset, size = (int(x) for x in self._member[index])
        path = self._paths[int(self._path_id[index])]
        data = read_image_bytes(path, None if offset < 0 else (offset, size))
        img, _ = decode_rgb(data, path, min_side=self._min_side)
        return self.transform(img, random.Random(derive_seed("image", sample_seed)))

    def _load(self, index: int, sample_seed: int) -> dict[str, Any]:
        lo, hi = int(self._caption_offsets[index]), int(self._caption_offsets[index + 1])
        caption_rng = random.Random(derive_seed("caption", sample_seed))
        caption = self._captions[caption_rng.randrange(lo, hi)]

        offset, size = (int(x) for x in self._member[index])
        path = self._paths[int(self._path_id[index])]
        name = path if offset < 0 else f"{path} (member at byte {offset})"
        data = read_image_bytes(path, None if offset < 0 else (offset, size))
        image_rng = random.Random(derive_seed("image", sample_seed))
        item: dict[str, Any] = {"index": index, "seed": sample_seed}
        if self.image_mode == "decoded":
            img, converted = decode_rgb(data, name, min_side=self._min_side)
            item["image"] = self.transform(img, image_rng)
            event = "converted_mode" if converted else None
        else:
            encoded, width, height, event = encoded_image(data, name, min_side=self._min_side)
            item["encoded"] = encoded
            item["params"] = (draw_pretrain_params(width, height, image_rng)
                              if self.transform.augment == "pretrain" else None)
        if event is not None:
            self.events.record(event, f"{name}: {event.replace('_', ' ')}")

        ids = build_tokenizer(self.vocab_path, self.max_text_len).encode(caption).ids
        text_ids = torch.tensor(ids, dtype=torch.int64)
        mask_gen = torch.Generator().manual_seed(derive_seed("mask", sample_seed))
        mlm_ids, selected = mask_tokens(text_ids, mask_gen, probability=self.mlm_probability)
        item.update(text_ids=text_ids, mlm_ids=mlm_ids, mlm_selected=selected)
        return item


# ----------------------------------------------------------------------------------------- collation


def _worker_shared(numel: int, dtype: torch.dtype) -> Tensor | None:
    """An uninitialised 1-D CPU tensor in shared memory when called in a loader worker, else None. A batch
    written straight into it crosses to the main process without another copy (as default_collate does);
    None also if torch's private API moved (the caller then builds an ordinary tensor)."""
    if get_worker_info() is None:
        return None
    try:
        like = torch.empty(0, dtype=dtype)
        return like.new(like._typed_storage()._new_shared(numel))
    except (AttributeError, RuntimeError):
        return None


def _stack_images(images: list[Tensor]) -> Tensor:
    out = _worker_shared(sum(t.numel() for t in images), images[0].dtype)
    if out is not None:
        out = out.resize_(len(images), *images[0].shape)
    return torch.stack(images, 0, out=out)


def _concat_files(files: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """B encoded files as one uint8 tensor (in shared memory in a worker) and their (B + 1,) offsets."""
    offsets = np.zeros(len(files) + 1, dtype=np.int64)
    np.cumsum([len(f) for f in files], out=offsets[1:])
    data = _worker_shared(int(offsets[-1]), torch.uint8)
    if data is None:
        return torch.from_numpy(np.concatenate(files)), torch.from_numpy(offsets)
    np.concatenate(files, out=data.numpy())
    return data, torch.from_numpy(offsets)


@dataclass
class EncodedBatch:
    """A collated batch whose images are still encoded (DALI backends decode them in the main process)."""

    data: Tensor
    """(N,) uint8: the B validated encoded files back to back. One tensor, so that it crosses from a loader
    worker to the main process through shared memory (pickled arrays cost the main process ~2-3 ms of GIL
    time per 6 MB batch on the dev CPU: the DALI threads' time)."""
    offsets: Tensor
    """(B + 1,) int64: file i is data[offsets[i]:offsets[i + 1]]."""
    params: list[AugParams | None]
    """B drawn augmentations (None for the resize-only transform)."""
    keys: list[tuple[int, int]]
    """B (index, seed) of the samples used (after replacement): the PIL twin re-decodes from them."""
    text: dict[str, Tensor]
    """The Batch text fields: text_ids, text_mask, mlm_ids, mlm_positions, mlm_labels."""

    @property
    def encoded(self) -> list[np.ndarray]:
        """B 1-D uint8 arrays, views of `data` (each a complete file)."""
        buf, o = self.data.numpy(), self.offsets.tolist()
        return [buf[o[i]:o[i + 1]] for i in range(len(o) - 1)]

    def to_batch(self, image: Tensor) -> Batch:
        """The `Batch` with `image` (B, 3, S, S)."""
        return Batch(image=image, **self.text)


def _collate_text(items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    B = len(items)
    lengths = torch.tensor([len(it["text_ids"]) for it in items], dtype=torch.int64)
    L = int(lengths.max())
    text_ids = torch.full((B, L), PAD_ID, dtype=torch.int64)
    mlm_ids = torch.full((B, L), PAD_ID, dtype=torch.int64)
    selected = torch.zeros((B, L), dtype=torch.bool)
    for b, it in enumerate(items):
        n = len(it["text_ids"])
        text_ids[b, :n] = torch.as_tensor(it["text_ids"])
        mlm_ids[b, :n] = torch.as_tensor(it["mlm_ids"])
        selected[b, :n] = torch.as_tensor(it["mlm_selected"])
    text_mask = (torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.int64)
    mlm_positions = selected.view(-1).nonzero().squeeze(1)  # nonzero() returns ascending indices
    mlm_labels = text_ids.view(-1)[mlm_positions]
    return {"text_ids": text_ids, "text_mask": text_mask, "mlm_ids": mlm_ids, "mlm_positions": mlm_positions,
            "mlm_labels": mlm_labels}


def collate(items: Sequence[dict[str, Any]]) -> Batch | EncodedBatch:
    """Pad and stack dataset items into a `Batch` (ALBEF `padding='longest'`).

    Args:
        items: B dicts from `PretrainDataset.__getitem__`.
    Returns:
        Batch with image (B, 3, S, S), text_ids/text_mask/mlm_ids (B, L) int64 where L is the longest
        caption of the batch (padding [PAD]=0, mask 0), mlm_positions (M,) ascending flat indices b*L + t
        of the selected tokens and mlm_labels (M,) = text_ids.flatten()[mlm_positions]. For items of an
        "encoded" dataset: an EncodedBatch with the same text fields and the encoded images.
    """
    if not items:
        raise ValueError("collate got an empty batch")
    text = _collate_text(items)
    if "encoded" in items[0]:
        data, offsets = _concat_files([it["encoded"] for it in items])
        return EncodedBatch(data, offsets, [it["params"] for it in items],
                            [(it["index"], it["seed"]) for it in items], text)
    return Batch(image=_stack_images([it["image"] for it in items]), **text)


def build_pretrain_loader(
    dataset: PretrainDataset,
    sampler: ResumableBatchSampler,
    *,
    num_workers: int,
    pin_memory: bool,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """The pretraining DataLoader: `sampler` as batch_sampler, `collate` as collate_fn.

    Workers are persistent when num_workers > 0. That does not freeze the epoch: DataLoader iterates the
    batch sampler in the main process at every `iter(loader)`, so `sampler.set_epoch(...)` before each
    `iter` takes effect (the workers only receive (index, seed) lists). A private generator is passed so
    that creating an iterator (which draws the workers' base seed) does not consume the global torch RNG.

    Args:
        dataset: the PretrainDataset.
        sampler: its ResumableBatchSampler; call `set_epoch` before iterating.
        num_workers: loader processes (0 = load in the main process).
        pin_memory: pin batches (Batch.pin_memory) for asynchronous host-to-device copies.
        prefetch_factor: batches prefetched per worker (torch default 2 when None); ignored without workers.
    Returns:
        DataLoader yielding `Batch` objects.
    """
    dataset.events.resize(num_workers + 1)  # one counter row per process, before the workers start
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = True
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
