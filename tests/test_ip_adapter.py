"""IP-Adapter (Ye et al. 2023) on the wrapped diffusers UNet, and its CLIP image encoder: the encoder
against CLIPImageProcessor and CLIPVisionModelWithProjection, the decoupled cross-attention against its
formula, what trains, and our file loaded by a diffusers StableDiffusionPipeline (load_ip_adapter),
whose sampling with the same image embeddings gives our samples. Tiny random models; nothing downloaded."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from diffusion.backbones import DiffusersUNet
from diffusion.conditioning import Conditioning
from diffusion.encoders import CLIPImageEncoder
from diffusion.ip_adapter import (
    NUM_TOKENS,
    WEIGHT_NAMES,
    IPAdapter,
    cross_attention_processors,
    save_ip_adapter,
    set_ip_scale,
    without_ip_adapter,
)
from diffusion.samplers import ClassifierFreeGuidance, ddim, grids
from diffusion.schedules import DDPM
from diffusion.training.module import DiffusionModule
from tests.conftest import compose_config
from tests.seeded import randn as _randn
from tests.tiny_encoders import TINY_SD_UNET, TINY_VAE_CONFIGS, no_network  # noqa: F401 - no_network: offline

WIDTH = TINY_SD_UNET["cross_attention_dim"]
# A tiny CLIP vision tower with projection: 32 px, patches of 8, embeddings of 24 (ViT-H/14: 224, 14, 1024).
TINY_VISION = dict(hidden_size=16, intermediate_size=32, projection_dim=24, num_hidden_layers=1,
                   num_attention_heads=2, image_size=32, patch_size=8)
EMBED = TINY_VISION["projection_dim"]


def _encoder(seed: int = 0) -> CLIPImageEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPImageEncoder(config=TINY_VISION)


def _unet(seed: int = 0) -> DiffusersUNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiffusersUNet(config=TINY_SD_UNET, in_channels=4, token_dim=WIDTH).eval()


def _adapted(seed: int = 0, randomise: bool = True) -> DiffusersUNet:
    """A tiny UNet with a new IP-Adapter; ``randomise``: its weights moved off their initial values, as
    training moves them (the initial to_k_ip equals to_k, which would hide a swapped key and value)."""
    backbone = _unet(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        IPAdapter(image_embed_dim=EMBED).apply(backbone)
    if randomise:
        g = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            for p in backbone.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return backbone


def _images(seed: int, shape=(2, 3, 41, 50)) -> np.ndarray:
    """Smooth 8-bit images (B, H, W, 3): a coarse random field, bilinearly upsampled."""
    coarse = torch.rand(shape[0], 3, 5, 6, generator=torch.Generator().manual_seed(seed))
    fine = F.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=False)
    return (fine * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _ours(images: np.ndarray) -> torch.Tensor:
    """The 8-bit images as our pipeline gives them: (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# --- the image encoder -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 41, 50), (1, 3, 64, 37), (1, 3, 32, 32)])
def test_the_encoder_is_clip_image_processor_then_clip_vision_with_projection(shape, tmp_path):
    """Our preprocessing of [-1, 1] images equals CLIPImageProcessor's (torchvision's and PIL's) on the
    8-bit images up to one 8-bit level (the processors round to 8 bits after resizing); the embeddings are
    the projection's image_embeds of those pixels, one token each; the model loads from a directory."""
    import PIL.Image

    images = _images(1, shape)
    encoder = _encoder(seed=2)
    ours = encoder.preprocess(_ours(images))
    sizes = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    level = 1 / 255 / min(encoder.std.flatten().tolist())  # one 8-bit level after normalising
    for processor in (transformers.CLIPImageProcessor(**sizes), transformers.CLIPImageProcessorPil(**sizes)):
        theirs = processor(images=[PIL.Image.fromarray(a) for a in images], return_tensors="pt").pixel_values
        assert theirs.shape == ours.shape == (shape[0], 3, 32, 32)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=level * 1.01)
        assert (ours - theirs).abs().mean() < 0.4 * level  # rounding (a quarter level on average), no shift
    encoder.model.save_pretrained(tmp_path / "image_encoder")
    loaded = CLIPImageEncoder(pretrained=str(tmp_path / "image_encoder"))
    reference = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "image_encoder").eval()
    with torch.no_grad():
        expected = reference(pixel_values=ours).image_embeds
    embeds = loaded(_ours(images))
    assert embeds.shape == (shape[0], 1, EMBED) and embeds.dtype == torch.float32
    torch.testing.assert_close(embeds[:, 0], expected, rtol=1e-5, atol=1e-5)
    assert loaded.fingerprint() == {**encoder.fingerprint(), "source": str(tmp_path / "image_encoder")}
    assert _encoder(seed=3).fingerprint()["sha256"] != encoder.fingerprint()["sha256"]
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.null_embeds(2), torch.zeros(2, 1, EMBED))


