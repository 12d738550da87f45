"""Image conditions: what of a sample's images conditions the model besides its prompt.

One part, ``image_condition=`` (conf/image_condition), turns a batch's images into the image fields
of its :class:`~diffusion.conditioning.types.Conditioning`, the same way in training, in validation,
in ``cache.py`` and for a sampling request, so that the model sees at sampling what it saw in
training:

- ``control``: a ControlNet's conditioning image (``batch["conditioning_image"]``, pixels in
  [-1, 1]), as ``cond.control`` (B, 1, C, H, W), in the space the ControlNet reads: pixels, or
  latents of the autoencoder (PixArt-delta's DiT ControlNet);
- ``inpaint``: the mask (``batch["mask"]``, 1 = fill) and the masked image, concatenated to x_t
  (``cond.concat``), as SD's inpainting UNet takes them: [mask at the latents' size, latents of
  ``image * (mask < 0.5)``], 1 + C channels;
- ``image_to_image``: the latents of the conditioning image concatenated to x_t (InstructPix2Pix;
  super-resolution with ``data.module.annotator=low_resolution``);
- ``image_prompt``: an image encoder's embeddings of the image (IP-Adapter), ``cond.image_embeds``;
  dropped with the prompt, zeros being its null condition.

They combine with any conditioner (labels, text): an inpainting model is still prompted. Control and
concatenated latents are never dropped (they describe the input: KEPT_FIELDS), and stay in both
branches of classifier-free guidance. Conditions are encoded with the autoencoder's posterior mode,
a function of the image, so that a cache holds exactly what training would compute.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from diffusion._checks import check_choice

Encode = Callable[[Tensor], Tensor]  # pixels (B, C, H, W) in [-1, 1] -> latents (or the pixels, without an autoencoder)
CONTROL_SPACES = ("pixels", "latents")


class ImageCondition(nn.Module, ABC):
    """``(batch, encode) -> {field: tensor}``: the image fields of a batch's condition. A cached
    batch carries the fields themselves (what :meth:`cache` stored) and they are used as they are."""

    #: The Conditioning fields it fills, which a cache stores.
    fields: tuple[str, ...] = ()
    #: The batch keys it reads: what a sampling request gives (sample.py's options).
    needs: tuple[str, ...] = ()
    #: The batch keys a sampling request gives instead (sample.py's options); None: ``needs``.
    requests: tuple[str, ...] | None = None

    @property
    def request_keys(self) -> tuple[str, ...]:
        return self.needs if self.requests is None else self.requests

    def concat_channels(self, latent_channels: int) -> int:
        """The channels it concatenates to x_t: the backbone's extra input channels."""
        return 0

    def bind(self, backbone: nn.Module) -> None:
        """Read off the backbone what it needs (e.g. the space a ControlNet's control lives in)."""

    def forward(self, batch: Mapping[str, Any], encode: Encode) -> dict[str, Tensor]:
        if all(name in batch for name in self.fields):  # a cached batch
            return {name: batch[name] for name in self.fields}
        missing = [key for key in self.needs if batch.get(key) is None]
        if missing and any(batch.get(key) is None for key in self.request_keys):
            raise ValueError(f"image_condition={self.name} needs batch keys {list(self.needs)}, the batch lacks "
                             f"{missing}: {self.hint}")
        return self.compute(batch, encode)

    @abstractmethod
    def compute(self, batch: Mapping[str, Any], encode: Encode) -> dict[str, Tensor]: ...

    def null(self, fields: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The null condition's fields (B = 1) of those it dropped with the prompt; kept fields have none."""
        return {}

    def cache(self, batch: Mapping[str, Any], encode: Encode) -> dict[str, Tensor]:
        return self(batch, encode)

    #: Why a cache cannot hold it (None: it can).
    cache_refusal: str | None = None

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    @property
    def hint(self) -> str:
        return ("train on images with conditioning images: data=image_folder with data.module.conditioning_column, "
                "conditioning_root or annotator (canny, grayscale, low_resolution, depth, pose)")

    def fingerprint(self) -> dict[str, Any]:
        return {"class": type(self).__name__}


def _conditioning_images(batch: Mapping[str, Any], key: str = "conditioning_image") -> Tensor:
    images = torch.as_tensor(batch[key])
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"batch[{key!r}] must be float images (B, C, H, W) in [-1, 1], got {images.dtype} "
                         f"{tuple(images.shape)}")
    return images


