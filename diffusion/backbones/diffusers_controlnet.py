"""ControlNet for the wrapped diffusers UNet (DiffusersUNet): diffusers' own ``ControlNetModel``,
initialised from the base UNet (``ControlNetModel.from_unet``, Zhang et al. 2023) or loaded as released
(``from_pretrained``: a hub id or a directory, e.g. lllyasviel/sd-controlnet-canny).

It is called as diffusers' ControlNet pipelines call it: the base's timestep (``N t - 1``), text
tokens and SDXL added conditions, and the conditioning image as pixels in [0, 1]. Our batches hold
pixels in [-1, 1] (``batch["conditioning_image"]``), so ``(control + 1) / 2`` goes in.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from diffusion.backbones.diffusers_unet import DiffusersUNet, _subfolder
from diffusion.backbones.unet_controlnet import check_control
from diffusion.conditioning.types import Conditioning


class DiffusersControlNet(nn.Module):
    """forward(x_t, t, cond, control (B, 3, f H, f W) pixels in [-1, 1]) -> the residuals for
    ``DiffusersUNet.forward(control_residuals=)``: ControlNetModel's down residuals, then its mid one
    (at conditioning scale 1; :class:`diffusion.controlnet.Controlled` scales them).

    Args:
        base: the DiffusersUNet to control.
        pretrained: None (a copy of the base's encoder, zero convolutions: the base's output at
            first), or a ControlNetModel's hub id or local directory.
        subfolder: where the ControlNet lies in a repository ("controlnet"); a local directory with
            its config.json at the top is read there.
        conditioning_channels: channels of the conditioning image (3, RGB).
    """

    input_space = "pixels"

    def __init__(self, base: DiffusersUNet, pretrained: str | None = None, subfolder: str | None = None,
                 conditioning_channels: int = 3) -> None:
        super().__init__()
        from diffusers import ControlNetModel

        if not isinstance(base, DiffusersUNet):
            raise ValueError(f"DiffusersControlNet controls a DiffusersUNet, got {type(base).__name__}")
        if base.token_mask:
            raise ValueError(f"{base.name} passes the tokens' mask (token_mask=true), which diffusers' ControlNetModel "
                             "does not take; build the base with backbone.token_mask=false, as SD was trained")
        if pretrained is None:
            self.controlnet = ControlNetModel.from_unet(base.unet, conditioning_channels=conditioning_channels)
            self.source = f"from_unet({base.source})"
        else:
            sub = _subfolder("DiffusersControlNet", "ControlNet", pretrained, subfolder)
            self.controlnet = ControlNetModel.from_pretrained(pretrained, **({"subfolder": sub} if sub else {}))
            self.source = pretrained if not sub else f"{pretrained}/{sub}"
        self.controlnet.float().requires_grad_(True)
        self.name = f"DiffusersControlNet({self.source})"
        self._check_fits(base)
        self.base_name = base.name
        c = self.controlnet.config
        self.conditioning_channels = int(c.conditioning_channels)
        self.pixels_per_latent = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
        if base.unet.is_gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        # The base's input map (timestep, tokens, added conditions), without holding the base as a submodule.
        self._base = [base]

    def _check_fits(self, base: DiffusersUNet) -> None:
        mine, theirs = self.controlnet.config, base.unet.config
        keys = ("in_channels", "block_out_channels", "cross_attention_dim", "addition_embed_type",
                "projection_class_embeddings_input_dim", "layers_per_block")
        differing = {k: (mine.get(k), theirs.get(k)) for k in keys if _plain(mine.get(k)) != _plain(theirs.get(k))}
        if differing:
            raise ValueError(f"{self.name} was built for another UNet than {base.name}: "
                             + ", ".join(f"{k} {a} here, {b} in the UNet" for k, (a, b) in differing.items())
                             + "; use a ControlNet trained for this base model")

    def control_shape(self, x: Tensor) -> tuple[int, int, int]:
        f = self.pixels_per_latent
        return self.conditioning_channels, x.shape[-2] * f, x.shape[-1] * f

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None, control: Tensor) -> list[Tensor]:
        sample, timestep, kwargs = self._base[0].unet_inputs(x, t, cond)
        check_control(self.name, control, x, self.control_shape(x), self.input_space)
        kwargs.pop("encoder_attention_mask")  # None: the base was refused with token_mask
        dtype = self.controlnet.dtype
        added = kwargs["added_cond_kwargs"]
        if added is not None:
            added = {k: v.to(dtype) for k, v in added.items()}
        tokens = kwargs["encoder_hidden_states"].to(dtype)
        down, mid = self.controlnet(sample.to(dtype), timestep, encoder_hidden_states=tokens,
                                    controlnet_cond=((control + 1) / 2).to(dtype), added_cond_kwargs=added,
                                    return_dict=False)
        return [*down, mid]

    def save_pretrained(self, directory: str | Path) -> Path:
        """diffusers' layout (config.json, diffusion_pytorch_model.safetensors), which
        ``ControlNetModel.from_pretrained`` reads."""
        self.controlnet.save_pretrained(directory, safe_serialization=True)
        return Path(directory)


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value
