"""Released models as backbones, their weights as they are: diffusers' UNet2DConditionModel (Stable
Diffusion 1.x/2.x) behind our forward(x_t, t, cond), against diffusers itself (the UNet and a whole
StableDiffusionPipeline), and fine-tuned from the command line. Tiny random UNets saved with
save_pretrained stand in for the hub's; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from hydra.utils import instantiate

from diffusion import cli
from diffusion.backbones import DiffusersUNet
from diffusion.conditioning import Conditioning
from diffusion.samplers import ClassifierFreeGuidance, ddim, euler, grids
from diffusion.schedules import DDPM
from tests.conftest import FAST, compose_config
from tests.make_captioned_folder import make_captioned_folder
from tests.seeded import randn as _randn
from tests.tiny_encoders import (  # noqa: F401 - no_network: any connection fails the test
    TINY_OPENCLIP_CONFIG,
    TINY_SD_UNET,
    TINY_VAE_CONFIGS,
    no_network,
    save_tiny_hf,
    save_tiny_sd_unet,
    tiny_sd_unet,
    trained_weights,
)

WIDTH = TINY_SD_UNET["cross_attention_dim"]  # the tiny text encoders' token width
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _saved_unet(directory: Path, seed: int = 0) -> tuple[UNet2DConditionModel, Path]:
    return save_tiny_sd_unet(directory, seed), directory


def _ours(unet: UNet2DConditionModel, **kwargs) -> DiffusersUNet:
    model = DiffusersUNet(config=dict(unet.config), in_channels=4, token_dim=WIDTH, **kwargs).eval()
    model.unet.load_state_dict(unet.state_dict())
    return model


# --- loading ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["unet", "pipeline"])
def test_the_backbone_option_loads_a_saved_unet_as_it_is(layout, tmp_path):
    """backbone=sd15_unet backbone.pretrained=DIR: a UNet's own directory, or a pipeline's with unet/."""
    root = tmp_path / "sd"
    unet, _ = _saved_unet(root / "unet" if layout == "pipeline" else root, seed=3)
    cfg = compose_config("train", ["backbone=sd15_unet", f"backbone.pretrained={root}"], tmp_path / "run")
    assert cfg.backbone.subfolder == "unet" and cfg.backbone.num_train_steps == 1000
    model = instantiate(cfg.backbone, in_channels=4, token_dim=WIDTH, pooled_dim=None, num_classes=None)
    assert isinstance(model, DiffusersUNet) and model.in_channels == 4 and model.token_dim == WIDTH
    saved = unet.state_dict()
    loaded = model.unet.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_the_hub_ids_are_only_defaults():
    from omegaconf import OmegaConf

    from tests.conftest import CONF

    sd15 = OmegaConf.load(Path(CONF) / "backbone" / "sd15_unet.yaml")
    assert sd15.pretrained == "runwayml/stable-diffusion-v1-5" and sd15.subfolder == "unet"
    sd21 = OmegaConf.load(Path(CONF) / "backbone" / "sd21_unet.yaml")
    assert sd21.pretrained == "stabilityai/stable-diffusion-2-1"


# --- the forward, against diffusers' -----------------------------------------------------------
def test_forward_is_diffusers_unet_at_the_timestep_n_t_minus_1():
    unet = tiny_sd_unet()
    model = _ours(unet)
    x, tokens = _randn(3, 4, 8, 8, seed=1), _randn(3, 7, WIDTH, seed=2)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [True] * 5 + [False] * 2])
    steps = torch.tensor([0, 499, 999])  # diffusers' integer timesteps
    t = ((steps + 1) / 1000).float()  # ours: training step i at t = (i + 1) / N, in float32
    with torch.no_grad():
        ours = model(x, t, Conditioning(tokens=tokens, mask=mask))
        theirs = unet(x, steps, encoder_hidden_states=tokens).sample
        assert torch.equal(ours, theirs)  # the padding is attended to, as SD does
        # Between the steps the timestep stays a float: t = 0.25 is diffusers' 249.0.
        between = model(x, torch.full((3,), 0.25), Conditioning(tokens=tokens))
        assert torch.equal(between, unet(x, torch.full((3,), 249.0), encoder_hidden_states=tokens).sample)
        assert not torch.allclose(between, unet(x, torch.full((3,), 250.0), encoder_hidden_states=tokens).sample)
        # token_mask=True: the mask goes to diffusers' encoder_attention_mask, and changes the output.
        masked = _ours(unet, token_mask=True)(x, t, Conditioning(tokens=tokens, mask=mask))
        assert torch.equal(masked, unet(x, steps, encoder_hidden_states=tokens, encoder_attention_mask=mask).sample)
        assert not torch.allclose(masked, ours)


def test_the_float32_time_of_every_training_step_is_its_integer_timestep():
    model = DiffusersUNet(config=TINY_SD_UNET, token_dim=WIDTH)
    steps = torch.arange(1000)
    assert torch.equal(model.timestep(((steps + 1) / 1000).float()), steps.float())


# --- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(in_channels=16), "takes latents of 4 channels, but the autoencoder gives 16"),
    (dict(token_dim=768), "tokens of width 32 .*the text encoder gives width 768"),
    (dict(token_dim=None), "gives none: use conditioning=text"),
    (dict(pooled_dim=16), "no pooled text vector.*text_encoder.pooling=none"),
    (dict(num_classes=10), "no class labels"),
])
def test_a_condition_or_latent_it_cannot_take_is_refused_at_build(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusersUNet(config=TINY_SD_UNET, **{"in_channels": 4, "token_dim": WIDTH, **kwargs})


def test_bad_sources_and_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        DiffusersUNet(token_dim=WIDTH)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no UNet"):
        DiffusersUNet(pretrained=str(tmp_path / "empty"), token_dim=WIDTH)
    sdxl = dict(TINY_SD_UNET, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=16 + 6 * 8)
    with pytest.raises(ValueError, match="pooled text vector of width 16.*text_encoder=sdxl"):
        DiffusersUNet(config=sdxl, token_dim=WIDTH)  # SDXL's UNet without its pooled vector (tests/test_sdxl.py)
    model = DiffusersUNet(config=TINY_SD_UNET, token_dim=WIDTH)
    x, t = torch.zeros(2, 4, 8, 8), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="needs cond.tokens"):
        model(x, t)
    with pytest.raises(ValueError, match="no cond.pooled"):
        model(x, t, Conditioning(tokens=torch.zeros(2, 3, WIDTH), pooled=torch.zeros(2, 5)))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.zeros(2, 4, 7, 8), t, Conditioning(tokens=torch.zeros(2, 3, WIDTH)))


# --- sampling: our samplers against a whole diffusers pipeline ----------------------------------
def _pipeline(unet: UNet2DConditionModel, scheduler) -> StableDiffusionPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE_CONFIGS["sd"])  # only for its scale factor: output_type="latent"
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("sampler,alpha_to_one", [("ddim", True), ("ddim", False), ("euler", None)])
def test_our_samplers_give_the_latents_of_a_stable_diffusion_pipeline(sampler, alpha_to_one, guidance):
    """SD's scheduler settings (scaled_linear betas, "leading" with steps_offset 1); the same noise and
    prompt embeddings. DDIM with set_alpha_to_one=False (SD's own config) ends at training step 0,
    t = 1/N, instead of at clean data: so does our grid with the option of that name."""
    steps, unet = 6, tiny_sd_unet(seed=5)
    if sampler == "ddim":
        scheduler = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=alpha_to_one, steps_offset=1,
                                  timestep_spacing="leading")
    else:
        scheduler = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading")
    prompts, null = _randn(2, 7, WIDTH, seed=6), _randn(1, 7, WIDTH, seed=7)
    noise = _randn(2, 4, 8, 8, seed=8)
    expected = _pipeline(unet, scheduler)(
        prompt_embeds=prompts, negative_prompt_embeds=null.expand(2, -1, -1), latents=noise.clone(),
        num_inference_steps=steps, guidance_scale=guidance, output_type="latent", height=64, width=64,
    ).images

    schedule = DDPM("scaled_linear", "eps")
    grid = grids.ddpm(steps, "leading", steps_offset=1, set_alpha_to_one=alpha_to_one is not False)
    assert grid[-1] == (schedule.first_trained_time if alpha_to_one is False else 0)
    model = ClassifierFreeGuidance(_ours(unet), Conditioning(tokens=prompts), Conditioning(tokens=null).expand(2),
                                   guidance)
    with torch.no_grad():
        ours = (ddim if sampler == "ddim" else euler)(model, schedule, noise, grid)
    assert expected.abs().mean() > 0.1  # not a degenerate run
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=2e-5)


def test_set_alpha_to_one_false_ends_the_grid_at_training_step_0(tmp_path):
    """diffusers' DDIMScheduler(set_alpha_to_one=False) steps to alphas_cumprod[0] last: t = 1/N."""
    assert grids.ddpm(4, "leading", steps_offset=1, set_alpha_to_one=False).tolist() == [0.752, 0.502, 0.252, 0.002, 0.001]
    assert grids.ddpm(4, "leading", set_alpha_to_one=False).tolist() == [0.751, 0.501, 0.251, 0.001]  # there already
    assert grids.ddpm(4, "leading").tolist()[-1] == 0
    sd = compose_config("train", ["experiment=finetune_sd15"], tmp_path)
    sdxl = compose_config("train", ["experiment=finetune_sdxl"], tmp_path)
    assert sd.schedule.grid.set_alpha_to_one is False and sdxl.schedule.grid.set_alpha_to_one is True


# --- fine-tuning from the command line ------------------------------------------------------------
def test_finetune_sd15_trains_from_the_saved_unet(tmp_path):
    """experiment=finetune_sd15 with a tiny saved UNet, the tiny SD VAE and a tiny CLIP text encoder
    (SD 1.x's kind: CLIPTextModel, last layer, no padding mask, no pooled vector)."""
    unet, unet_dir = _saved_unet(tmp_path / "unet", seed=1)
    clip = save_tiny_hf("clip_text", tmp_path / "clip")
    images = make_captioned_folder(tmp_path / "images", n=8, sizes=[(64, 64)], layout="csv")
    fast = [o for o in FAST if not o.startswith(("backbone", "data.module.batch_size"))]
    cfg = compose_config("train", [
        *fast, "experiment=finetune_sd15", f"backbone.pretrained={unet_dir}", "vae=tiny_sd",
        f"text_encoder.pretrained={clip}", "text_encoder.max_length=16", f"data.module.root={images}",
        "data.module.resolution=64", "data.module.batch_size=2", "data.module.num_workers=0",
        "model.optim.optimizer.lr=1e-3",
    ], tmp_path / "run")
    metrics = cli.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    step, trained = trained_weights(ckpt, "backbone.unet.")
    assert step == 4
    start = unet.state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the released weights moved
    model = cli.load_module(ckpt)  # rebuilt from the run's config: the same backbone option
    assert isinstance(model.backbone, DiffusersUNet)
    images = model.sample(2, ["a red circle", "a blue square"], steps=2)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


# --- the text encoders as SD runs them ---------------------------------------------------------
def test_a_clip_encoder_without_the_padding_mask_is_the_model_called_without_one(tmp_path):
    import transformers

    from diffusion.encoders import HFTextEncoder

    directory = save_tiny_hf("clip_text", tmp_path / "clip")
    encoder = HFTextEncoder(str(directory), max_length=16, pooling="none", attention_mask=False)
    masked = HFTextEncoder(str(directory), max_length=16, pooling="none")
    reference = transformers.CLIPTextModel.from_pretrained(directory).eval()
    ids = encoder.tokenizer(["a red cat", "a photo"], padding="max_length", max_length=16,
                            return_tensors="pt")["input_ids"]
    got = encoder(["a red cat", "a photo"])
    with torch.no_grad():
        torch.testing.assert_close(got.tokens, reference(input_ids=ids).last_hidden_state, rtol=0, atol=0)
    assert got.pooled is None and encoder.pooled_dim is None
    other = masked(["a red cat", "a photo"])
    real = got.mask
    torch.testing.assert_close(got.tokens[real], other.tokens[real], rtol=1e-5, atol=1e-6)  # causal: the same
    assert not torch.allclose(got.tokens[~real], other.tokens[~real])  # the padding states differ
    assert encoder.fingerprint()["attention_mask"] == "false" and "attention_mask" not in masked.fingerprint()


def test_the_openclip_penultimate_layer_and_no_pooled_vector():
    from diffusion.encoders import OpenCLIPTextEncoder

    def build(**kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return OpenCLIPTextEncoder("tiny-clip", model_config=TINY_OPENCLIP_CONFIG, **kwargs)

    last, penultimate, bare = build(), build(layer="penultimate"), build(layer="penultimate", pooled=False)
    prompts = ["a red circle", "a blue square on the sea"]
    tower = penultimate.model
    captured = {}
    hook = tower.transformer.resblocks[-2].register_forward_hook(lambda m, i, o: captured.update(h=o))
    with torch.no_grad():
        ids = penultimate.tokenizer(prompts, context_length=penultimate.max_length)
        expected_pooled = tower.encode_text(ids)  # open_clip's own forward, the hook on the way
    hook.remove()
    expected_tokens = tower.ln_final(captured["h"])
    got = penultimate(prompts)
    torch.testing.assert_close(got.tokens, expected_tokens, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.pooled, expected_pooled, rtol=1e-6, atol=1e-6)  # always the last layer's
    torch.testing.assert_close(got.pooled, last(prompts).pooled, rtol=0, atol=0)
    assert not torch.allclose(got.tokens, last(prompts).tokens)
    plain = bare(prompts)
    assert plain.pooled is None and bare.pooled_dim is None and torch.equal(plain.tokens, got.tokens)
    assert penultimate.fingerprint()["layer"] == "penultimate" and "layer" not in last.fingerprint()
    with pytest.raises(ValueError, match="layer"):
        build(layer="middle")
