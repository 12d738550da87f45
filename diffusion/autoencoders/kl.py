"""A diffusers `AutoencoderKL` (the VAE of Stable Diffusion, SDXL and FLUX) as a frozen Autoencoder.

Scale and shift come from the model's own config (`scaling_factor`, `shift_factor`):
SD 1.x/2.x 0.18215 (4 channels), SDXL 0.13025 (4 channels), FLUX 0.3611 with shift 0.1159
(16 channels) -- the values in the configs of stabilityai/sd-vae-ft-mse, stabilityai/sdxl-vae
and black-forest-labs/FLUX.1-schnell (vae/).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from diffusion._checks import check_choice
from diffusion.autoencoders.base import Autoencoder

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class KLAutoencoder(Autoencoder):
    """`pretrained` (hub id or local directory) or `config` (a random `AutoencoderKL(**config)`), not both.

    encode: posterior mode (its mean) by default, a posterior sample if `sample_posterior`.
    Both directions run in chunks of `chunk_size` samples, so a large batch does not need the
    activation memory of the whole batch at once, and return the dtype of their input.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        subfolder: str | None = None,
        config: Mapping[str, Any] | None = None,
        chunk_size: int = 8,
        dtype: str = "float32",
        sample_posterior: bool = False,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
    ) -> None:
        super().__init__()
        if (pretrained is None) == (config is None):
            raise ValueError(
                "KLAutoencoder expects exactly one of `pretrained` (a hub id or local directory) and `config` "
                f"(a dict of AutoencoderKL arguments), got pretrained={pretrained!r} and "
                f"config={'None' if config is None else 'a dict'}."
            )
        if config is not None and subfolder is not None:
            raise ValueError(f"KLAutoencoder: subfolder={subfolder!r} only applies to `pretrained`, got a config.")
        if chunk_size < 1:
            raise ValueError(f"KLAutoencoder expects chunk_size >= 1, got {chunk_size}.")
        check_choice("dtype", dtype, DTYPES)
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:  # a dev dependency of the project, needed only for latent diffusion
            raise ImportError("KLAutoencoder needs diffusers: pip install diffusers") from e

        if pretrained is not None:
            self.vae = AutoencoderKL.from_pretrained(pretrained, subfolder=subfolder, torch_dtype=DTYPES[dtype])
            self.source = pretrained if subfolder is None else f"{pretrained}/{subfolder}"
        else:
            self.vae = AutoencoderKL(**_plain(config))
            self.source = "config"
            if dtype != "float32":
                self.vae.to(DTYPES[dtype])

        cfg = self.vae.config
        if getattr(cfg, "latents_mean", None) is not None or getattr(cfg, "latents_std", None) is not None:
            # A per-channel normalisation cannot be expressed by one scale and shift; fail instead of
            # silently producing latents of the wrong statistics.
            raise ValueError(
                f"KLAutoencoder: {self.source} normalises latents per channel (latents_mean/latents_std "
                "in its config), which KLAutoencoder does not support; expected a scalar scaling_factor/shift_factor."
            )
        self.scale = float(cfg.scaling_factor if scaling_factor is None else scaling_factor)
        self.shift = float((cfg.shift_factor or 0.0) if shift_factor is None else shift_factor)
        if self.scale <= 0:
            raise ValueError(f"KLAutoencoder expects scaling_factor > 0, got {self.scale}.")
        self.image_channels = int(cfg.in_channels)
        self.latent_channels = int(cfg.latent_channels)
        # Every encoder block but the last halves the resolution.
        self.downsample_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.chunk_size = chunk_size
        self.sample_posterior = sample_posterior
        self._freeze()

    @property
    def draws_posterior(self) -> bool:
        """Whether ``encode`` draws from the posterior (and so takes ``noise``)."""
        return self.sample_posterior

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) = (z - shift) * scale, z the posterior mode or a sample:
        ``mean + std * noise`` with ``noise`` (B, C, H/f, W/f) standard normal when given (training passes
        draws keyed to each sample, so a resumed run draws the same), else from ``generator``."""
        self._check_images(images)
        if noise is not None and noise.shape[0] != images.shape[0]:
            raise ValueError(f"KLAutoencoder.encode: noise for {noise.shape[0]} samples, images of {images.shape[0]}")
        out = []
        noises = noise.split(self.chunk_size) if noise is not None else [None] * len(images.split(self.chunk_size))
        for chunk, eps in zip(images.split(self.chunk_size), noises):
            posterior = self.vae.encode(chunk.to(self.dtype)).latent_dist
            if not self.sample_posterior:
                z = posterior.mode()
            elif eps is not None:
                z = posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
            else:
                z = posterior.sample(generator=generator)
            out.append((z.to(images.dtype) - self.shift) * self.scale)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) normalised latents -> images (B, 3, h*f, w*f) in ~[-1, 1] (not clamped)."""
        self._check_latents(latents)
        out = []
        for chunk in latents.split(self.chunk_size):
            z = chunk / self.scale + self.shift
            out.append(self.vae.decode(z.to(self.dtype)).sample.to(latents.dtype))
        return torch.cat(out)


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A Hydra DictConfig -> plain dict, since diffusers serialises its config to JSON."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return dict(config)
