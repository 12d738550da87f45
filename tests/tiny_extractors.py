"""A tiny feature extractor for the evaluation tests: the image box-downsampled to 4x4 and projected
by a fixed random matrix. Cheap, deterministic, and sensitive to the image content, so the tests of
the evaluation job's plumbing (processes, resume, references) run in seconds; the real networks
have tests of their own. And tiny random CLIP and DINOv2 directories, as the hub has them, for the
evaluations through diffusion.evaluation.hub."""

from __future__ import annotations

from pathlib import Path

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


def save_tiny_clip(directory: Path, image_size: int = 8, patch_size: int = 4, seed: int = 0) -> Path:
    """A tiny random CLIPModel (tests.tiny_encoders' "clip_full" with a vision tower of `image_size`),
    its word-level tokenizer and a CLIP image processor config, saved as a hub directory is."""
    import transformers as tf

    from tests.tiny_encoders import save_tiny_hf

    save_tiny_hf("clip_full", directory, seed, vision={"image_size": image_size, "patch_size": patch_size})
    tf.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                             crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def save_tiny_dinov2(directory: Path, image_size: int = 28, patch_size: int = 14, seed: int = 0) -> Path:
    """A tiny random Dinov2Model and the image processor dgm-eval's preprocessing corresponds to (a plain
    bicubic resize to `image_size`, no crop, ImageNet mean/std), saved as a hub directory is."""
    import transformers as tf
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

    config = tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=patch_size, image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tf.Dinov2Model(config).save_pretrained(directory)
    tf.BitImageProcessorPil(size={"height": image_size, "width": image_size}, resample=PILImageResampling.BICUBIC,
                            do_center_crop=False, image_mean=IMAGENET_DEFAULT_MEAN,
                            image_std=IMAGENET_DEFAULT_STD).save_pretrained(directory)
    return directory
