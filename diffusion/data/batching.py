"""The batch sampler of every data module: batches of one group (an aspect-ratio bucket, a latent
shape), split over processes by the sampler itself, and resumable mid-epoch.

An epoch is a list of GLOBAL batches of ``batch_size * num_replicas`` samples that depends only on
``(seed, epoch)`` and the global batch size; process ``rank`` loads the ``rank``-th slice of each.
So the samples of an optimiser step do not depend on how many processes share them, and a resumed
run, whatever its world size, continues at the next global batch. The indices it yields carry their
epoch (:class:`EpochIndex`), so a dataset can key its random augmentation to (seed, epoch, index).

A training sampler follows the run's count of batches (``follow``): the epochs form one stream of
global batches, and each iteration starts at the run's position in it. So a resumed run continues
the epoch where it stopped, and so does a finished run extended to more steps (which Lightning
records as a completed epoch, and would start a new one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import DistributedSampler, Sampler

if TYPE_CHECKING:
    import lightning as L


class EpochIndex(int):
    """A dataset index that carries the epoch it was drawn for; otherwise a plain ``int``.

    It travels with the index through the DataLoader (pickled into worker processes too), so a
    dataset's augmentation can be a function of (seed, epoch, index) alone: the same whatever the
    worker, the number of workers or processes, or a resume. Datasets that ignore it see an int.
    """

    epoch: int

    def __new__(cls, index: int, epoch: int) -> EpochIndex:
        self = super().__new__(cls, index)
        self.epoch = epoch
        return self

    def __reduce__(self) -> tuple[type, tuple[int, int]]:
        return type(self), (int(self), self.epoch)

    def __repr__(self) -> str:
        return f"EpochIndex({int(self)}, epoch={self.epoch})"


def epoch_of(index: int) -> int:
    """The epoch an index was drawn for; 0 for a plain int (a dataset indexed directly, a cache)."""
    return getattr(index, "epoch", 0)


def _members_of_groups(groups: int | Sequence[Hashable]) -> dict[Hashable, np.ndarray]:
    """``{group id: its indices}``, groups in order of first appearance (a deterministic order)."""
    if isinstance(groups, (int, np.integer)):
        if groups < 0:
            raise ValueError(f"groups must be a sample count >= 0 or a sequence of group ids, got {groups}")
        return {0: np.arange(int(groups))} if groups else {}
    if not isinstance(groups, Sequence):
        # Lightning tries GlobalBatchSampler(DistributedSampler, ...) under DDP: refuse it loudly.
        raise TypeError(
            f"groups must be a sample count or a sequence of group ids, got {type(groups).__name__}; under DDP set "
            "trainer.use_distributed_sampler=false, this sampler splits batches by rank itself"
        )
    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    return {group: np.asarray(indices) for group, indices in members.items()}


def _check_arguments(batch_size: int, seed: int, num_replicas: int, rank: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}")


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of indices of one group each, this process's share of global batches.

    Each epoch a ``numpy.random.default_rng([seed, epoch])`` shuffles every group and the global
    batches of all groups together (``shuffle``; unshuffled: groups in order of first appearance).
    ``drop_last`` keeps full global batches only (training); otherwise a group's last global batch
    is padded, wrapping around the group, to a multiple of ``num_replicas`` (like torch's
    DistributedSampler), so every rank gets as many batches, none empty (evaluation).

    Indices come as :class:`EpochIndex` of the sampler's epoch. ``len`` is the full epoch of one
    rank. Lightning calls ``set_epoch`` through ``sampler``; ``resume`` makes the next iteration
    skip the global batches a stopped run had trained on; ``follow`` makes every iteration start
    at a position in the stream of epochs.
    """

    def __init__(
        self,
        groups: int | Sequence[Hashable],
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        self.members = _members_of_groups(groups)
        _check_arguments(batch_size, seed, num_replicas, rank)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch, self._skip = 0, 0
        self._position: Callable[[], int] | None = None
        self.sampler = self  # Lightning calls set_epoch on `dataloader.batch_sampler.sampler`

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    @property
    def num_samples(self) -> int:
        return sum(len(m) for m in self.members.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue ``epoch`` after its first ``batches_done`` global batches (the next iteration only)."""
        if batches_done < 0:
            raise ValueError(f"batches_done must be >= 0, got {batches_done}")
        self.epoch, self._skip = epoch, batches_done

    def follow(self, position: Callable[[], int]) -> None:
        """Start each iteration at global batch ``position()`` of the stream of epochs (epoch
        ``position // len(self)``, after its first ``position % len(self)`` batches), instead of
        at the epoch set by ``set_epoch``."""
        self._position = position

    def _batches_of_group(self, n: int) -> int:
        return n // self.global_batch_size if self.drop_last else math.ceil(n / self.global_batch_size)

    def __len__(self) -> int:
        return sum(self._batches_of_group(len(m)) for m in self.members.values())

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        """A group's samples, in epoch order, as global batches; the last one padded or dropped."""
        size = self.global_batch_size
        batches = [order[start:start + size] for start in range(0, len(order), size)]
        if batches and len(batches[-1]) < size:
            if self.drop_last:
                batches.pop()
            else:  # wrap around the group so that each rank gets an equal, non-empty slice
                short = batches[-1]
                padding = -len(short) % self.num_replicas
                batches[-1] = np.concatenate([short, order[np.arange(padding) % len(order)]])
        return batches

    def global_batches(self) -> list[np.ndarray]:
        """This epoch's global batches: the same on every rank, and for any world size of equal global batch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[np.ndarray] = []
        for members in self.members.values():
            batches += self._cut(members[rng.permutation(len(members))] if self.shuffle else members)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        if self._position is not None:
            self.epoch, self._skip = divmod(self._position(), len(self))
        skip, self._skip = self._skip, 0
        for batch in self.global_batches()[skip:]:
            share = len(batch) // self.num_replicas
            yield [EpochIndex(i, self.epoch) for i in batch[self.rank * share:(self.rank + 1) * share].tolist()]


def batches_processed(trainer: L.Trainer) -> int:
    """The run's count of training batches before the current one, over all epochs and resumes:
    the position in the stream of global batches that samplers and training draws follow."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.processed


def batch_sampler(
    trainer: L.Trainer | None, groups: int | Sequence[Hashable], batch_size: int, *, train: bool, seed: int
) -> GlobalBatchSampler:
    """The sampler of a data module's loader: this process's share (rank and world size from
    ``trainer``, a single process without one), shuffled full batches for training, every sample
    for evaluation; a resumed training epoch continues at the batch after the checkpoint's."""
    num_replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = GlobalBatchSampler(groups, batch_size, shuffle=train, drop_last=train, seed=seed,
                                 num_replicas=num_replicas, rank=rank)
    if len(sampler) == 0:
        raise ValueError(_no_batch_message(sampler))
    if train and trainer is not None:
        # `processed`, not `completed`: checkpoints are written before Lightning completes the batch.
        sampler.follow(lambda: batches_processed(trainer))
    return sampler


def _no_batch_message(sampler: GlobalBatchSampler) -> str:
    needed = f"data.module.batch_size={sampler.batch_size} x world size {sampler.num_replicas}"
    if len(sampler.members) > 1:
        counts = {group: len(m) for group, m in sampler.members.items()}
        where = f"; a batch holds one group (shape), samples per group: {counts}"
    else:
        where = ""
    return (f"no full batch of {needed} = {sampler.global_batch_size} samples from {sampler.num_samples} "
            f"samples{where}; lower the batch size or the number of processes, or add data")


def check_split_over_processes(loader: object, world_size: int) -> None:
    """Refuse a training loader that would give every process the same samples.

    Lightning's sampler injection is off in our trainer configs (the data modules split batches
    themselves), so a data module of one's own must do the same, or turn the injection back on.
    """
    if world_size == 1:
        return
    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, GlobalBatchSampler) and sampler.num_replicas == world_size:
        return
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        return
    raise ValueError(
        f"the training data loader is not split over the {world_size} processes, so each would train on the same "
        "samples: build its batch_sampler with diffusion.data.batching.batch_sampler(self.trainer, ...) (as the "
        "project's data modules do), or set trainer.use_distributed_sampler=true to let Lightning split it"
    )
