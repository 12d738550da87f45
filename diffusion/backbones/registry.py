"""Named backbone sizes: DiT-S/B/L/XL with patch 2, 4, 8, plus tiny CPU sizes for tests.

Names: the paper's ("DiT-XL/2") or friendly ("dit_xl_2"); `build_dit("DiT-XL/2",
num_classes=1000)` builds one, keyword arguments overriding the preset. For Hydra:
`_target_: diffusion.backbones.registry.build_dit` with `name: dit_b_2`.
"""

from __future__ import annotations

from typing import Any

from diffusion.backbones.dit import DiT
from diffusion.backbones.unet import UNet

# depth, hidden size, heads: Table 1 of Peebles & Xie 2023 (DiT).
_DIT_SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

DIT_CONFIGS: dict[str, dict[str, int]] = {}
for _size, _cfg in _DIT_SIZES.items():
    for _patch in (2, 4, 8):
        DIT_CONFIGS[f"DiT-{_size}/{_patch}"] = dict(_cfg, patch_size=_patch)
        DIT_CONFIGS[f"dit_{_size.lower()}_{_patch}"] = dict(_cfg, patch_size=_patch)
# Small sizes for tests and CPU experiments (ours, not from a paper).
DIT_CONFIGS["dit_tiny"] = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2)
DIT_CONFIGS["dit_small_cpu"] = dict(depth=6, hidden_size=256, num_heads=4, patch_size=2)

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # ADM-like sizes for 64 px images / 32x32 latents (channels from Dhariwal & Nichol 2021, ImageNet 64).
    "unet_adm_64": dict(model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_levels=(1, 2, 3)),
    # Stable Diffusion 2 layout (Rombach et al. 2022): 320 channels, multipliers 1, 2, 4, 4, 64-wide heads;
    # set token_dim (1024 for OpenCLIP ViT-H) for its cross-attention.
    "unet_sd2": dict(
        model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2), head_dim=64
    ),
    # Small sizes for tests and CPU experiments (ours).
    "unet_tiny": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), head_dim=32),
    "unet_small_cpu": dict(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(2,), head_dim=64),
}


def _lookup(table: dict[str, dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
    if name not in table:
        raise ValueError(f"Unknown {kind} name '{name}'; allowed names: {', '.join(table)}.")
    return dict(table[name])


def dit_config(name: str) -> dict[str, Any]:
    """The constructor arguments of a named DiT size (a copy)."""
    return _lookup(DIT_CONFIGS, name, "DiT")


def dit_forward_flops(name: str, size: int = 32, channels: int = 4, frequency_dim: int = 256,
                      mlp_ratio: float = 4.0, attention: bool = True) -> float:
    """Forward FLOPs of one ``size`` x ``size`` x ``channels`` input to the named DiT with a variance
    head (learn_sigma), 2 per multiply-add, from the sizes alone: within 0.5 % of Table 4 of Peebles
    & Xie 2023 and equal to torch's FlopCounterMode. ``attention=False`` leaves out attention's two
    N x N matmuls."""
    cfg = dit_config(name)
    d, depth, p = cfg["hidden_size"], cfg["depth"], cfg["patch_size"]
    n = (size // p) ** 2  # tokens
    hidden = int(d * mlp_ratio)
    per_block = n * 2 * (3 * d * d + d * d + 2 * d * hidden) + 4 * n * n * d * attention + 2 * d * 6 * d  # + adaLN
    embed = n * 2 * p * p * channels * d + 2 * (frequency_dim * d + d * d)  # patches, time MLP
    final = n * 2 * d * p * p * 2 * channels + 2 * d * 2 * d  # final linear, its adaLN
    return float(depth * per_block + embed + final)


def unet_config(name: str) -> dict[str, Any]:
    """The constructor arguments of a named UNet size (a copy)."""
    return _lookup(UNET_CONFIGS, name, "UNet")


def build_dit(name: str, **overrides: Any) -> DiT:
    """DiT of a named size; `overrides` set or replace constructor arguments (in_channels, num_classes, ...)."""
    return DiT(**{**dit_config(name), **overrides})


def build_unet(name: str, **overrides: Any) -> UNet:
    """UNet of a named size; `overrides` set or replace constructor arguments."""
    return UNet(**{**unet_config(name), **overrides})
