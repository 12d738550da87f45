"""Layers shared by the backbones: time embedding, 2-D sin-cos positions, attention, checks."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusion.conditioning.types import Conditioning

# The backbone sees t in [0, 1]; DiT and ADM embed integer DDPM steps 0..999, so t is scaled
# by 1000 before the sinusoidal embedding to keep their frequency range.
TIME_SCALE = 1000.0


def timestep_embedding(
    t: Tensor, dim: int, scale: float = TIME_SCALE, max_period: float = 10000.0, shift: float = 0.0
) -> Tensor:
    """Sinusoidal embedding of ``scale * t + shift`` (B,) -> (B, dim), [cos | sin] as in DiT / ADM;
    always float32. The affine map is taken in t's dtype (at least float32) before the cast."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    time = t.to(torch.promote_types(t.dtype, torch.float32)) * scale + shift
    args = time.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) in [0, 1] -> (B, out_dim): sinusoidal features of ``scale * t + shift``, then a 2-layer
    SiLU MLP. The affine map lets weights trained on another time axis run on ours (diffusion.convert:
    DiT's integer steps are ``N t - 1``, SiT's data-at-1 time is ``1 - t``)."""

    def __init__(self, out_dim: int, frequency_dim: int = 256, scale: float = TIME_SCALE, shift: float = 0.0) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.scale, self.shift = scale, shift
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.frequency_dim, self.scale, shift=self.shift)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def sincos_pos_embed_2d(dim: int, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sin-cos positions (height * width, dim), row-major over the patch grid.

    Follows DiT's `get_2d_sincos_pos_embed` (first half encodes the column, second
    half the row), computed for the input's own grid so any size or aspect works.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a hidden size divisible by 4, got {dim}.")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def axis(pos: Tensor) -> Tensor:  # (N,) -> (N, dim // 2) = [sin | cos]
        out = pos[:, None] * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    rows = torch.arange(height, dtype=torch.float64, device=device).repeat_interleave(width)
    cols = torch.arange(width, dtype=torch.float64, device=device).repeat(height)
    return torch.cat([axis(cols), axis(rows)], dim=1).float()


class Attention(nn.Module):
    """Multi-head attention through `F.scaled_dot_product_attention`.

    Self-attention when `context_dim` is None; otherwise queries come from x and
    keys/values from a context of width `context_dim` (cross-attention), with an
    optional key mask (B, L) bool, True = attend.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention width {dim} is not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # IP-Adapter's key and value map of image tokens, set on a cross-attention by adapter=ip_adapter;
        # forward then adds ``ip_scale`` times the attention over ``image_tokens``.
        self.ip_kv: nn.Linear | None = None

    #: IP-Adapter's weight of the attention over image tokens (diffusion.ip_adapter).
    ip_scale: float = 1.0

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                image_tokens: Tensor | None = None) -> Tensor:
        h = self.num_heads
        if self.is_cross:
            q = rearrange(self.q(x), "b n (h d) -> b h n d", h=h)
            k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=h)
        else:  # unbound on the (B, N, 3, H, d) layout: the backward stacks the gradients straight into it
            q, k, v = (part.transpose(1, 2) for part in self.qkv(x).unflatten(-1, (3, h, -1)).unbind(2))
        attn_mask = None
        if mask is not None:
            # A sample with no real token would give softmax over nothing (NaN): let it attend to
            # its padding here and zero its output below, i.e. "no tokens, no contribution".
            has_token = mask.any(dim=1)  # (B,)
            attn_mask = rearrange(mask | ~has_token[:, None], "b l -> b 1 1 l")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))
        if mask is not None:
            out = out * has_token[:, None, None].to(out.dtype)
        if self.ip_kv is not None and image_tokens is not None and self.ip_scale != 0:
            # Decoupled cross-attention (Ye et al. 2023): proj(text + s image) = proj(text) + s W_proj image.
            k, v = rearrange(self.ip_kv(image_tokens), "b l (two h d) -> two b h l d", two=2, h=h)
            image = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
            out = out + self.ip_scale * F.linear(image, self.proj.weight)
        return out


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so that its residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def zero_extra_input_channels(conv: nn.Conv2d, in_channels: int) -> None:
    """Zero the weights a convolution gives its input channels past ``in_channels`` (concatenated
    conditions): the backbone starts as it would without them (InstructPix2Pix, SD inpainting)."""
    with torch.no_grad():
        conv.weight[:, in_channels:].zero_()


