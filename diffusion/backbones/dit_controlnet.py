"""ControlNet-Transformer for our DiT (PixArt-delta, Chen et al. 2024, sec. 4).

Trainable copies of the base's first N blocks process the control (VAE latents of the conditioning
image, the shape of x_t) beside the frozen base; each copy's output goes through a zero-initialised
linear and is added to the base's hidden states. With h_0 the embedded x_t, B_i the base blocks,
C_i their copies, E the base's patch embedding (with positions) and zero-initialised linears
W_before and W_after_i, the wiring of PixArt-delta's released code (ControlPixArtHalf) is

    h_1 = B_0(h_0)                              the first base block runs as usual
    g_1 = C_0(h_1 + W_before E(control))        the first copy reads the base's h_1 and the control
    g_{i+1} = C_i(g_i)          (i >= 1)        later copies read only the previous copy
    r_i = W_after_i g_{i+1}                     residual i, i < N
    h_{i+2} = B_{i+1}(h_{i+1} + r_i)            r_i is added to the output of base block i

so residual i goes after base block i (the input of base block i+1): DiT.forward's
``control_residuals``. Since every copy depends only on h_1 and the control, never on the base's
later hidden states, the residuals can all be computed before the base runs, as the generic
ControlNet wrapper (diffusion.controlnet) does; here N may equal the base's depth (the last residual
then enters the final layer), where the released code stops at depth - 1.

The embeddings (patch embedding for x_t and for the control, time, labels, pooled vector, tokens) and
B_0 are the base's own modules, run under ``torch.no_grad``: PixArt-delta shares them with its frozen
base rather than copying them, so the ControlNet adds only its copies and linears, its c and tokens
are the base's exactly, and no gradient of the ControlNet's loss can reach the base. The base is held
by reference and not registered as a submodule, so this module's parameters and state dict are its
own (the wrapper that owns the base moves it between devices).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from diffusion.backbones.dit import DiT, DiTBlock
from diffusion.backbones.layers import autocast_context, check_condition, check_input, maybe_checkpoint
from diffusion.conditioning.types import Conditioning


class DiTControlNet(nn.Module):
    """forward(x_t, t, cond, control (B, C, H, W) latents) -> N residuals (B, tokens, hidden) for
    ``DiT.forward(control_residuals=...)``.

    num_blocks: how many of the base's first blocks are copied (PixArt-delta: 13 of 28); at most the
    base's depth; None: 13, or the whole depth of a shallower base. The copies start as the base's weights, the linears as zero, so at initialisation
    every residual is zero and the controlled model equals the base.
    """

    input_space = "latents"
    block_types = (DiTBlock,)  # the units of FSDP sharding

    def __init__(self, base: DiT, num_blocks: int | None = None) -> None:
        super().__init__()
        if not isinstance(base, DiT):
            raise TypeError(f"DiTControlNet needs a DiT base backbone, got {type(base).__name__}.")
        depth = len(base.blocks)
        num_blocks = min(13, depth) if num_blocks is None else num_blocks
        if not 1 <= num_blocks <= depth:
            raise ValueError(
                f"DiTControlNet num_blocks={num_blocks} must be between 1 and the base's depth {depth} "
                "(it copies the base's first num_blocks blocks; PixArt-delta copies 13 of 28); set num_blocks."
            )
        object.__setattr__(self, "base", base)  # a reference, not a submodule: see the module docstring
        self.num_blocks = num_blocks
        self.gradient_checkpointing = base.gradient_checkpointing
        hidden = base.hidden_size
        self.copies = nn.ModuleList(copy.deepcopy(base.blocks[i]) for i in range(num_blocks))
        for p in self.copies.parameters():
            p.requires_grad_(True)  # the base may arrive frozen
        self.before_proj = nn.Linear(hidden, hidden)
        self.after_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_blocks))
        for linear in (self.before_proj, *self.after_proj):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None, control: Tensor) -> list[Tensor]:
        base = self.base
        check_input("DiTControlNet", x, t, base.in_channels, base.patch_size, "the patch size")
        cond = check_condition("DiTControlNet", cond, x.shape[0], base.num_classes, base.token_dim, base.pooled_dim)
        if not isinstance(control, Tensor) or control.shape != x.shape:
            got = tuple(control.shape) if isinstance(control, Tensor) else type(control).__name__
            raise ValueError(
                f"DiTControlNet reads the control in latent space (input_space='latents'): it must have "
                f"x_t's shape {tuple(x.shape)}, got {got}; encode the conditioning image with the VAE."
            )
        with autocast_context(base.bf16_autocast, x):
            with torch.no_grad():  # the base's modules: shared and frozen (PixArt-delta)
                c, tokens = base.embed_condition(t, cond)
                h = base.blocks[0](base.embed_tokens(x), c, tokens, cond.mask)  # h_1
                control_tokens = base.embed_tokens(control.to(x.dtype))
            g = h + self.before_proj(control_tokens)
            residuals = []
            for block, after_proj in zip(self.copies, self.after_proj):
                g = maybe_checkpoint(self.gradient_checkpointing, block, g, c, tokens, cond.mask)
                residuals.append(after_proj(g))
        return residuals
