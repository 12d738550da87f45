"""Tiny random SD3 / FLUX parts in a pipeline repository's layout (transformer/, vae/, text encoders
and tokenizers), for tests; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.tiny_encoders import TINY_VAE_CONFIGS, save_tiny_hf

WIDTH, POOLED = 32, 16  # the tiny text encoders' token width, the tiny CLIP's projection width
# SD3's layout (MM-DiT joint blocks, 2x2 patches, 16 latent channels), narrow: real 24 blocks of 1536.
TINY_SD3: dict[str, Any] = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=WIDTH,
                                caption_projection_dim=16, pooled_projection_dim=POOLED, pos_embed_max_size=16)
# FLUX's layout (double- then single-stream blocks, 2x2-packed 16-channel latents, 3-axis RoPE): real
# 19 + 38 blocks of 3072; the rope axes add up to the head width.
TINY_FLUX: dict[str, Any] = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=WIDTH,
                                 pooled_projection_dim=POOLED, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
# The widths of the joint text encoders of save_pipeline_parts: SD3's 2 CLIPs side by side (32 + 32)
# under a T5 of 64, pooled 16 + 16; FLUX's T5 tokens (32) and CLIPTextModel's pooled EOS state (32).
PIPELINE_WIDTHS = {"sd3": dict(joint_attention_dim=64, pooled_projection_dim=32),
                   "flux": dict(pooled_projection_dim=32)}
TEXT_PARTS = {"sd3": ["clip_l", "clip_g", "t5"], "flux": ["clip", "t5"]}
TARGETS = ("SD3Transformer", "FluxTransformer")


def tiny_transformer(kind: str, seed: int = 0, **overrides: Any):
    """A random SD3Transformer2DModel ("sd3") or FluxTransformer2DModel ("flux") of the tiny layout (eval
    mode). Their zero-initialised output layers get random values, or every output would be zero."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls, config = (SD3Transformer2DModel, TINY_SD3) if kind == "sd3" else (FluxTransformer2DModel, TINY_FLUX)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**{**config, **overrides}).eval()
        with torch.no_grad():
            for p in model.parameters():
                if not p.abs().sum():
                    p.copy_(torch.randn(p.shape) * 0.2)
    return model


def save_pipeline_encoders(root: Path, kind: str) -> Path:
    """Tiny text encoders in a pipeline repository's layout: SD3's CLIP-L, CLIP-G (both with projection)
    and a T5 wider than the two CLIPs side by side (64 > 32 + 32, as 4096 > 768 + 1280); FLUX's CLIP
    (without projection) and T5."""
    import transformers

    parts = [("clip", "text_encoder", "tokenizer", 0), ("clip", "text_encoder_2", "tokenizer_2", 1),
             ("t5", "text_encoder_3", "tokenizer_3", 2)]
    if kind == "flux":
        parts = [("clip_text", "text_encoder", "tokenizer", 0), ("t5", "text_encoder_2", "tokenizer_2", 1)]
    for family, model_dir, tokenizer_dir, seed in parts:
        save_tiny_hf(family, root / model_dir, seed)
        save_tiny_hf(family, root / tokenizer_dir, seed)
    if kind == "sd3":
        config = transformers.T5Config.from_pretrained(root / "text_encoder_3")
        config.d_model, config.d_ff = 64, 96
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(2)
            transformers.T5EncoderModel(config).save_pretrained(root / "text_encoder_3")
    return root


def save_pipeline_parts(root: Path, kind: str, seed: int = 1):
    """A whole tiny pipeline directory: transformer/ (returned), vae/ (16 channels) and the text encoders."""
    from diffusers import AutoencoderKL

    save_pipeline_encoders(root, kind)
    transformer = tiny_transformer(kind, seed, **PIPELINE_WIDTHS[kind])
    transformer.save_pretrained(root / "transformer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderKL(**TINY_VAE_CONFIGS["flux"]).save_pretrained(root / "vae")
    return transformer


def overrides(root: Path, kind: str, length: int = 16) -> list[str]:
    """The command-line overrides that point a finetune_sd3 / finetune_flux run at a tiny pipeline directory."""
    return [f"backbone.pretrained={root}", f"vae.pretrained={root}", f"text_encoder.pretrained={root}",
            *[f"text_encoder.encoders.{p}.max_length={length}" for p in TEXT_PARTS[kind]]]


def with_tiny_pipeline_parts(cfg, tmp_path: Path):
    """A finetune_sd3 / finetune_flux config with its hub ids checked as composed, then pointed at a tiny
    pipeline directory of the same kinds (test_train's every-option test)."""
    from omegaconf import open_dict

    kind = "sd3" if cfg.backbone._target_.endswith("SD3Transformer") else "flux"
    hub = ("stabilityai/", "black-forest-labs/")
    assert all(str(part.pretrained).startswith(hub) for part in (cfg.backbone, cfg.vae, cfg.text_encoder))
    root = tmp_path / f"tiny-{kind}"
    save_pipeline_parts(root, kind)
    with open_dict(cfg):
        for part in (cfg.backbone, cfg.vae, cfg.text_encoder):
            part.pretrained = str(root)
        for name in TEXT_PARTS[kind]:
            cfg.text_encoder.encoders[name].max_length = 16
    return cfg


def check_tiny_backbone_option(node) -> None:
    """A backbone option of SD3 / FLUX (test_train's every-option test): built with a tiny config in
    place of the hub's weights, its forward keeps x_t's shape."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from diffusion.conditioning import Conditioning

    kind = "sd3" if node._target_.endswith("SD3Transformer") else "flux"
    tiny = OmegaConf.merge(node, {"pretrained": None, "config": TINY_SD3 if kind == "sd3" else TINY_FLUX})
    model = instantiate(tiny, in_channels=16, token_dim=WIDTH, pooled_dim=POOLED)
    x = torch.zeros(2, 16, 8, 8)
    cond = Conditioning(tokens=torch.zeros(2, 3, WIDTH), pooled=torch.zeros(2, POOLED))
    assert model(x, torch.full((2,), 0.5), cond).shape == x.shape