def with_concat(name: str, x: Tensor, cond: Conditioning, concat_channels: int) -> Tensor:
    """``x`` with ``cond.concat`` appended on the channel axis: the input of a backbone built with
    ``concat_channels`` extra input channels (diffusion.conditioning.image_inputs)."""
    if concat_channels == 0:
        if cond.concat is not None:
            raise ValueError(f"{name} was built without concatenated conditions (concat_channels=0), but cond.concat "
                             "was given; build it with image_condition=inpaint|image_to_image|super_resolution")
        return x
    if cond.concat is None:
        raise ValueError(f"{name} was built for {concat_channels} concatenated condition channels (an inpainting mask "
                         "and masked image, a low-resolution image), but cond.concat is None")
    if cond.concat.shape[1] != concat_channels or cond.concat.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"{name}: cond.concat must be (B, {concat_channels}, {x.shape[-2]}, {x.shape[-1]}) like x_t, "
                         f"got {tuple(cond.concat.shape)}")
    return torch.cat([x, cond.concat.to(x.dtype)], dim=1)


def maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)`, recomputing its activations in backward when `enabled` (and grads are on)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def autocast_context(enabled: bool, x: Tensor) -> ContextManager:
    """bf16 autocast on x's device type when enabled."""
    return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16) if enabled else nullcontext()


# -- input checks: loud, naming the expected and the received value -------------------------
def check_input(name: str, x: Tensor, t: Tensor, in_channels: int, multiple: int, multiple_of: str) -> None:
    """x (B, in_channels, H, W) with H, W multiples of `multiple`; t (B,) float."""
    if x.ndim != 4:
        raise ValueError(f"{name} expects x_t of shape (B, C, H, W), got shape {tuple(x.shape)}.")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} was built for in_channels={in_channels}, got x_t with {x.shape[1]} channels.")
    height, width = x.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(
            f"{name} needs height and width divisible by {multiple} ({multiple_of}), got {height}x{width}."
        )
    if t.shape != (x.shape[0],):
        raise ValueError(f"{name} expects t of shape (B,) = ({x.shape[0]},), got shape {tuple(t.shape)}.")
    if not t.is_floating_point():
        raise ValueError(f"{name} expects continuous t in [0, 1] (a float tensor), got dtype {t.dtype}.")


def check_condition(
    name: str, cond: Conditioning | None, batch: int, num_classes: int | None, token_dim: int | None, pooled_dim: int | None
) -> Conditioning:
    """The fields the model was built for are present with the right widths, and no others."""
    cond = cond if cond is not None else Conditioning()
    expected = {"labels": num_classes is not None, "tokens": token_dim is not None, "pooled": pooled_dim is not None}
    for field, wanted in expected.items():
        given = getattr(cond, field) is not None
        if wanted and not given:
            hint = f" (the null class is {num_classes})" if field == "labels" else ""
            raise ValueError(f"{name} was built to use cond.{field}, but it is None{hint}.")
        if given and not wanted:
            raise ValueError(
                f"{name} was built without {field} conditioning, but cond.{field} was given; "
                f"set {'num_classes' if field == 'labels' else field[:-1] + '_dim'} in its config to use it."
            )
    if not cond.is_empty and cond.batch_size != batch:
        raise ValueError(f"{name}: cond has batch size {cond.batch_size}, expected x_t's batch size {batch}.")
    if cond.tokens is not None and cond.tokens.shape[-1] != token_dim:
        raise ValueError(f"{name} was built for tokens of width token_dim={token_dim}, got width {cond.tokens.shape[-1]}.")
    if cond.pooled is not None and cond.pooled.shape[-1] != pooled_dim:
        raise ValueError(f"{name} was built for pooled of width pooled_dim={pooled_dim}, got width {cond.pooled.shape[-1]}.")
    return cond


def check_image_embeds(name: str, cond: Conditioning, width: int | None) -> Tensor | None:
    """cond.image_embeds, checked against a backbone whose IP-Adapter takes embeddings of ``width`` (None:
    it has none, and refuses them)."""
    got = None if cond.image_embeds is None else tuple(cond.image_embeds.shape)
    if width is None:
        if got is not None:
            raise ValueError(f"{name} takes no cond.image_embeds (an image prompt), but they were given: add "
                             "an IP-Adapter (adapter=ip_adapter) or leave the image prompt out")
        return None
    if got is None or got[2] != width:
        raise ValueError(f"{name} has an IP-Adapter and needs cond.image_embeds of shape (B, N, {width}), the image "
                         f"encoder's embeddings of N image prompts (zeros: no image prompt); got {got}")
    return cond.image_embeds


def ip_image_tokens(name: str, projection: nn.Module | None, cond: Conditioning) -> Tensor | None:
    """IP-Adapter's image tokens (B, N * tokens per image, width) of cond.image_embeds (B, N, D), through
    the backbone's image projection (diffusion.ip_adapter); None without one, which refuses embeddings."""
    embeds = check_image_embeds(name, cond, None if projection is None else projection.embed_dim)
    return None if projection is None else projection(embeds).flatten(1, 2)
