"""IP-Adapter on the wrapped FLUX transformer (diffusion.ip_adapter_flux): a new adapter starts as the
base and only it trains; scale 0 is the base; our file, loaded by diffusers' FluxPipeline.load_ip_adapter,
gives diffusers' FluxTransformer2DModel our output, and a FluxPipeline run our Euler latents, for the
same image embeddings; the refusals. Tiny random models; nothing downloaded."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from diffusion.backbones import FluxTransformer
from diffusion.backbones.diffusers_mmdit import image_ids, pack, unpack
from diffusion.conditioning import Conditioning
from diffusion.ip_adapter import WEIGHT_NAMES, IPAdapter, save_ip_adapter, set_ip_scale, without_ip_adapter
from diffusion.ip_adapter_flux import NUM_TOKENS, ip_processors
from diffusion.samplers import ClassifierFreeGuidance, euler, grids
from diffusion.schedules import FlowMatching
from diffusion.timesteps import FluxShift
from tests.seeded import randn as _randn
from tests.tiny_encoders import no_network  # noqa: F401 - autouse: offline
from tests.tiny_mmdit import POOLED, TINY_FLUX, WIDTH, tiny_transformer

EMBED = 24  # the image encoder's embedding width (XLabs': CLIP ViT-L/14's 768)
# Two double-stream blocks, so that the file's block numbering is tested.
FLUX = dict(num_layers=2)


def _ours(theirs) -> FluxTransformer:
    model = FluxTransformer(config=dict(theirs.config), guidance=3.5, in_channels=16, token_dim=WIDTH,
                            pooled_dim=POOLED).eval()
    model.transformer.load_state_dict(theirs.state_dict())
    return model


def _adapted(base: FluxTransformer, seed: int = 1, randomise: bool = True) -> FluxTransformer:
    """A copy of ``base`` with a new IP-Adapter; ``randomise``: its weights moved off their initial
    values (zero key/value maps would hide a wrong layout)."""
    model = copy.deepcopy(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        IPAdapter(image_embed_dim=EMBED).apply(model)
    if randomise:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _inputs(images: int = 2, seed: int = 3):
    x, t = _randn(2, 16, 8, 8, seed=seed), torch.tensor([0.3, 0.8])
    cond = Conditioning(tokens=_randn(2, 5, WIDTH, seed=seed + 1), pooled=_randn(2, POOLED, seed=seed + 2),
                        image_embeds=_randn(2, images, EMBED, seed=seed + 3))
    return x, t, cond


def _text_only(cond: Conditioning) -> Conditioning:
    return Conditioning(tokens=cond.tokens, pooled=cond.pooled)


@pytest.fixture(scope="module")
def base() -> FluxTransformer:
    return _ours(tiny_transformer("flux", seed=4, **FLUX))


def test_a_new_adapter_starts_as_the_base_and_only_it_trains(base):
    model = _adapted(base, randomise=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    blocks = len(model.transformer.transformer_blocks)
    assert len(trained) == 4 + 4 * blocks  # projection (linear, norm); per double block to_k_ip, to_v_ip (w, b)
    assert all(n.startswith("transformer.encoder_hid_proj.") or "_ip." in n for n in trained)
    assert not any(n.startswith("transformer.single_transformer_blocks.") for n in trained)
    for proc in ip_processors(model.transformer):  # x-flux's initialisation: key and value maps from zero
        assert all(not m.weight.abs().sum() and not m.bias.abs().sum() for m in (*proc.to_k_ip, *proc.to_v_ip))
    x, t, cond = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond), base(x, t, _text_only(cond)), rtol=0, atol=1e-6)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # the first step moves to_v_ip alone (everything else multiplies zero maps)
        optimiser.zero_grad()
        model(x, t, cond).square().mean().backward()
        optimiser.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trained


def test_scale_0_is_the_base_and_set_ip_scale_sets_every_double_block(base):
    model = _adapted(base)
    x, t, cond = _inputs()
    with torch.no_grad():
        expected = base(x, t, _text_only(cond))
        assert (model(x, t, cond) - expected).abs().max() > 1e-2
        set_ip_scale(model, 0.0)
        # Up to rounding: diffusers' IP processor feeds to_out a non-contiguous tensor, its plain one a copy.
        torch.testing.assert_close(model(x, t, cond), expected, rtol=0, atol=1e-6)
    set_ip_scale(model, 0.5)
    assert [proc.scale for proc in ip_processors(model.transformer)] == [[0.5]] * len(FLUX) * 2


@pytest.mark.parametrize("weight_name", WEIGHT_NAMES)
def test_our_file_loads_into_a_flux_pipeline_which_gives_our_output(base, weight_name, tmp_path):
    model = _adapted(base)
    assert [p.name for p in save_ip_adapter(model, tmp_path)] == list(WEIGHT_NAMES)
    theirs = tiny_transformer("flux", seed=4, **FLUX)
    pipe = FluxPipeline(transformer=theirs, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, scheduler=FlowMatchEulerDiscreteScheduler(
                            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                            base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(tmp_path), weight_name=weight_name, image_encoder_pretrained_model_name_or_path=None)
    ours_procs, their_procs = ip_processors(model.transformer), ip_processors(theirs)
    for a, b in zip(ours_procs, their_procs, strict=True):  # block i's maps went to block i
        torch.testing.assert_close(b.to_k_ip[0].weight, a.to_k_ip[0].weight, rtol=0, atol=0)
        torch.testing.assert_close(b.to_v_ip[0].bias, a.to_v_ip[0].bias, rtol=0, atol=0)

    x, t, cond = _inputs()
    with torch.no_grad():  # one call, as FluxPipeline makes it
        expected = theirs(hidden_states=pack(x), timestep=t, guidance=torch.full_like(t, 3.5),
                          encoder_hidden_states=cond.tokens, pooled_projections=cond.pooled,
                          img_ids=image_ids(8, 8), txt_ids=torch.zeros(5, 3), return_dict=False,
                          joint_attention_kwargs={"ip_adapter_image_embeds": [cond.image_embeds]})[0]
        torch.testing.assert_close(model(x, t, cond), unpack(expected, 8, 8), rtol=1e-5, atol=1e-5)

    # Two Euler steps of the pipeline (FLUX's dynamic shift). It takes one prompt's embeddings (1, N, D) and
    # repeats them over the batch; the negative ones are given, as it would otherwise encode a black image,
    # and go unused at true_cfg_scale 1.
    noise, steps = _randn(2, 16, 8, 8, seed=9), 2
    prompt = cond.image_embeds[:1]
    cond = Conditioning(tokens=cond.tokens, pooled=cond.pooled, image_embeds=prompt.expand(2, -1, -1))
    with torch.no_grad():
        packed = pipe(prompt_embeds=cond.tokens, pooled_prompt_embeds=cond.pooled, latents=pack(noise),
                      ip_adapter_image_embeds=[prompt], negative_ip_adapter_image_embeds=[torch.zeros_like(prompt)],
                      num_inference_steps=steps, guidance_scale=3.5, output_type="latent", height=64, width=64).images
        ours = euler(ClassifierFreeGuidance(model, cond, None, 1.0), FlowMatching(), noise,
                     grids.shifted(steps, FluxShift()(8, 8)))
    assert (unpack(packed, 8, 8) - noise).abs().mean() > 0.1
    torch.testing.assert_close(ours, unpack(packed, 8, 8), rtol=1e-4, atol=1e-4)


def test_write_outputs_and_the_base_without_the_adapter(base, tmp_path):
    model = _adapted(base)
    written = IPAdapter(image_embed_dim=EMBED).write_outputs(SimpleNamespace(ema=SimpleNamespace(module=model)),
                                                            tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(written[0]))
    assert {k for k in keys if k.startswith("image_proj.")} == {f"image_proj.{m}.{p}" for m in ("proj", "norm")
                                                                for p in ("weight", "bias")}
    assert {k for k in keys if k.startswith("ip_adapter.")} == {f"ip_adapter.{i}.to_{kv}_ip.{p}" for i in range(2)
                                                                for kv in "kv" for p in ("weight", "bias")}
    assert load_file(written[0])["image_proj.proj.weight"].shape == (NUM_TOKENS * WIDTH, EMBED)
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
    with pytest.raises(ValueError, match=r"needs cond.image_embeds.*got \(2, 2, 7\)"):
        model(x, t, Conditioning(tokens=cond.tokens, pooled=cond.pooled, image_embeds=torch.zeros(2, 2, 7)))
    with pytest.raises(ValueError, match="takes no cond.image_embeds"):
        base(x, t, cond)
    with pytest.raises(ValueError, match="has an IP-Adapter already"):
        IPAdapter(image_embed_dim=EMBED).apply(model)
    with pytest.raises(ValueError, match="carries no IP-Adapter"):
        set_ip_scale(base, 0.5)
    with pytest.raises(ValueError, match="carries no IP-Adapter"):
        without_ip_adapter(base)
    with pytest.raises(ValueError, match="only SD3's IP-Adapter has a resampler"):
        IPAdapter(image_embed_dim=EMBED, resampler={"num_queries": 4}).apply(copy.deepcopy(base))
    assert TINY_FLUX["num_layers"] == 1  # FLUX above overrides it to 2


def test_a_flux_ip_adapter_fine_tune_from_the_command_line_writes_what_a_flux_pipeline_loads(tmp_path):
    """experiment=finetune_flux image_condition=image_prompt adapter=ip_adapter on a tiny FLUX pipeline
    directory: two steps train the adapter alone; the run and export.py write ip_adapter.safetensors, which
    a FluxTransformer2DModel of the base loads and then predicts as the EMA backbone."""
    from diffusers import FluxTransformer2DModel

    from diffusion import cli
    from tests.conftest import FAST, compose_config
    from tests.make_captioned_folder import make_captioned_folder
    from tests.test_ip_adapter import _encoder
    from tests.tiny_mmdit import overrides, save_pipeline_parts

    root = tmp_path / "model"
    save_pipeline_parts(root, "flux")
    _encoder(seed=32).model.save_pretrained(tmp_path / "image_encoder")
    images = make_captioned_folder(tmp_path / "images", n=4, sizes=[(64, 64)], layout="csv")
    fast = [o for o in FAST if not o.startswith(("backbone", "data.module.batch_size"))]
    run = tmp_path / "run"
    cli.train(compose_config("train", [
        *fast, "experiment=finetune_flux", *overrides(root, "flux"), f"data.module.root={images}",
        "data.module.resolution=64", "data.module.batch_size=2", "data.module.num_workers=0", "trainer.max_steps=2",
        "model.optim.optimizer.lr=1e-2", "model.ema_decay=0.5", "image_condition=image_prompt",
        f"image_condition.encoder.pretrained={tmp_path / 'image_encoder'}", "image_condition.encoder.subfolder=null",
        "adapter=ip_adapter"], run))
    model = cli.load_module(run / "checkpoints" / "last.ckpt")
    backbone = model.ema.module
    assert isinstance(backbone, FluxTransformer)
    assert any(p.abs().sum() for n, p in backbone.named_parameters() if "to_v_ip" in n)  # trained off zero
    export = cli.export(compose_config("export", [f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
                                                  f"out={tmp_path / 'export'}"], tmp_path))
    from safetensors.torch import load_file

    exported = load_file(next((tmp_path / "export" / "transformer").glob("*.safetensors")))
    assert exported.keys() == FluxTransformer2DModel.from_pretrained(root / "transformer").state_dict().keys()
    x, t, _ = _inputs()
    tokens, pooled = _randn(2, 5, 32, seed=1), _randn(2, 32, seed=2)
    cond = Conditioning(tokens=tokens, pooled=pooled, image_embeds=_randn(2, 1, EMBED, seed=3))
    for directory in (run, export):
        theirs = FluxTransformer2DModel.from_pretrained(root / "transformer")
        pipe = FluxPipeline(transformer=theirs, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        pipe.load_ip_adapter(str(directory), weight_name=WEIGHT_NAMES[0],
                             image_encoder_pretrained_model_name_or_path=None)
        with torch.no_grad():
            expected = theirs(hidden_states=pack(x), timestep=t, guidance=torch.full_like(t, 3.5),
                              encoder_hidden_states=tokens, pooled_projections=pooled, img_ids=image_ids(8, 8),
                              txt_ids=torch.zeros(5, 3), return_dict=False,
                              joint_attention_kwargs={"ip_adapter_image_embeds": [cond.image_embeds]})[0]
            torch.testing.assert_close(backbone(x, t, cond), unpack(expected, 8, 8), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # sampling takes the image prompt (another image: other samples)
        prompted, unprompted = (model.sample(1, ["a cat"], steps=2, generator=torch.Generator().manual_seed(0),
                                             inputs={"ip_image": image}) for image in
                                (torch.rand(1, 3, 64, 64) * 2 - 1, torch.zeros(1, 3, 64, 64)))
    assert torch.isfinite(prompted).all() and (prompted - unprompted).abs().max() > 1e-4
