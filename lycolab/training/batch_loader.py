"""Batches read ahead by DataLoader worker processes (sd-scripts' ``max_data_loader_n_workers``).

Decoding, resizing and cropping images is the part of a step that does not need the GPU, so sd-scripts hands it to
``min(max_data_loader_n_workers, cpu count)`` worker processes that work a few batches ahead. Here every batch of
the rest of the run is planned first (epoch, batch, optimizer steps before it), and a worker turns a planned batch
into its inputs — flips, crops, captions, pixels — from random streams keyed by the run's seed and the batch's
position (``training.seeds``), never by which process read it or in which order. So 0, 1 or 2 workers train
exactly the same bits. One loader serves the whole run, so its workers persist across epochs (what
``persistent_data_loader_workers`` asks for); with cached latents there are no images to read and the loop reads
captions itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from lycolab.data.dataset import BucketedDataset
from lycolab.training import distributed
from lycolab.training.seeds import python_rng

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedBatch:
    """One global batch of the run: its epoch, place in the epoch, items, and optimizer steps taken before it."""

    epoch: int
    batch_index: int
    items: tuple[int, ...]
    steps_before: int


@dataclass
class BatchInputs:
    """What one process needs from the disk for its share of a planned batch."""

    planned: PlannedBatch
    indices: list[int]
    positions: range
    flips: list[bool]
    captions: list[str]
    pixels: torch.Tensor | None  # 3xHxW images stacked; None when the latents come from the cache


def plan_batches(dataset: BucketedDataset, start: tuple[int, int, int], epochs: int, total_steps: int,
                 accumulation: int, processes: int = 1) -> list[PlannedBatch]:
    """Every batch from ``start`` (step, epoch, next batch) to the run's last optimizer step, in training order.

    An optimizer step closes every ``accumulation`` batches of an epoch and at its end, as the loop does."""
    step, first_epoch, first_batch = start
    planned = []
    for epoch in range(first_epoch, epochs + 1):
        batches = dataset.make_batches(epoch, processes)
        begin = first_batch if epoch == first_epoch else 0
        for batch_index in range(begin, len(batches)):
            before = step + (batch_index - begin) // accumulation
            if before >= total_steps:
                return planned
            planned.append(PlannedBatch(epoch, batch_index, tuple(batches[batch_index]), before))
        step += -(-(len(batches) - begin) // accumulation)
    return planned


class RunBatches(Dataset):
    """The planned batches as a map-style dataset: item ``k`` is this process's inputs for the k-th batch."""

    def __init__(self, dataset: BucketedDataset, planned: list[PlannedBatch], seed: int, total_steps: int,
                 read_pixels: bool, rank: int = 0, world: int = 1):
        self.dataset, self.planned, self.seed, self.total_steps = dataset, planned, seed, total_steps
        self.read_pixels, self.rank, self.world = read_pixels, rank, world

    def __len__(self) -> int:
        return len(self.planned)

    def __getitem__(self, position: int) -> BatchInputs:
        planned = self.planned[position]
        indices, positions = distributed.share(list(planned.items), self.rank, self.world)
        rngs = [python_rng(self.seed, planned.epoch, planned.batch_index, slot) for slot in positions]
        # each image's stream is used in this order: flip, crop (only when reading pixels), caption
        flips = [self.dataset.wants_flip(index, rng) for index, rng in zip(indices, rngs, strict=True)]
        pixels = None
        if self.read_pixels and indices:
            pixels = torch.stack([self.dataset.pixels(index, flip, rng)
                                  for index, flip, rng in zip(indices, flips, rngs, strict=True)])
        captions = [self.dataset.caption(index, rng, planned.epoch, planned.steps_before, self.total_steps)
                    for index, rng in zip(indices, rngs, strict=True)]
        return BatchInputs(planned, indices, positions, flips, captions, pixels)


def _as_is(inputs: BatchInputs) -> BatchInputs:
    return inputs  # batches are built whole by RunBatches; the DataLoader must not collate them again


def worker_count(requested: int, read_pixels: bool) -> int:
    """sd-scripts' ``min(max_data_loader_n_workers, os.cpu_count())``; none when no image is read (cached latents)."""
    return min(requested, os.cpu_count() or 1) if read_pixels else 0


def iterate_batches(batches: RunBatches, workers: int) -> Iterator[BatchInputs]:
    """The batches in order, read ahead by ``workers`` processes (0: read here, when asked for)."""
    if workers <= 0 or len(batches) == 0:
        yield from (batches[position] for position in range(len(batches)))
        return
    # a generator of its own: the workers' base seed would otherwise be drawn from the global torch RNG, which
    # dropout uses and a saved state restores, and a resumed run would draw it at another point than an
    # uninterrupted one (the workers use no torch randomness: every draw comes from training.seeds)
    loader = DataLoader(batches, batch_size=None, shuffle=False, num_workers=min(workers, len(batches)),
                        collate_fn=_as_is, generator=torch.Generator().manual_seed(0))
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:  # a run that stops early (an error, the last step) leaves no workers behind
            shutdown()