def test_the_encoder_refuses_what_it_cannot_encode():
    encoder = _encoder()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="uint8 pixels"):
        encoder(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        CLIPImageEncoder()
    with pytest.raises(ValueError, match="crop_size=40"):
        CLIPImageEncoder(config=TINY_VISION, crop_size=40)


# --- the decoupled cross-attention -------------------------------------------------------------------
def test_the_new_maps_start_as_the_text_maps_and_only_the_adapter_trains():
    """to_k_ip / to_v_ip start as each cross-attention layer's to_k / to_v (the paper); in a DiffusionModule
    the image projection and those maps alone train, take gradients and are checkpointed."""
    backbone = _adapted(seed=3, randomise=False)
    processors = cross_attention_processors(backbone.unet)
    assert len(processors) == 4  # one down, the mid and two up transformer blocks of the tiny layout
    for name, proc in processors:
        attn = backbone.unet.get_submodule(name.removesuffix(".processor"))
        assert torch.equal(proc.to_k_ip[0].weight, attn.to_k.weight)
        assert torch.equal(proc.to_v_ip[0].weight, attn.to_v.weight)
        assert proc.to_k_ip[0].weight is not attn.to_k.weight  # a copy: training one leaves the other
    projection = backbone.unet.encoder_hid_proj.image_projection_layers[0]
    assert projection.image_embeds.weight.shape == (NUM_TOKENS * WIDTH, EMBED)

    module = DiffusionModule(_unet(seed=3), DDPM("scaled_linear", "eps"), adapter=IPAdapter(image_embed_dim=EMBED),
                             ema_decay=0.5)
    trains = {n for n, p in module.backbone.named_parameters() if p.requires_grad}
    expected = {f"unet.{name}.{m}_ip.0.weight" for name, _ in processors for m in ("to_k", "to_v")}
    expected |= {f"unet.encoder_hid_proj.image_projection_layers.0.{p}"
                 for p in ("image_embeds.weight", "image_embeds.bias", "norm.weight", "norm.bias")}
    assert trains == expected
    x, t = _randn(2, 4, 8, 8, seed=4), torch.tensor([0.3, 0.8])
    cond = Conditioning(tokens=_randn(2, 5, WIDTH, seed=5), image_embeds=_randn(2, 1, EMBED, seed=6))
    module.objective(partial(module.model(module.backbone), cond=cond), x, t=t).loss.backward()
    for name, p in module.backbone.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in trains), name
    state = module.state_dict()
    assert set(state) == {f"{owner}.{n}" for owner in ("backbone", "ema.module") for n in trains} | {"ema.num_updates"}


