"""ControlNets for the wrapped SD3 and FLUX transformers (diffusers' SD3ControlNetModel /
FluxControlNetModel): the controlled model is its base at initialisation; with trained (here:
perturbed) weights it equals diffusers' ControlNet feeding the transformer its block samples (one
ControlNet and two, and one denoiser call inside StableDiffusion3ControlNetPipeline /
FluxControlNetPipeline); the saved ControlNet loads with from_pretrained and as adapter.pretrained;
only the ControlNet trains. Tiny random transformers stand in for the hub's."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from diffusion.adapters import ControlNet
from diffusion.backbones import FluxTransformer, SD3Transformer
from diffusion.backbones.diffusers_mmdit import image_ids, pack, unpack
from diffusion.backbones.diffusers_mmdit_controlnet import MMDiTControlNet
from diffusion.conditioning import Conditioning
from diffusion.controlnet import controlnet_for
from diffusion.schedules import FlowMatching
from diffusion.training.module import DiffusionModule
from tests.seeded import perturb as _perturb, randn as _randn
from tests.tiny_encoders import TINY_VAE_CONFIGS, no_network  # noqa: F401 - no_network: offline
from tests.tiny_mmdit import POOLED, TINY_FLUX, TINY_SD3, WIDTH

KINDS = ("sd3", "flux")
# Bases deeper than the ControlNets, so that spreading their samples over the blocks is exercised:
# SD3 3 joint blocks (the last one's residual is dropped by diffusers: context_pre_only), FLUX 3
# double-stream and 2 single-stream blocks.
BASES = {"sd3": {**TINY_SD3, "num_layers": 3}, "flux": {**TINY_FLUX, "num_layers": 3, "num_single_layers": 2}}


def _base(kind: str, seed: int = 0, **kwargs):
    cls, extra = (SD3Transformer, {}) if kind == "sd3" else (FluxTransformer, {"guidance": 3.5})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = cls(config=BASES[kind], in_channels=16, token_dim=WIDTH, pooled_dim=POOLED, **extra, **kwargs)
    _perturb(base, seed + 100, scale=0.1)  # the zeroed output layers of a fresh transformer would hide all
    return base.eval()


def _inputs(k: int = 1, seed: int = 1):
    x, t = _randn(2, 16, 8, 8, seed=seed), torch.tensor([0.3, 0.8])
    cond = Conditioning(tokens=_randn(2, 5, WIDTH, seed=seed + 1), pooled=_randn(2, POOLED, seed=seed + 2),
                        control=_randn(2, k, 16, 8, 8, seed=seed + 3))
    return x, t, cond


def _reference(kind, base, nets, x, t, cond, scales):
    """diffusers itself: the ControlNet (the Multi model for several), then the transformer given its block
    samples, called as StableDiffusion3ControlNetPipeline / FluxControlNetPipeline call them."""
    from diffusers.models.controlnets.controlnet_flux import FluxMultiControlNetModel
    from diffusers.models.controlnets.controlnet_sd3 import SD3MultiControlNetModel

    transformer = base.transformer
    controls = [cond.control[:, i] for i in range(len(nets))]
    if kind == "sd3":
        steps = t * 1000
        net = nets[0] if len(nets) == 1 else SD3MultiControlNetModel(nets)
        samples = net(hidden_states=x, controlnet_cond=controls[0] if len(nets) == 1 else controls,
                      conditioning_scale=scales[0] if len(nets) == 1 else scales, encoder_hidden_states=cond.tokens,
                      pooled_projections=cond.pooled, timestep=steps, return_dict=False)[0]
        return transformer(hidden_states=x, timestep=steps, encoder_hidden_states=cond.tokens,
                           pooled_projections=cond.pooled, block_controlnet_hidden_states=samples,
                           return_dict=False)[0]
    ids, txt_ids, guidance = image_ids(8, 8), torch.zeros(cond.tokens.shape[1], 3), torch.full((2,), 3.5)
    common = dict(hidden_states=pack(x), timestep=t, encoder_hidden_states=cond.tokens, pooled_projections=cond.pooled,
                  img_ids=ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)
    if len(nets) == 1:
        double, single = nets[0](controlnet_cond=pack(controls[0]), conditioning_scale=scales[0], **common)
    else:
        modes = [torch.zeros(2)] * len(nets)  # read only by union ControlNets
        double, single = FluxMultiControlNetModel(nets)(controlnet_cond=[pack(c) for c in controls],
                                                        controlnet_mode=modes, conditioning_scale=scales, **common)
    out = transformer(controlnet_block_samples=double, controlnet_single_block_samples=single, **common)[0]
    return unpack(out, 8, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_the_controlled_transformer_is_its_base_at_initialisation(kind):
    base = _base(kind)
    model = ControlNet().apply(base)
    net = model.controlnets[0]
    assert isinstance(net, MMDiTControlNet) and net.input_space == "latents" and model.input_spaces == ["latents"]
    # diffusers' defaults, at most the base's blocks: SD3 12 -> 2 (before the last, context_pre_only, one);
    # FLUX 4 -> 3 double, 10 -> 2 single.
    c = net.controlnet.config
    assert (c.num_layers == 2) if kind == "sd3" else (c.num_layers, c.num_single_layers) == (3, 2)
    assert net.num_residuals == (2 if kind == "sd3" else 5)
    x, t, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), base(x, t, cond))
        _perturb(net, seed=5)
        assert not torch.allclose(model(x, t, cond), base(x, t, cond), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scales", [[0.7], [0.5, -1.3]], ids=["one", "two"])
def test_trained_controlnets_equal_diffusers_given_the_same_weights(kind, scales):
    base = _base(kind, seed=1)
    k = len(scales)
    model = ControlNet(num_controls=k, num_blocks=2, control_scale=scales).apply(base)
    for i, net in enumerate(model.controlnets):
        assert net.controlnet.config.num_layers == 2
        _perturb(net, seed=20 + i)
    x, t, cond = _inputs(k=k)
    with torch.no_grad():
        ours = model(x, t, cond)
        theirs = _reference(kind, base, [n.controlnet for n in model.controlnets], x, t, cond, scales)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours, base(x, t, cond), atol=1e-4)  # the ControlNets act


@pytest.mark.parametrize("kind", KINDS)
def test_saved_controlnet_loads_with_from_pretrained_and_as_adapter_pretrained(kind, tmp_path):
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    base = _base(kind, seed=2)
    module = DiffusionModule(base, FlowMatching(), adapter=ControlNet(num_blocks=2), ema_decay=0.5)
    _perturb(module.ema.module.controlnets[0], seed=30)
    x, t, cond = _inputs()
    with torch.no_grad():
        ours = module.ema.module(x, t, cond)
    (directory,) = module.adapter.write_outputs(module, tmp_path)
    assert directory == tmp_path / "controlnet" and (directory / "diffusion_pytorch_model.safetensors").is_file()
    loaded = (SD3ControlNetModel if kind == "sd3" else FluxControlNetModel).from_pretrained(directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(_reference(kind, base, [loaded], x, t, cond, [1.0]), ours, rtol=1e-5, atol=1e-5)
        for pretrained in (str(tmp_path), str(directory)):  # a pipeline's layout (controlnet/ in it), its own
            again = ControlNet(pretrained=pretrained).apply(_base(kind, seed=2))
            torch.testing.assert_close(again(x, t, cond), ours, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_controlnet_trains(kind):
    module = DiffusionModule(_base(kind, seed=3), FlowMatching(), adapter=ControlNet(num_blocks=1))
    backbone = module.backbone
    net = backbone.controlnets[0].controlnet
    x, t, cond = _inputs()
    module.objective(partial(module.model(backbone), cond=cond), x, t=t).loss.backward()
    assert all(p.grad is None for p in backbone.base.parameters())
    assert all(b.weight.grad.abs().sum() > 0 for b in net.controlnet_blocks)  # the zero-initialised outputs
    held = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert held == {id(p) for p in backbone.controlnets[0].parameters()}


def _record(module: torch.nn.Module, calls: dict, key: str, what) -> None:
    """Keep what(kwargs, output) of the module's first call (the hook returns None: the output stays)."""
    def hook(_, args, kwargs, out):
        calls.setdefault(key, what(kwargs, out))

    module.register_forward_hook(hook, with_kwargs=True)


