"""Stable Diffusion's UNet (diffusers' ``UNet2DConditionModel``) behind our backbone interface,
its released weights loaded as they are (no conversion).

Time: SD was trained on the integer DDPM steps i = 0..N-1, which our DDPM puts at t = (i + 1) / N
(diffusion.schedules.DDPM), so the UNet sees the timestep ``N t - 1``; it stays a float, so
continuous-time samplers may ask between the steps. Condition: the text tokens go in as
``encoder_hidden_states``. SD 1.x/2.x cross-attend to every token, padding included, so the
padding mask is not passed unless ``token_mask`` asks for it. SD 1.x/2.x UNets take no pooled
vector and no class label.

SDXL (``addition_embed_type="text_time"``) adds two inputs to the time embedding: ``text_embeds``,
the pooled text vector (``cond.pooled``: OpenCLIP bigG's projected EOS state), and ``time_ids``, six
numbers per sample, (original height, width, crop top, left, target height, width) in pixels, its
size and crop micro-conditioning. In training they are each image's, as the data pipeline gives
them (``cond.time_ids``, diffusion.conditioning.micro: the file's size, the crop's offset and size),
as diffusers' SDXL script trains. Where the condition has none (sampling, data without sizes) they
come from config: ``time_ids`` null sizes are the image's size, latent size times
``pixels_per_latent`` (what diffusers' SDXL pipeline passes by default), crop (0, 0).

With an IP-Adapter (adapter=ip_adapter, diffusion.ip_adapter) the UNet also takes ``cond.image_embeds``
(B, N, D), N image prompts' embeddings (zeros: none), passed as diffusers' pipelines pass them
(``added_cond_kwargs["image_embeds"]``, a list of one tensor: one IP-Adapter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.backbones.layers import check_image_embeds, check_input, with_concat
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
        time_ids: SDXL's micro-conditioning where the condition carries none (``cond.time_ids``),
            {original_size: [h, w] | null, crop_top_left: [top, left],
            target_size: [h, w] | null}, in pixels; a null size is the image's (latents' size times
            ``pixels_per_latent``). Only for a UNet with ``addition_embed_type="text_time"``.
        pixels_per_latent: the autoencoder's downsampling factor (8 for SDXL's VAE).
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
        time_ids: Mapping[str, Any] | None = None,
        pixels_per_latent: int = 8,
        concat_channels: int = 0,
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
            sub = _subfolder("DiffusersUNet", "UNet", pretrained, subfolder)
            self.unet = UNet2DConditionModel.from_pretrained(pretrained, torch_dtype=torch.float32,
                                                             **({"subfolder": sub} if sub else {}))
            self.source = pretrained if not sub else f"{pretrained}/{sub}"
        else:
            self.unet = UNet2DConditionModel(**_plain(config))
            self.source = "config"
        self.name = f"DiffusersUNet({self.source})"
        self.concat_channels = _concat_input(self.unet, int(concat_channels), in_channels, self.name)
        c = self.unet.config
        self.num_train_steps = int(num_train_steps)
        self.in_channels = int(c.in_channels) - self.concat_channels  # x_t's; cond.concat brings the rest
        self.out_channels = int(c.out_channels)
        self.token_dim = _cross_attention_dim(c.cross_attention_dim, self.name)
        self.num_classes = None
        self.token_mask = token_mask
        self.downsample_factor = 2 ** (len(c.block_out_channels) - 1)
        self.text_time = c.addition_embed_type == "text_time"
        self.takes_time_ids = self.text_time  # each training image's (diffusion.conditioning.micro)
        # SDXL's time embedding takes the pooled vector and 6 sinusoidal time ids, concatenated.
        self.pooled_dim = (int(c.projection_class_embeddings_input_dim) - 6 * int(c.addition_time_embed_dim)
                           if self.text_time else None)
        self._check_build(in_channels, token_dim, pooled_dim, num_classes)
        self.micro = _micro_conditioning(time_ids, self.name) if self.text_time else None
        if time_ids is not None and not self.text_time:
            raise ValueError(f"{self.name} takes no time_ids (addition_embed_type={c.addition_embed_type!r}); "
                             "time_ids is SDXL's micro-conditioning: leave it null for SD 1.x/2.x")
        if pixels_per_latent < 1:
            raise ValueError(f"DiffusersUNet: pixels_per_latent must be >= 1, got {pixels_per_latent}")
        self.pixels_per_latent = int(pixels_per_latent)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def _check_build(self, in_channels: int | None, token_dim: int | None, pooled_dim: int | None,
                     num_classes: int | None) -> None:
        c = self.unet.config
        if c.addition_embed_type not in (None, "text_time") or c.class_embed_type is not None:
            raise ValueError(f"{self.name} needs added conditions (addition_embed_type={c.addition_embed_type!r}, "
                             f"class_embed_type={c.class_embed_type!r}) which this wrapper does not pass; it "
                             "takes SD 1.x/2.x UNets and SDXL's (addition_embed_type='text_time')")
        if self.out_channels != self.in_channels:
            raise ValueError(f"{self.name} takes {self.in_channels} channels and returns {self.out_channels}: a "
                             "backbone's output has x_t's shape; an inpainting UNet (9 in, 4 out) takes its mask and "
                             "masked image as a concatenated condition: image_condition=inpaint")
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
        if self.text_time and pooled_dim != self.pooled_dim:
            raise ValueError(f"{self.name} takes a pooled text vector of width {self.pooled_dim} (SDXL's text_embeds: "
                             "projection_class_embeddings_input_dim - 6 addition_time_embed_dim), the text encoder "
                             f"gives {pooled_dim}: use SDXL's encoder pair (text_encoder=sdxl), whose pooled vector "
                             "is the second encoder's projection")
        if not self.text_time and pooled_dim is not None:
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

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None, *,
                control_residuals: Sequence[Tensor] | None = None) -> Tensor:
        """``control_residuals``: a ControlNet's outputs (diffusion.backbones.diffusers_controlnet), its
        down residuals then its mid one, passed as diffusers' down_block_additional_residuals and
        mid_block_additional_residual."""
        sample, timestep, kwargs = self.unet_inputs(x, t, cond)
        if control_residuals is not None:
            *down, mid = (r.to(sample.dtype) for r in control_residuals)
            kwargs.update(down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
        out = self.unet(sample, timestep, **kwargs, return_dict=False)[0]
        return out.to(x.dtype)

    def unet_inputs(self, x: Tensor, t: Tensor, cond: Conditioning | None) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """The checked (sample, timestep, keyword arguments) of diffusers' call for x_t, t and cond: the
        text tokens, their mask, SDXL's added conditions; what a ControlNet of this UNet is given too."""
        check_input(self.name, x, t, self.in_channels, self.downsample_factor, "the UNet's downsampling")
        cond = cond if cond is not None else Conditioning()
        if cond.tokens is None:
            raise ValueError(f"{self.name} needs cond.tokens (B, L, {self.token_dim}), the text encoder's tokens; "
                             "got none (the null condition is the empty prompt's encoding)")
        if cond.labels is not None:
            raise ValueError(f"{self.name} takes no cond.labels, but it was given")
        if not self.text_time and cond.pooled is not None:
            raise ValueError(f"{self.name} takes no cond.pooled, but it was given")
        if not self.text_time and cond.time_ids is not None:
            raise ValueError(f"{self.name} takes no cond.time_ids (SDXL's micro-conditioning), but they were given")
        if cond.tokens.shape[0] != x.shape[0] or cond.tokens.shape[-1] != self.token_dim:
            raise ValueError(f"{self.name} expects cond.tokens of shape ({x.shape[0]}, L, {self.token_dim}), got "
                             f"{tuple(cond.tokens.shape)}")
        dtype = self.unet.dtype
        mask = cond.mask if self.token_mask else None
        added = None
        if self.text_time:
            if cond.pooled is None or cond.pooled.shape != (x.shape[0], self.pooled_dim):
                got = None if cond.pooled is None else tuple(cond.pooled.shape)
                raise ValueError(f"{self.name} needs cond.pooled of shape ({x.shape[0]}, {self.pooled_dim}), SDXL's "
                                 f"text_embeds (the second text encoder's projection); got {got}")
            ids = self.time_ids(x) if cond.time_ids is None else cond.time_ids
            if ids.shape != (x.shape[0], 6):
                raise ValueError(f"{self.name} needs cond.time_ids of shape ({x.shape[0]}, 6), got {tuple(ids.shape)}")
            added = {"text_embeds": cond.pooled.to(dtype), "time_ids": ids.to(dtype)}
        ip = self.image_embeds(x, cond)
        if ip is not None:  # one IP-Adapter: a list of one (B, N images, D) tensor, as diffusers' pipelines pass
            added = {**(added or {}), "image_embeds": [ip.to(dtype)]}
        x_in = with_concat(self.name, x, cond, self.concat_channels)  # the ControlNet's input too (from_unet's width)
        return x_in.to(dtype), self.timestep(t), {"encoder_hidden_states": cond.tokens.to(dtype),
                                                  "encoder_attention_mask": mask, "added_cond_kwargs": added}

    def image_embeds(self, x: Tensor, cond: Conditioning) -> Tensor | None:
        """cond.image_embeds (B, N, D), checked, for a UNet with an IP-Adapter (diffusion.ip_adapter); None without."""
        from diffusion.ip_adapter import image_embed_dim

        return check_image_embeds(self.name, cond, image_embed_dim(self.unet))

    def time_ids(self, x: Tensor) -> Tensor:
        """SDXL's (B, 6) time ids for latents x: (original h, w, crop top, left, target h, w), in pixels."""
        image = [x.shape[-2] * self.pixels_per_latent, x.shape[-1] * self.pixels_per_latent]
        micro = self.micro
        row = [*(micro["original_size"] or image), *micro["crop_top_left"], *(micro["target_size"] or image)]
        return torch.tensor(row, dtype=torch.float32, device=x.device).expand(x.shape[0], 6)