def _attention_by_hand(attn, h: torch.Tensor, text: torch.Tensor, image: torch.Tensor, proc, scale: float):
    """softmax(q K^T / sqrt(d)) V over the text, plus scale times the same over the image tokens with the
    new maps, per head, then the output projection (the paper's eq. 5)."""
    heads = attn.heads

    def attend(q, k, v):
        split = lambda z: z.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731 - (B, heads, L, d)
        q, k, v = split(q), split(k), split(v)
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return (weights @ v).transpose(1, 2).flatten(2)

    q = attn.to_q(h)
    out = attend(q, attn.to_k(text), attn.to_v(text))
    out = out + scale * attend(q, proc.to_k_ip[0](image), proc.to_v_ip[0](image))
    return attn.to_out[0](out)


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_a_cross_attention_layer_is_text_attention_plus_scale_times_image_attention(scale):
    backbone = _adapted(seed=7)
    set_ip_scale(backbone, scale)
    name, proc = cross_attention_processors(backbone.unet)[-1]
    attn = backbone.unet.get_submodule(name.removesuffix(".processor"))
    h, text = _randn(2, 6, attn.to_q.in_features, seed=8), _randn(2, 5, WIDTH, seed=9)
    image = _randn(2, 2, NUM_TOKENS, WIDTH, seed=10)  # two image prompts: their 8 tokens in one softmax
    with torch.no_grad():
        got = attn(h, encoder_hidden_states=(text, [image]))
        expected = _attention_by_hand(attn, h, text, image.flatten(1, 2), proc, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_scale_0_is_the_base_unet_and_zero_embeddings_are_not_zero_tokens():
    """ip_scale 0 gives the base UNet's output whatever the image; zero embeddings (the null image prompt)
    project to LayerNorm(proj.bias) tokens, so with scale 1 they still change the output."""
    backbone, base = _adapted(seed=11), _unet(seed=11)
    x, t = _randn(2, 4, 8, 8, seed=12), torch.tensor([0.2, 0.7])
    tokens, image = _randn(2, 5, WIDTH, seed=13), _randn(2, 1, EMBED, seed=14)
    zeros = torch.zeros_like(image)
    with torch.no_grad():
        plain = base(x, t, Conditioning(tokens=tokens))
        set_ip_scale(backbone, 0.0)
        assert torch.equal(backbone(x, t, Conditioning(tokens=tokens, image_embeds=image)), plain)
        set_ip_scale(backbone, 1.0)
        with_null = backbone(x, t, Conditioning(tokens=tokens, image_embeds=zeros))
        with_image = backbone(x, t, Conditioning(tokens=tokens, image_embeds=image))
        projection = backbone.unet.encoder_hid_proj.image_projection_layers[0]
        null_tokens = projection(zeros[:, 0])
    expected = F.layer_norm(projection.image_embeds.bias.view(NUM_TOKENS, WIDTH), (WIDTH,), projection.norm.weight,
                            projection.norm.bias)
    torch.testing.assert_close(null_tokens, expected.expand(2, -1, -1))
    assert not torch.allclose(with_null, plain, atol=1e-4)
    assert not torch.allclose(with_image, with_null, atol=1e-4)


def test_without_the_adapter_is_the_base_unet():
    backbone, base = _adapted(seed=24), _unet(seed=24)
    plain = without_ip_adapter(backbone)
    assert plain.unet.state_dict().keys() == base.unet.state_dict().keys()
    x, t, tokens = _randn(2, 4, 8, 8, seed=25), torch.tensor([0.2, 0.7]), _randn(2, 5, WIDTH, seed=26)
    with torch.no_grad():
        assert torch.equal(plain(x, t, Conditioning(tokens=tokens)), base(x, t, Conditioning(tokens=tokens)))
        backbone(x, t, Conditioning(tokens=tokens, image_embeds=torch.zeros(2, 1, EMBED)))  # the original keeps it


# --- diffusers loads our file ------------------------------------------------------------------------
def _pipeline(unet, image_encoder):
    """A tiny StableDiffusionPipeline of the base UNet, a CLIP vision encoder and CLIPImageProcessor (32 px)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE_CONFIGS["sd"])  # only for its scale factor: output_type="latent"
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"),
        safety_checker=None, image_encoder=image_encoder, requires_safety_checker=False,
        feature_extractor=transformers.CLIPImageProcessor(size=32, crop_size=32),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("weight_name", WEIGHT_NAMES)
def test_a_stable_diffusion_pipeline_loads_our_file_and_samples_our_latents(weight_name, tmp_path):
    """The adapter's file (written by adapter.write_outputs from the EMA backbone), loaded by
    pipe.load_ip_adapter into a pipeline of the base UNet; its DDIM sampling with guidance, ip scale 0.6,
    an image prompt of two images' embeddings (and zeros, its negative image embeds) gives our sampler's
    latents with our null condition (zero embeddings). The pipeline's own encoding of the images is ours."""
    import PIL.Image

    backbone, encoder = _adapted(seed=15), _encoder(seed=16)
    module = DiffusionModule(backbone, DDPM("scaled_linear", "eps"))  # write_outputs reads module.ema.module
    written = IPAdapter(image_embed_dim=EMBED).write_outputs(module, tmp_path / "out")
    assert [p.name for p in written] == list(WEIGHT_NAMES)
    pipe = _pipeline(_unet(seed=15).unet, encoder.model)
    pipe.load_ip_adapter(str(tmp_path / "out"), subfolder="", weight_name=weight_name)
    pipe.set_ip_adapter_scale(0.6)
    set_ip_scale(backbone, 0.6)

    images = _images(17, (2, 3, 40, 48))
    embeds = encoder(_ours(images))
    with torch.no_grad():
        theirs, negative = pipe.encode_image([PIL.Image.fromarray(a) for a in images], "cpu", 1)
    # The processor's rounding to 8 bits moves the tiny encoder's embeddings by well under 1% of their size.
    torch.testing.assert_close(embeds[:, 0], theirs, rtol=0, atol=0.01 * theirs.abs().max().item())
    assert torch.equal(negative, torch.zeros_like(theirs))

    # diffusers' pipeline takes one image prompt for the whole batch, here of two images (N = 2: their 8
    # tokens attended together); its negative the zeros. Ours: that prompt (1, 2, D) for each sample.
    prompt = embeds.transpose(0, 1)
    prompts, null = _randn(2, 7, WIDTH, seed=18), _randn(1, 7, WIDTH, seed=19).expand(2, -1, -1)
    noise, steps, guidance = _randn(2, 4, 8, 8, seed=20), 3, 3.0
    expected = pipe(prompt_embeds=prompts, negative_prompt_embeds=null, latents=noise.clone(),
                    ip_adapter_image_embeds=[torch.cat([torch.zeros_like(prompt), prompt])], num_inference_steps=steps,
                    guidance_scale=guidance, output_type="latent", height=64, width=64).images
    image = prompt.expand(2, -1, -1)
    schedule, grid = DDPM("scaled_linear", "eps"), grids.ddpm(steps, "leading", steps_offset=1, set_alpha_to_one=False)
    model = ClassifierFreeGuidance(backbone, Conditioning(tokens=prompts, image_embeds=image),
                                   Conditioning(tokens=null, image_embeds=torch.zeros_like(image)), guidance)
    without = ClassifierFreeGuidance(_unet(seed=15), Conditioning(tokens=prompts), Conditioning(tokens=null), guidance)
    with torch.no_grad():
        ours, plain = ddim(model, schedule, noise, grid), ddim(without, schedule, noise, grid)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=2e-5)
    assert (ours - plain).abs().max() > 1e-2  # the image prompt changed the samples