def test_a_stable_diffusion_3_controlnet_pipeline_denoiser_call_is_ours():
    """One step of StableDiffusion3ControlNetPipeline from prompt embeddings: what its transformer returns
    for the inputs it was given (latents, timestep, the control latents the pipeline made with the VAE)
    is our Controlled output; our fresh ControlNet's config has the pipeline pass the pooled vector."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3ControlNetPipeline

    base = _base("sd3", seed=4)
    model = ControlNet(control_scale=0.6, num_blocks=2).apply(base)
    net = model.controlnets[0].controlnet
    assert not net.config.force_zeros_for_pooled_projection
    _perturb(net, seed=40)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE_CONFIGS["flux"])
    pipe = StableDiffusion3ControlNetPipeline(
        transformer=base.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    calls = {}
    _record(net, calls, "control", lambda kw, out: kw["controlnet_cond"])
    _record(base.transformer, calls, "base", lambda kw, out: (kw, out))
    tokens, pooled = _randn(1, 5, WIDTH, seed=6), _randn(1, POOLED, seed=7)
    with torch.no_grad():
        pipe(prompt_embeds=tokens, pooled_prompt_embeds=pooled, control_image=_randn(1, 3, 64, 64, seed=8).clamp(-1, 1),
             controlnet_conditioning_scale=0.6, num_inference_steps=1, guidance_scale=1.0, height=64, width=64,
             latents=_randn(1, 16, 8, 8, seed=9), output_type="latent")
        kwargs, out = calls["base"]
        t = kwargs["timestep"].float() / 1000
        cond = Conditioning(tokens=tokens, pooled=pooled, control=calls["control"][:, None])
        ours = model(kwargs["hidden_states"], t, cond)
        assert not torch.allclose(ours, base(kwargs["hidden_states"], t, cond), atol=1e-4)  # the ControlNet acts
    torch.testing.assert_close(ours, out[0], rtol=1e-5, atol=1e-5)


def test_a_flux_controlnet_pipeline_denoiser_call_is_ours():
    """One step of FluxControlNetPipeline (packed latents and control latents, its position ids and
    guidance): the transformer's output is our Controlled output, unpacked."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline

    base = _base("flux", seed=5)
    model = ControlNet(control_scale=0.6, num_blocks=2).apply(base)
    net = model.controlnets[0].controlnet
    _perturb(net, seed=50)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE_CONFIGS["flux"])
    pipe = FluxControlNetPipeline(transformer=base.transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                  text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                  controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    calls = {}
    _record(net, calls, "control", lambda kw, out: kw["controlnet_cond"])
    _record(base.transformer, calls, "base", lambda kw, out: (kw, out))
    tokens, pooled = _randn(1, 5, WIDTH, seed=6), _randn(1, POOLED, seed=7)
    with torch.no_grad():
        pipe(prompt_embeds=tokens, pooled_prompt_embeds=pooled, control_image=_randn(1, 3, 64, 64, seed=8).clamp(-1, 1),
             controlnet_conditioning_scale=0.6, num_inference_steps=1, guidance_scale=3.5, height=64, width=64,
             latents=pack(_randn(1, 16, 8, 8, seed=9)), output_type="latent")
        kwargs, out = calls["base"]
        x, control = unpack(kwargs["hidden_states"], 8, 8), unpack(calls["control"], 8, 8)
        cond = Conditioning(tokens=tokens, pooled=pooled, control=control[:, None])
        ours = model(x, kwargs["timestep"].float(), cond)
        assert not torch.allclose(ours, base(x, kwargs["timestep"].float(), cond), atol=1e-4)
    torch.testing.assert_close(ours, unpack(out[0], 8, 8), rtol=1e-5, atol=1e-5)


def test_bad_options_are_refused_with_what_to_give():
    base = _base("sd3")
    with pytest.raises(ValueError, match="read the conditioning image's latents"):
        ControlNet(input_space="pixels").apply(base)
    with pytest.raises(ValueError, match="num_single_layers is FLUX's"):
        MMDiTControlNet(base, num_single_layers=1)
    with pytest.raises(ValueError, match="num_layers=3, but the base has 2 joint blocks before the last"):
        ControlNet(num_blocks=3).apply(base)
    with pytest.raises(ValueError, match="reads latents of 16 channels"):
        controlnet_for(base, conditioning_channels=4)
    model = ControlNet().apply(base)
    x, t, cond = _inputs()
    with pytest.raises(ValueError, match=r"control of shape \(2, 16, 8, 8\)"):
        model(x, t, cond.replace(control=cond.control[..., :4, :4]))


def test_a_controlnet_of_another_transformer_is_refused(tmp_path):
    other = SD3Transformer(config={**BASES["sd3"], "num_attention_heads": 4}, in_channels=16, token_dim=WIDTH,
                           pooled_dim=POOLED)
    MMDiTControlNet(other).save_pretrained(tmp_path / "controlnet")
    with pytest.raises(ValueError, match="another transformer.*num_attention_heads 4 here, 2 in the transformer"):
        ControlNet(pretrained=str(tmp_path / "controlnet")).apply(_base("sd3"))
    with pytest.raises(ValueError, match="a pretrained one.*leave them null"):
        MMDiTControlNet(_base("sd3"), pretrained=str(tmp_path / "controlnet"), num_layers=2)


def test_an_instantx_style_sd3_controlnet_gets_what_its_pipeline_feeds_it(tmp_path):
    """A released InstantX SD3 ControlNet (force_zeros_for_pooled_projection, diffusers' default) was trained
    on unshifted latents z * scale and a zero pooled vector, as StableDiffusion3ControlNetPipeline feeds it:
    ours, given our shifted latents (z - shift) * scale and latent_shift = shift * scale, equals that."""
    from diffusers import SD3ControlNetModel

    base = _base("sd3", seed=6)
    released = SD3ControlNetModel.from_transformer(base.transformer, num_layers=2, num_extra_conditioning_channels=0)
    assert released.config.force_zeros_for_pooled_projection
    _perturb(released, seed=60)
    released.save_pretrained(tmp_path / "controlnet")
    with pytest.raises(ValueError, match="unshifted latents.*latent_shift"):
        ControlNet(pretrained=str(tmp_path)).apply(base)
    shift, scale = 0.0609, 1.5305  # SD3's VAE
    model = ControlNet(pretrained=str(tmp_path), latent_shift=shift * scale, control_scale=0.9).apply(base)
    x, t, cond = _inputs()
    unshifted = cond.control[:, 0] + shift * scale
    with torch.no_grad():
        samples = released(hidden_states=x, controlnet_cond=unshifted, conditioning_scale=0.9, timestep=t * 1000,
                           encoder_hidden_states=cond.tokens, pooled_projections=torch.zeros_like(cond.pooled),
                           return_dict=False)[0]
        theirs = base.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.tokens,
                                  pooled_projections=cond.pooled, block_controlnet_hidden_states=samples,
                                  return_dict=False)[0]
        torch.testing.assert_close(model(x, t, cond), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_controlnet_trains_from_the_command_line_and_is_written_in_diffusers_layout(kind, tmp_path):
    """experiment=finetune_sd3 / finetune_flux adapter=controlnet from a tiny pipeline directory, on a
    captioned folder with Canny conditioning images: the control is the conditioning image's latents,
    only the ControlNet moves, the end of training writes controlnet/ that diffusers' class reads, and
    the model samples with a control."""
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    from diffusion import cli
    from diffusion.controlnet import Controlled
    from tests.conftest import FAST, compose_config
    from tests.make_captioned_folder import make_captioned_folder
    from tests.tiny_mmdit import overrides, save_pipeline_parts

    root = tmp_path / "model"
    theirs = save_pipeline_parts(root, kind).state_dict()
    images = make_captioned_folder(tmp_path / "images", n=4, sizes=[(64, 64)], layout="csv")
    fast = [o for o in FAST if not o.startswith(("backbone", "data.module.batch_size"))]
    cfg = compose_config("train", [
        *fast, f"experiment=finetune_{kind}", *overrides(root, kind), "adapter=controlnet", "adapter.num_blocks=1",
        f"data.module.root={images}", "data.module.resolution=64", "data.module.batch_size=2",
        "data.module.num_workers=0", "data.module.annotator=canny", "trainer.max_steps=2",
        "model.optim.optimizer.lr=1e-3"], tmp_path / "run")
    metrics = cli.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    model = cli.load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert isinstance(model.backbone, Controlled) and model.image_condition.space == "latents"
    written = list((tmp_path / "run").rglob("controlnet/config.json"))
    assert len(written) == 1
    loaded = (SD3ControlNetModel if kind == "sd3" else FluxControlNetModel).from_pretrained(written[0].parent)
    saved = loaded.state_dict()
    ema = model.ema.module.controlnets[0].controlnet.state_dict()
    assert saved.keys() == ema.keys() and all(torch.equal(saved[k], ema[k]) for k in saved)
    trained = model.backbone.controlnets[0].controlnet
    assert any(b.weight.abs().sum() > 0 for b in trained.controlnet_blocks)  # the zero outputs moved
    base = model.backbone.base.transformer.state_dict()
    assert base.keys() == theirs.keys() and all(torch.equal(base[k], theirs[k]) for k in theirs)  # fixed
    control = torch.rand(2, 1, 3, 64, 64) * 2 - 1
    samples = model.sample(2, ["a red circle", "a blue square"], steps=2, inputs={"conditioning_image": control})
    assert samples.shape == (2, 3, 64, 64) and torch.isfinite(samples).all()


@pytest.mark.parametrize("kind", KINDS)
def test_the_base_may_be_bfloat16_beside_a_float32_controlnet(kind):
    model = ControlNet(base_dtype="bfloat16", num_blocks=1).apply(_base(kind, seed=7))
    assert model.base.transformer.dtype == torch.bfloat16 and model.controlnets[0].controlnet.dtype == torch.float32
    x, t, cond = _inputs()
    with torch.no_grad():
        out = model(x, t, cond)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
