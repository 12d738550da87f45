"""Sample grids as images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor


def to_grid(images: Tensor, nrow: int | None = None, scale: int | None = None, padding: int = 1) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> one uint8 image (rows, cols, C) with a ``padding``-pixel border,
    ``nrow`` images a row (default: square), each enlarged ``scale`` times (nearest; default:
    small images to about 32 pixels, large ones as they are)."""
    b, c, h, w = images.shape
    scale = scale or max(1, 32 // max(h, w))
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    x = torch.nn.functional.pad(x, (padding, padding, padding, padding), value=0)
    x = torch.cat([x, torch.zeros(rows * nrow - b, *x.shape[1:], dtype=torch.uint8)])
    grid = rearrange(x, "(r n) c h w -> (r h) (n w) c", r=rows, n=nrow)
    return grid.numpy()


def write_png(grid: np.ndarray, path: str | Path) -> Path:
    """Write a grid from :func:`to_grid` as PNG (grayscale for one channel, RGB for three)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, scale: int | None = None) -> Path:
    """:func:`to_grid` then :func:`write_png`."""
    return write_png(to_grid(images, nrow, scale), path)
