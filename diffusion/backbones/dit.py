"""DiT: Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023).

Conditioning: class labels and a pooled vector are added to the time embedding
and drive adaLN (as in DiT); text tokens enter every block by cross-attention
after self-attention (PixArt-alpha, Chen et al. 2023). Positions are fixed 2-D
sin-cos embeddings computed for each input's own patch grid, so one model
trains and samples at several resolutions and aspect ratios.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import Mlp, PatchEmbed
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
    sincos_pos_embed_2d,
    with_concat,
    zero_extra_input_channels,
)
from diffusion.conditioning.labels import LabelEmbedder
from diffusion.conditioning.types import Conditioning


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, N, D) * (1 + scale) + shift, with scale/shift (B, 1, D)."""
    return torch.addcmul(shift, x, 1 + scale)


class DiTBlock(nn.Module):
    """Self-attention, optional cross-attention to tokens, MLP; adaLN-Zero modulation from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cross_attention: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        # PixArt-alpha: cross-attention without its own norm or gate; its output projection is zeroed instead.
        self.cross_attn = Attention(hidden_size, num_heads, context_dim=hidden_size) if cross_attention else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=_gelu_tanh)
        # shift, scale, gate for attention and for the MLP
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, tokens: Tensor | None, mask: Tensor | None,
                image_tokens: Tensor | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = rearrange(
            self.adaLN_modulation(c), "b (six d) -> six b 1 d", six=6
        )
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, tokens, mask, image_tokens)
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """adaLN then a linear decode of each token to a patch of out_channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = rearrange(self.adaLN_modulation(c), "b (two d) -> two b 1 d", two=2)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """forward(x_t (B, C, H, W), t (B,) in [0, 1], cond) -> (B, C, H, W).

    With learn_sigma (the paper's configuration) the final layer also decodes C variance channels
    (diffusion.variance: trained by the hybrid loss, read by sampler=ddpm_learned); forward returns
    the prediction's C channels, and all 2C only with ``return_variance=True``. ``time_scale * t + time_shift`` is what the time embedding sees.
    Conditioning fields used: labels if num_classes, tokens/mask if token_dim,
    pooled if pooled_dim; the model refuses fields it was not built for.
    """

    block_types = (DiTBlock,)  # the units of FSDP sharding

    def __init__(
        self,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        token_dim: int | None = None,
        pooled_dim: int | None = None,
        learn_sigma: bool = False,
        frequency_dim: int = 256,
        time_scale: float = TIME_SCALE,
        time_shift: float = 0.0,
        gradient_checkpointing: bool = False,
        bf16_autocast: bool = False,
        concat_channels: int = 0,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"DiT hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
        if hidden_size % 4:
            raise ValueError(f"DiT hidden_size={hidden_size} must be divisible by 4 for 2-D sin-cos positions.")
        if concat_channels < 0:
            raise ValueError(f"DiT concat_channels must be >= 0, got {concat_channels}.")
        self.in_channels = in_channels
        self.concat_channels = concat_channels  # cond.concat's, appended to x_t; the output keeps in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels  # of the final layer
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.token_dim = token_dim
        self.pooled_dim = pooled_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.bf16_autocast = bf16_autocast

        self.x_embedder = PatchEmbed(
            img_size=None, patch_size=patch_size, in_chans=in_channels + concat_channels, embed_dim=hidden_size, strict_img_size=False
        )
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_dim, time_scale, time_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes is not None else None
        self.pooled_embedder = (
            Mlp(pooled_dim, hidden_size, hidden_size, act_layer=nn.SiLU) if pooled_dim is not None else None
        )
        # PixArt-alpha's caption projection: tokens (B, L, token_dim) -> (B, L, hidden)
        self.token_embedder = (
            Mlp(token_dim, hidden_size, hidden_size, act_layer=_gelu_tanh) if token_dim is not None else None
        )
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, cross_attention=token_dim is not None) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.image_projection: nn.Module | None = None  # IP-Adapter's (adapter=ip_adapter, diffusion.ip_adapter)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The DiT paper's initialisation: ViT-style, with every block's adaLN modulation (so its gates)
        and the final linear zeroed, so the model starts as exactly zero and every block as the identity.

        The final layer's own modulation keeps its ViT init, as the paper's text has it ("we initialize the
        final linear layer with zeros and otherwise use standard weight initialization techniques from
        ViT") and as PixArt-alpha's final layer does. The reference code zeroes it too; then the first
        optimiser step could only move the final linear, and the output would ignore the condition until
        the second step. Kept, class labels and the pooled vector shape the output from the first step
        (text tokens, through cross-attention zero-initialised as in PixArt-alpha, from the second).
        """

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear over the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        zero_extra_input_channels(self.x_embedder.proj, self.in_channels)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for mlp in (self.pooled_embedder, self.token_embedder):
            if mlp is not None:
                nn.init.normal_(mlp.fc1.weight, std=0.02)
                nn.init.normal_(mlp.fc2.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:  # PixArt-alpha zeroes the cross-attention output
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed_tokens(self, x: Tensor) -> Tensor:
        """Patch embedding plus 2-D sin-cos positions: (B, C, H, W) -> (B, N, D). Call under the autocast
        of forward; a ControlNet embeds its control with it too (PixArt-delta)."""
        height, width = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        # Positions in the parameters' dtype: under autocast the residual stream stays float32.
        pos = sincos_pos_embed_2d(self.hidden_size, height, width, x.device).to(self.x_embedder.proj.weight.dtype)
        # The patch embedding is a transposed view of the convolution's output; made contiguous
        # once here, or every later op (layer norms, residual adds) would inherit that layout and
        # copy to and from it, in forward and backward.
        return self.x_embedder(x).contiguous() + pos

    def embed_condition(self, t: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor | None]:
        """c (B, D), the adaLN input (time + labels + pooled), and the projected tokens (B, L, D) or None."""
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(cond.labels)
        if self.pooled_embedder is not None:
            c = c + self.pooled_embedder(cond.pooled)
        tokens = self.token_embedder(cond.tokens) if self.token_embedder is not None else None
        return c, tokens

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        cond: Conditioning | None = None,
        *,
        return_variance: bool = False,
        control_residuals: list[Tensor] | None = None,
    ) -> Tensor:
        """``control_residuals``: a ControlNet's outputs (diffusion.backbones.dit_controlnet), one (B, N, D)
        tensor per block from the first; residual i is added to the output of block i (PixArt-delta)."""
        if return_variance and not self.learn_sigma:
            raise ValueError("DiT.forward(return_variance=True) needs a model built with learn_sigma=True")
        check_input("DiT", x, t, self.in_channels, self.patch_size, "the patch size")
        cond = check_condition("DiT", cond, x.shape[0], self.num_classes, self.token_dim, self.pooled_dim)
        height, width = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        residuals = self._check_residuals(control_residuals, (x.shape[0], height * width, self.hidden_size))
        with autocast_context(self.bf16_autocast, x):
            h = self.embed_tokens(with_concat("DiT", x, cond, self.concat_channels))  # (B, N, D)
            c, tokens = self.embed_condition(t, cond)  # (B, D), (B, L, D) or None
            image_tokens = ip_image_tokens("DiT", self.image_projection, cond)  # IP-Adapter's, else None
            for i, block in enumerate(self.blocks):
                h = maybe_checkpoint(self.gradient_checkpointing, block, h, c, tokens, cond.mask, image_tokens)
                if i < len(residuals):
                    h = h + residuals[i]
            h = self.final_layer(h, c)  # (B, N, p * p * C_out)
        out = rearrange(
            h, "b (h w) (p q c) -> b c (h p) (w q)", h=height, w=width, p=self.patch_size, q=self.patch_size
        )
        if self.learn_sigma and not return_variance:  # the prediction: the first C channels
            out = out[:, : self.in_channels]
        return out.to(x.dtype)

    def _check_residuals(self, residuals: list[Tensor] | None, shape: tuple[int, int, int]) -> list[Tensor]:
        """At most one residual per block, each of the hidden states' shape (B, N, D)."""
        if residuals is None:
            return []
        residuals = list(residuals)
        if len(residuals) > len(self.blocks):
            raise ValueError(
                f"DiT got {len(residuals)} control_residuals, but it has only {len(self.blocks)} blocks; "
                "build the ControlNet with num_blocks <= the base's depth."
            )
        for i, residual in enumerate(residuals):
            if tuple(residual.shape) != shape:
                raise ValueError(
                    f"DiT control_residuals[{i}] has shape {tuple(residual.shape)}, expected the hidden states' "
                    f"(B, tokens, hidden) = {shape}; was the ControlNet given a control of x_t's shape?"
                )
        return residuals
