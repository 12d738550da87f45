"""SD3's and FLUX's transformers (diffusers' ``SD3Transformer2DModel`` and ``FluxTransformer2DModel``)
behind our backbone interface, their released weights loaded as they are (no conversion).

Theory: both were trained with rectified flow, our :class:`~diffusion.schedules.FlowMatching`:
``x_t = (1 - t) x0 + t xT``, and both predict the velocity ``xT - x0`` with our sign (diffusers'
FlowMatchEulerDiscreteScheduler steps ``x + (sigma_next - sigma) v``, and sigma is our t).
Time: SD3 takes the timestep ``1000 t`` (the scheduler's ``sigma * 1000``); FLUX takes ``t`` itself
(its pipeline divides by 1000 again, the model multiplies inside). Condition: ``cond.tokens`` go in as
``encoder_hidden_states`` (SD3: CLIP-L/G penultimate states padded to T5's width, then T5's tokens;
FLUX: T5's), ``cond.pooled`` as ``pooled_projections`` (SD3: CLIP-L and CLIP-G pooled; FLUX: CLIP-L's).
Neither pipeline passes a padding mask, so none is passed here.

With an IP-Adapter (adapter=ip_adapter, diffusion.ip_adapter_flux) FLUX also takes ``cond.image_embeds``
(B, N, D), N image prompts' embeddings (zeros: none), passed as FluxPipeline passes them
(``joint_attention_kwargs["ip_adapter_image_embeds"]``, a list of one tensor: one IP-Adapter).
SD3 with one (diffusion.ip_adapter_sd3) takes SigLIP's patch states (B, N, D) the same way, a tensor as
StableDiffusion3Pipeline passes it; its transformer resamples them with its own timestep.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.backbones.diffusers_unet import _plain, _subfolder
from diffusion.backbones.layers import check_image_embeds, check_input
from diffusion.conditioning.types import Conditioning


class _DiffusersTransformer(nn.Module):
    """What the two wrappers share: loading (a hub id or directory, or a config for random weights),
    the build-time checks of the conditioner's widths, and the condition's checks at each call."""

    family = ""  # a name for messages: "SD3" | "FLUX"
    hint = ""  # which text encoders feed it, for messages

    def __init__(self, model_class: type, pretrained: str | None, subfolder: str | None,
                 config: Mapping[str, Any] | None, gradient_checkpointing: bool) -> None:
        super().__init__()
        kind = type(self).__name__
        if (pretrained is None) == (config is None):
            raise ValueError(f"{kind} needs exactly one of pretrained (a hub id or a directory) and config "
                             f"({model_class.__name__} arguments), got pretrained={pretrained!r} and "
                             f"config={'a dict' if config is not None else None}")
        if pretrained is not None:
            sub = _subfolder(kind, "transformer", pretrained, subfolder)
            self.transformer = model_class.from_pretrained(pretrained, torch_dtype=torch.float32,
                                                           **({"subfolder": sub} if sub else {}))
            self.source = pretrained if not sub else f"{pretrained}/{sub}"
        else:
            self.transformer = model_class(**_plain(config))
            self.source = "config"
        self.name = f"{kind}({self.source})"
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    def _check_build(self, in_channels: int | None, token_dim: int | None, pooled_dim: int | None,
                     num_classes: int | None, vae_hint: str) -> None:
        if in_channels is not None and in_channels != self.in_channels:
            raise ValueError(f"{self.name} takes latents of {self.in_channels} channels, but the autoencoder gives "
                             f"{in_channels}: pair it with the VAE it was trained with ({vae_hint})")
        if num_classes is not None:
            raise ValueError(f"{self.name} takes no class labels (got num_classes={num_classes}): use "
                             "conditioning=text")
        for what, got, want in (("tokens", token_dim, self.token_dim), ("pooled vector", pooled_dim, self.pooled_dim)):
            if got != want:
                raise ValueError(f"{self.name} needs text {what} of width {want}, the text encoder gives "
                                 f"{'none' if got is None else f'width {got}'}: use conditioning=text with "
                                 f"{self.hint}")

    def _check_condition(self, x: Tensor, cond: Conditioning | None) -> Conditioning:
        cond = cond if cond is not None else Conditioning()
        if cond.labels is not None:
            raise ValueError(f"{self.name} takes no cond.labels, but they were given")
        for field, width in (("tokens", self.token_dim), ("pooled", self.pooled_dim)):
            value = getattr(cond, field)
            if value is None:
                raise ValueError(f"{self.name} needs cond.{field} of width {width} ({self.hint}); got none (the "
                                 "null condition is the empty prompt's encoding)")
            if value.shape[0] != x.shape[0] or value.shape[-1] != width:
                shape = f"({x.shape[0]}, L, {width})" if field == "tokens" else f"({x.shape[0]}, {width})"
                raise ValueError(f"{self.name} expects cond.{field} of shape {shape}, got {tuple(value.shape)}")
        return cond


class SD3Transformer(_DiffusersTransformer):
    """forward(x_t (B, C, H, W), t (B,) in [0, 1], cond) -> SD3's velocity ``xT - x0``, of x_t's shape.

    Args:
        pretrained: a hub id or a local directory: the transformer's own (config.json at the top) or a
            pipeline's (the transformer in ``subfolder``). Exactly one of ``pretrained`` and ``config``.
        subfolder: where the transformer lies in a pipeline repository ("transformer").
        config: SD3Transformer2DModel arguments, for random weights (tests).
        num_train_steps: the timestep of t = 1 (1000: the scheduler's ``sigma * num_train_timesteps``).
        in_channels, token_dim, pooled_dim, num_classes: what build_module passes; checked against the
            transformer's config (joint_attention_dim, pooled_projection_dim).
        gradient_checkpointing: recompute activations in backward (diffusers' own).
    """

    family = "SD3"
    hint = "SD3's text encoders (CLIP-L/G penultimate + T5 tokens, CLIP-L+G pooled)"

    def __init__(self, pretrained: str | None = None, subfolder: str | None = "transformer",
                 config: Mapping[str, Any] | None = None, num_train_steps: int = 1000,
                 in_channels: int | None = None, token_dim: int | None = None, pooled_dim: int | None = None,
                 num_classes: int | None = None, gradient_checkpointing: bool = False) -> None:
        from diffusers import SD3Transformer2DModel

        super().__init__(SD3Transformer2DModel, pretrained, subfolder, config, gradient_checkpointing)
        if num_train_steps < 1:
            raise ValueError(f"SD3Transformer: num_train_steps must be >= 1, got {num_train_steps}")
        c = self.transformer.config
        self.num_train_steps = int(num_train_steps)
        self.in_channels = int(c.in_channels)
        self.token_dim, self.pooled_dim = int(c.joint_attention_dim), int(c.pooled_projection_dim)
        self.num_classes = None
        self.downsample_factor = int(c.patch_size)
        if int(c.out_channels) != self.in_channels:
            raise ValueError(f"{self.name} takes {self.in_channels} channels and returns {c.out_channels}; a "
                             "backbone's output has its input's shape")
        self._check_build(in_channels, token_dim, pooled_dim, num_classes, "vae=sd3, 16 channels")

    @property
    def block_types(self) -> tuple[type, ...]:
        """The units of FSDP sharding: the joint (MM-DiT) blocks."""
        from diffusers.models.attention import JointTransformerBlock

        return (JointTransformerBlock,)

    def timestep(self, t: Tensor) -> Tensor:
        """SD3's timestep of our t: ``num_train_steps * t`` (float32)."""
        return t.to(torch.float32) * self.num_train_steps

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None, *,
                control_residuals: Sequence[Tensor] | None = None) -> Tensor:
        """``control_residuals``: an SD3 ControlNet's block samples (diffusion.backbones.
        diffusers_mmdit_controlnet), passed as diffusers' ``block_controlnet_hidden_states``."""
        check_input(self.name, x, t, self.in_channels, self.downsample_factor, "the patch size")
        cond = self._check_condition(x, cond)
        dtype = self.transformer.dtype
        residuals = None if control_residuals is None else [r.to(dtype) for r in control_residuals]
        from diffusion.ip_adapter_sd3 import image_embed_dim

        ip = check_image_embeds(self.name, cond, image_embed_dim(self.transformer))
        # A fresh dict each call (the transformer pops the embeddings out of it); a tensor, as SD3's pipeline passes.
        joint = None if ip is None else {"ip_adapter_image_embeds": ip.to(dtype)}
        out = self.transformer(hidden_states=x.to(dtype), timestep=self.timestep(t),
                               encoder_hidden_states=cond.tokens.to(dtype), pooled_projections=cond.pooled.to(dtype),
                               block_controlnet_hidden_states=residuals, joint_attention_kwargs=joint,
                               return_dict=False)[0]
        return out.to(x.dtype)


class FluxTransformer(_DiffusersTransformer):
    """forward(x_t (B, C, H, W), t (B,) in [0, 1], cond) -> FLUX's velocity ``xT - x0``, of x_t's shape.

    The latents are packed into 2x2 patches of ``4 C`` features (FLUX's transformer takes
    ``in_channels = 4 C``), with position ids (0, row, column) per patch and zeros per text token,
    and the output unpacked again.

    Args:
        pretrained, subfolder, config, gradient_checkpointing: as :class:`SD3Transformer`
            (FluxTransformer2DModel arguments).
        guidance: the distilled guidance scale of a model with ``guidance_embeds`` (FLUX.1-dev: 3.5 in
            its pipeline; diffusers' fine-tuning scripts train at a fixed value too); must be None
            for a model without (FLUX.1-schnell).
        in_channels, token_dim, pooled_dim, num_classes: what build_module passes; checked.
    """

    family = "FLUX"
    hint = "FLUX's text encoders (T5 tokens, CLIP-L pooled)"

    def __init__(self, pretrained: str | None = None, subfolder: str | None = "transformer",
                 config: Mapping[str, Any] | None = None, guidance: float | None = None,
                 in_channels: int | None = None, token_dim: int | None = None, pooled_dim: int | None = None,
                 num_classes: int | None = None, gradient_checkpointing: bool = False) -> None:
        from diffusers import FluxTransformer2DModel

        super().__init__(FluxTransformer2DModel, pretrained, subfolder, config, gradient_checkpointing)
        c = self.transformer.config
        if int(c.patch_size) != 1 or int(c.in_channels) % 4 or self.transformer.out_channels != c.in_channels:
            raise ValueError(f"{self.name} must take and return 2x2-packed latents (patch_size 1, in_channels "
                             f"= out_channels = 4 x latent channels), got patch_size={c.patch_size}, "
                             f"in_channels={c.in_channels}, out_channels={self.transformer.out_channels}")
        if bool(c.guidance_embeds) != (guidance is not None):
            need = ("takes a guidance scale (guidance_embeds, FLUX.1-dev): set backbone.guidance, e.g. 3.5"
                    if c.guidance_embeds else "has no guidance input (FLUX.1-schnell): set backbone.guidance=null")
            raise ValueError(f"{self.name} {need}; got guidance={guidance!r}")
        self.guidance = None if guidance is None else float(guidance)
        self.in_channels = int(c.in_channels) // 4
        self.token_dim, self.pooled_dim = int(c.joint_attention_dim), int(c.pooled_projection_dim)
        self.num_classes = None
        self.downsample_factor = 2
        self._check_build(in_channels, token_dim, pooled_dim, num_classes, "vae=flux, 16 channels")

    @property
    def block_types(self) -> tuple[type, ...]:
        """The units of FSDP sharding: the double- and single-stream blocks."""
        from diffusers.models.transformers.transformer_flux import (
            FluxSingleTransformerBlock,
            FluxTransformerBlock,
        )

        return (FluxTransformerBlock, FluxSingleTransformerBlock)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None, *,
                control_residuals: Sequence[Tensor] | None = None) -> Tensor:
        """``control_residuals``: a FLUX ControlNet's (diffusion.backbones.diffusers_mmdit_controlnet):
        one per double-stream block, passed as diffusers' ``controlnet_block_samples``, then its
        single-block samples, ``controlnet_single_block_samples``."""
        check_input(self.name, x, t, self.in_channels, self.downsample_factor, "FLUX's 2x2 packing")
        cond = self._check_condition(x, cond)
        dtype = self.transformer.dtype
        height, width = x.shape[-2:]
        guidance = None if self.guidance is None else torch.full_like(t, self.guidance, dtype=torch.float32)
        double = single = None
        if control_residuals is not None:
            residuals = [r.to(dtype) for r in control_residuals]
            blocks = len(self.transformer.transformer_blocks)
            if len(residuals) < blocks:
                raise ValueError(f"{self.name} takes one control residual per double-stream block ({blocks}), then "
                                 f"the single-block ones; got {len(residuals)} (MMDiTControlNet gives this layout)")
            double, single = residuals[:blocks], (residuals[blocks:] or None)
        from diffusion.ip_adapter_flux import image_embed_dim

        ip = check_image_embeds(self.name, cond, image_embed_dim(self.transformer))
        # A fresh dict each call: the transformer pops the embeddings out of it.
        joint = None if ip is None else {"ip_adapter_image_embeds": [ip.to(dtype)]}
        out = self.transformer(
            hidden_states=pack(x).to(dtype), timestep=t.to(torch.float32),
            encoder_hidden_states=cond.tokens.to(dtype), pooled_projections=cond.pooled.to(dtype),
            img_ids=image_ids(height, width, x.device), txt_ids=torch.zeros(cond.tokens.shape[1], 3, device=x.device),
            guidance=guidance, controlnet_block_samples=double, controlnet_single_block_samples=single,
            joint_attention_kwargs=joint, return_dict=False,
        )[0]
        return unpack(out, height, width).to(x.dtype)


def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4 C): FLUX's 2x2 patches in row-major order, each ordered
    (channel, row in patch, column in patch)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack` for latents of ``height`` x ``width``."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """FLUX's position ids of the packed patches: (H/2 * W/2, 3) rows (0, row, column)."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float().to(device)
