"""What the feature extractors share: uint8 RGB images in, a dict of float32 feature matrices out.

Every extractor (InceptionFeatures, DINOv2Features, CLIPFeatures) has
  name           a string naming the network and its weights,
  feature_dims   {feature key: dimension},
  fingerprint()  a dict identifying weights, preprocessing and precision, stored with each metric
                 so numbers computed with different extractors are never compared by mistake,
  forward(images) / features(images)   images -> {feature key: (B, dim) float32}.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffusion._checks import check_choice

PRECISIONS = ("32", "bf16")


def as_uint8_nchw(images: Any, who: str) -> Tensor:
    """`images` as a uint8 (B, 3, H, W) tensor; (B, H, W, 3) is accepted too (NHWC, as samples.npz's
    arr_0), recognised by a last dimension of 3 and a second that is not 3.

    Anything but uint8 0..255 is refused: float images have no agreed range, and guessing one would
    shift every metric silently."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise ValueError(f"{who}: images must be a torch.Tensor or numpy array, got {type(images).__name__}.")
    if images.dtype != torch.uint8:
        raise ValueError(
            f"{who}: images must be uint8 in 0..255 (e.g. samples.npz's arr_0), got dtype {images.dtype}; "
            "convert float images in [-1, 1] as ADM does: ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)."
        )
    if images.ndim != 4:
        raise ValueError(f"{who}: images must be (B, 3, H, W) or (B, H, W, 3), got shape {tuple(images.shape)}.")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    if images.shape[1] != 3:
        raise ValueError(
            f"{who}: images must have 3 (RGB) channels, got shape {tuple(images.shape)}; "
            "repeat a grayscale channel 3 times, drop an alpha channel."
        )
    return images


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state_dict: each tensor's name, dtype, shape and bytes, in key order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


class FeatureExtractor(nn.Module):
    """Base: the image check, the precision and `features()`; subclasses set `name`, `feature_dims`
    and implement `forward(images) -> dict` and `fingerprint()`."""

    name: str
    feature_dims: dict[str, int]

    def __init__(self, precision: str = "32") -> None:
        super().__init__()
        self.precision = check_choice("precision", precision, PRECISIONS)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @contextlib.contextmanager
    def _network_precision(self) -> Iterator[None]:
        """bf16: the network under autocast on its device (weights stay float32); else nothing."""
        if self.precision == "bf16":
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def _images(self, images: Any) -> Tensor:
        """Checked uint8 (B, 3, H, W) images on the extractor's device, as float32 0..255."""
        x = as_uint8_nchw(images, type(self).__name__)
        return x.to(self.device, non_blocking=True).float()

    @torch.inference_mode()
    def features(self, images: Any) -> dict[str, Tensor]:
        """forward() without autograd: {feature key: (B, dim) float32}."""
        return self(images)

    def fingerprint(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError
