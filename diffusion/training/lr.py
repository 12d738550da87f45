"""Learning-rate schedules as multipliers of the base rate, per optimiser step."""

from __future__ import annotations

import math

from diffusion._checks import check_choice

LR_DECAYS = ("constant", "cosine", "linear")


def warmup_then_decay(step: int, warmup_steps: int, total_steps: int, decay: str = "constant", min_ratio: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then constant, cosine or linear decay to
    ``min_ratio`` at ``total_steps``."""
    check_choice("decay", decay, LR_DECAYS)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape
