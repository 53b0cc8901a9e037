"""Micro-batches of a global batch: which samples each process takes at each accumulation step.

A global batch of G = B x W x A samples (micro-batch B, W processes, A accumulation steps) is split
into W*A slots of B samples; process r takes slot a*W + r at accumulation step a. Slot s is what a
`ResumableBatchSampler` with rank=s and world_size=W*A yields, so the samples (and their per-sample
seeds) of every optimizer step depend only on (seed, epoch, step, G): W processes x A steps and one
process x (W*A) steps see the same global batches, in the same slots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch.utils.data import Sampler

from albef_fast.data.dataset import ResumableBatchSampler


class AccumulationBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's micro-batches, A per optimizer step, in accumulation order.

    Args:
        make: builds the slot sampler for (rank, world_size) = (slot, W*A).
        rank, world_size: this process r and the number of processes W.
        accum_steps: A.
    """

    def __init__(self, make: Callable[[int, int], ResumableBatchSampler], *, rank: int, world_size: int,
                 accum_steps: int) -> None:
        super().__init__()
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
        slots = world_size * accum_steps
        self.slots = [make(a * world_size + rank, slots) for a in range(accum_steps)]
        for s in self.slots[1:]:  # one epoch order (and its cache) for all slots, not one per slot
            s.permutation = self.slots[0].permutation
        self.accum_steps = accum_steps
        self.batch_size = self.slots[0].batch_size

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: n // G."""
        return len(self.slots[0])

    def __len__(self) -> int:
        """Micro-batches per epoch (what the DataLoader yields)."""
        return self.accum_steps * len(self.slots[0])

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch and the first optimizer step of the next iteration (see
        `ResumableBatchSampler.set_epoch`; here in optimizer steps)."""
        for s in self.slots:
            s.set_epoch(epoch, start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for micro in zip(*self.slots):
            yield from micro