def _concat_input(unet: nn.Module, concat_channels: int, latent_channels: int | None, name: str) -> int:
    """``concat_channels``, after giving a UNet that lacks them extra zero-initialised input channels.

    A UNet trained with the concatenated condition (SD's inpainting UNet: 4 latent + 1 mask + 4 masked
    image = 9 input channels) takes it as it is; one trained without (4) gets ``concat_channels`` new
    input channels of the first convolution, zero, so that it starts as the base (InstructPix2Pix,
    Brooks et al. 2023), and its config says the new width, as ``save_pretrained`` then writes it."""
    if concat_channels < 0:
        raise ValueError(f"{name}: concat_channels must be >= 0, got {concat_channels}")
    total, latent = int(unet.config.in_channels), latent_channels or int(unet.config.out_channels)
    if concat_channels == 0 or total == latent + concat_channels:  # the UNet's own width is checked after
        return concat_channels
    if total != latent:
        raise ValueError(f"{name} takes {total} input channels, which is neither the latents' {latent} nor the latents' "
                         f"plus concat_channels={concat_channels}: an inpainting UNet (9 = 4 + 1 + 4) needs "
                         "image_condition=inpaint, and a plain UNet takes the latents alone")
    old = unet.conv_in
    new = nn.Conv2d(total + concat_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :total] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new.to(old.weight.dtype)
    unet.register_to_config(in_channels=total + concat_channels)
    return concat_channels


