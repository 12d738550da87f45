"""Data modules: each yields batches ``{"image": (B, C, H, W) in [-1, 1], "label": (B,)}``."""

from diffusion.data.digits import DigitsDataModule, load_digits_split

__all__ = ["DigitsDataModule", "load_digits_split"]
