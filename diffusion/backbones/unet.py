"""UNet in the ADM / Stable Diffusion style.

ADM (Dhariwal & Nichol 2021): residual blocks whose GroupNorm is modulated by
the time (+ class, + pooled) embedding as scale-shift, self-attention at chosen
levels, zero-initialised output convolutions so each block starts as the
identity. Stable Diffusion (Rombach et al. 2022): with text tokens, attention
levels use spatial-transformer blocks (self-attention, cross-attention to the
tokens, GEGLU feed-forward).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffusion.backbones.layers import (
    TIME_SCALE,
    Attention,
    TimestepEmbedder,
    autocast_context,
    check_condition,
    check_input,
    ip_image_tokens,
    maybe_checkpoint,
    with_concat,
    zero_extra_input_channels,
    zero_module,
)
from diffusion.conditioning.labels import LabelEmbedder
from diffusion.conditioning.types import Conditioning


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then norm * (1 + scale) + shift from the embedding, SiLU-dropout-conv (zeroed)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.out_norm = nn.GroupNorm(groups, out_ch)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        )
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        scale, shift = rearrange(self.emb_layers(emb), "b (two c) -> two b c 1 1", two=2)
        h = torch.addcmul(shift, self.out_norm(h), 1 + scale)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """ADM self-attention over all pixels, residual, output projection zeroed."""

    def __init__(self, ch: int, head_dim: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.attn = Attention(ch, _num_heads(ch, head_dim))
        zero_module(self.attn.proj)

    def forward(self, x: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None,
                image_tokens: Tensor | None = None) -> Tensor:
        h = rearrange(self.norm(x), "b c y x -> b (y x) c")
        h = rearrange(self.attn(h), "b (y x) c -> b c y x", y=x.shape[-2])
        return x + h


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020), as in Stable Diffusion."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to tokens, GEGLU feed-forward."""

    def __init__(self, dim: int, num_heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, qkv_bias=False)
        self.attn2 = Attention(dim, num_heads, context_dim=context_dim, qkv_bias=False)
        self.ff = GEGLU(dim)

    def forward(self, x: Tensor, tokens: Tensor, mask: Tensor | None, image_tokens: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), tokens, mask, image_tokens)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Stable Diffusion's spatial transformer: pixels as tokens through `depth` transformer blocks."""

    def __init__(self, ch: int, head_dim: int, groups: int, context_dim: int, depth: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.blocks = nn.ModuleList(TransformerBlock(ch, _num_heads(ch, head_dim), context_dim) for _ in range(depth))
        self.proj_out = zero_module(nn.Linear(ch, ch))

    def forward(self, x: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None,
                image_tokens: Tensor | None = None) -> Tensor:
        h = self.proj_in(rearrange(self.norm(x), "b c y x -> b (y x) c"))
        for block in self.blocks:
            h = block(h, tokens, mask, image_tokens)
        return x + rearrange(self.proj_out(h), "b (y x) c -> b c y x", y=x.shape[-2])


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """One residual block, optionally followed by attention: the unit of gradient checkpointing."""

    def __init__(self, res: ResBlock, attn: nn.Module | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: Tensor, emb: Tensor, tokens: Tensor | None, mask: Tensor | None,
                image_tokens: Tensor | None = None) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x, tokens, mask, image_tokens) if self.attn is not None else x


def _num_heads(ch: int, head_dim: int) -> int:
    if ch % head_dim:
        raise ValueError(f"UNet attention width {ch} is not divisible by head_dim={head_dim}.")
    return ch // head_dim


