"""SDXL as a backbone, its weights as they are: diffusers' UNet2DConditionModel with the added
conditions (text_embeds, time_ids) behind our forward(x_t, t, cond), its two text encoders read as
SDXL was trained, against diffusers itself (the UNet, StableDiffusionXLPipeline's encode_prompt and
its sampling), and fine-tuned from the command line. Tiny random models stand in for the hub's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from omegaconf import OmegaConf

from diffusion import cli
from diffusion.backbones import DiffusersUNet
from diffusion.conditioning import Conditioning
from diffusion.encoders import HFTextEncoder, JointTextEncoder
from diffusion.samplers import ClassifierFreeGuidance, euler, grids
from diffusion.schedules import DDPM
from tests.conftest import CONF, FAST, compose_config
from tests.make_captioned_folder import make_captioned_folder
from tests.seeded import randn as _randn
from tests.tiny_encoders import TINY_SD_UNET, TINY_VAE_CONFIGS, no_network, save_tiny_hf, trained_weights  # noqa: F401

# The two tiny CLIP encoders are 32 wide each (768 and 1280 in SDXL): the UNet cross-attends to 64;
# the second's projection (16; 1280 in SDXL) and 6 time ids of 8 sinusoidal features each (256 in
# SDXL) feed its added time embedding.
WIDTH, POOLED, TIME_DIM = 64, 16, 8
TINY_SDXL_UNET = dict(TINY_SD_UNET, cross_attention_dim=WIDTH, addition_embed_type="text_time",
                      addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM)
# The scheduler of stabilityai/stable-diffusion-xl-base-1.0 (scheduler/scheduler_config.json).
SDXL_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                      timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
                      prediction_type="epsilon")


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**TINY_SDXL_UNET).eval()


def _ours(unet: UNet2DConditionModel, **kwargs) -> DiffusersUNet:
    model = DiffusersUNet(config=dict(unet.config), in_channels=4, token_dim=WIDTH, pooled_dim=POOLED, **kwargs)
    model.unet.load_state_dict(unet.state_dict())
    return model.eval()


def _save_pipeline_encoders(root: Path) -> Path:
    """The two tiny encoders in SDXL's repository layout: text_encoder (CLIPTextModel) and tokenizer,
    text_encoder_2 (CLIPTextModelWithProjection) and tokenizer_2."""
    save_tiny_hf("clip_text", root / "text_encoder", seed=1)
    save_tiny_hf("clip", root / "text_encoder_2", seed=2)
    for model, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        (root / tokenizer).mkdir()
        for f in (root / model).iterdir():
            if "token" in f.name:
                shutil.copy(f, root / tokenizer / f.name)
    return root


def _sdxl_encoder(root: Path, max_length: int = 64) -> JointTextEncoder:
    """text_encoder=sdxl as its config file says, from root."""
    cfg = OmegaConf.load(Path(CONF) / "text_encoder" / "sdxl.yaml")
    cfg.pretrained = str(root)
    for part in cfg.encoders.values():
        part.max_length = max_length
    from hydra.utils import instantiate

    return instantiate(cfg, _convert_="all")


# --- the forward, against diffusers' -----------------------------------------------------------
def test_forward_is_diffusers_unet_with_text_embeds_and_the_image_size_time_ids():
    unet = tiny_sdxl_unet(seed=1)
    x, tokens, pooled = _randn(3, 4, 8, 16, seed=1), _randn(3, 7, WIDTH, seed=2), _randn(3, POOLED, seed=3)
    steps = torch.tensor([0, 499, 999])
    t = ((steps + 1) / 1000).float()
    # Default: original = target = the image (latents x 8), crop (0, 0), as the SDXL pipeline passes.
    ids = torch.tensor([[64.0, 128, 0, 0, 64, 128]]).expand(3, 6)
    given = dict(original_size=[512, 256], crop_top_left=[16, 8], target_size=[64, 128])
    with torch.no_grad():
        theirs = unet(x, steps, encoder_hidden_states=tokens,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        ours = _ours(unet)(x, t, Conditioning(tokens=tokens, pooled=pooled))
        assert torch.equal(ours, theirs)
        configured = _ours(unet, time_ids=given)(x, t, Conditioning(tokens=tokens, pooled=pooled))
        other_ids = torch.tensor([[512.0, 256, 16, 8, 64, 128]]).expand(3, 6)
        assert torch.equal(configured, unet(x, steps, encoder_hidden_states=tokens,
                                            added_cond_kwargs={"text_embeds": pooled, "time_ids": other_ids}).sample)
        assert not torch.allclose(configured, ours)  # the time ids reach the output
        other_pooled = _ours(unet)(x, t, Conditioning(tokens=tokens, pooled=pooled.flip(0)))
        assert not torch.allclose(other_pooled, ours)  # and so does the pooled vector
    assert torch.equal(_ours(unet, pixels_per_latent=4).time_ids(x)[0], torch.tensor([32.0, 64, 0, 0, 32, 64]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(pooled_dim=None), "pooled text vector of width 16.*gives None.*text_encoder=sdxl"),
    (dict(pooled_dim=32), "pooled text vector of width 16.*gives 32"),
    (dict(token_dim=32), "tokens of width 64"),
    (dict(time_ids=dict(original_size=[64])), "time_ids.original_size must be two non-negative integers"),
    (dict(time_ids=dict(crop_top_left=None)), "time_ids.crop_top_left must be two"),
    (dict(time_ids=dict(size=[1, 2])), "unknown keys \\['size'\\]"),
])
def test_an_sdxl_unet_refuses_what_it_cannot_take(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusersUNet(config=TINY_SDXL_UNET, **{"in_channels": 4, "token_dim": WIDTH, "pooled_dim": POOLED, **kwargs})


def test_bad_inputs_and_other_added_conditions_are_refused():
    with pytest.raises(ValueError, match="takes no time_ids"):
        DiffusersUNet(config=TINY_SD_UNET, token_dim=32, time_ids=dict(crop_top_left=[0, 0]))
    with pytest.raises(ValueError, match="addition_embed_type='text'"):
        DiffusersUNet(config=dict(TINY_SD_UNET, addition_embed_type="text"), token_dim=32)
    model = DiffusersUNet(config=TINY_SDXL_UNET, token_dim=WIDTH, pooled_dim=POOLED)
    x, t, tokens = torch.zeros(2, 4, 8, 8), torch.full((2,), 0.5), torch.zeros(2, 3, WIDTH)
    with pytest.raises(ValueError, match="needs cond.pooled of shape \\(2, 16\\).*got None"):
        model(x, t, Conditioning(tokens=tokens))
    with pytest.raises(ValueError, match="got \\(2, 8\\)"):
        model(x, t, Conditioning(tokens=tokens, pooled=torch.zeros(2, 8)))


# --- the two text encoders, against the SDXL pipeline's encode_prompt --------------------------
def _pipeline(unet, root: Path | None = None, scheduler=None) -> StableDiffusionXLPipeline:
    import transformers as tf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE_CONFIGS["sdxl"])  # for its scale factor only: output_type="latent"
    parts = dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    if root is not None:
        parts = dict(text_encoder=tf.CLIPTextModel.from_pretrained(root / "text_encoder"),
                     text_encoder_2=tf.CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2"),
                     tokenizer=tf.AutoTokenizer.from_pretrained(root / "tokenizer"),
                     tokenizer_2=tf.AutoTokenizer.from_pretrained(root / "tokenizer_2"))
    pipe = StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=scheduler or EulerDiscreteScheduler(**SDXL_SCHEDULER),
                                     **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_encoder_pair_gives_the_sdxl_pipelines_prompt_embeddings(tmp_path):
    root = _save_pipeline_encoders(tmp_path / "sdxl")
    encoder = _sdxl_encoder(root, max_length=64)  # the tiny tokenizers' model_max_length, which the pipeline pads to
    pipe = _pipeline(tiny_sdxl_unet(), root)
    prompts = ["a red cat on the sea", "a photo of a big blue house with a tree"]
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
    got = encoder(prompts)
    assert got.tokens.shape == (2, 64, WIDTH) and encoder.token_dim == WIDTH and encoder.pooled_dim == POOLED
    torch.testing.assert_close(got.tokens, embeds, rtol=0, atol=0)
    torch.testing.assert_close(got.pooled, pooled, rtol=0, atol=0)
    null = encoder.null_condition(2)  # zeros, as the pipeline's force_zeros_for_empty_prompt
    torch.testing.assert_close(null.tokens, negative, rtol=0, atol=0)
    torch.testing.assert_close(null.pooled, negative_pooled, rtol=0, atol=0)
    assert embeds.abs().mean() > 0.1 and pooled.abs().mean() > 0.01  # not degenerate

    # Independently: the penultimate layer of each encoder, concatenated (the first's last layer differs).
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=64, return_tensors="pt").input_ids
    with torch.no_grad():
        first = pipe.text_encoder(ids, output_hidden_states=True)
        second = pipe.text_encoder_2(ids, output_hidden_states=True)
    torch.testing.assert_close(got.tokens, torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1))
    torch.testing.assert_close(got.pooled, second.text_embeds)
    assert not torch.allclose(got.tokens[..., :32], first.last_hidden_state)
    real = pipe.tokenizer(prompts, padding="max_length", max_length=64, return_tensors="pt").attention_mask.bool()
    assert torch.equal(got.mask, real)
    # Caption dropout and captionless images train on the zeros too (the conditioner's null).
    from diffusion.conditioning import TextPrompts

    cond = TextPrompts(encoder)({"caption": prompts, "has_caption": torch.tensor([True, False])})
    assert torch.equal(cond.tokens[0], got.tokens[0]) and not cond.tokens[1].any() and not cond.pooled[1].any()
    assert encoder.fingerprint()["null_as"] == "zeros" and encoder.encoders["clip_l"].fingerprint()["layer"] == "penultimate"
    empty = _sdxl_encoder(root)
    empty.null_as = "empty_prompt"
    torch.testing.assert_close(empty.null_condition(1).tokens, encoder([""]).tokens)


def test_a_bad_encoder_pair_is_refused(tmp_path):
    root = _save_pipeline_encoders(tmp_path / "sdxl")
    one = HFTextEncoder(str(root), subfolder="text_encoder", tokenizer_subfolder="tokenizer", max_length=16, pooling="none")
    two = HFTextEncoder(str(root), subfolder="text_encoder_2", tokenizer_subfolder="tokenizer_2", max_length=20)
    with pytest.raises(ValueError, match="must give the same length, got \\{'one': 16, 'two': 20\\}"):
        JointTextEncoder({"one": one, "two": two}, tokens=[["one", "two"]])
    with pytest.raises(ValueError, match="encoder 'one' gives no pooled vector"):
        JointTextEncoder({"one": one}, tokens=[["one"]], pooled=["one"])
    with pytest.raises(ValueError, match="null_as='nothing' is not supported"):
        JointTextEncoder({"one": one}, tokens=[["one"]], null_as="nothing")
    with pytest.raises(ValueError, match="layer='middle' is not supported"):
        HFTextEncoder(str(root), subfolder="text_encoder", tokenizer_subfolder="tokenizer", layer="middle")


# --- sampling: our Euler against the whole SDXL pipeline -----------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_our_euler_gives_the_latents_of_an_sdxl_pipeline(guidance):
    """SDXL's scheduler config (Euler, scaled_linear, "leading", steps_offset 1) and its add_time_ids
    (original = target = (height, width), crop (0, 0)); the same noise and embeddings."""
    steps, unet = 5, tiny_sdxl_unet(seed=4)
    prompts, pooled = _randn(2, 7, WIDTH, seed=5), _randn(2, POOLED, seed=6)
    null, null_pooled = _randn(1, 7, WIDTH, seed=7), _randn(1, POOLED, seed=8)
    noise = _randn(2, 4, 8, 16, seed=9)
    expected = _pipeline(unet)(
        prompt_embeds=prompts, pooled_prompt_embeds=pooled, negative_prompt_embeds=null.expand(2, -1, -1),
        negative_pooled_prompt_embeds=null_pooled.expand(2, -1), latents=noise.clone(), num_inference_steps=steps,
        guidance_scale=guidance, output_type="latent", height=64, width=128,
    ).images

    schedule = DDPM("scaled_linear", "eps")
    model = ClassifierFreeGuidance(_ours(unet), Conditioning(tokens=prompts, pooled=pooled),
                                   Conditioning(tokens=null, pooled=null_pooled).expand(2), guidance)
    with torch.no_grad():
        ours = euler(model, schedule, noise, grids.ddpm(steps, "leading", steps_offset=1))
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=2e-5)


# --- fine-tuning from the command line ------------------------------------------------------------
def test_finetune_sdxl_trains_from_the_saved_parts(tmp_path):
    """experiment=finetune_sdxl with a tiny saved pipeline (unet/, text_encoder(_2)/, tokenizer(_2)/)
    and the tiny SD VAE (SDXL's has the same architecture)."""
    root = _save_pipeline_encoders(tmp_path / "sdxl")
    unet = tiny_sdxl_unet(seed=2)
    unet.save_pretrained(root / "unet")
    images = make_captioned_folder(tmp_path / "images", n=8, sizes=[(64, 64)], layout="csv")
    fast = [o for o in FAST if not o.startswith(("backbone", "data.module.batch_size"))]
    cfg = compose_config("train", [
        *fast, "experiment=finetune_sdxl", f"backbone.pretrained={root}", "vae=tiny_sd",
        f"text_encoder.pretrained={root}",
        f"data.module.root={images}", "data.module.resolution=64", "data.module.batch_size=2",
        "data.module.num_workers=0", "model.optim.optimizer.lr=1e-3",
    ], tmp_path / "run")
    assert cfg.backbone.time_ids.crop_top_left == [0, 0] and cfg.text_encoder.null_as == "zeros"
    assert cfg.schedule.schedule.prediction == "eps" and cfg.sampler.name == "euler"
    metrics = cli.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    step, trained = trained_weights(ckpt, "backbone.unet.")
    assert step == 4
    start = unet.state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start if "add_embedding" in k)  # text_time trained
    model = cli.load_module(ckpt)
    assert isinstance(model.backbone, DiffusersUNet) and model.backbone.text_time
    out = model.sample(2, ["a red cat", "a blue house"], steps=2)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()


