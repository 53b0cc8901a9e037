"""The pretraining loader with its image backend: PIL in the loader workers, or DALI (GPU, or CPU for
tests) in the main process after the workers have read, validated and tokenised.

Backends (all give `Batch.image` (B, 3, S, S) float32 CLIP-normalised, from the same drawn params):

* ``pil``: decode + augment in the DataLoader workers (`transforms.ImageTransform`); the CPU fallback
  and the reference twin.
* ``dali``: workers read the encoded bytes, validate them, draw the augmentation params, clean and
  tokenise the caption and mask it; the main process decodes and augments on the GPU ("mixed"
  decoding); `Batch.image` arrives on the CUDA device.
* ``dali_cpu``: the same DALI graph on the CPU (device_id=None); this is how CI tests the graph.
* ``auto``: ``dali`` when training on CUDA and DALI imports, else ``pil``. The choice is logged.

Sharding: the batch sampler strides positions across ranks; the DataLoader hands whole batches to its
workers round-robin, so each worker reads disjoint samples. Exact resume is the sampler's (the DALI
stage draws nothing itself).

Overlap. The DALI stage runs in one background thread of the main process (`DaliLoader`, prefetch
batches ahead, default 2): while the training step of batch i runs, the thread decodes/augments batch
i+1. A second thread takes the batches from the DataLoader (waiting on the workers, receiving) up to
prefetch batches ahead of the DALI thread, so that this overlaps DALI's work instead of adding to it
(on an H200 with 8 DALI threads the two in series gave 1,871 images/s against 2,701 for the DALI stage
alone). Each thread handles the batches strictly in sampler order and DALI draws nothing, so order and
content are those of the synchronous path (prefetch=0), bit for bit. The threads spend most of their
time inside DALI's C++ executor, torch kernels and queue waits, which release the GIL.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from torch.utils.data import DataLoader

from albef_fast.data.batch import Batch
from albef_fast.data.dali import DaliImagePipeline, dali_unavailable_reason
from albef_fast.data.dataset import (
    EncodedBatch,
    PretrainDataset,
    ResumableBatchSampler,
    build_pretrain_loader,
)
from albef_fast.data.images import BadSampleError
from albef_fast.data.sharding import AccumulationBatchSampler

log = logging.getLogger("albef_fast")

__all__ = ["BACKENDS", "DaliLoader", "build_loader", "choose_backend"]

Backend = Literal["auto", "dali", "dali_cpu", "pil"]
BACKENDS: tuple[str, ...] = ("auto", "dali", "dali_cpu", "pil")


def choose_backend(requested: str, device: torch.device) -> str:
    """Resolve `data.image_backend` to "dali", "dali_cpu" or "pil" and log the choice once.

    Args:
        requested: one of `BACKENDS`.
        device: the training device.
    Returns:
        the backend to use.
    Raises:
        ValueError: unknown name. RuntimeError: "dali"/"dali_cpu" asked for but unavailable.
    """
    if requested not in BACKENDS:
        raise ValueError(f"data.image_backend={requested!r} is unknown; valid: {', '.join(BACKENDS)}")
    reason = dali_unavailable_reason()
    if requested == "auto":
        if device.type != "cuda":
            chosen, why = "pil", f"training on {device.type}"
        elif reason:
            chosen, why = "pil", reason
        else:
            chosen, why = "dali", "CUDA and nvidia-dali available"
        log.info("data: image backend %s (auto: %s)", chosen, why)
        return chosen
    if requested in ("dali", "dali_cpu") and reason:
        raise RuntimeError(f"data.image_backend={requested} but {reason}; install nvidia-dali-cuda130 or use pil")
    if requested == "dali" and device.type != "cuda":
        raise RuntimeError(f"data.image_backend=dali decodes on the GPU but the device is {device}; "
                           "use dali_cpu or pil")
    log.info("data: image backend %s (asked for)", requested)
    return requested


class DaliLoader:
    """Iterates a DataLoader of `EncodedBatch` and decodes each batch with DALI into a `Batch`.

    If DALI raises on a batch (a file that passed the host checks but has corrupt data), the pipeline is
    rebuilt and that batch is decoded with the PIL twin from the same params, counted as
    "dali_batch_fallback"; a sample PIL cannot decode either gets the dataset's deterministic
    replacement. The batch keeps its size and order either way.

    With prefetch > 0 a background thread runs the DataLoader and the DALI stage up to `prefetch` decoded
    batches ahead of the consumer (plus the one it is working on); the batches come out in the same order
    with the same content as with prefetch=0 (everything in the consumer's thread). Leaving an epoch early
    (break, an exception) stops the thread after the batch it is on; an exception in the thread (e.g.
    BadDataError from a worker) is raised in the consumer at the position where it happened.

    Args:
        loader: DataLoader over an "encoded" PretrainDataset.
        pipeline: the DALI stage.
        dataset: the dataset (for the fallback and the event counters).
        prefetch: decoded batches kept ready ahead of the consumer (0: decode synchronously when asked).
    """

    def __init__(self, loader: DataLoader, pipeline: DaliImagePipeline, dataset: PretrainDataset, *,
                 prefetch: int = 2) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0 (batches decoded ahead), got {prefetch!r}")
        self.loader, self.pipeline, self.dataset, self.prefetch = loader, pipeline, dataset, prefetch

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_sampler(self) -> Any:
        return self.loader.batch_sampler

    def __iter__(self) -> Iterator[Batch]:
        if self.prefetch == 0:
            for encoded in self.loader:
                yield self._decode(encoded)
            return

        def decoded() -> Iterator[Batch]:
            if self.pipeline.device == "gpu":  # the DALI copy and the PIL fallback use this thread's stream
                torch.cuda.set_device(self.pipeline.device_id)
            # The DataLoader is iterated in a thread of its own, so that taking batch i+1 from the
            # workers (waiting, unpickling) overlaps DALI's work on batch i instead of adding to it.
            encoded = _run_ahead(lambda: iter(self.loader), self.prefetch, "albef-data-fetch")
            try:
                for batch in encoded:
                    yield self._decode(batch, ready_on_return=True)
            finally:
                encoded.close()  # stops and joins the fetch thread

        yield from _run_ahead(decoded, self.prefetch, "albef-dali-prefetch")

    def _decode(self, batch: EncodedBatch, ready_on_return: bool = False) -> Batch:
        """DALI (or the PIL twin) for one batch; with ready_on_return, a CUDA image is complete on return
        (the producer thread's stream is not the consumer's)."""
        out = self._decode_any(batch)
        if ready_on_return and out.image.is_cuda:
            torch.cuda.current_stream(out.image.device).synchronize()
        return out

    def _decode_any(self, batch: EncodedBatch) -> Batch:
        try:
            return batch.to_batch(self.pipeline(batch.encoded, batch.params))
        except RuntimeError as e:
            self.pipeline.reset()
            self.dataset.events.record("dali_batch_fallback",
                                       f"DALI failed on a batch ({str(e).splitlines()[0][:200]}); decoded with PIL")
        images = []
        for index, seed in batch.keys:
            try:
                images.append(self.dataset.load_image(index, seed))
            except BadSampleError as bad:
                self.dataset.events.record(bad.kind, str(bad))
                self.dataset.events.record("replaced")
                images.append(self._replacement(index, seed))
        image = torch.stack(images)
        if self.pipeline.device == "gpu":
            image = image.to(torch.device("cuda", self.pipeline.device_id), non_blocking=True)
        return batch.to_batch(image)

    def _replacement(self, index: int, seed: int) -> torch.Tensor:
        # The dataset's own replacement chain (from this sample's seed), decoded with PIL.
        from albef_fast.data.dataset import derive_seed

        for attempt in range(8):
            index = derive_seed("replace", seed, attempt) % len(self.dataset)
            seed = derive_seed("replace-seed", seed, attempt)
            try:
                return self.dataset.load_image(index, seed)
            except BadSampleError as bad:
                self.dataset.events.record(bad.kind, str(bad))
                self.dataset.events.record("replaced")
        raise RuntimeError("no decodable replacement found after a DALI failure; the data look broken")


def build_loader(
    dataset: PretrainDataset,
    sampler: ResumableBatchSampler,
    backend: str,
    *,
    num_workers: int,
    pin_memory: bool,
    dali_threads: int = 4,
    dali_hw_decoder_load: float | None = None,
    prefetch_factor: int | None = None,
    dali_prefetch: int = 2,
) -> DataLoader | DaliLoader:
    """The pretraining loader for a resolved backend (`choose_backend`).

    Args:
        dataset: built with image_mode "decoded" for pil, "encoded" for the DALI backends.
        sampler: its batch sampler; call `set_epoch` before each iteration.
        backend: "pil", "dali" or "dali_cpu".
        num_workers, pin_memory, prefetch_factor: DataLoader settings (pin_memory is ignored for DALI:
            its images are produced on the device, and the small text tensors are copied as they are).
        dali_threads: DALI CPU threads.
        dali_hw_decoder_load: share of JPEGs for the hardware decoder ("dali" only; None: DALI's default).
        dali_prefetch: batches the DALI stage decodes ahead in its background thread (0: synchronous).
    Returns:
        an iterable of `Batch`, re-iterable once per epoch.
    """
    want = "decoded" if backend == "pil" else "encoded"
    if dataset.image_mode != want:
        raise ValueError(f"backend {backend!r} needs a dataset with image_mode={want!r}, got {dataset.image_mode!r}")
    if backend == "pil":
        return build_pretrain_loader(dataset, sampler, num_workers=num_workers, pin_memory=pin_memory,
                                     prefetch_factor=prefetch_factor)
    if backend not in ("dali", "dali_cpu"):
        raise ValueError(f"backend must be pil, dali or dali_cpu, got {backend!r}")
    loader = build_pretrain_loader(dataset, sampler, num_workers=num_workers, pin_memory=False,
                                   prefetch_factor=prefetch_factor)
    pipeline = DaliImagePipeline(dataset.transform.size, dataset.transform.augment, sampler.batch_size,
                                 device="gpu" if backend == "dali" else "cpu", num_threads=dali_threads,
                                 hw_decoder_load=dali_hw_decoder_load)
    return DaliLoader(loader, pipeline, dataset, prefetch=dali_prefetch)


def build_training_data(
    data: Any,
    train_files: list[str],
    image_size: int,
    *,
    seed: int,
    device: torch.device,
    mlm_probability: float,
    rank: int = 0,
    world_size: int = 1,
    accum_steps: int = 1,
) -> tuple[PretrainDataset, AccumulationBatchSampler, DataLoader | DaliLoader, dict[str, int]]:
    """Everything the training loop needs from `data` (a `config.DataConfig`): sources, sampler (weighted
    mixture when `data.train_weights` is set), dataset for the chosen backend, and the loader.

    Returns:
        (dataset, sampler, loader, load statistics by name); `dataset.events.totals()` gives the
        bad/converted sample counts at any time.
    """
    from albef_fast.data.dataset import MixtureBatchSampler, load_sources
    from albef_fast.data.sources import Mixture
    from albef_fast.data.transforms import ImageTransform

    # Shard indexes are cached under data.cache_dir, keyed by (path, size, mtime): see sources.index_shard.
    sources = load_sources(train_files, max_words=data.max_words,
                           index_cache=Path(data.cache_dir).expanduser() / "shard_index")
    backend = choose_backend(data.image_backend, device)
    dataset = PretrainDataset(sources.samples, ImageTransform(image_size, data.augment),
                              max_text_len=data.max_text_len, mlm_probability=mlm_probability,
                              image_mode="decoded" if backend == "pil" else "encoded")
    # rank, world_size, accum_steps: this process's slots of each global batch (data/sharding.py)
    if data.train_weights:
        mixture = Mixture(sources.sizes, data.train_weights, seed=seed)
        sampler = AccumulationBatchSampler(
            lambda r, w: MixtureBatchSampler(mixture, data.batch_size, seed=seed, rank=r, world_size=w),
            rank=rank, world_size=world_size, accum_steps=accum_steps)
        log.info("data: mixing %s with weights %s -> %s samples per epoch", sources.names, data.train_weights,
                 mixture.counts)
    else:
        sampler = AccumulationBatchSampler(
            lambda r, w: ResumableBatchSampler(len(dataset), data.batch_size, seed=seed, rank=r, world_size=w),
            rank=rank, world_size=world_size, accum_steps=accum_steps)
    loader = build_loader(dataset, sampler, backend, num_workers=data.num_workers,
                          pin_memory=device.type == "cuda", dali_threads=data.dali_threads,
                          dali_hw_decoder_load=data.dali_hw_decoder_load)
    js, sh = sources.json_stats, sources.shard_stats
    stats = {"samples": len(dataset), "json_files": js.files, "json_entries": js.entries,
             "json_samples_skipped": js.samples_skipped, "empty_captions_dropped": js.empty_captions_dropped
             + sh.empty_captions_dropped, "shards": sh.shards, "shard_samples": sh.samples,
             "shard_samples_without_image": sh.no_image, "shard_samples_without_caption": sh.no_caption,
             "shards_truncated": len(sh.truncated_shards), "shard_samples_incomplete": sh.incomplete_samples}
    log.info("data: %s", stats)
    return dataset, sampler, loader, stats


def _run_ahead(make: Callable[[], Iterator[Any]], depth: int, name: str) -> Iterator[Any]:
    """Yield what `make()` yields, computed in a background thread named `name` up to `depth` items
    ahead, in order. An exception in the thread is raised here at its position. Closing this generator
    (the consumer leaves early) stops the thread after the item it is on, closes its iterator if that is
    a generator (a DataLoader iterator has no close: its workers stop when it is collected) and joins the
    thread, so the source is never iterated twice at once."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:  # False once the consumer has gone
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = None
        try:
            it = make()
            for value in it:
                if not put(("item", value)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer, raised there
            put(("error", e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
