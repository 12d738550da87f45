"""Noise sources of the samplers: a ``torch.Generator`` for the whole batch, or one generator per
sample (``PerSampleNoise``), so that a sample's initial noise and every noise a stochastic sampler
adds to it depend on its own seed only, never on the batch it was drawn in or on the process."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class PerSampleNoise:
    """Row ``i`` of every draw comes from a CPU generator seeded with ``seeds[i]``, in the order of
    the draws, then moves to the requested device: the same numbers on a CPU and on any GPU, for any
    batch size. Draws are small (one sample's shape each), so the CPU cost is the copy."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self._generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> Tensor:
        shape = tuple(shape)
        if not shape or shape[0] != len(self.seeds):
            raise ValueError(f"PerSampleNoise of {len(self.seeds)} samples cannot draw shape {shape}: the first "
                             "dimension must be the number of samples")
        rows = [torch.randn(shape[1:], generator=g, dtype=dtype or torch.float32) for g in self._generators]
        return torch.stack(rows).to(device)


NoiseSource = torch.Generator | PerSampleNoise


def randn(shape: Sequence[int], generator: NoiseSource | None, device: torch.device | str,
          dtype: torch.dtype) -> Tensor:
    """Standard normal noise of ``shape`` from ``generator`` (a torch.Generator or a PerSampleNoise)."""
    if isinstance(generator, PerSampleNoise):
        return generator.randn(shape, device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
