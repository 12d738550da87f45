"""Backbones: forward(x_t, t, cond) -> output of x_t's shape; t in [0, 1], cond a Conditioning."""

from diffusion.backbones.dit import DiT
from diffusion.backbones.diffusers_mmdit import FluxTransformer, SD3Transformer
from diffusion.backbones.diffusers_unet import DiffusersUNet
from diffusion.backbones.registry import (
    DIT_CONFIGS,
    UNET_CONFIGS,
    build_dit,
    build_unet,
    dit_config,
    unet_config,
)
from diffusion.backbones.unet import UNet

__all__ = ["DiT", "DiffusersUNet", "FluxTransformer", "SD3Transformer", "UNet", "DIT_CONFIGS", "UNET_CONFIGS", "build_dit", "build_unet", "dit_config", "unet_config"]