def test_the_sdxl_configs_name_the_released_weights():
    unet = OmegaConf.load(Path(CONF) / "backbone" / "sdxl_unet.yaml")
    assert unet.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    text = OmegaConf.load(Path(CONF) / "text_encoder" / "sdxl.yaml")
    assert [e.subfolder for e in text.encoders.values()] == ["text_encoder", "text_encoder_2"]
    assert [e.layer for e in text.encoders.values()] == ["penultimate", "penultimate"] and text.pooled == ["clip_g"]


# --- each training image's size and crop (micro-conditioning), as diffusers' SDXL script ----------
def test_each_image_gives_its_original_size_and_crop_as_diffusers_sdxl_script_computes_them(tmp_path):
    """The crop offset is that of the resized image, of the flipped one when flipped (diffusers flips,
    then crops): checked by cropping the flipped resized file with PIL at the reported offset."""
    from PIL import Image, ImageOps

    from diffusion.data.captions import ImageCaptionDataset
    from diffusion.data.images import RESAMPLE

    folder = make_captioned_folder(tmp_path / "images", n=6, sizes=[(90, 40), (40, 70)], layout="csv")
    data = ImageCaptionDataset(folder, resolution=32, crop="random", hflip=True, seed=3)
    flips = set()
    for item in (data[i] for i in range(len(data))):
        with Image.open(item["path"]) as img:
            w, h = img.size
            rgb = img.convert("RGB")
        assert item["original_size"].tolist() == [h, w] and item["target_size"].tolist() == [32, 32]
        top, left = item["crop_top_left"].tolist()
        scale = max(32 / w, 32 / h)
        resized = rgb.resize((max(32, round(w * scale)), max(32, round(h * scale))), RESAMPLE)
        expected = {}
        for flipped, picture in ((False, resized), (True, ImageOps.mirror(resized))):
            crop = torch.from_numpy(__import__("numpy").array(picture.crop((left, top, left + 32, top + 32))))
            expected[flipped] = crop.permute(2, 0, 1).float().div(127.5).sub(1)
        match = [f for f, e in expected.items() if torch.allclose(item["image"], e, atol=1e-6)]
        assert match, "the reported crop offset does not give the item's pixels"
        flips.update(match)
    assert flips == {False, True}  # both cases were checked


