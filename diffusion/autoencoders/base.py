"""The frozen data autoencoder of latent diffusion, and the identity for pixel space.

An autoencoder maps images (B, 3, H, W) in [-1, 1] to latents (B, C, H/f, W/f) that are
already normalised, `(z - shift) * scale`, so the diffusion model sees roughly unit-variance
data whichever autoencoder is plugged in; `decode` undoes the normalisation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from diffusion._checks import check_on_device
from diffusion.frozen import FrozenModule, weights_sha256

# Images are expected in [-1, 1]; this margin only catches the common mistake of [0, 255] input.
_IMAGE_RANGE_LIMIT = 1.5


class Autoencoder(FrozenModule, ABC):
    """Frozen encoder-decoder: eval mode, no gradients; subclasses call `_freeze()` last in `__init__`."""

    latent_channels: int
    downsample_factor: int
    image_channels: int = 3
    scale: float = 1.0
    shift: float = 0.0
    source: str = "config"
    _checked_images: bool = False  # whether encode has had its first batch

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """(B, image_channels, H, W) in [-1, 1] -> (B, latent_channels, H/f, W/f), normalised."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """(B, latent_channels, h, w) normalised latents -> (B, image_channels, h*f, w*f) in ~[-1, 1]."""

    @property
    def dtype(self) -> torch.dtype | None:
        p = next(self.parameters(), None)
        return None if p is None else p.dtype

    def fingerprint(self) -> dict[str, str]:
        """What determines the latents, e.g. to check that cached latents match this autoencoder."""
        return {
            "class": type(self).__name__,
            "source": self.source,
            "sha256": weights_sha256(self),
            "dtype": str(self.dtype).removeprefix("torch."),
            "scale": repr(float(self.scale)),
            "shift": repr(float(self.shift)),
            "channels": str(self.latent_channels),
            "factor": str(self.downsample_factor),
        }

    # -- input checks -------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        name = type(self).__name__
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise ValueError(
                f"{name}.encode expects images (B, {self.image_channels}, H, W), got shape {tuple(images.shape)}."
            )
        f = self.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"{name}.encode expects H and W divisible by the downsample factor {f}, "
                f"got H={images.shape[2]}, W={images.shape[3]}; resize or crop the images."
            )
        if not images.is_floating_point():
            raise ValueError(f"{name}.encode expects float images in [-1, 1], got dtype {images.dtype}.")
        if images.numel():
            # The first batch is read on the host, for a clear error on every device (the usual
            # mistake, [0, 255] data, shows there); later ones on the device, so the host never
            # waits. NaN passes: the non-finite loss check stops that run.
            lo, hi = torch.aminmax(images.detach())
            message = f"{name}.encode expects images in [-1, 1]"
            check_on_device(~((lo < -_IMAGE_RANGE_LIMIT) | (hi > _IMAGE_RANGE_LIMIT)), message,
                            lambda: f"{message}, got values in [{float(lo):.3g}, {float(hi):.3g}].",
                            read=not self._checked_images)
            self._checked_images = True

    def _check_latents(self, latents: Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"{type(self).__name__}.decode expects latents (B, {self.latent_channels}, h, w), "
                f"got shape {tuple(latents.shape)}."
            )


class IdentityAutoencoder(Autoencoder):
    """Pixel space: encode and decode are the identity (factor 1, scale 1, shift 0)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"IdentityAutoencoder needs channels >= 1, got {channels}.")
        self.image_channels = self.latent_channels = channels
        self.downsample_factor = 1
        self.source = "identity"
        self._freeze()

    def encode(self, images: Tensor) -> Tensor:
        self._check_images(images)
        return images

    def decode(self, latents: Tensor) -> Tensor:
        self._check_latents(latents)
        return latents
