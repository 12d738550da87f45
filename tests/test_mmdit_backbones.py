"""SD3's and FLUX's transformers as backbones, their weights as they are: diffusers'
SD3Transformer2DModel and FluxTransformer2DModel behind our forward(x_t, t, cond), against diffusers
itself (the models, and whole StableDiffusion3Pipeline / FluxPipeline runs from prompt embeddings),
and fine-tuned from the command line. Tiny random transformers saved with save_pretrained stand in
for the hub's; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion import cli
from diffusion.backbones import FluxTransformer, SD3Transformer
from diffusion.backbones.diffusers_mmdit import image_ids, pack, unpack
from diffusion.conditioning import Conditioning
from diffusion.samplers import ClassifierFreeGuidance, euler, grids
from diffusion.schedules import FlowMatching
from diffusion.timesteps import FluxShift
from tests.conftest import CONF, FAST, compose_config
from tests.make_captioned_folder import make_captioned_folder
from tests.seeded import randn as _randn
from tests.tiny_encoders import no_network, save_tiny_hf, trained_weights  # noqa: F401 - no_network: autouse
from tests.tiny_mmdit import (
    POOLED,
    TINY_FLUX,
    TINY_SD3,
    WIDTH,
    overrides,
    save_pipeline_encoders,
    save_pipeline_parts,
    tiny_transformer,
)

_tiny = tiny_transformer


def _ours(kind: str, theirs, **kwargs):
    cls = SD3Transformer if kind == "sd3" else FluxTransformer
    if kind == "flux" and theirs.config.guidance_embeds:
        kwargs.setdefault("guidance", 3.5)
    model = cls(config=dict(theirs.config), in_channels=16, token_dim=WIDTH, pooled_dim=POOLED, **kwargs).eval()
    model.transformer.load_state_dict(theirs.state_dict())
    return model


# --- loading ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("layout", ["transformer", "pipeline"])
def test_the_backbone_option_loads_a_saved_transformer_as_it_is(kind, layout, tmp_path):
    root = tmp_path / kind
    theirs = _tiny(kind, seed=3)
    theirs.save_pretrained(root / "transformer" if layout == "pipeline" else root)
    option = "sd3_transformer" if kind == "sd3" else "flux_transformer"
    cfg = compose_config("train", [f"backbone={option}", f"backbone.pretrained={root}"], tmp_path / "run")
    assert cfg.backbone.subfolder == "transformer"
    model = instantiate(cfg.backbone, in_channels=16, token_dim=WIDTH, pooled_dim=POOLED, num_classes=None)
    assert isinstance(model, SD3Transformer if kind == "sd3" else FluxTransformer) and model.in_channels == 16
    saved, loaded = theirs.state_dict(), model.transformer.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_the_hub_ids_are_only_defaults():
    sd3 = OmegaConf.load(Path(CONF) / "backbone" / "sd3_transformer.yaml")
    assert sd3.pretrained == "stabilityai/stable-diffusion-3-medium-diffusers" and sd3.subfolder == "transformer"
    flux = OmegaConf.load(Path(CONF) / "backbone" / "flux_transformer.yaml")
    assert flux.pretrained == "black-forest-labs/FLUX.1-dev" and flux.guidance == 3.5
    for name, repo in (("sd3", sd3.pretrained), ("flux", flux.pretrained)):  # the text encoders: the same repository
        assert OmegaConf.load(Path(CONF) / "text_encoder" / f"{name}.yaml").pretrained == repo
    assert OmegaConf.load(Path(CONF) / "vae" / "sd3.yaml").pretrained == sd3.pretrained


# --- the forward, against diffusers' -----------------------------------------------------------
def test_sd3_forward_is_diffusers_at_the_timestep_1000_t():
    theirs = _tiny("sd3", seed=1)
    model = _ours("sd3", theirs)
    x, tokens, pooled = _randn(3, 16, 8, 8, seed=1), _randn(3, 7, WIDTH, seed=2), _randn(3, POOLED, seed=3)
    t = torch.tensor([0.001, 0.5, 1.0])
    with torch.no_grad():
        ours = model(x, t, Conditioning(tokens=tokens, pooled=pooled))
        expected = theirs(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
                          timestep=torch.tensor([1.0, 500.0, 1000.0])).sample
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        other = theirs(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
                       timestep=torch.tensor([0.001, 0.5, 1.0])).sample
        assert not torch.allclose(ours, other, atol=1e-4)  # the time map matters


def _flux_reference(theirs, x, t, tokens, pooled, guidance):
    """FLUX's pipeline's own call, written out: packing as FluxPipeline._pack_latents, its position ids."""
    b, c, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    out = theirs(hidden_states=packed, timestep=t, guidance=guidance, pooled_projections=pooled,
                 encoder_hidden_states=tokens, txt_ids=torch.zeros(tokens.shape[1], 3), img_ids=ids).sample
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)  # vae_scale_factor 8: latents of h x w


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_forward_is_diffusers_on_packed_latents(guidance_embeds):
    theirs = _tiny("flux", seed=2, guidance_embeds=guidance_embeds)
    model = _ours("flux", theirs)
    x, tokens, pooled = _randn(2, 16, 8, 6, seed=4), _randn(2, 5, WIDTH, seed=5), _randn(2, POOLED, seed=6)
    t = torch.tensor([0.25, 0.9])
    guidance = torch.full((2,), 3.5) if guidance_embeds else None
    with torch.no_grad():
        ours = model(x, t, Conditioning(tokens=tokens, pooled=pooled))
        torch.testing.assert_close(ours, _flux_reference(theirs, x, t, tokens, pooled, guidance), rtol=0, atol=0)
        if guidance_embeds:  # the guidance input is live
            other = _flux_reference(theirs, x, t, tokens, pooled, torch.full((2,), 1.0))
            assert not torch.allclose(ours, other, atol=1e-4)
        transposed = model(x.transpose(-1, -2).contiguous()[..., :6, :6], t, Conditioning(tokens=tokens, pooled=pooled))
        assert transposed.shape == (2, 16, 6, 6)


def test_packing_is_flux_pipelines_and_inverts():
    x = _randn(2, 16, 6, 4, seed=7)
    torch.testing.assert_close(pack(x), FluxPipeline._pack_latents(x, 2, 16, 6, 4), rtol=0, atol=0)
    torch.testing.assert_close(unpack(pack(x), 6, 4), x, rtol=0, atol=0)
    torch.testing.assert_close(image_ids(6, 4), FluxPipeline._prepare_latent_image_ids(1, 3, 2, "cpu", torch.float32))
    # Hand-checked: the second patch of row 0 is x[:, :, 0:2, 2:4], channel-major.
    torch.testing.assert_close(pack(x)[:, 1], x[:, :, 0:2, 2:4].reshape(2, -1), rtol=0, atol=0)


# --- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls,config", [(SD3Transformer, TINY_SD3), (FluxTransformer, TINY_FLUX)])
@pytest.mark.parametrize("kwargs,match", [
    (dict(in_channels=4), "takes latents of 16 channels, but the autoencoder gives 4"),
    (dict(token_dim=768), "tokens of width 32, the text encoder gives width 768"),
    (dict(pooled_dim=None), "pooled vector of width 16, the text encoder gives none"),
    (dict(num_classes=10), "no class labels"),
])
def test_a_condition_or_latent_it_cannot_take_is_refused_at_build(cls, config, kwargs, match):
    extra = {"guidance": 3.5} if cls is FluxTransformer else {}
    with pytest.raises(ValueError, match=match):
        cls(config=config, **{"in_channels": 16, "token_dim": WIDTH, "pooled_dim": POOLED, **extra, **kwargs})


def test_bad_sources_guidance_and_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        SD3Transformer(token_dim=WIDTH, pooled_dim=POOLED)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no transformer"):
        FluxTransformer(pretrained=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="takes a guidance scale.*backbone.guidance"):
        FluxTransformer(config=TINY_FLUX)
    with pytest.raises(ValueError, match="no guidance input.*backbone.guidance=null"):
        FluxTransformer(config={**TINY_FLUX, "guidance_embeds": False}, guidance=3.5)
    with pytest.raises(ValueError, match="2x2-packed"):
        FluxTransformer(config={**TINY_FLUX, "in_channels": 18}, guidance=3.5)
    model = SD3Transformer(config=TINY_SD3, token_dim=WIDTH, pooled_dim=POOLED)
    x, t = torch.zeros(2, 16, 8, 8), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="needs cond.tokens of width 32"):
        model(x, t)
    with pytest.raises(ValueError, match="needs cond.pooled"):
        model(x, t, Conditioning(tokens=torch.zeros(2, 3, WIDTH)))
    with pytest.raises(ValueError, match=r"cond.pooled of shape \(2, 16\)"):
        model(x, t, Conditioning(tokens=torch.zeros(2, 3, WIDTH), pooled=torch.zeros(2, 5)))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.zeros(2, 16, 7, 8), t, Conditioning(tokens=torch.zeros(2, 3, WIDTH), pooled=torch.zeros(2, 16)))


# --- sampling: our Euler on flow matching against the pipelines ---------------------------------
def _embeddings(seed: int):
    return (_randn(2, 7, WIDTH, seed=seed), _randn(2, POOLED, seed=seed + 1),
            _randn(2, 7, WIDTH, seed=seed + 2), _randn(2, POOLED, seed=seed + 3))


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_our_euler_gives_the_latents_of_a_stable_diffusion_3_pipeline(guidance):
    """SD3's scheduler (shift 3.0) and its default grid (grids.flow_match_euler); the same noise and
    prompt embeddings, the negative ones passed too, so the pipeline needs no tokenizer."""
    steps, theirs = 5, _tiny("sd3", seed=5)
    tokens, pooled, null_tokens, null_pooled = _embeddings(10)
    noise = _randn(2, 16, 8, 8, seed=8)
    pipe = StableDiffusion3Pipeline(transformer=theirs, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                    negative_pooled_prompt_embeds=null_pooled, latents=noise.clone(), num_inference_steps=steps,
                    guidance_scale=guidance, output_type="latent", height=64, width=64).images

    model = ClassifierFreeGuidance(_ours("sd3", theirs), Conditioning(tokens=tokens, pooled=pooled),
                                   Conditioning(tokens=null_tokens, pooled=null_pooled), guidance)
    grid = grids.flow_match_euler(steps, shift=3.0)
    with torch.no_grad():
        ours = euler(model, FlowMatching(), noise, grid)
    assert (expected - noise).abs().mean() > 0.1  # not a degenerate run
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_the_sd3_grid_is_the_schedulers():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(7)
    torch.testing.assert_close(grids.flow_match_euler(7, shift=3.0).float(), scheduler.sigmas, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_our_euler_gives_the_latents_of_a_flux_pipeline(guidance_embeds):
    """FLUX's scheduler (dynamic exponential shift, mu linear in the token count): our shifted grid
    with FluxShift's shift of the latents' size. The pipeline takes and returns packed latents."""
    steps, theirs = 4, _tiny("flux", seed=6, guidance_embeds=guidance_embeds)
    tokens, pooled, _, _ = _embeddings(20)
    noise = _randn(2, 16, 8, 8, seed=9)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096,
                                                time_shift_type="exponential")
    pipe = FluxPipeline(transformer=theirs, scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    packed = pipe(prompt_embeds=tokens, pooled_prompt_embeds=pooled, latents=pack(noise), num_inference_steps=steps,
                  guidance_scale=3.5, output_type="latent", height=64, width=64).images
    expected = unpack(packed, 8, 8)

    model = ClassifierFreeGuidance(_ours("flux", theirs), Conditioning(tokens=tokens, pooled=pooled), None, 1.0)
    grid = grids.shifted(steps, FluxShift()(8, 8))
    with torch.no_grad():
        ours = euler(model, FlowMatching(), noise, grid)
    assert (expected - noise).abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


# --- the text encoders as the pipelines run them ------------------------------------------------
_save_pipeline_encoders = save_pipeline_encoders


def _text_encoder(root: Path, kind: str, tmp_path: Path, length: int = 16):
    parts = ["clip_l", "clip_g", "t5"] if kind == "sd3" else ["clip", "t5"]
    cfg = compose_config("train", [f"text_encoder={kind}", f"text_encoder.pretrained={root}",
                                   *[f"text_encoder.encoders.{p}.max_length={length}" for p in parts]],
                         tmp_path / "run")
    return instantiate(cfg.text_encoder)


def test_sd3s_text_encoders_give_its_pipelines_prompt_embeddings(tmp_path):
    root = _save_pipeline_encoders(tmp_path / "sd3", "sd3")
    encoder = _text_encoder(root, "sd3", tmp_path, length=64)  # the tiny tokenizers' model_max_length
    assert encoder.token_dim == 64 and encoder.pooled_dim == 32 and encoder.max_length == 128
    import transformers

    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=transformers.CLIPTextModelWithProjection.from_pretrained(root / "text_encoder"),
        tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder_2=transformers.CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2"),
        tokenizer_2=transformers.AutoTokenizer.from_pretrained(root / "tokenizer_2"),
        text_encoder_3=transformers.T5EncoderModel.from_pretrained(root / "text_encoder_3"),
        tokenizer_3=transformers.AutoTokenizer.from_pretrained(root / "tokenizer_3"))
    prompts = ["a red cat on the sea", "a photo of a big house"]
    with torch.no_grad():
        tokens, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                  max_sequence_length=64)
    got = encoder(prompts)
    torch.testing.assert_close(got.tokens, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooled, pooled, rtol=1e-5, atol=1e-5)
    assert got.mask.shape == (2, 128) and encoder.fingerprint()["clip_l.layer"] == "penultimate"


def test_fluxs_text_encoders_give_its_pipelines_prompt_embeddings(tmp_path):
    import transformers

    root = _save_pipeline_encoders(tmp_path / "flux", "flux")
    encoder = _text_encoder(root, "flux", tmp_path, length=64)
    pipe = FluxPipeline(
        transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=transformers.CLIPTextModel.from_pretrained(root / "text_encoder"),
        tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder_2=transformers.T5EncoderModel.from_pretrained(root / "text_encoder_2"),
        tokenizer_2=transformers.AutoTokenizer.from_pretrained(root / "tokenizer_2"))
    prompts = ["a red cat on the sea", "a photo of a big house"]
    with torch.no_grad():
        tokens, pooled, _ = pipe.encode_prompt(prompts, prompts, max_sequence_length=64)
    got = encoder(prompts)
    torch.testing.assert_close(got.tokens, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooled, pooled, rtol=1e-5, atol=1e-5)


def test_a_joint_encoder_refuses_names_and_shapes_it_cannot_join(tmp_path):
    from diffusion.encoders import HFTextEncoder, JointTextEncoder

    clip = HFTextEncoder(str(save_tiny_hf("clip", tmp_path / "c")), max_length=8)
    bare = HFTextEncoder(str(save_tiny_hf("t5", tmp_path / "t")), max_length=6, pooling="none")
    with pytest.raises(ValueError, match="no encoder named 'g'.*'clip'"):
        JointTextEncoder({"clip": clip}, tokens=[["g"]])
    with pytest.raises(ValueError, match="'t5' gives no pooled vector"):
        JointTextEncoder({"clip": clip, "t5": bare}, tokens=[["clip"]], pooled=["t5"])
    with pytest.raises(ValueError, match="same length"):
        JointTextEncoder({"clip": clip, "t5": bare}, tokens=[["clip", "t5"]])
    with pytest.raises(ValueError, match="do not fit token_dim=16"):
        JointTextEncoder({"clip": clip}, tokens=[["clip"]], token_dim=16)
    with pytest.raises(ValueError, match="layer"):
        HFTextEncoder(str(tmp_path / "c"), layer="middle")


# --- fine-tuning from the command line ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_finetune_trains_from_the_saved_transformer(kind, tmp_path):
    """experiment=finetune_sd3 / finetune_flux from a tiny pipeline directory: its transformer/, a tiny
    16-channel vae/ and its tiny text encoders (SD3: CLIP-L + CLIP-G + T5; FLUX: CLIP + T5)."""
    root = tmp_path / "model"
    theirs = save_pipeline_parts(root, kind)
    images = make_captioned_folder(tmp_path / "images", n=8, sizes=[(64, 64)], layout="csv")
    fast = [o for o in FAST if not o.startswith(("backbone", "data.module.batch_size"))]
    cfg = compose_config("train", [
        *fast, f"experiment=finetune_{kind}", *overrides(root, kind),
        f"data.module.root={images}", "data.module.resolution=64", "data.module.batch_size=2",
        "data.module.num_workers=0", "model.optim.optimizer.lr=1e-3",
    ], tmp_path / "run")
    metrics = cli.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    step, trained = trained_weights(ckpt, "backbone.transformer.")
    assert step == 4
    start = theirs.state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the released weights moved
    model = cli.load_module(ckpt)
    assert isinstance(model.backbone, SD3Transformer if kind == "sd3" else FluxTransformer)
    images = model.sample(2, ["a red circle", "a blue square"], steps=2)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


def test_the_recipes_pair_flow_matching_with_each_models_shift(tmp_path):
    sd3 = compose_config("train", ["experiment=finetune_sd3"], tmp_path / "sd3")
    flux = compose_config("train", ["experiment=finetune_flux"], tmp_path / "flux")
    for cfg in (sd3, flux):
        assert cfg.schedule.schedule._target_ == "diffusion.schedules.FlowMatching"
        assert cfg.schedule.time_distribution._target_ == "diffusion.timesteps.LogitNormal"
    assert sd3.schedule.time_distribution.shift == 3.0 and sd3.vae.pretrained.startswith("stabilityai/")
    grid = instantiate(sd3.schedule.grid, _partial_=True)
    torch.testing.assert_close(grid(28), grids.flow_match_euler(28, 3.0))
    shift = instantiate(flux.schedule.time_distribution).shift
    assert isinstance(shift, FluxShift) and shift(128, 128) == pytest.approx(flux.schedule.grid.shift, rel=1e-4)



@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_lora_fine_tune_exports_what_diffusers_loads(kind, tmp_path):
    """adapter=lora on the tiny transformer from the command line (diffusers' default targets of each
    model's LoRA script); export.py writes pytorch_lora_weights.safetensors, which the base transformer
    loads as its pipeline's load_lora_weights does (prefix "transformer"), and transformer/ with the
    LoRA merged, which from_pretrained reads: both give our model's output."""
    from diffusion.adapters import DEFAULT_TARGETS

    from tests.tiny_families import lora_finetune_and_export, tiny_family

    root = tmp_path / "model"
    ckpt, out = lora_finetune_and_export(kind, tiny_family(kind, root), tmp_path)
    model = cli.load_module(ckpt)
    wrapped = model.ema.module.transformer
    targets = {n.rsplit(".", 1)[-1] for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert targets >= {"to_q", "add_q_proj", "to_add_out"} and (kind == "sd3" or "proj" in targets)
    assert len(DEFAULT_TARGETS["FluxTransformer" if kind == "flux" else "SD3Transformer"]) >= 8

    cls = SD3Transformer2DModel if kind == "sd3" else FluxTransformer2DModel
    widths = dict(in_channels=16, token_dim=64 if kind == "sd3" else WIDTH, pooled_dim=2 * POOLED,
                  **({"guidance": model.ema.module.guidance} if kind == "flux" else {}))
    x = _randn(2, 16, 8, 8, seed=8)
    cond = Conditioning(tokens=_randn(2, 5, widths["token_dim"], seed=9), pooled=_randn(2, 2 * POOLED, seed=10))
    t = torch.tensor([0.3, 0.7])
    wrapper = SD3Transformer if kind == "sd3" else FluxTransformer
    with torch.no_grad():
        ours = model.ema.module(x, t, cond)
        base = wrapper(pretrained=str(root), **widths).eval()
        before = base(x, t, cond)
        base.transformer.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors",
                                           prefix="transformer")
        torch.testing.assert_close(base(x, t, cond), ours, rtol=1e-4, atol=1e-5)
        merged = wrapper(pretrained=str(out / "transformer"), **widths).eval()
        assert isinstance(merged.transformer, cls)
        torch.testing.assert_close(merged(x, t, cond), ours, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before, ours, atol=1e-4)  # the LoRA was trained away from zero
