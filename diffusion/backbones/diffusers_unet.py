"""Stable Diffusion's UNet (diffusers' ``UNet2DConditionModel``) behind our backbone interface,
its released weights loaded as they are (no conversion).

Time: SD was trained on the integer DDPM steps i = 0..N-1, which our DDPM puts at t = (i + 1) / N
(diffusion.schedules.DDPM), so the UNet sees the timestep ``N t - 1``; it stays a float, so
continuous-time samplers may ask between the steps. Condition: the text tokens go in as
``encoder_hidden_states``. SD 1.x/2.x cross-attend to every token, padding included, so the
padding mask is not passed unless ``token_mask`` asks for it. Their UNets take no pooled vector
and no class label; a model that needs SDXL's added conditions is refused for now.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.backbones.layers import check_input
from diffusion.conditioning.types import Conditioning


class DiffusersUNet(nn.Module):
    """forward(x_t (B, C, H, W), t (B,) in [0, 1], cond) -> the UNet's output (eps or v, the
    prediction it was trained for: pair it with that schedule).

    Args:
        pretrained: a hub id or a local directory: a UNet's own (its config.json at the top) or a
            pipeline's (the UNet in ``subfolder``). Exactly one of ``pretrained`` and ``config``.
        subfolder: where the UNet lies in a pipeline repository ("unet"); a local directory
            holding the UNet at its top is read there whatever this says.
        config: UNet2DConditionModel arguments, for a randomly initialised UNet (tests).
        num_train_steps: N of the DDPM the weights were trained on (1000 for SD).
        in_channels, token_dim, pooled_dim, num_classes: what build_module passes (the latents'
            channels, the text encoder's widths); checked against the UNet's own config.
        token_mask: pass the tokens' padding mask as ``encoder_attention_mask`` (SD did not).
        gradient_checkpointing: recompute activations in backward (diffusers' own).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        subfolder: str | None = "unet",
        config: Mapping[str, Any] | None = None,
        num_train_steps: int = 1000,
        in_channels: int | None = None,
        token_dim: int | None = None,
        pooled_dim: int | None = None,
        num_classes: int | None = None,
        token_mask: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        if (pretrained is None) == (config is None):
            raise ValueError("DiffusersUNet needs exactly one of pretrained (a hub id or a directory) and config "
                             f"(UNet2DConditionModel arguments), got pretrained={pretrained!r} and "
                             f"config={'a dict' if config is not None else None}")
        if num_train_steps < 1:
            raise ValueError(f"DiffusersUNet: num_train_steps must be >= 1, got {num_train_steps}")
        if pretrained is not None:
            sub = _subfolder(pretrained, subfolder)
            self.unet = UNet2DConditionModel.from_pretrained(pretrained, torch_dtype=torch.float32,
                                                             **({"subfolder": sub} if sub else {}))
            self.source = pretrained if not sub else f"{pretrained}/{sub}"
        else:
            self.unet = UNet2DConditionModel(**_plain(config))
            self.source = "config"
        c = self.unet.config
        self.name = f"DiffusersUNet({self.source})"
        self.num_train_steps = int(num_train_steps)
        self.in_channels = int(c.in_channels)
        self.out_channels = int(c.out_channels)
        self.token_dim = _cross_attention_dim(c.cross_attention_dim, self.name)
        self.pooled_dim = None
        self.num_classes = None
        self.token_mask = token_mask
        self.downsample_factor = 2 ** (len(c.block_out_channels) - 1)
        self._check_build(in_channels, token_dim, pooled_dim, num_classes)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def _check_build(self, in_channels: int | None, token_dim: int | None, pooled_dim: int | None,
                     num_classes: int | None) -> None:
        c = self.unet.config
        if c.addition_embed_type is not None or c.class_embed_type is not None:
            raise ValueError(f"{self.name} needs added conditions (addition_embed_type={c.addition_embed_type!r}, "
                             f"class_embed_type={c.class_embed_type!r}, e.g. SDXL's text_embeds and time_ids), which "
                             "this wrapper does not pass yet; use an SD 1.x/2.x UNet")
        if self.out_channels != self.in_channels:
            raise ValueError(f"{self.name} takes {self.in_channels} channels and returns {self.out_channels} (an "
                             "inpainting or variance model?); a backbone's output has its input's shape")
        if in_channels is not None and in_channels != self.in_channels:
            raise ValueError(f"{self.name} takes latents of {self.in_channels} channels, but the autoencoder gives "
                             f"{in_channels}: pair the UNet with the VAE it was trained with (vae=sd for SD 1.x/2.x)")
        if num_classes is not None:
            raise ValueError(f"{self.name} takes no class labels (got num_classes={num_classes}): use "
                             "conditioning=text with the text encoder it was trained with")
        if token_dim is None:
            raise ValueError(f"{self.name} cross-attends to text tokens of width {self.token_dim}, but the "
                             "conditioner gives none: use conditioning=text with a text encoder of that width")
        if token_dim != self.token_dim:
            raise ValueError(f"{self.name} cross-attends to tokens of width {self.token_dim} (cross_attention_dim), "
                             f"the text encoder gives width {token_dim}: use the text encoder the UNet was trained "
                             "with (CLIP ViT-L/14, 768, for SD 1.x; OpenCLIP ViT-H/14, 1024, for SD 2.x)")
        if pooled_dim is not None:
            raise ValueError(f"{self.name} takes no pooled text vector, but the text encoder gives one of width "
                             f"{pooled_dim}: build it without (text_encoder.pooling=none for a Hugging Face "
                             "encoder, text_encoder.pooled=false for OpenCLIP)")

    @property
    def block_types(self) -> tuple[type, ...]:
        """The units of FSDP sharding: diffusers' residual and transformer blocks."""
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        return (ResnetBlock2D, Transformer2DModel)

    def timestep(self, t: Tensor) -> Tensor:
        """diffusers' timestep of our t: ``N t - 1`` (float32). A t within its dtype's rounding of a
        training step's (i + 1) / N gives exactly i, as the integer timesteps of diffusers' own
        schedulers; times between the steps stay as they are."""
        step = t.to(torch.float64) * self.num_train_steps - 1
        nearest = step.round()
        # t's rounding error (half an ulp, |t| eps / 2) times N, with a factor 2 to spare.
        close = (step - nearest).abs() <= self.num_train_steps * t.abs().to(torch.float64) * torch.finfo(t.dtype).eps
        return torch.where(close, nearest, step).to(torch.float32)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        check_input(self.name, x, t, self.in_channels, self.downsample_factor, "the UNet's downsampling")
        cond = cond if cond is not None else Conditioning()
        if cond.tokens is None:
            raise ValueError(f"{self.name} needs cond.tokens (B, L, {self.token_dim}), the text encoder's tokens; "
                             "got none (the null condition is the empty prompt's encoding)")
        for field in ("labels", "pooled"):
            if getattr(cond, field) is not None:
                raise ValueError(f"{self.name} takes no cond.{field}, but it was given")
        if cond.tokens.shape[0] != x.shape[0] or cond.tokens.shape[-1] != self.token_dim:
            raise ValueError(f"{self.name} expects cond.tokens of shape ({x.shape[0]}, L, {self.token_dim}), got "
                             f"{tuple(cond.tokens.shape)}")
        dtype = self.unet.dtype
        mask = cond.mask if self.token_mask else None
        out = self.unet(x.to(dtype), self.timestep(t), encoder_hidden_states=cond.tokens.to(dtype),
                        encoder_attention_mask=mask, return_dict=False)[0]
        return out.to(x.dtype)


def _subfolder(pretrained: str, subfolder: str | None) -> str | None:
    """A local directory with the UNet's config at its top is read there; else ``subfolder``."""
    path = Path(pretrained)
    if path.is_dir() and (path / "config.json").is_file():
        return None
    if path.is_dir() and subfolder and not (path / subfolder / "config.json").is_file():
        raise ValueError(f"DiffusersUNet: {pretrained} holds no UNet: neither {path / 'config.json'} nor "
                         f"{path / subfolder / 'config.json'} exists; pass a UNet's or a pipeline's directory")
    return subfolder


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict with plain lists (diffusers does not take OmegaConf's containers)."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)


def _cross_attention_dim(value: Any, name: str) -> int:
    """One width for every block's cross-attention (SD's); per-block widths are refused."""
    widths = {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}
    if len(widths) != 1:
        raise ValueError(f"{name} has cross-attention widths {sorted(widths)} per block; one text encoder "
                         "feeds one width")
    return widths.pop()