class Control(ImageCondition):
    """A ControlNet's conditioning image as ``cond.control`` (B, K, C, H, W): K = 1 in training; a
    sampling request may give (B, K, C, H, W) for K ControlNets. The space (pixels, or the
    autoencoder's latents) is the ControlNets' (``input_spaces`` of diffusion.controlnet.Controlled)."""

    fields, needs = ("control",), ("conditioning_image",)

    def __init__(self, space: str | None = None) -> None:
        super().__init__()
        self.space = None if space is None else check_choice("image_condition.space", space, CONTROL_SPACES)

    def bind(self, backbone: nn.Module) -> None:
        spaces = set(getattr(backbone, "input_spaces", ()))  # diffusion.controlnet.Controlled's: one space for all
        if not spaces:
            raise ValueError("image_condition=control feeds a ControlNet, and the backbone has none: add "
                             "adapter=controlnet (it trains a ControlNet beside the frozen base)")
        (space,) = spaces
        if self.space is not None and self.space != space:
            raise ValueError(f"image_condition.space={self.space}, but the ControlNet reads {space}; leave it null")
        self.space = space

    def compute(self, batch: Mapping[str, Any], encode: Encode) -> dict[str, Tensor]:
        images = torch.as_tensor(batch["conditioning_image"])
        several = images.ndim == 5
        if not several:
            images = _conditioning_images(batch)[:, None]
        b, k = images.shape[:2]
        flat = images.flatten(0, 1)
        control = encode(flat) if self.space == "latents" else flat
        return {"control": control.unflatten(0, (b, k))}

    def fingerprint(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "space": self.space}


class Inpaint(ImageCondition):
    """SD's inpainting input: ``cond.concat`` = [mask resized to the latents (nearest), latents of the
    masked image ``image * (mask < 0.5)``], 1 + C channels after x_t's C (SD 2's inpainting UNet's
    9 = 4 + 1 + 4). The mask is 1 where the model fills."""

    fields, needs = ("concat",), ("image", "mask")
    cache_refusal = ("image_condition=inpaint draws a new mask for each sample each epoch, so the masked image's "
                     "latents cannot be cached; leave cache_dir out")

    def concat_channels(self, latent_channels: int) -> int:
        return 1 + latent_channels

    @property
    def hint(self) -> str:
        return "train on data with masks (data.module.masks=true) or give sample.py mask=..."

    def compute(self, batch: Mapping[str, Any], encode: Encode) -> dict[str, Tensor]:
        image, mask = _conditioning_images(batch, "image"), torch.as_tensor(batch["mask"]).to(batch["image"].dtype)
        if mask.shape != (image.shape[0], 1, *image.shape[-2:]):
            raise ValueError(f"batch['mask'] must be (B, 1, H, W) = {(image.shape[0], 1, *image.shape[-2:])} like the "
                             f"image, 1 where the model fills; got {tuple(mask.shape)}")
        latents = encode(image * (mask < 0.5))
        small = F.interpolate(mask, size=latents.shape[-2:], mode="nearest") if latents.shape[-2:] != mask.shape[-2:] else mask
        return {"concat": torch.cat([small.to(latents.dtype), latents], dim=1)}


class ImageToImage(ImageCondition):
    """The conditioning image's latents as ``cond.concat`` (InstructPix2Pix's input image;
    super-resolution's low-resolution image with ``data.module.annotator=low_resolution``)."""

    fields, needs = ("concat",), ("conditioning_image",)

    def concat_channels(self, latent_channels: int) -> int:
        return latent_channels

    def compute(self, batch: Mapping[str, Any], encode: Encode) -> dict[str, Tensor]:
        return {"concat": encode(_conditioning_images(batch))}


class ImagePrompt(ImageCondition):
    """IP-Adapter's image prompt: ``encoder(batch["ip_image"])`` (B, N, D), the training image itself
    when the batch has no other (Ye et al. 2023 train on the image as its own prompt). Dropped with
    the prompt; the null condition is zeros (diffusers' negative image embeddings)."""

    fields, needs, requests = ("image_embeds",), ("image",), ("ip_image",)

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def compute(self, batch: Mapping[str, Any], encode: Encode) -> dict[str, Tensor]:
        key = "ip_image" if batch.get("ip_image") is not None else "image"  # a request's prompt, else the image
        return {"image_embeds": self.encoder(_conditioning_images(batch, key))}

    def null(self, fields: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"image_embeds": torch.zeros_like(fields["image_embeds"][:1])}

    @property
    def hint(self) -> str:
        return "give sample.py ip_image=..."

    def fingerprint(self) -> dict[str, Any]:
        fingerprint = getattr(self.encoder, "fingerprint", None)
        return {"class": type(self).__name__, "encoder": fingerprint() if fingerprint else type(self.encoder).__name__}
