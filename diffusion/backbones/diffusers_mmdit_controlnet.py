"""ControlNet for the wrapped SD3 and FLUX transformers (SD3Transformer, FluxTransformer): diffusers' own
``SD3ControlNetModel`` / ``FluxControlNetModel``, initialised from the base transformer
(``from_transformer``: copies of its embeddings and first blocks, zero-initialised output layers and
control embedding) or loaded as released (``from_pretrained``: a hub id or a directory).

Both read the control as the autoencoder's latents of the conditioning image (``input_space =
"latents"``, x_t's shape), as diffusers' StableDiffusion3ControlNetPipeline and FluxControlNetPipeline
feed them (FLUX's packed into 2x2 patches like x_t). They are called as those pipelines call them: the
base's timestep, tokens, pooled vector (SD3: zeros for a ControlNet whose config says
``force_zeros_for_pooled_projection``, as the pipeline does, which also feeds it unshifted latents:
``latent_shift``) and FLUX's position ids and guidance.

The residual layout (what ``SD3Transformer.forward`` / ``FluxTransformer.forward`` take as
``control_residuals``; Controlled sums K ControlNets' lists elementwise, so they must share it):
- SD3: the ControlNet's block samples, one per ControlNet block (B, L, D), passed as the transformer's
  ``block_controlnet_hidden_states`` (it spreads them over its joint blocks, block i taking sample
  ``int(i * n / N)``);
- FLUX: one residual per double-stream block of the base (diffusers' ``controlnet_block_samples``
  spread as the transformer spreads them: block i takes sample ``i // ceil(N / n)``), then the
  ControlNet's single-block samples as they are (``controlnet_single_block_samples``; none for a
  ControlNet without single blocks). The base splits the list at its number of double-stream blocks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion.backbones.diffusers_mmdit import FluxTransformer, SD3Transformer, image_ids, pack
from diffusion.backbones.diffusers_unet import _subfolder
from diffusion.backbones.unet_controlnet import check_control
from diffusion.conditioning.types import Conditioning


class MMDiTControlNet(nn.Module):
    """forward(x_t, t, cond, control (B, C, H, W) latents, x_t's shape) -> the residuals for the base's
    ``forward(control_residuals=)`` (the layout in the module docstring), at conditioning scale 1
    (:class:`diffusion.controlnet.Controlled` scales them).

    Args:
        base: the SD3Transformer or FluxTransformer to control.
        pretrained: None (``from_transformer``: the base's output at first), or an SD3ControlNetModel's /
            FluxControlNetModel's hub id or local directory.
        subfolder: where the ControlNet lies in a repository ("controlnet"); a local directory with its
            config.json at the top is read there.
        num_layers: a fresh ControlNet's copied (joint / double-stream) blocks; None: diffusers'
            default (SD3 12, FLUX 4), at most the base's (SD3: its blocks before the last).
        num_single_layers: a fresh FLUX ControlNet's single-stream blocks; None: 10, at most the base's.
        latent_shift: the autoencoder's ``shift_factor * scaling_factor``, for an SD3 ControlNet whose
            config says ``force_zeros_for_pooled_projection`` (InstantX's released ones): their pipeline
            feeds the unshifted latents ``z * scaling_factor``, which are our ``(z - shift) * scale``
            plus this. Required for such a ControlNet; unused otherwise (a fresh one reads our latents).
    """

    input_space = "latents"

    def __init__(self, base: SD3Transformer | FluxTransformer, pretrained: str | None = None,
                 subfolder: str | None = "controlnet", num_layers: int | None = None,
                 num_single_layers: int | None = None, latent_shift: float | None = None) -> None:
        super().__init__()
        from diffusers import FluxControlNetModel, SD3ControlNetModel

        if not isinstance(base, (SD3Transformer, FluxTransformer)):
            raise ValueError(f"MMDiTControlNet controls an SD3Transformer or a FluxTransformer, got "
                             f"{type(base).__name__}")
        self.flux = isinstance(base, FluxTransformer)
        model_class = FluxControlNetModel if self.flux else SD3ControlNetModel
        transformer = base.transformer
        if pretrained is None:
            self.controlnet = self._from_transformer(model_class, transformer, num_layers, num_single_layers)
            self.source = f"from_transformer({base.source})"
        else:
            if num_layers is not None or num_single_layers is not None:
                raise ValueError("MMDiTControlNet: num_layers / num_single_layers shape a fresh ControlNet; a "
                                 f"pretrained one ({pretrained}) has its own: leave them null")
            sub = _subfolder("MMDiTControlNet", model_class.__name__, pretrained, subfolder)
            self.controlnet = model_class.from_pretrained(pretrained, torch_dtype=torch.float32,
                                                          **({"subfolder": sub} if sub else {}))
            self.source = pretrained if not sub else f"{pretrained}/{sub}"
        self.controlnet.float().requires_grad_(True)
        self.name = f"MMDiTControlNet({self.source})"
        self._check_fits(base)
        self.base_name = base.name
        self.latent_shift = 0.0
        if not self.flux and self.controlnet.config.force_zeros_for_pooled_projection:
            if latent_shift is None:
                raise ValueError(f"{self.name} was trained on unshifted latents (force_zeros_for_pooled_projection, "
                                 "InstantX's): give latent_shift = the VAE's shift_factor * scaling_factor "
                                 "(adapter.latent_shift; SD3's VAE: 0.0609 * 1.5305)")
            self.latent_shift = float(latent_shift)
        if transformer.is_gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        # The base's input map (timestep, ids, guidance), without holding the base as a submodule.
        self._base = [base]

    @staticmethod
    def _from_transformer(model_class: type, transformer: nn.Module, num_layers: int | None,
                          num_single_layers: int | None) -> nn.Module:
        c = transformer.config
        for what, value in (("num_layers", num_layers), ("num_single_layers", num_single_layers)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"MMDiTControlNet: {what}={value!r}, a number of copied blocks >= 0")
        if model_class.__name__ == "SD3ControlNetModel":
            if num_single_layers is not None:
                raise ValueError("MMDiTControlNet: num_single_layers is FLUX's (single-stream blocks); SD3's "
                                 "ControlNet has joint blocks only (num_layers)")
            # The transformer's last joint block is context_pre_only (its residual is never added, and its
            # weights do not fit a ControlNet block): at most the blocks before it are copied.
            layers = _layers("num_layers", num_layers, 12, int(c.num_layers) - 1, "joint blocks before the last")
            if layers < 1:
                raise ValueError("MMDiTControlNet: an SD3 ControlNet needs num_layers >= 1")
            net = model_class.from_transformer(transformer, num_layers=layers, num_extra_conditioning_channels=0)
            # diffusers' default (True) makes its pipeline feed zeros for the pooled vector and unshifted
            # latents (InstantX's training); ours gets the base's pooled vector and our latents.
            net.register_to_config(force_zeros_for_pooled_projection=False)
            return net
        double = _layers("num_layers", num_layers, 4, int(c.num_layers), "double-stream blocks")
        single = _layers("num_single_layers", num_single_layers, 10, int(c.num_single_layers), "single-stream blocks")
        if double < 1:
            raise ValueError("MMDiTControlNet: a FLUX ControlNet needs num_layers >= 1 (double-stream blocks)")
        return model_class.from_transformer(transformer, num_layers=double, num_single_layers=single,
                                            attention_head_dim=int(c.attention_head_dim),
                                            num_attention_heads=int(c.num_attention_heads))

    def _check_fits(self, base: SD3Transformer | FluxTransformer) -> None:
        mine, theirs = self.controlnet.config, base.transformer.config
        keys = ["in_channels", "patch_size", "joint_attention_dim", "pooled_projection_dim", "attention_head_dim",
                "num_attention_heads"]
        if self.flux:
            keys.append("guidance_embeds")
        differing = {k: (mine.get(k), theirs.get(k)) for k in keys
                     if _plain(mine.get(k)) != _plain(theirs.get(k))}
        if differing:
            raise ValueError(f"{self.name} was built for another transformer than {base.name}: "
                             + ", ".join(f"{k} {a} here, {b} in the transformer" for k, (a, b) in differing.items())
                             + "; use a ControlNet trained for this base model")
        if self.flux and (self.controlnet.input_hint_block is not None or self.controlnet.union):
            raise ValueError(f"{self.name} is an XLabs-style (pixel input_hint_block) or union ControlNet; "
                             "MMDiTControlNet takes latent-input FLUX ControlNets (InstantX's layout, "
                             "FluxControlNetModel.from_transformer)")
        if not self.flux and (self.controlnet.pos_embed is None or self.controlnet.context_embedder is None):
            raise ValueError(f"{self.name} shares the transformer's patch embedding and takes no tokens (SD3.5's "
                             "8b ControlNets); MMDiTControlNet takes ControlNets with their own (InstantX's "
                             "layout, SD3ControlNetModel.from_transformer)")
        if not self.flux and int(mine.extra_conditioning_channels) != 0:
            raise ValueError(f"{self.name} takes {mine.extra_conditioning_channels} extra conditioning channels "
                             "(a mask beside the latents, inpainting ControlNets), which cond.control does not hold")

    @property
    def num_residuals(self) -> int:
        """How many tensors :meth:`forward` returns."""
        c = self.controlnet.config
        if not self.flux:
            return int(c.num_layers)
        return len(self._base[0].transformer.transformer_blocks) + int(c.num_single_layers)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None, control: Tensor) -> list[Tensor]:
        base = self._base[0]
        check_control(self.name, control, x, tuple(x.shape[1:]), self.input_space)
        cond = base._check_condition(x, cond)
        dtype = self.controlnet.dtype
        tokens, pooled = cond.tokens.to(dtype), cond.pooled.to(dtype)
        if not self.flux:
            if self.controlnet.config.force_zeros_for_pooled_projection:
                pooled = torch.zeros_like(pooled)  # as StableDiffusion3ControlNetPipeline
            control = control + self.latent_shift  # 0 but for those (see latent_shift)
            (samples,) = self.controlnet(hidden_states=x.to(dtype), controlnet_cond=control.to(dtype),
                                         timestep=base.timestep(t), encoder_hidden_states=tokens,
                                         pooled_projections=pooled, return_dict=False)
            return list(samples)
        height, width = x.shape[-2:]
        guidance = (torch.full_like(t, base.guidance, dtype=torch.float32)
                    if self.controlnet.config.guidance_embeds else None)
        double, single = self.controlnet(
            hidden_states=pack(x).to(dtype), controlnet_cond=pack(control).to(dtype), timestep=t.to(torch.float32),
            encoder_hidden_states=tokens, pooled_projections=pooled, img_ids=image_ids(height, width, x.device),
            txt_ids=torch.zeros(tokens.shape[1], 3, device=x.device), guidance=guidance, return_dict=False)
        blocks = len(base.transformer.transformer_blocks)
        step = math.ceil(blocks / len(double))  # FluxTransformer2DModel's spreading of the block samples
        return [double[i // step] for i in range(blocks)] + list(single or [])

    def save_pretrained(self, directory: str | Path) -> Path:
        """diffusers' layout (config.json, diffusion_pytorch_model.safetensors), which
        ``SD3ControlNetModel`` / ``FluxControlNetModel.from_pretrained`` reads."""
        self.controlnet.save_pretrained(directory, safe_serialization=True)
        return Path(directory)


def _layers(what: str, given: int | None, default: int, most: int, blocks: str) -> int:
    """A fresh ControlNet's copied blocks: ``given``, or diffusers' default capped at the base's ``most``."""
    if given is None:
        return min(default, most)
    if given > most:
        raise ValueError(f"MMDiTControlNet: {what}={given}, but the base has {most} {blocks} to copy; give at "
                         f"most {most} (adapter.num_blocks for num_layers)")
    return given


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value
