"""ControlNet for our UNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models").

A trainable copy of the UNet's encoder (time, label and pooled embeddings, conv_in, the down stages,
the mid block), its weights copied from the base, reads x_t plus the embedded conditioning image; a
zero-initialised 1x1 convolution on each of its skips and on its mid output gives the residuals that
the base adds to its own (``UNet.forward(control_residuals=)``). At initialisation every residual is
zero, so the controlled UNet is the base exactly, and the zero convolutions still receive gradients.

The conditioning image is pixels (``input_space="pixels"``, ``pixels_per_latent`` times x_t's size,
as it comes, e.g. in [-1, 1]), embedded by a small conv stack that downsamples it to x_t's resolution,
its last convolution zeroed (diffusers' ControlNetConditioningEmbedding has this shape); or latents of
x_t's size (``input_space="latents"``), embedded by a zero 1x1 convolution.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from diffusion._checks import check_choice
from diffusion.backbones.layers import autocast_context, check_condition, check_input, maybe_checkpoint, zero_module
from diffusion.backbones.unet import Stage, UNet
from diffusion.conditioning.types import Conditioning

INPUT_SPACES = ("pixels", "latents")
#: Widths of the conditioning embedding's levels (full resolution, then each halving), as diffusers'.
EMBEDDING_CHANNELS = (16, 32, 96, 256)


class ConditioningEmbedding(nn.Module):
    """(B, C, f H, f W) pixels -> (B, out_channels, H, W): conv-SiLU at full resolution, then per
    halving a conv-SiLU and a stride-2 conv-SiLU, and a zeroed 3x3 output conv; f a power of 2."""

    def __init__(self, in_channels: int, out_channels: int, downsampling: int,
                 widths: Sequence[int] = EMBEDDING_CHANNELS) -> None:
        super().__init__()
        halvings = int(math.log2(downsampling)) if downsampling >= 1 else -1
        if halvings < 0 or 2**halvings != downsampling:
            raise ValueError(f"ControlNet: pixels_per_latent={downsampling} must be a power of 2 (1 in pixel space, "
                             "the autoencoder's factor, 8 for SD's VAE, in latent space)")
        widths = [*widths, *[widths[-1]] * max(0, halvings + 1 - len(widths))][: halvings + 1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1), nn.SiLU()]
        for i in range(halvings):
            layers += [nn.Conv2d(widths[i], widths[i], 3, padding=1), nn.SiLU(),
                       nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = zero_module(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, image: Tensor) -> Tensor:
        return self.out(self.body(image))


class UNetControlNet(nn.Module):
    """forward(x_t, t, cond, control) -> the residuals for ``base.forward(control_residuals=)``.

    Args:
        base: the UNet to control; its encoder's weights are copied (the base itself is not kept).
        conditioning_channels: channels of the conditioning image (3 for RGB pixels; the latents'
            channels in latent space).
        input_space: "pixels" or "latents": what ``control`` holds (the data pipeline gives it).
        pixels_per_latent: how many pixels a latent spans (the autoencoder's factor; 1 in pixel
            space): the pixel control is that much larger than x_t.
    """

    def __init__(self, base: UNet, conditioning_channels: int = 3, input_space: str = "pixels",
                 pixels_per_latent: int = 1) -> None:
        super().__init__()
        if not isinstance(base, UNet):
            raise ValueError(f"UNetControlNet controls our UNet (diffusion.backbones.unet), got {type(base).__name__}")
        self.input_space = check_choice("ControlNet input_space", input_space, INPUT_SPACES)
        self.conditioning_channels = int(conditioning_channels)
        self.pixels_per_latent = int(pixels_per_latent) if input_space == "pixels" else 1
        for name in ("in_channels", "num_classes", "token_dim", "pooled_dim", "downsample_factor",
                     "gradient_checkpointing", "bf16_autocast", "channels_last"):
            setattr(self, name, getattr(base, name))
        # The trainable copy of the encoder (Zhang et al. sec. 3.1): the base's weights to start from.
        self.time_embed = copy.deepcopy(base.time_embed)
        self.label_embed = copy.deepcopy(base.label_embed)
        self.pooled_embed = copy.deepcopy(base.pooled_embed)
        self.conv_in = copy.deepcopy(base.conv_in)
        self.down = copy.deepcopy(base.down)
        self.mid = copy.deepcopy(base.mid)
        model_channels = base.conv_in.out_channels
        if self.input_space == "pixels":
            self.cond_embed: nn.Module = ConditioningEmbedding(conditioning_channels, model_channels,
                                                               self.pixels_per_latent)
        else:
            self.cond_embed = zero_module(nn.Conv2d(conditioning_channels, model_channels, 1))
        *skips, mid = base.skip_channels()
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(ch, ch, 1)) for ch in skips)
        self.mid_zero_conv = zero_module(nn.Conv2d(mid, mid, 1))
        self.requires_grad_(True)  # a frozen base's copies train

    def control_shape(self, x: Tensor) -> tuple[int, int, int]:
        """The (C, H, W) of the control for x_t of x's shape."""
        f = self.pixels_per_latent
        return self.conditioning_channels, x.shape[-2] * f, x.shape[-1] * f

    def _run(self, layer: nn.Module, h: Tensor, emb: Tensor, tokens: Tensor | None, mask: Tensor | None) -> Tensor:
        if isinstance(layer, Stage):
            return maybe_checkpoint(self.gradient_checkpointing, layer, h, emb, tokens, mask)
        return layer(h)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None, control: Tensor) -> list[Tensor]:
        check_input("UNetControlNet", x, t, self.in_channels, self.downsample_factor, "2 ** (number of levels - 1)")
        cond = check_condition("UNetControlNet", cond, x.shape[0], self.num_classes, self.token_dim, self.pooled_dim)
        check_control("UNetControlNet", control, x, self.control_shape(x), self.input_space)
        tokens, mask = cond.tokens, cond.mask
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        with autocast_context(self.bf16_autocast, x):
            emb = self.time_embed(t)
            if self.label_embed is not None:
                emb = emb + self.label_embed(cond.labels)
            if self.pooled_embed is not None:
                emb = emb + self.pooled_embed(cond.pooled)
            h = self.conv_in(x.contiguous(memory_format=layout))
            h = h + self.cond_embed(control.to(x.dtype).contiguous(memory_format=layout))
            outs = [h]
            for layer in self.down:
                h = self._run(layer, h, emb, tokens, mask)
                outs.append(h)
            for layer in self.mid:
                h = self._run(layer, h, emb, tokens, mask)
            return [conv(o) for conv, o in zip(self.zero_convs, outs)] + [self.mid_zero_conv(h)]


def check_control(name: str, control: Tensor | None, x: Tensor, shape: tuple[int, int, int], space: str) -> None:
    """One ControlNet's control is (B, C, H, W) of the shape it was built for."""
    want = (x.shape[0], *shape)
    if control is None or tuple(control.shape) != want:
        got = None if control is None else tuple(control.shape)
        raise ValueError(f"{name} needs a control of shape {want} ({space}; x_t is {tuple(x.shape)}), got {got}: "
                         + ("check adapter.pixels_per_latent (the autoencoder's factor, 1 in pixel space) and "
                            "adapter.conditioning_channels" if space == "pixels" else
                            "the control latents must be x_t's size (adapter.conditioning_channels their channels)"))
