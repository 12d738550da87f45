"""Sampling that a resumed run can continue exactly where it stopped."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Shuffles with ``(seed, epoch)``, so an epoch's order is known again after a restart, and
    skips the first ``skip`` samples of the next epoch it is iterated for: those a resumed run had
    already trained on. Lightning calls ``set_epoch`` at each epoch; ``len`` is the full epoch."""

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, samples_done: int) -> None:
        self.epoch, self.skip = epoch, samples_done

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        skip, self.skip = self.skip, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.size
