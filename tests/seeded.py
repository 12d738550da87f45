"""Seeded tensors and weights for the tests: the same values whatever ran before."""

from __future__ import annotations

import torch


def randn(*shape: int, seed: int) -> torch.Tensor:
    """Standard normal draws of ``shape`` from a generator of their own, seeded with ``seed``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Trained-looking weights: every parameter (zero-initialised layers too) moved off its init, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