def _micro_conditioning(time_ids: Mapping[str, Any] | None, name: str) -> dict[str, list[int] | None]:
    """The checked time_ids config: original_size and target_size [h, w] or None, crop_top_left [top, left]."""
    given = dict(_plain(time_ids)) if time_ids is not None else {}
    keys = ("original_size", "crop_top_left", "target_size")
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise ValueError(f"{name}: time_ids takes {list(keys)}, got unknown keys {unknown}")
    micro = {"original_size": given.get("original_size"), "crop_top_left": given.get("crop_top_left", [0, 0]),
             "target_size": given.get("target_size")}
    for key, value in micro.items():
        if value is None and key != "crop_top_left":
            continue
        if value is None or len(value) != 2 or any(int(v) != v or v < 0 for v in value):
            raise ValueError(f"{name}: time_ids.{key} must be two non-negative integers [h, w] (pixels)"
                             f"{' or null (the image size)' if key != 'crop_top_left' else ''}, got {value!r}")
        micro[key] = [int(v) for v in value]
    return micro


def _subfolder(owner: str, model: str, pretrained: str, subfolder: str | None) -> str | None:
    """A local directory with the ``model``'s config at its top is read there; else ``subfolder``
    (a pipeline's layout). ``owner`` names the wrapper in the refusal."""
    path = Path(pretrained)
    if path.is_dir() and (path / "config.json").is_file():
        return None
    if path.is_dir() and subfolder and not (path / subfolder / "config.json").is_file():
        raise ValueError(f"{owner}: {pretrained} holds no {model}: neither {path / 'config.json'} nor "
                         f"{path / subfolder / 'config.json'} exists; pass a {model}'s or a pipeline's directory")
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
