"""Data modules: each yields batches ``{"image": (B, C, H, W) in [-1, 1], ...}`` with ``label``
(class-conditional) or ``caption`` / ``has_caption`` (text), or ``latent`` and the cached
condition when training from a cache; ``dataset(split)`` gives a split unshuffled."""

from diffusion.data.batching import GlobalBatchSampler
from diffusion.data.buckets import make_buckets
from diffusion.data.cache import CachedDataModule, CachedDataset, write_cache
from diffusion.data.captions import ImageCaptionDataModule, ImageCaptionDataset
from diffusion.data.classes import ImageClassDataModule, ImageClassDataset, center_crop_arr
from diffusion.data.dreambooth import DreamBoothDataModule, DreamBoothDataset
from diffusion.data.digits import DigitsDataModule, load_digits_split

__all__ = [
    "CachedDataModule",
    "CachedDataset",
    "DigitsDataModule",
    "DreamBoothDataModule",
    "DreamBoothDataset",
    "GlobalBatchSampler",
    "ImageCaptionDataModule",
    "ImageCaptionDataset",
    "ImageClassDataModule",
    "ImageClassDataset",
    "center_crop_arr",
    "load_digits_split",
    "make_buckets",
    "write_cache",
]
