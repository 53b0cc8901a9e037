"""Counting bad and converted samples across loader processes, with periodic warnings.

A bad sample never stops a run and never changes the shape of the batch stream: the dataset replaces
it by another sample chosen from its seed (see `dataset.PretrainDataset`) and records the event here.
The counters are one shared-memory int64 tensor with one row per process (row 0 = the main process,
row 1 + i = loader worker i), so each process only writes its own row (no lock) and the main process
reads the sums at any time. Shared memory works for forked and for spawned workers: torch pickles a
shared tensor as a handle to the same memory.

Counters include batches that the workers prefetched but the loop has not consumed yet.

Resume. `state_dict()` gives the totals as plain ints (loadable with torch.load(weights_only=True));
`load_state_dict()` puts them back into the main process's row before the loader starts, so the totals
of a resumed run continue from the checkpoint instead of restarting at zero. Because the counts include
prefetched batches, and a resumed run replays the batches after its checkpoint, a resumed total can
exceed an uninterrupted run's by the events of the batches that were prefetched (at most
num_workers * prefetch_factor batches, plus the DALI stage's look-ahead) when the checkpoint was written.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch.utils.data import get_worker_info

log = logging.getLogger("albef_fast")

__all__ = ["EVENTS", "DataEvents"]

EVENTS: tuple[str, ...] = (
    "missing",  # the image file does not exist
    "unreadable",  # zero bytes, not an image, corrupt header or data
    "truncated",  # the encoded image ends before its data does
    "too_large",  # more pixels than PIL's decompression-bomb limit
    "replaced",  # samples replaced by another (the sum of the four above, plus dali failures)
    "converted_mode",  # grayscale, CMYK, palette, alpha or 16-bit images converted to 8-bit RGB
    "transcoded",  # formats the DALI decoder is not given raw (e.g. GIF, CMYK JPEG): re-encoded as PNG
    "dali_batch_fallback",  # DALI failed on a batch; it was decoded with the PIL twin instead
)
_INDEX = {name: i for i, name in enumerate(EVENTS)}


_RECORD_LOCK = threading.Lock()
"""Serialises `record` within a process: with DALI the main process has two loader threads (the fetch
thread reads samples, the decode thread's PIL fallback too) that may count at once. A module-level lock,
so that DataEvents still pickles to the workers."""


class DataEvents:
    """Per-process event counters in shared memory.

    Args:
        rows: processes that may record (1 + number of loader workers).
        warn_first: events of one kind logged one by one (with the file) before thinning out; after
            that a kind is logged at its 2**k-th occurrence in a process, with the running count.
    """

    def __init__(self, rows: int = 1, warn_first: int = 3) -> None:
        self.counts = torch.zeros((max(1, rows), len(EVENTS)), dtype=torch.int64).share_memory_()
        self.warn_first = warn_first

    def _row(self) -> int:
        info = get_worker_info()
        row = 0 if info is None else 1 + info.id
        if row >= self.counts.shape[0]:
            raise RuntimeError(f"DataEvents has {self.counts.shape[0]} rows but loader worker {row - 1} records: "
                               "build the loader with build_loader(), which sizes it")
        return row

    def record(self, kind: str, detail: str = "") -> None:
        """Count one event of `kind` (one of `EVENTS`) in this process's row; warn periodically.

        Args:
            kind: event name.
            detail: what happened, naming the file (used in the warning).
        """
        if kind not in _INDEX:
            raise ValueError(f"unknown data event {kind!r}; valid: {', '.join(EVENTS)}")
        row = self._row()
        with _RECORD_LOCK:  # += on a tensor element is a read-modify-write
            self.counts[row, _INDEX[kind]] += 1
            n = int(self.counts[row, _INDEX[kind]])
        if kind in ("replaced", "converted_mode"):
            return  # logged through the event that caused them / too common to be news
        if n <= self.warn_first or (n & (n - 1)) == 0:
            where = "main process" if row == 0 else f"loader worker {row - 1}"
            log.warning("data: %s (%s #%d in the %s; the sample was handled, training goes on)", detail, kind, n,
                        where)

    def totals(self) -> dict[str, int]:
        """Sums over all processes, by event name (zeros included)."""
        sums = self.counts.sum(0).tolist()
        return dict(zip(EVENTS, sums))

    def state_dict(self) -> dict[str, int]:
        """The totals over all processes, {event name: count} as plain ints (for the checkpoint)."""
        return self.totals()  # tolist() already gives Python ints

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from saved totals (call before iterating the loader): the main process's row gets the
        totals, the worker rows are zeroed. Event names that this version does not know are refused; names
        it knows but `state` lacks (events added since the checkpoint) start at zero.

        Args:
            state: from `state_dict()`.
        Raises:
            ValueError: an unknown event name or a count that is not an int >= 0.
        """
        if not isinstance(state, dict):
            raise ValueError(f"data events state must be a dict of event name -> count, got {type(state).__name__}")
        unknown = sorted(set(state) - set(EVENTS))
        if unknown:
            raise ValueError(f"data events state has unknown event names {unknown}; valid: {', '.join(EVENTS)}")
        row = torch.zeros(len(EVENTS), dtype=torch.int64)
        for name, count in state.items():
            value = count.item() if isinstance(count, torch.Tensor) and count.numel() == 1 else count
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"data events state: {name!r} must be an int >= 0, got {count!r}")
            row[_INDEX[name]] = value
        self.counts.zero_()  # in place: the workers share this memory
        self.counts[0] = row

    def resize(self, rows: int) -> None:
        """Make room for `rows` processes (call before the workers start); keeps the counts so far."""
        if rows > self.counts.shape[0]:
            counts = torch.zeros((rows, len(EVENTS)), dtype=torch.int64)
            counts[: self.counts.shape[0]] = self.counts
            self.counts = counts.share_memory_()
