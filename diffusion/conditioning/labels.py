"""Class labels: an embedding table with one extra row for the null class.

As in DiT (Peebles & Xie 2023), index `num_classes` is the null class used for
classifier-free guidance; dropping a label means replacing it by that index
(see `dropout.py`), so the table itself never drops anything.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion._checks import check_on_device
from diffusion.conditioning.types import Conditioning


class LabelEmbedder(nn.Module):
    """labels (B,) int64 in [0, num_classes] -> (B, dim); `num_classes` is the null class."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LabelEmbedder needs num_classes >= 1, got {num_classes}.")
        self.num_classes = num_classes
        self.null_index = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)  # +1: the null class

    def forward(self, labels: Tensor) -> Tensor:
        if labels.ndim != 1 or labels.dtype != torch.long:
            raise ValueError(f"labels must be int64 of shape (B,), got dtype {labels.dtype} shape {tuple(labels.shape)}.")
        if labels.numel():
            # On the labels' device on every call, so the host never waits, and torch.compile traces it.
            message = f"labels must lie in [0, {self.null_index}] ({self.null_index} = null class)"
            check_on_device(((labels >= 0) & (labels <= self.null_index)).all(), message,
                            lambda: f"{message}, got min {int(labels.min())} max {int(labels.max())}.")
        return self.table(labels)


def label_condition(labels: Tensor) -> Conditioning:
    """Wrap class indices (B,) as a Conditioning."""
    return Conditioning(labels=labels.long())


def null_label_condition(batch_size: int, num_classes: int, device: torch.device | str | None = None) -> Conditioning:
    """The unconditional (null-class) Conditioning for classifier-free guidance."""
    return Conditioning(labels=torch.full((batch_size,), num_classes, dtype=torch.long, device=device))