# --- bad input ---------------------------------------------------------------------------------------
def test_missing_or_misshapen_image_embeddings_and_wrong_backbones_are_refused():
    backbone, plain = _adapted(seed=21), _unet(seed=21)
    x, t, tokens = _randn(2, 4, 8, 8, seed=22), torch.tensor([0.2, 0.7]), _randn(2, 5, WIDTH, seed=23)
    with pytest.raises(ValueError, match=rf"needs cond.image_embeds of shape \(B, N, {EMBED}\).*got None"):
        backbone(x, t, Conditioning(tokens=tokens))
    with pytest.raises(ValueError, match=rf"\(B, N, {EMBED}\).*got \(2, 1, 7\)"):
        backbone(x, t, Conditioning(tokens=tokens, image_embeds=torch.zeros(2, 1, 7)))
    with pytest.raises(ValueError, match="takes no cond.image_embeds.*adapter=ip_adapter"):
        plain(x, t, Conditioning(tokens=tokens, image_embeds=torch.zeros(2, 1, EMBED)))
    with pytest.raises(ValueError, match="carries no IP-Adapter"):
        set_ip_scale(plain, 0.5)
    with pytest.raises(ValueError, match="ip_scale='high'"):
        set_ip_scale(backbone, "high")
    with pytest.raises(ValueError, match="wrapped diffusers UNet.*or our DiT.*not Linear"):
        IPAdapter(image_embed_dim=EMBED).apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="DiT has no cross-attention"):
        IPAdapter(image_embed_dim=EMBED).apply(_dit(token_dim=None))
    with pytest.raises(ValueError, match="already"):
        IPAdapter(image_embed_dim=EMBED).apply(backbone)
    with pytest.raises(ValueError, match="image_embed_dim=0"):
        IPAdapter(image_embed_dim=0)
    with pytest.raises(ValueError, match="base_dtype=bfloat16"):
        IPAdapter(image_embed_dim=EMBED, base_dtype="bfloat16")
    with pytest.raises(ValueError, match="carries no IP-Adapter"):
        save_ip_adapter(plain, Path("unused"))