class UNet(nn.Module):
    """forward(x_t (B, C, H, W), t (B,) in [0, 1], cond) -> (B, C, H, W) (2C with learn_sigma and return_variance).

    Levels run at full, 1/2, 1/4, ... resolution with `model_channels * channel_mult[i]`
    channels and `num_res_blocks` residual blocks each; `attention_levels` are the level
    indices (0 = full resolution) with attention, which is self-attention, or a spatial
    transformer with cross-attention when `token_dim` is set. H and W must be divisible
    by 2 ** (len(channel_mult) - 1).

    `channels_last` runs the network in the (B, H, W, C) memory layout, which oneDNN (CPUs) and
    cuDNN (GPUs) convolve faster, and in which attention's (B, H * W, C) tokens are free views;
    the output is returned in the usual layout.
    """

    block_types = (ResBlock, AttentionBlock, SpatialTransformer)  # the units of FSDP sharding

    def __init__(
        self,
        in_channels: int = 4,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1, 2, 3),
        head_dim: int = 64,
        dropout: float = 0.0,
        num_classes: int | None = None,
        token_dim: int | None = None,
        pooled_dim: int | None = None,
        transformer_depth: int = 1,
        norm_groups: int = 32,
        learn_sigma: bool = False,
        time_scale: float = TIME_SCALE,
        gradient_checkpointing: bool = False,
        bf16_autocast: bool = False,
        channels_last: bool = True,
        concat_channels: int = 0,
    ) -> None:
        super().__init__()
        channel_mult, attention_levels = tuple(channel_mult), tuple(attention_levels)
        bad_levels = [lvl for lvl in attention_levels if not 0 <= lvl < len(channel_mult)]
        if bad_levels:
            raise ValueError(f"UNet attention_levels must lie in [0, {len(channel_mult) - 1}], got {bad_levels}.")
        for ch in {model_channels * m for m in channel_mult}:
            if ch % norm_groups:
                raise ValueError(f"UNet channel count {ch} is not divisible by norm_groups={norm_groups}.")
        if concat_channels < 0:
            raise ValueError(f"UNet concat_channels must be >= 0, got {concat_channels}.")
        self.in_channels = in_channels
        self.concat_channels = concat_channels  # cond.concat's, appended to x_t; the output keeps in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels  # of the last convolution
        self.num_classes = num_classes
        self.token_dim = token_dim
        self.pooled_dim = pooled_dim
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.gradient_checkpointing = gradient_checkpointing
        self.bf16_autocast = bf16_autocast
        self.channels_last = channels_last

        emb_dim = 4 * model_channels  # ADM's time-embedding width
        self.time_embed = TimestepEmbedder(emb_dim, frequency_dim=model_channels, scale=time_scale)
        self.label_embed = LabelEmbedder(num_classes, emb_dim) if num_classes is not None else None
        self.pooled_embed = (
            nn.Sequential(nn.Linear(pooled_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            if pooled_dim is not None
            else None
        )

        def attention(ch: int) -> nn.Module:
            if token_dim is None:
                return AttentionBlock(ch, head_dim, norm_groups)
            return SpatialTransformer(ch, head_dim, norm_groups, token_dim, transformer_depth)

        def stage(in_ch: int, out_ch: int, level: int) -> Stage:
            res = ResBlock(in_ch, out_ch, emb_dim, dropout, norm_groups)
            return Stage(res, attention(out_ch) if level in attention_levels else None)

        self.conv_in = nn.Conv2d(in_channels + concat_channels, model_channels, 3, padding=1)
        zero_extra_input_channels(self.conv_in, in_channels)
        self.down = nn.ModuleList()
        skip_channels, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(stage(ch, model_channels * mult, level))
                ch = model_channels * mult
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)

        self.mid = nn.ModuleList(
            [
                Stage(ResBlock(ch, ch, emb_dim, dropout, norm_groups), attention(ch)),
                Stage(ResBlock(ch, ch, emb_dim, dropout, norm_groups), None),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(stage(ch + skip_channels.pop(), model_channels * mult, level))
                ch = model_channels * mult
            if level != 0:
                self.up.append(Upsample(ch))

        self.out = nn.Sequential(
            nn.GroupNorm(norm_groups, ch), nn.SiLU(), zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        )
        self.image_projection: nn.Module | None = None  # IP-Adapter's (adapter=ip_adapter, diffusion.ip_adapter)

    def _run(self, layer: nn.Module, h: Tensor, emb: Tensor, tokens: Tensor | None, mask: Tensor | None,
             image_tokens: Tensor | None = None) -> Tensor:
        if isinstance(layer, Stage):
            return maybe_checkpoint(self.gradient_checkpointing, layer, h, emb, tokens, mask, image_tokens)
        return layer(h)  # down/up-sampling convolutions are cheap to keep

    def skip_channels(self) -> list[int]:
        """The channels of each skip (conv_in's output, then each down layer's) and, last, of the mid
        block's output: the shapes of a ControlNet's residuals (diffusion.backbones.unet_controlnet)."""
        channels = [self.conv_in.out_channels]
        for layer in self.down:
            channels.append(layer.res.out_norm.num_channels if isinstance(layer, Stage) else layer.conv.out_channels)
        return [*channels, self.mid[-1].res.out_norm.num_channels]

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None, *, return_variance: bool = False,
                control_residuals: Sequence[Tensor] | None = None) -> Tensor:
        """The prediction's C channels; with learn_sigma and ``return_variance=True`` all 2C
        (prediction, then the variance channels of diffusion.variance), as DiT.

        ``control_residuals``: a ControlNet's outputs, one per skip (:meth:`skip_channels`) and last
        the mid block's, added to the skips and to the mid block's output (diffusers'
        down_block_additional_residuals and mid_block_additional_residual)."""
        if return_variance and not self.learn_sigma:
            raise ValueError("UNet.forward(return_variance=True) needs a model built with learn_sigma=True")
        check_input("UNet", x, t, self.in_channels, self.downsample_factor, "2 ** (number of levels - 1)")
        cond = check_condition("UNet", cond, x.shape[0], self.num_classes, self.token_dim, self.pooled_dim)
        tokens, mask = cond.tokens, cond.mask
        image_tokens = ip_image_tokens("UNet", self.image_projection, cond)  # IP-Adapter's, else None
        with autocast_context(self.bf16_autocast, x):
            emb = self.time_embed(t)  # (B, 4 * model_channels)
            if self.label_embed is not None:
                emb = emb + self.label_embed(cond.labels)
            if self.pooled_embed is not None:
                emb = emb + self.pooled_embed(cond.pooled)
            h = with_concat("UNet", x, cond, self.concat_channels)
            h = self.conv_in(h.contiguous(memory_format=torch.channels_last) if self.channels_last else h)
            skips = [h]
            for layer in self.down:
                h = self._run(layer, h, emb, tokens, mask, image_tokens)
                skips.append(h)
            for layer in self.mid:
                h = self._run(layer, h, emb, tokens, mask, image_tokens)
            if control_residuals is not None:
                self._check_residuals(control_residuals, [*skips, h])
                skips = [s + r for s, r in zip(skips, control_residuals)]  # new tensors: h's path is left as it was
                h = h + control_residuals[-1]
            for layer in self.up:
                if isinstance(layer, Stage):
                    h = torch.cat([h, skips.pop()], dim=1)
                h = self._run(layer, h, emb, tokens, mask, image_tokens)
            out = self.out(h)
        if self.learn_sigma and not return_variance:  # the prediction: the first C channels
            out = out[:, : self.in_channels]
        return out.to(x.dtype).contiguous()

    def _check_residuals(self, residuals: Sequence[Tensor], targets: list[Tensor]) -> None:
        if len(residuals) != len(targets):
            raise ValueError(f"UNet takes {len(targets)} control residuals (one per skip and the mid block's), "
                             f"got {len(residuals)}: a ControlNet built for another UNet?")
        for i, (r, target) in enumerate(zip(residuals, targets)):
            if r.shape != target.shape:
                raise ValueError(f"UNet control residual {i} has shape {tuple(r.shape)}, its skip "
                                 f"{tuple(target.shape)}: a ControlNet built for another UNet or input size?")
