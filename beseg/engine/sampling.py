"""Reproducible sampling: the epoch's cases and augmentation seeds depend on ``(seed, epoch, position)`` only.

So the data a run sees does not depend on the number of DataLoader workers or processes, and a
resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

__all__ = ["EpochSampler", "SeededDataset"]


class EpochSampler(Sampler):
    """Indices for one epoch of ``steps * batch_size * world_size`` samples, with augmentation seeds.

    The epoch's sequence concatenates seeded permutations of the cases; process ``rank`` takes
    every ``world_size``-th element, so a global batch is the same set of samples whatever the
    number of processes. Each element is ``(case index, augmentation seed)``.

    Args:
        num_items: cases in the training set.
        steps: optimiser steps per epoch.
        batch_size: samples per step per process.
        seed: the run's seed (``train.seed``).
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, num_items: int, steps: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_items, self.steps, self.batch_size = num_items, steps, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_sequence(self) -> list[tuple[int, int]]:
        """The whole epoch's ``(case index, augmentation seed)`` pairs, for all processes."""
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.steps * self.batch_size * self.world_size
        order: list[int] = []
        while len(order) < total:
            order.extend(rng.permutation(self.num_items).tolist())
        seeds = rng.integers(0, 2**31 - 1, size=total)
        return [(order[i], int(seeds[i])) for i in range(total)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.global_sequence()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return self.steps * self.batch_size


class SeededDataset(Dataset):
    """Draws each item with the sampler's seed: ``dataset.sample(index, seed)`` when the dataset has it
    (the store's patch dataset), else the MONAI dataset's random transforms seeded before the item."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if hasattr(self.dataset, "sample"):
            return self.dataset.sample(index, seed)
        self.dataset.transform.set_random_state(seed=seed)
        return self.dataset[index]