def _ours_backbone(kind: str = "DiT", seed: int = 0, token_dim: int | None = WIDTH):
    """A tiny DiT or UNet of ours, its weights moved off their zero initialisation (zero gates and
    cross-attention outputs would hide the cross-attention) as training moves them."""
    from diffusion.backbones import DiT, UNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "DiT":
            model = DiT(in_channels=4, patch_size=2, hidden_size=16, depth=2, num_heads=2, token_dim=token_dim)
        else:
            model = UNet(4, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                         head_dim=4, norm_groups=4, token_dim=token_dim)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _dit(seed: int = 0, token_dim: int | None = WIDTH):
    return _ours_backbone("DiT", seed, token_dim)


@pytest.mark.parametrize("kind", ["DiT", "UNet"])
def test_our_backbones_take_the_same_adapter(kind):
    """Our DiT and UNet: ip_kv starts as each cross-attention's kv; a cross-attention is proj(text
    attention + scale image attention), by hand; scale 0 gives the base model; only the adapter trains;
    bad input is refused."""
    import copy

    base = _ours_backbone(kind, seed=36)
    backbone = copy.deepcopy(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(37)
        IPAdapter(image_embed_dim=EMBED, scale=0.7).apply(backbone)
    attentions = [m for m in backbone.modules() if getattr(m, "ip_kv", None) is not None]
    assert len(attentions) == (2 if kind == "DiT" else 4)  # the DiT's 2 blocks; the UNet's 1 down, mid, 2 up
    for a in attentions:
        assert torch.equal(a.ip_kv.weight, a.kv.weight) and a.ip_kv.weight is not a.kv.weight
        assert (a.ip_kv.bias is None) == (a.kv.bias is None)
        assert a.kv.bias is None or torch.equal(a.ip_kv.bias, a.kv.bias)
    with torch.no_grad():
        for p in backbone.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    attn = attentions[-1]
    width, context = attn.q.in_features, attn.kv.in_features
    h, text = _randn(2, 6, width, seed=38), _randn(2, 5, context, seed=39)
    image = _randn(2, NUM_TOKENS, context, seed=40)
    with torch.no_grad():
        got = attn(h, text, None, image)
        k, v = attn.kv(text).chunk(2, -1)
        k_ip, v_ip = attn.ip_kv(image).chunk(2, -1)
        expected = _attention_by_hand(_HandAttention(attn, k, v), h, text, image, _HandIP(k_ip, v_ip), 0.7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    x, t = _randn(2, 4, 8, 8, seed=41), torch.tensor([0.2, 0.7])
    tokens, embeds = _randn(2, 5, WIDTH, seed=42), _randn(2, 2, EMBED, seed=43)
    cond = Conditioning(tokens=tokens, image_embeds=embeds)
    with torch.no_grad():
        set_ip_scale(backbone, 0.0)
        torch.testing.assert_close(backbone(x, t, cond), base(x, t, Conditioning(tokens=tokens)), rtol=0, atol=0)
        set_ip_scale(backbone, 0.7)
        assert not torch.allclose(backbone(x, t, cond), base(x, t, Conditioning(tokens=tokens)), atol=1e-4)
    backbone(x, t, cond).square().mean().backward()
    for name, p in backbone.named_parameters():
        adapter = name.startswith("image_projection.") or ".ip_kv." in name
        assert p.requires_grad == adapter and ((p.grad is not None and p.grad.abs().sum() > 0) == adapter), name
    with pytest.raises(ValueError, match=rf"{kind} has an IP-Adapter and needs cond.image_embeds of shape \(B, N, {EMBED}"):
        backbone(x, t, Conditioning(tokens=tokens))
    with pytest.raises(ValueError, match=f"{kind} takes no cond.image_embeds"):
        base(x, t, cond)
    module = DiffusionModule(_ours_backbone(kind, seed=36), DDPM("linear", "eps"),
                             adapter=IPAdapter(image_embed_dim=EMBED))
    assert IPAdapter(image_embed_dim=EMBED).write_outputs(module, Path("unused")) == []  # no other layout to write
    assert {k.split(".", 1)[1] for k in module.state_dict() if k.startswith("backbone.")} == {
        n for n, p in module.backbone.named_parameters() if p.requires_grad}


class _HandAttention:
    """Our Attention's maps as the by-hand formula reads them (to_q, to_k, to_v, to_out, heads)."""

    def __init__(self, attn, k, v):
        self.heads, self.to_q, self.to_out = attn.num_heads, attn.q, [attn.proj]
        self.to_k, self.to_v = (lambda _: k), (lambda _: v)


class _HandIP:
    def __init__(self, k, v):
        self.to_k_ip, self.to_v_ip = [lambda _: k], [lambda _: v]


def test_the_config_group_builds_the_adapter(tmp_path):
    from hydra.utils import instantiate

    node = compose_config("train", ["adapter=ip_adapter", f"adapter.image_embed_dim={EMBED}"], tmp_path).adapter
    adapter = instantiate(node, _convert_="all")
    assert isinstance(adapter, IPAdapter) and adapter.image_embed_dim == EMBED and adapter.scale == 1.0
    assert not adapter.trains_base


def test_an_sdxl_unet_takes_the_image_prompt_with_its_pooled_vector_and_time_ids():
    """SDXL's added conditions and the image embeddings go in together, as diffusers' SDXL pipeline passes them."""
    from tests.test_sdxl import POOLED, TINY_SDXL_UNET
    from tests.test_sdxl import WIDTH as SDXL_WIDTH

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(27)
        backbone = DiffusersUNet(config=TINY_SDXL_UNET, in_channels=4, token_dim=SDXL_WIDTH, pooled_dim=POOLED).eval()
        IPAdapter(image_embed_dim=EMBED).apply(backbone)
    x, t = _randn(2, 4, 8, 8, seed=28), torch.tensor([0.2, 0.7])
    cond = Conditioning(tokens=_randn(2, 5, SDXL_WIDTH, seed=29), pooled=_randn(2, POOLED, seed=30),
                        image_embeds=_randn(2, 1, EMBED, seed=31))
    with torch.no_grad():
        ours = backbone(x, t, cond)
        theirs = backbone.unet(x, backbone.timestep(t), encoder_hidden_states=cond.tokens, added_cond_kwargs={
            "text_embeds": cond.pooled, "time_ids": backbone.time_ids(x), "image_embeds": [cond.image_embeds]}).sample
        null = backbone(x, t, cond.replace(image_embeds=torch.zeros_like(cond.image_embeds)))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.allclose(ours, null, atol=1e-4)


def test_an_ip_adapter_fine_tune_from_the_command_line_writes_diffusers_files(tmp_path):
    """image_condition=image_prompt adapter=ip_adapter on the tiny SD 1.5 parts: two steps train the adapter
    alone (the training image as its own prompt); the run writes ip_adapter.safetensors, which a pipeline of
    the base UNet loads and then predicts as the EMA backbone; sampling takes the image prompt (another image,
    other samples)."""
    from safetensors.torch import load_file

    from diffusion import cli
    from tests.make_captioned_folder import make_captioned_folder
    from tests.tiny_families import finetune_overrides, tiny_family

    parts = tiny_family("sd15", tmp_path / "parts")
    _encoder(seed=32).model.save_pretrained(tmp_path / "image_encoder")
    images = make_captioned_folder(tmp_path / "images", n=4, sizes=[(64, 64)], layout="csv")
    run = tmp_path / "run"
    cli.train(compose_config("train", finetune_overrides(
        "sd15", parts, "trainer.max_steps=2", f"data.module.root={images}", "model.optim.optimizer.lr=1e-2",
        "image_condition=image_prompt", f"image_condition.encoder.pretrained={tmp_path / 'image_encoder'}",
        "image_condition.encoder.subfolder=null", "adapter=ip_adapter", f"adapter.image_embed_dim={EMBED}",
        "model.ema_decay=0.5"), run))
    assert list((run / "samples").glob("*.png"))  # the grid: the first images as their own image prompts
    model = cli.load_module(run / "checkpoints" / "last.ckpt")
    assert type(model.adapter).__name__ == "IPAdapter"
    flat = load_file(run / WEIGHT_NAMES[0])
    assert {k.split(".")[0] for k in flat} == {"image_proj", "ip_adapter"}
    backbone = model.ema.module
    base = DiffusersUNet(pretrained=str(tmp_path / "parts" / "unet"), in_channels=4, token_dim=WIDTH)
    trained = {n: p for n, p in backbone.named_parameters() if ".to_k_ip." in n}
    assert trained and all(not torch.equal(p, base.unet.get_parameter(n.removeprefix("unet.").replace(
        "processor.to_k_ip.0", "to_k"))) for n, p in trained.items())  # trained off its initial value
    _pipeline_predicts_as(backbone, tmp_path / "parts" / "unet", run, WEIGHT_NAMES[0])
    export = cli.export(compose_config("export", [f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
                                                  f"out={tmp_path / 'export'}"], tmp_path))
    for name in WEIGHT_NAMES:  # export.py writes them too, from the checkpoint's EMA backbone
        _pipeline_predicts_as(backbone, tmp_path / "parts" / "unet", export, name)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        prompted = model.sample(1, ["a cat"], steps=2, generator=torch.Generator().manual_seed(0),
                                inputs={"ip_image": image})
        unprompted = model.sample(1, ["a cat"], steps=2, generator=torch.Generator().manual_seed(0),
                                  inputs={"ip_image": torch.zeros(1, 3, 64, 64)})
    assert prompted.shape == unprompted.shape and not torch.allclose(prompted, unprompted, atol=1e-4)
    import PIL.Image

    PIL.Image.fromarray(_images(44, (1, 3, 64, 64))[0]).save(tmp_path / "prompt.png")
    npz = cli.sample(compose_config("sample", [
        f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "num=2", "steps=2", "precision=32", "progress=false",
        f"ip_image={tmp_path / 'prompt.png'}", f"out={tmp_path / 'samples'}"], tmp_path))
    assert np.load(npz)["arr_0"].shape[0] == 2  # sample.py ip_image= reaches the adapter


def _pipeline_predicts_as(backbone, base_unet: Path, directory: Path, weight_name: str) -> None:
    """A pipeline of the base UNet saved in ``base_unet``, our file from ``directory`` loaded, predicts as
    ``backbone``."""
    from diffusers import UNet2DConditionModel

    pipe = _pipeline(UNet2DConditionModel.from_pretrained(base_unet), None)
    pipe.load_ip_adapter(str(directory), subfolder="", weight_name=weight_name, image_encoder_folder=None)
    x, t = _randn(2, 4, 8, 8, seed=33), torch.tensor([0.3, 0.8])
    cond = Conditioning(tokens=_randn(2, 5, WIDTH, seed=34), image_embeds=_randn(2, 1, EMBED, seed=35))
    with torch.no_grad():
        theirs = pipe.unet(x, backbone.timestep(t), encoder_hidden_states=cond.tokens,
                           added_cond_kwargs={"image_embeds": [cond.image_embeds]}).sample
        ours = backbone(x, t, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_an_ip_adapter_trains_from_a_cache_of_the_image_embeddings(tmp_path):
    """cache.py stores each sample's image embeddings (the encoder's of its training image) beside its
    latents and text embeddings, equal to what training computes on the fly; training reads them back.
    The adapter's width comes from the encoder (adapter.image_embed_dim left null)."""
    from hydra.utils import instantiate

    from diffusion import cli
    from diffusion.data.cache import CachedDataset
    from tests.make_captioned_folder import make_captioned_folder
    from tests.tiny_families import finetune_overrides, tiny_family

    parts = tiny_family("sd15", tmp_path / "parts")
    _encoder(seed=32).model.save_pretrained(tmp_path / "image_encoder")
    images = make_captioned_folder(tmp_path / "images", n=4, sizes=[(64, 64)], layout="csv")
    overrides = finetune_overrides(
        "sd15", parts, "trainer.max_steps=2", f"data.module.root={images}", "image_condition=image_prompt",
        f"image_condition.encoder.pretrained={tmp_path / 'image_encoder'}", "image_condition.encoder.subfolder=null",
        "adapter=ip_adapter", f"cache_dir={tmp_path / 'cache'}")
    cfg = compose_config("train", overrides, tmp_path / "cache_run")
    cli.cache(cfg)
    model = cli.build_module(cfg).eval()
    assert model.adapter.image_embed_dim == EMBED
    cached = CachedDataset(tmp_path / "cache" / "train", cli.cache_fingerprint(cfg, model))
    source = instantiate(cfg.data.module).dataset("train")
    with torch.no_grad():
        for i in range(2):
            expected = model.image_condition.encoder(source[i]["image"][None])[0]
            torch.testing.assert_close(cached[i]["image_embeds"].float(), expected, rtol=1e-5, atol=1e-5)
    cli.train(compose_config("train", overrides, tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    with pytest.raises(ValueError, match="add image_condition=image_prompt"):
        cli.build_module(compose_config("train", [o for o in overrides if not o.startswith("image_condition")],
                                        tmp_path / "refused"))
