"""The ImageNet-256 recipes hold their papers' settings (Peebles & Xie 2023, Table 1 and section 5;
Ma et al. 2024, section 4), and their tiny variants differ from them only in size."""

from __future__ import annotations

import pytest

from tests.conftest import compose_config

# What both papers train with: SD-VAE ft-EMA latents, AdamW 1e-4 constant without weight decay,
# batch 256, EMA 0.9999, class dropout 0.1, horizontal flips, 1000 classes at 256 px, cfg 1.5.
SHARED = {
    "vae.pretrained": "stabilityai/sd-vae-ft-ema",
    "vae.sample_posterior": True,
    "data.module.resolution": 256,
    "data.module.hflip": True,
    "data.num_classes": 1000,
    "conditioning.dropout": 0.1,
    "global_batch_size": 256,
    "model.ema_decay": 0.9999,
    "model.optim.optimizer._target_": "torch.optim.AdamW",
    "model.optim.optimizer.lr": 1e-4,
    "model.optim.optimizer.weight_decay": 0.0,
    "model.optim.warmup_steps": 0,
    "model.optim.decay": "constant",
    "model.sampling.cfg_scale": 1.5,
    "backbone.name": "dit_xl_2",
    "trainer.gradient_clip_val": None,
}
RECIPES = {
    "imagenet256_dit_xl_2": {
        "schedule.schedule._target_": "diffusion.schedules.DDPM",
        "schedule.schedule.beta_schedule": "linear",
        "schedule.schedule.num_steps": 1000,
        "schedule.schedule.prediction": "eps",
        "schedule.time_distribution._target_": "diffusion.timesteps.DiscreteUniform",
        "schedule.grid.spacing": "linspace",  # DiT's space_timesteps(1000, "250")
        "model.sampling.sampler": "ancestral",
        "model.sampling.steps": 250,
    },
    "imagenet256_sit_xl_2": {
        "schedule.schedule._target_": "diffusion.schedules.FlowMatching",
        "schedule.time_distribution._target_": "diffusion.timesteps.Uniform",
        "schedule.weighting._target_": "diffusion.weighting.NoWeighting",
        "model.sampling.sampler": "heun",
        "model.sampling.steps": 125,
    },
}


def _get(cfg, dotted: str):
    node = cfg
    for key in dotted.split("."):
        node = node[key]
    return node


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_holds_the_papers_settings(recipe, tmp_path):
    cfg = compose_config("train", [f"experiment={recipe}"], tmp_path)
    expected = {**SHARED, **RECIPES[recipe]}
    got = {key: _get(cfg, key) for key in expected}
    assert got == expected


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_tiny_variant_differs_only_in_size(recipe, tmp_path):
    full = compose_config("train", [f"experiment={recipe}"], tmp_path)
    tiny = compose_config("train", [f"experiment={recipe}_tiny"], tmp_path)
    sized = {"vae.pretrained", "data.module.resolution", "data.num_classes", "global_batch_size", "backbone.name"}
    for key, value in {**SHARED, **RECIPES[recipe]}.items():
        if key not in sized and key != "model.sampling.steps":
            assert _get(tiny, key) == value, key
    assert tiny.schedule == full.schedule
    assert tiny.backbone.name == "dit_tiny" and tiny.vae.pretrained is None
