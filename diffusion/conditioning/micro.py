"""SDXL's size and crop micro-conditioning (Podell et al. 2023, sec. 2.2) of each training image.

The image-caption datasets give every item its ``original_size`` (h, w of the file), the
``crop_top_left`` (top, left) of its crop in the resized image and its ``target_size`` (h, w of the
crop), as diffusers' SDXL training script computes them. A backbone that reads them
(``takes_time_ids``: the SDXL UNet) gets them as ``Conditioning.time_ids`` in training and
validation. They are never dropped with the caption (SDXL's size embedders had no dropout), and
sampling takes them from the backbone's config instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffusion.conditioning.types import Conditioning

#: The batch keys of the micro-conditioning, in the order of SDXL's six time ids.
MICRO_KEYS = ("original_size", "crop_top_left", "target_size")


def takes_time_ids(backbone: nn.Module) -> bool:
    return bool(getattr(backbone, "takes_time_ids", False))


def with_time_ids(cond: Conditioning, batch: Mapping[str, Any], backbone: nn.Module) -> Conditioning:
    """``cond`` with the batch's (B, 6) time ids when ``backbone`` takes them and the batch has them
    (an image folder's, or a cache written from one); else ``cond`` as it is."""
    if not takes_time_ids(backbone) or not all(key in batch for key in MICRO_KEYS):
        return cond
    ids = torch.cat([torch.as_tensor(batch[key]).long().reshape(-1, 2) for key in MICRO_KEYS], dim=1)
    return cond.replace(time_ids=ids.to(cond.tokens.device if cond.tokens is not None else ids.device))