def test_the_training_step_gives_the_unet_each_images_time_ids_also_when_the_caption_is_dropped(tmp_path):
    from diffusion.conditioning.micro import with_time_ids
    from diffusion.training.module import DiffusionModule

    class Prompts(torch.nn.Module):  # a stand-in conditioner: fixed tokens and pooled vectors
        takes = "prompts"

        def forward(self, batch):
            return Conditioning(tokens=torch.ones(len(batch["caption"]), 3, WIDTH),
                                pooled=torch.ones(len(batch["caption"]), POOLED))

        def null(self, n, device):
            return Conditioning(tokens=torch.zeros(n, 3, WIDTH), pooled=torch.zeros(n, POOLED))

    unet = _ours(tiny_sdxl_unet(seed=3))
    module = DiffusionModule(unet, DDPM(prediction="eps"), conditioner=Prompts(), cond_dropout=1.0)
    seen = []
    unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("cond", args[-1])), with_kwargs=True)
    batch = {"image": torch.zeros(2, 4, 8, 8), "caption": ["a", "b"],
             "original_size": torch.tensor([[300, 200], [64, 96]]), "crop_top_left": torch.tensor([[0, 10], [4, 0]]),
             "target_size": torch.tensor([[64, 64], [64, 64]])}
    module.training_step(batch, 0)
    (cond,) = seen
    assert torch.equal(cond.tokens, torch.zeros(2, 3, WIDTH))  # every caption dropped (p = 1) ...
    assert torch.equal(cond.time_ids, torch.tensor([[300, 200, 0, 10, 64, 64], [64, 96, 4, 0, 64, 64]]))  # ... not sizes
    # They reach diffusers' UNet as its time_ids; a backbone that takes none never gets them.
    x, t = _randn(2, 4, 8, 8, seed=5), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        theirs = unet.unet(x, unet.timestep(t), encoder_hidden_states=cond.tokens,
                           added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids.float()}).sample
        assert torch.equal(unet(x, t, cond), theirs)
    sd = DiffusersUNet(config=TINY_SD_UNET, token_dim=32)
    plain = Conditioning(tokens=torch.zeros(2, 3, 32))
    assert with_time_ids(plain, batch, sd) is plain
    with pytest.raises(ValueError, match="takes no cond.time_ids"):
        sd(torch.zeros(2, 4, 8, 8), t, plain.replace(time_ids=cond.time_ids))
    with pytest.raises(ValueError, match="time_ids must be int64 of shape \\(B, 6\\)"):
        Conditioning(time_ids=torch.zeros(2, 6))
