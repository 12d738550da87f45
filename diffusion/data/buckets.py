"""Aspect-ratio buckets (SDXL, kohya-ss): train at several resolutions of about the same area
instead of cropping every image square. Each image goes to the bucket of closest aspect ratio;
each batch holds one bucket, so the images of a batch share ``(H, W)`` while the run mixes them.
Buckets are ``(height, width)``; image sizes are PIL's ``(width, height)``."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from diffusion._checks import check_positive


@dataclass(frozen=True)
class BucketConfig:
    """Sides are multiples of ``multiple``; aspect ratios lie in [1/max_ratio, max_ratio]."""

    multiple: int = 64
    max_ratio: float = 2.0

    @classmethod
    def coerce(cls, value: bool | BucketConfig | Mapping[str, Any]) -> BucketConfig | None:
        """``buckets=`` as configs give it: false -> None, true -> defaults, a mapping -> its fields."""
        if isinstance(value, BucketConfig) or value is None:
            return value
        if isinstance(value, bool):
            return cls() if value else None
        if isinstance(value, Mapping):
            return cls(**dict(value))
        raise TypeError(f"buckets must be a bool, a BucketConfig or a mapping of its fields, got {value!r}")


def make_buckets(resolution: int, multiple: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """``(height, width)`` buckets, sorted from tallest to widest: for each short side (a multiple
    of ``multiple``, up to ``resolution``) the largest long side keeping the area at most
    ``resolution**2``, and its transpose. ``make_buckets(1024)`` gives SDXL's resolutions up to
    2:1 (1024x1024, 1152x896, 1216x832, 1344x768 and transposes) and 1088x960."""
    check_positive("resolution", resolution)
    check_positive("buckets.multiple", multiple)
    if max_ratio < 1:
        raise ValueError(f"buckets.max_ratio must be >= 1, got {max_ratio}")
    area = resolution * resolution
    long_of_short: dict[int, int] = {}
    for short in range(multiple, resolution + 1, multiple):
        long = area // short // multiple * multiple
        if long >= short and long / short <= max_ratio:
            long_of_short[short] = long
    # Two short sides can round to the same long side; keep the one with the larger area.
    best: dict[int, int] = {}
    for short, long in long_of_short.items():
        best[long] = max(best.get(long, 0), short)
    shapes = {(long, short) for long, short in best.items()} | {(short, long) for long, short in best.items()}
    if not shapes:
        raise ValueError(
            f"no aspect-ratio buckets for resolution={resolution}, multiple={multiple}, max_ratio={max_ratio}; "
            "lower buckets.multiple (it must be at most the resolution) or raise buckets.max_ratio"
        )
    return sorted(shapes, key=lambda hw: hw[1] / hw[0])


def assign_buckets(sizes: Sequence[tuple[int, int]], buckets: Sequence[tuple[int, int]]) -> list[int]:
    """For each ``(width, height)`` the index of the bucket of closest aspect ratio, measured as
    ``|log(w/h) - log(bw/bh)|`` so that 2:1 and 1:2 are equally far from square."""
    if not sizes:
        return []
    image_log_ratio = np.log([w / h for w, h in sizes])[:, None]
    bucket_log_ratio = np.log([w / h for h, w in buckets])[None, :]
    return np.abs(image_log_ratio - bucket_log_ratio).argmin(axis=1).tolist()  # ties: the first bucket


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices of one bucket each, batch order shuffled across buckets.

    The order depends only on ``(seed, epoch)``: ``set_epoch`` (called by Lightning through the
    ``sampler`` attribute each epoch) gives a new order, the same on every rank and on resume.
    With ``num_replicas > 1`` each rank takes every ``num_replicas``-th batch of that order (use
    ``Trainer(use_distributed_sampler=False)``); ranks get the same number of batches.
    """

    def __init__(
        self,
        bucket_of_each_index: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if not isinstance(bucket_of_each_index, Sequence):
            # Lightning tries BucketBatchSampler(DistributedSampler, ...) under DDP: refuse it loudly.
            raise TypeError(
                f"bucket_of_each_index must be a sequence of bucket ids, got {type(bucket_of_each_index).__name__}; "
                "under DDP set trainer.use_distributed_sampler=false, this sampler splits batches by rank itself"
            )
        check_positive("batch_size", batch_size)
        if seed < 0 or not 0 <= rank < num_replicas:
            raise ValueError(f"need seed >= 0 and 0 <= rank < num_replicas; got {seed=}, {rank=}, {num_replicas=}")
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.num_replicas, self.rank, self.epoch = seed, num_replicas, rank, 0
        groups: dict[int, list[int]] = {}
        for index, bucket in enumerate(bucket_of_each_index):
            groups.setdefault(int(bucket), []).append(index)
        self.groups = dict(sorted(groups.items()))
        self.sampler = self  # Lightning calls set_epoch on `dataloader.batch_sampler.sampler`

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches_per_bucket(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return sum(self._batches_per_bucket(len(g)) for g in self.groups.values()) // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        for members in self.groups.values():
            order = [members[i] for i in rng.permutation(len(members))] if self.shuffle else members
            n_batches = self._batches_per_bucket(len(order))
            batches += [order[k * self.batch_size : (k + 1) * self.batch_size] for k in range(n_batches)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        usable = len(batches) // self.num_replicas * self.num_replicas  # equal counts, or DDP hangs
        yield from batches[self.rank : usable : self.num_replicas]
