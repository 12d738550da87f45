"""A base backbone controlled by K ControlNets (Zhang et al. 2023), and the ControlNet of each backbone.

``Controlled(base, controlnets, scales)`` is a backbone: ``forward(x_t, t, cond)`` runs ControlNet k
on ``cond.control[:, k]`` (B, C, H, W), sums ``scale_k * residuals_k`` elementwise over k, and calls
``base(x_t, t, cond, control_residuals=...)``, as diffusers' MultiControlNetModel with
``controlnet_conditioning_scale``. The control is a kept field of the condition (KEPT_FIELDS): it
stays in both branches of classifier-free guidance.

``control_scale`` (a float for every ControlNet, or one per ControlNet) may be set at any time, e.g. at
sampling: ``set_control_scale(module, 0.5)`` sets it on every Controlled backbone in a module (the
trained backbone and its EMA copy of a DiffusionModule), or ``backbone.control_scale = [1.0, 0.5]``.

:func:`controlnet_for` builds the ControlNet of a base by its type: ours for our UNet
(diffusion.backbones.unet_controlnet), diffusers' ControlNetModel for a DiffusersUNet, for our DiT
the PixArt-delta ControlNet-Transformer (diffusion.backbones.dit_controlnet), and diffusers'
SD3ControlNetModel / FluxControlNetModel for the wrapped SD3 / FLUX transformers
(diffusion.backbones.diffusers_mmdit_controlnet).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from diffusion.conditioning.types import Conditioning


def _scales(value: float | Sequence[float], count: int) -> list[float]:
    scales = [float(value)] * count if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(scales) != count:
        raise ValueError(f"control_scale {list(value)} has {len(scales)} values for {count} ControlNets: give one "
                         "per ControlNet, or a single number for all")
    return scales


class Controlled(nn.Module):
    """forward(x_t, t, cond, **kwargs) = base(x_t, t, cond, control_residuals=sum_k scale_k controlnet_k(
    x_t, t, cond, cond.control[:, k]), **kwargs). The base's attributes (in_channels, learn_sigma, ...)
    are read through."""

    def __init__(self, base: nn.Module, controlnets: Sequence[nn.Module], scales: float | Sequence[float] = 1.0):
        super().__init__()
        if not controlnets:
            raise ValueError("Controlled needs at least one ControlNet")
        spaces = {getattr(net, "input_space", None) for net in controlnets}
        if len(spaces) > 1:  # cond.control is one (B, K, C, H, W) tensor: its K controls share a space and size
            raise ValueError(f"Controlled: the ControlNets read controls in different spaces "
                             f"{sorted(map(str, spaces))}; cond.control holds them in one tensor, so combine "
                             "ControlNets of one input_space")
        self.base = base
        self.controlnets = nn.ModuleList(controlnets)
        self.control_scale = scales

    @property
    def control_scale(self) -> list[float]:
        return list(self._control_scale)

    @control_scale.setter
    def control_scale(self, value: float | Sequence[float]) -> None:
        self._control_scale = _scales(value, len(self.controlnets))

    @property
    def input_spaces(self) -> list[str]:
        """What each ControlNet's control holds: "pixels" ([-1, 1], pixels_per_latent times x_t's size)
        or "latents" (the autoencoder's, x_t's size)."""
        return [net.input_space for net in self.controlnets]

    @property
    def block_types(self) -> tuple[type, ...]:
        return tuple(self.base.block_types)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("base", "controlnets"):
                raise
            return getattr(super().__getattr__("base"), name)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None, **kwargs: Any) -> Tensor:
        control = None if cond is None else cond.control
        count = len(self.controlnets)
        if control is None:
            raise ValueError(f"the backbone is controlled by {count} ControlNet(s), but cond.control is None: give the "
                             "conditioning image (batch['conditioning_image'] in training; inputs={'control': ...} "
                             "at sampling), shape (B, K, C, H, W)")
        if control.shape[1] != count:
            raise ValueError(f"cond.control holds {control.shape[1]} controls (shape {tuple(control.shape)}), but "
                             f"{count} ControlNet(s) are attached: give one control per ControlNet on axis 1")
        total: list[Tensor] | None = None
        for k, (net, scale) in enumerate(zip(self.controlnets, self._control_scale)):
            residuals = net(x, t, cond, control[:, k])
            if total is None:
                total = [scale * r for r in residuals]
            else:
                total = [acc + scale * r for acc, r in zip(total, residuals)]
        return self.base(x, t, cond, control_residuals=total, **kwargs)


def set_control_scale(module: nn.Module, scale: float | Sequence[float]) -> int:
    """Set ``control_scale`` on every :class:`Controlled` in ``module`` (a DiffusionModule: its backbone
    and EMA copy); returns how many. None found is refused: the model holds no ControlNet."""
    found = [m for m in module.modules() if isinstance(m, Controlled)]
    if not found:
        raise ValueError("control_scale was given, but the model holds no ControlNet (train with adapter=controlnet)")
    for m in found:
        m.control_scale = scale
    return len(found)


def controlnet_for(base: nn.Module, *, pretrained: str | None = None, subfolder: str | None = "controlnet",
                   conditioning_channels: int = 3, input_space: str | None = None, pixels_per_latent: int | None = None,
                   num_blocks: int | None = None, latent_shift: float | None = None) -> nn.Module:
    """The ControlNet of ``base`` by its type, initialised from its weights (or ``pretrained``'s):
    UNet -> UNetControlNet, DiffusersUNet -> DiffusersControlNet (diffusers' ControlNetModel), DiT ->
    DiTControlNet (diffusion.backbones.dit_controlnet; ``num_blocks`` copied blocks), SD3Transformer /
    FluxTransformer -> MMDiTControlNet (diffusers' SD3ControlNetModel / FluxControlNetModel, latents;
    ``num_blocks`` its joint / double-stream blocks).

    ``input_space``: what the control holds, "pixels" or "latents" (our UNet reads either); None: the
    ControlNet's own (pixels for the UNets, latents for the DiT).
    ``pixels_per_latent``: how much larger a pixel control is than x_t (the autoencoder's factor; 1 in
    pixel space); None: the base's ``pixels_per_latent`` where it has one (DiffusersUNet: 8), else 1.
    ``pretrained``: for a DiffusersUNet a ControlNetModel's hub id or directory (``subfolder`` in it),
    for SD3 / FLUX an SD3ControlNetModel's / FluxControlNetModel's (``latent_shift``: see MMDiTControlNet);
    for ours a ``controlnet.safetensors`` this project wrote (adapter ControlNet.write_outputs)."""
    import inspect

    from diffusion.backbones.diffusers_mmdit import FluxTransformer, SD3Transformer
    from diffusion.backbones.diffusers_unet import DiffusersUNet
    from diffusion.backbones.dit import DiT
    from diffusion.backbones.unet import UNet

    factor = pixels_per_latent if pixels_per_latent is not None else getattr(base, "pixels_per_latent", 1)
    if isinstance(base, (SD3Transformer, FluxTransformer)):
        from diffusion.backbones.diffusers_mmdit_controlnet import MMDiTControlNet

        if input_space not in (None, "latents"):
            raise ValueError(f"adapter.input_space={input_space!r}: diffusers' SD3 / FLUX ControlNets read the "
                             "conditioning image's latents; use input_space=latents or leave it null")
        # pixels_per_latent (the autoencoder's factor, which the command line sets) has no use: latents.
        net = MMDiTControlNet(base, pretrained=pretrained, subfolder=subfolder, num_layers=num_blocks,
                              latent_shift=latent_shift)
        channels = base.in_channels
        if conditioning_channels not in (3, channels):  # 3: the adapter's default, for pixels
            raise ValueError(f"adapter.conditioning_channels={conditioning_channels}: {net.name} reads latents of "
                             f"{channels} channels; leave it at its default")
        return net
    if isinstance(base, DiffusersUNet):
        from diffusion.backbones.diffusers_controlnet import DiffusersControlNet

        if input_space not in (None, "pixels"):
            raise ValueError(f"adapter.input_space={input_space!r}: diffusers' ControlNetModel reads pixels; use "
                             "input_space=pixels")
        net = DiffusersControlNet(base, pretrained=pretrained, subfolder=subfolder,
                                  conditioning_channels=conditioning_channels)
        if pixels_per_latent is not None and pixels_per_latent != net.pixels_per_latent:
            raise ValueError(f"adapter.pixels_per_latent={pixels_per_latent}, but {net.name}'s conditioning "
                             f"embedding downsamples by {net.pixels_per_latent}: leave it null")
        return net
    if isinstance(base, UNet):
        from diffusion.backbones.unet_controlnet import UNetControlNet

        net = UNetControlNet(base, conditioning_channels=conditioning_channels, input_space=input_space or "pixels",
                             pixels_per_latent=factor)
    elif isinstance(base, DiT):
        try:
            from diffusion.backbones.dit_controlnet import DiTControlNet
        except ModuleNotFoundError as e:
            if e.name != "diffusion.backbones.dit_controlnet":
                raise
            raise ValueError("adapter=controlnet: the DiT ControlNet (diffusion.backbones.dit_controlnet) is not "
                             "in this checkout") from e
        space = DiTControlNet.input_space
        if input_space not in (None, space):
            raise ValueError(f"adapter.input_space={input_space!r}: the DiT ControlNet reads {space} (the conditioning "
                             f"image through the autoencoder); use input_space={space} or leave it null")
        given = {"num_blocks": num_blocks, "conditioning_channels": conditioning_channels,
                 "input_space": input_space, "pixels_per_latent": factor}
        takes = inspect.signature(DiTControlNet).parameters  # the options it has
        net = DiTControlNet(base, **{k: v for k, v in given.items() if k in takes and v is not None})
    else:
        raise ValueError(f"adapter=controlnet has no ControlNet for backbone {type(base).__name__}; it takes our "
                         "UNet (backbone=unet_*), our DiT (backbone=dit_*), diffusers' SD UNets "
                         "(backbone=sd15_unet, sd21_unet, sdxl_unet) and the SD3 / FLUX transformers")
    if pretrained is not None:
        load_controlnet_weights(net, pretrained)
    return net


def load_controlnet_weights(net: nn.Module, file: str) -> None:
    """Load a ``controlnet.safetensors`` (our ControlNet's state dict) into ``net``; another shape is refused."""
    from pathlib import Path

    from safetensors.torch import load_file

    if not Path(file).is_file():
        raise ValueError(f"adapter.pretrained={file}: no such file; for our UNet or DiT give the "
                         "controlnet.safetensors a ControlNet training wrote")
    try:
        net.load_state_dict(load_file(file))
    except RuntimeError as e:
        raise ValueError(f"adapter.pretrained={file} holds another ControlNet than this base's: "
                         f"{str(e).splitlines()[0]}") from e
