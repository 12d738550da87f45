"""A tiny feature extractor for the evaluation tests: the image box-downsampled to 4x4 and projected
by a fixed random matrix. Cheap, deterministic, and sensitive to the image content, so the tests of
the evaluation job's plumbing (processes, resume, references) run in seconds; the real networks
have tests of their own."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyFeatures(nn.Module):
    name = "tiny_projection"

    def __init__(self, dim: int = 16, precision: str = "32", seed: int = 0):
        super().__init__()
        self.dim = dim
        self.feature_dims = {"pool": dim, "spatial": dim}
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(3 * 16, dim, generator=g, dtype=torch.float64))
        self.register_buffer("spatial_projection", torch.randn(3 * 16, dim, generator=g, dtype=torch.float64))

    def fingerprint(self) -> dict:
        return {"extractor": self.name, "dim": self.dim, "resize": "area to 4x4"}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if images.dtype != torch.uint8:
            raise ValueError(f"TinyFeatures takes uint8 images, got {images.dtype}")
        x = nn.functional.adaptive_avg_pool2d(images.double() / 255, 4).flatten(1)
        return {"pool": (x @ self.projection).float(), "spatial": torch.tanh(x @ self.spatial_projection).float()}
