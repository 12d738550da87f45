"""IP-Adapter on the wrapped SD3 transformer (diffusion.ip_adapter_sd3) and SigLIP's image encoder: the
encoder equals SiglipImageProcessor then SiglipVisionModel's penultimate hidden states; only the adapter
trains; scale 0 is the base; our file, loaded by diffusers' StableDiffusion3Pipeline.load_ip_adapter,
gives diffusers' SD3Transformer2DModel our output, and the pipeline our Euler latents, for the same image
embeddings; the refusals. Tiny random models; nothing downloaded."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import transformers
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from diffusion.backbones import FluxTransformer, SD3Transformer
from diffusion.conditioning import Conditioning
from diffusion.encoders import SiglipImageEncoder
from diffusion.ip_adapter import WEIGHT_NAMES, IPAdapter, save_ip_adapter, set_ip_scale, without_ip_adapter
from diffusion.ip_adapter_sd3 import ip_processors
from diffusion.samplers import ClassifierFreeGuidance, euler, grids
from diffusion.schedules import FlowMatching
from tests.seeded import randn as _randn
from tests.test_ip_adapter import _images, _ours as _pixels
from tests.tiny_encoders import no_network  # noqa: F401 - autouse: offline
from tests.tiny_mmdit import POOLED, TINY_FLUX, WIDTH, tiny_transformer

EMBED, PATCHES = 24, 16  # the tiny SigLIP's width (So400m's 1152) and patches (384 / 14 = 27: 729)
SIGLIP = dict(hidden_size=EMBED, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8)
# A narrow resampler (InstantX's: hidden 1280, 20 heads of 64, 64 queries, a 320-wide timestep embedding).
RESAMPLER = dict(hidden_dim=64, heads=1, num_queries=4, timestep_in_dim=16)


def _wrap(theirs) -> SD3Transformer:
    model = SD3Transformer(config=dict(theirs.config), in_channels=16, token_dim=WIDTH, pooled_dim=POOLED).eval()
    model.transformer.load_state_dict(theirs.state_dict())
    return model


def _adapted(base: SD3Transformer, seed: int = 1, randomise: bool = True) -> SD3Transformer:
    """A copy of ``base`` with a new IP-Adapter; ``randomise``: its weights moved off their initial values."""
    model = copy.deepcopy(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        IPAdapter(image_embed_dim=EMBED, resampler=RESAMPLER).apply(model)
    if randomise:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _inputs(seed: int = 3):
    x, t = _randn(2, 16, 8, 8, seed=seed), torch.tensor([0.3, 0.8])
    cond = Conditioning(tokens=_randn(2, 5, WIDTH, seed=seed + 1), pooled=_randn(2, POOLED, seed=seed + 2),
                        image_embeds=_randn(2, PATCHES, EMBED, seed=seed + 3))
    return x, t, cond


def _text_only(cond: Conditioning) -> Conditioning:
    return Conditioning(tokens=cond.tokens, pooled=cond.pooled)


@pytest.fixture(scope="module")
def base() -> SD3Transformer:
    return _wrap(tiny_transformer("sd3", seed=4))


# --- the image encoder -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 41, 50), (1, 3, 64, 37)])
def test_the_encoder_is_siglip_image_processor_then_the_penultimate_hidden_states(shape, tmp_path):
    """Our preprocessing equals SiglipImageProcessor's (torchvision's and PIL's) on 8-bit images up to about
    one 8-bit level (they round to 8 bits after resizing, and between its two passes: a few pixels of an
    image upscaled one way and downscaled the other come out a hair over one level); the embeddings are
    SiglipVisionModel's
    hidden_states[-2] of those pixels (StableDiffusion3Pipeline.encode_image), all patches."""
    import PIL.Image

    images = _images(1, shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        encoder = SiglipImageEncoder(pretrained=None, config=SIGLIP)
    ours = encoder.preprocess(_pixels(images))
    level = 1 / 255 / 0.5
    size = {"height": 32, "width": 32}
    for processor in (transformers.SiglipImageProcessor(size=size), transformers.SiglipImageProcessorPil(size=size)):
        theirs = processor(images=[PIL.Image.fromarray(a) for a in images], return_tensors="pt").pixel_values
        assert theirs.shape == ours.shape == (shape[0], 3, 32, 32)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=level * 1.1)
        assert (ours - theirs).abs().mean() < 0.4 * level
    encoder.model.save_pretrained(tmp_path / "siglip")
    loaded = SiglipImageEncoder(pretrained=str(tmp_path / "siglip"))
    reference = transformers.SiglipVisionModel.from_pretrained(tmp_path / "siglip").eval()
    with torch.no_grad():
        expected = reference(pixel_values=ours, output_hidden_states=True).hidden_states[-2]
    embeds = loaded(_pixels(images))
    assert embeds.shape == (shape[0], PATCHES, EMBED) and embeds.dtype == torch.float32
    assert loaded.num_tokens == PATCHES and loaded.embed_dim == EMBED
    torch.testing.assert_close(embeds, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(embeds, reference(pixel_values=ours).last_hidden_state)  # not the last state
    assert not loaded.null_embeds(2).abs().sum() and loaded.null_embeds(2).shape == (2, PATCHES, EMBED)


def test_the_siglip_image_condition_config_builds_it():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load("conf/image_condition/image_prompt_siglip.yaml")
    assert node.encoder.pretrained == "google/siglip-so400m-patch14-384"
    node = OmegaConf.merge(node, {"encoder": {"pretrained": None, "config": SIGLIP}})
    condition = instantiate(node)
    assert isinstance(condition.encoder, SiglipImageEncoder) and condition.encoder.embed_dim == EMBED


# --- the adapter -------------------------------------------------------------------------------------
def test_only_the_adapter_trains(base):
    model = _adapted(base, randomise=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    procs = ip_processors(model.transformer)
    assert len(procs) == len(model.transformer.transformer_blocks)
    assert {n for n in trained if not n.startswith("transformer.image_proj.")} == {
        f"transformer.transformer_blocks.{i}.attn.processor.{m}" for i in range(len(procs))
        for m in ("norm_ip.linear.weight", "norm_ip.linear.bias", "to_k_ip.weight", "to_v_ip.weight")}
    assert all(proc.scale == 1.0 for proc in procs)
    x, t, cond = _inputs()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimiser.zero_grad()
    model(x, t, cond).square().mean().backward()
    optimiser.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trained


def test_scale_0_is_the_base_and_set_ip_scale_sets_every_joint_attention(base):
    model = _adapted(base)
    x, t, cond = _inputs()
    with torch.no_grad():
        expected = base(x, t, _text_only(cond))
        assert (model(x, t, cond) - expected).abs().max() > 1e-2
        set_ip_scale(model, 0.0)
        torch.testing.assert_close(model(x, t, cond), expected, rtol=0, atol=1e-6)
    set_ip_scale(model, 0.5)
    assert [proc.scale for proc in ip_processors(model.transformer)] == [0.5, 0.5]


@pytest.mark.parametrize("weight_name", WEIGHT_NAMES)
def test_our_file_loads_into_an_sd3_pipeline_which_gives_our_output(base, weight_name, tmp_path):
    model = _adapted(base)
    assert [p.name for p in save_ip_adapter(model, tmp_path)] == list(WEIGHT_NAMES)
    theirs = tiny_transformer("sd3", seed=4)
    pipe = StableDiffusion3Pipeline(transformer=theirs, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(tmp_path), weight_name=weight_name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(1.0)  # diffusers' processors start at 0.5, ours at 1 (as trained)
    for a, b in zip(ip_processors(model.transformer), ip_processors(theirs), strict=True):
        torch.testing.assert_close(b.to_k_ip.weight, a.to_k_ip.weight, rtol=0, atol=0)
        torch.testing.assert_close(b.norm_ip.linear.bias, a.norm_ip.linear.bias, rtol=0, atol=0)
    x, t, cond = _inputs()
    with torch.no_grad():  # one call, as the pipeline makes it (the transformer resamples with its timestep)
        expected = theirs(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.tokens,
                          pooled_projections=cond.pooled, return_dict=False,
                          joint_attention_kwargs={"ip_adapter_image_embeds": cond.image_embeds})[0]
        torch.testing.assert_close(model(x, t, cond), expected, rtol=1e-5, atol=1e-5)

    # Two Euler steps, no guidance. The pipeline takes one image prompt's embeddings (1, N, D) and repeats
    # them over the batch (it passes batch_size as its num_images_per_prompt).
    noise, steps = _randn(2, 16, 8, 8, seed=9), 2
    prompt = cond.image_embeds[:1]
    cond = Conditioning(tokens=cond.tokens, pooled=cond.pooled, image_embeds=prompt.expand(2, -1, -1))
    with torch.no_grad():
        latents = pipe(prompt_embeds=cond.tokens, pooled_prompt_embeds=cond.pooled, latents=noise.clone(),
                       ip_adapter_image_embeds=prompt, num_inference_steps=steps, guidance_scale=1.0,
                       output_type="latent", height=64, width=64).images
        ours = euler(ClassifierFreeGuidance(model, cond, None, 1.0), FlowMatching(), noise,
                     grids.flow_match_euler(steps, shift=3.0))
    assert (latents - noise).abs().mean() > 0.1
    torch.testing.assert_close(ours, latents, rtol=1e-4, atol=1e-4)


def test_write_outputs_in_instantx_layout_and_the_base_without_the_adapter(base, tmp_path):
    from safetensors.torch import load_file

    model = _adapted(base)
    written = IPAdapter(image_embed_dim=EMBED).write_outputs(SimpleNamespace(ema=SimpleNamespace(module=model)),
                                                            tmp_path)
    keys = set(load_file(written[0]))
    # InstantX's SD3.5-Large names of the resampler blocks (diffusers' loader renames them).
    assert {"image_proj.latents", "image_proj.proj_in.weight", "image_proj.layers.3.0.to_kv.weight",
            "image_proj.layers.0.0.norm1.weight", "image_proj.layers.0.1.1.weight", "image_proj.layers.0.2.1.bias",
            "image_proj.time_embedding.linear_1.weight", "ip_adapter.1.norm_ip.linear.weight",
            "ip_adapter.0.to_v_ip.weight"} <= keys
    assert not any(".ln0." in k or ".attn.to_q." in k for k in keys)
    plain = without_ip_adapter(model)
    assert plain.transformer.state_dict().keys() == base.transformer.state_dict().keys()
    x, t, cond = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, _text_only(cond)), base(x, t, _text_only(cond)), rtol=0, atol=0)


def test_the_refusals(base):
    model = _adapted(base, randomise=False)
    x, t, cond = _inputs()
    with pytest.raises(ValueError, match=r"has an IP-Adapter and needs cond.image_embeds of shape \(B, N, 24\)"):
        model(x, t, _text_only(cond))
    with pytest.raises(ValueError, match="takes no cond.image_embeds"):
        base(x, t, cond)
    with pytest.raises(ValueError, match="has an IP-Adapter already"):
        IPAdapter(image_embed_dim=EMBED).apply(model)
    with pytest.raises(ValueError, match="carries no IP-Adapter"):
        without_ip_adapter(base)
    with pytest.raises(ValueError, match="carries no IP-Adapter"):
        set_ip_scale(base, 0.5)
    with pytest.raises(ValueError, match="unknown option.*depth"):
        IPAdapter(image_embed_dim=EMBED, resampler=dict(depth=2)).apply(copy.deepcopy(base))
    with pytest.raises(ValueError, match="timestep_in_dim=15"):
        IPAdapter(image_embed_dim=EMBED, resampler={**RESAMPLER, "timestep_in_dim": 15}).apply(copy.deepcopy(base))
    flux = FluxTransformer(config=TINY_FLUX, guidance=3.5, in_channels=16, token_dim=WIDTH, pooled_dim=POOLED)
    with pytest.raises(ValueError, match="only SD3's IP-Adapter has a resampler"):
        IPAdapter(image_embed_dim=EMBED, resampler=RESAMPLER).apply(flux)
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        SiglipImageEncoder(config=SIGLIP)
    with pytest.raises(ValueError, match="penultimate"):
        SiglipImageEncoder(pretrained=None, config={**SIGLIP, "num_hidden_layers": 1})


def test_an_sd3_ip_adapter_fine_tune_from_the_command_line_writes_what_an_sd3_pipeline_loads(tmp_path):
    """experiment=finetune_sd3 image_condition=image_prompt_siglip adapter=ip_adapter on a tiny SD3 pipeline
    directory: two steps train the adapter alone; export.py writes ip_adapter.safetensors and a plain
    transformer/, which diffusers' SD3 loader puts together into what predicts as the EMA backbone."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    from diffusion import cli
    from tests.conftest import FAST, compose_config
    from tests.make_captioned_folder import make_captioned_folder
    from tests.tiny_mmdit import overrides, save_pipeline_parts

    root = tmp_path / "model"
    save_pipeline_parts(root, "sd3")
    SiglipImageEncoder(pretrained=None, config=SIGLIP).model.save_pretrained(tmp_path / "siglip")
    images = make_captioned_folder(tmp_path / "images", n=4, sizes=[(64, 64)], layout="csv")
    fast = [o for o in FAST if not o.startswith(("backbone", "data.module.batch_size"))]
    run = tmp_path / "run"
    resampler = ",".join(f"{k}:{v}" for k, v in RESAMPLER.items())
    cli.train(compose_config("train", [
        *fast, "experiment=finetune_sd3", *overrides(root, "sd3"), f"data.module.root={images}",
        "data.module.resolution=64", "data.module.batch_size=2", "data.module.num_workers=0", "trainer.max_steps=2",
        "model.optim.optimizer.lr=1e-2", "model.ema_decay=0.5", "image_condition=image_prompt_siglip",
        f"image_condition.encoder.pretrained={tmp_path / 'siglip'}", "adapter=ip_adapter",
        f"adapter.resampler={{{resampler}}}"], run))
    model = cli.load_module(run / "checkpoints" / "last.ckpt")
    backbone = model.ema.module
    assert isinstance(backbone, SD3Transformer)
    from diffusion.ip_adapter import is_ip_parameter

    trained = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trained and all(is_ip_parameter(n) for n in trained)
    assert isinstance(model.image_condition.encoder, SiglipImageEncoder)
    cli.export(compose_config("export", [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'export'}"],
                              tmp_path))
    exported = load_file(next((tmp_path / "export" / "transformer").glob("*.safetensors")))
    assert exported.keys() == SD3Transformer2DModel.from_pretrained(root / "transformer").state_dict().keys()
    theirs = SD3Transformer2DModel.from_pretrained(tmp_path / "export" / "transformer")
    pipe = StableDiffusion3Pipeline(transformer=theirs, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.load_ip_adapter(str(tmp_path / "export"), weight_name=WEIGHT_NAMES[0], image_encoder_folder=None)
    pipe.set_ip_adapter_scale(1.0)
    x, t = _randn(2, 16, 8, 8, seed=1), torch.tensor([0.3, 0.8])
    cond = Conditioning(tokens=_randn(2, 5, 64, seed=2), pooled=_randn(2, 32, seed=3),
                        image_embeds=_randn(2, PATCHES, EMBED, seed=4))
    with torch.no_grad():
        expected = theirs(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.tokens,
                          pooled_projections=cond.pooled, return_dict=False,
                          joint_attention_kwargs={"ip_adapter_image_embeds": cond.image_embeds})[0]
        torch.testing.assert_close(backbone(x, t, cond), expected, rtol=1e-5, atol=1e-5)
        prompted, unprompted = (model.sample(1, ["a cat"], steps=2, generator=torch.Generator().manual_seed(0),
                                             inputs={"ip_image": image}) for image in
                                (torch.rand(1, 3, 64, 64) * 2 - 1, torch.zeros(1, 3, 64, 64)))
    assert torch.isfinite(prompted).all() and (prompted - unprompted).abs().max() > 1e-4
