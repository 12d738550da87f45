"""Random inpainting masks, each drawn from its sample's own generator (seed, epoch, index), so a
resumed run, any number of workers or of processes mask each sample the same way.

A mask is (1, H, W) float, 1 where the model fills. As in SD's inpainting training (random
rectangles, sometimes the whole image), a sample gets 1 to ``max_boxes`` axis-aligned rectangles,
each side 1/4 to 3/4 of the image's, and with probability ``p_full`` the whole image, so that
the model also learns to generate from nothing (its unconditional case).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion.training.randomness import sample_seed

_MASK_STREAM = int.from_bytes(b"masks", "big")


def mask_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """One sample's mask generator: a stream of its own, apart from its crop and flip."""
    return torch.Generator().manual_seed(sample_seed(seed, _MASK_STREAM, epoch, index))


def random_mask(height: int, width: int, generator: torch.Generator, max_boxes: int = 2, p_full: float = 0.1) -> Tensor:
    """(1, height, width) float mask of random rectangles (1 = fill)."""
    if max_boxes < 1 or not 0 <= p_full <= 1:
        raise ValueError(f"random_mask: max_boxes must be >= 1 and p_full in [0, 1], got {max_boxes}, {p_full}")
    mask = torch.zeros(1, height, width)
    if torch.rand((), generator=generator) < p_full:
        return mask.fill_(1.0)
    boxes = int(torch.randint(1, max_boxes + 1, (), generator=generator))
    for _ in range(boxes):
        h = int(torch.randint(max(1, height // 4), max(2, 3 * height // 4 + 1), (), generator=generator))
        w = int(torch.randint(max(1, width // 4), max(2, 3 * width // 4 + 1), (), generator=generator))
        top = int(torch.randint(0, height - h + 1, (), generator=generator))
        left = int(torch.randint(0, width - w + 1, (), generator=generator))
        mask[:, top:top + h, left:left + w] = 1.0
    return mask
