"""ControlNet (Zhang et al. 2023) for our UNet and the wrapped diffusers UNet: the controlled model is
its base at initialisation; with trained (here: perturbed) weights our DiffusersUNet + DiffusersControlNet
is diffusers' ControlNetModel feeding UNet2DConditionModel (one ControlNet and several, and inside
StableDiffusionControlNetPipeline); the saved ControlNet loads with ControlNetModel.from_pretrained;
only the ControlNet trains; bad controls are refused. Tiny random models stand in for the hub's."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from diffusion.adapters import ControlNet, Frozen, save_controlnets
from diffusion.backbones import DiffusersUNet, build_unet
from diffusion.backbones.diffusers_controlnet import DiffusersControlNet
from diffusion.backbones.unet_controlnet import UNetControlNet
from diffusion.conditioning import Conditioning
from diffusion.controlnet import Controlled, controlnet_for, set_control_scale
from diffusion.schedules import DDPM
from diffusion.training.module import DiffusionModule
from tests.seeded import perturb as _perturb, randn as _randn
from tests.tiny_encoders import TINY_SD_UNET, TINY_VAE_CONFIGS, no_network  # noqa: F401 - no_network: offline

WIDTH = TINY_SD_UNET["cross_attention_dim"]
N = 1000


# --- our UNet ------------------------------------------------------------------------------------------
def _our_unet(seed: int = 0, **kwargs) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet("unet_tiny", in_channels=4, num_classes=10, norm_groups=8, **kwargs)
    _perturb(unet, seed + 100)  # the zeroed output convolutions of a fresh UNet would hide a wrong skip
    return unet.eval()


def _our_inputs(factor: int = 4, k: int = 1):
    x, t = _randn(2, 4, 8, 8, seed=1), torch.tensor([0.3, 0.8])
    control = _randn(2, k, 3, 8 * factor, 8 * factor, seed=2).clamp(-1, 1)
    return x, t, Conditioning(labels=torch.tensor([3, 10]), control=control)


def test_our_unet_controlled_is_its_base_at_initialisation_and_not_after_training_steps():
    base = _our_unet()
    model = ControlNet(pixels_per_latent=4).apply(base)
    x, t, cond = _our_inputs()
    assert isinstance(model, Controlled) and isinstance(model.controlnets[0], UNetControlNet)
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), base(x, t, cond))
    # The copy starts from the base's encoder weights.
    net = model.controlnets[0]
    assert torch.equal(net.down[0].res.in_layers[2].weight, base.down[0].res.in_layers[2].weight)
    assert net.down[0].res.in_layers[2].weight is not base.down[0].res.in_layers[2].weight
    _perturb(net, seed=5)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, cond), base(x, t, cond), atol=1e-4)


def test_our_unet_residuals_land_on_the_skips_and_the_mid_block():
    """UNet.forward(control_residuals=) against the forward written out by hand with the residuals added."""
    base = _our_unet(seed=2, channels_last=False)
    x, t, cond = _our_inputs()
    with torch.no_grad():
        emb = base.time_embed(t) + base.label_embed(cond.labels)
        h = base.conv_in(x)
        skips = [h]
        for layer in base.down:
            h = base._run(layer, h, emb, None, None)
            skips.append(h)
        for layer in base.mid:
            h = base._run(layer, h, emb, None, None)
        residuals = [_randn(*a.shape, seed=10 + i) for i, a in enumerate([*skips, h])]
        assert [r.shape[1] for r in residuals] == base.skip_channels()
        skips = [s + r for s, r in zip(skips, residuals)]
        h = h + residuals[-1]
        for layer in base.up:
            if type(layer).__name__ == "Stage":
                h = torch.cat([h, skips.pop()], dim=1)
            h = base._run(layer, h, emb, None, None)
        expected = base.out(h)
        torch.testing.assert_close(base(x, t, cond.replace(control=None), control_residuals=residuals), expected)


def test_our_unet_controlnet_trains_alone_and_checkpoints_hold_it_alone():
    base = _our_unet(seed=3, gradient_checkpointing=True)
    module = DiffusionModule(base, DDPM("linear", "eps"), adapter=ControlNet(pixels_per_latent=4), ema_decay=0.5)
    backbone = module.backbone
    x, t, cond = _our_inputs()
    loss = module.objective(partial(module.model(backbone), cond=cond), x, t=t).loss
    loss.backward()
    net = backbone.controlnets[0]
    assert all(p.grad is None for p in backbone.base.parameters())
    assert net.mid_zero_conv.weight.grad.abs().sum() > 0 and all(c.weight.grad.abs().sum() > 0 for c in net.zero_convs)
    # The zero convolutions pass no gradient back at first (their weights are zero): one step moves them,
    # and the next gradient reaches the copy's inside, down to the conditioning embedding.
    assert not net.cond_embed.out.weight.grad.any()
    optimizer = module.configure_optimizers()["optimizer"]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in net.parameters()}
    optimizer.step()
    optimizer.zero_grad()
    module.objective(partial(module.model(backbone), cond=cond), x, t=t).loss.backward()
    assert net.cond_embed.out.weight.grad.abs().sum() > 0 and net.down[0].res.in_layers[2].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.base.parameters())
    optimizer.step()
    module.ema.update(backbone)
    with torch.no_grad():
        assert not torch.allclose(backbone(x, t, cond), backbone.base(x, t, cond), atol=1e-6)
    state = module.state_dict()
    assert set(state) == ({f"{o}.controlnets.0.{n}" for o in ("backbone", "ema.module") for n in net.state_dict()}
                          | {"ema.num_updates"})
    # Resume: a module built the same way (the base from the same seed) takes the state back.
    again = DiffusionModule(_our_unet(seed=3, gradient_checkpointing=True), DDPM("linear", "eps"),
                            adapter=ControlNet(pixels_per_latent=4), ema_decay=0.5)
    assert again.base_weights_sha256 == module.base_weights_sha256
    checkpoint = {"state_dict": state, "adapter": {"name": "controlnet", "base_dtype": "float32",
                                                   "base_weights_sha256": module.base_weights_sha256}}
    again.check_checkpoint(checkpoint, "test")
    again.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(again.ema.module(x, t, cond), module.ema.module(x, t, cond), rtol=0, atol=0)
    other = DiffusionModule(_our_unet(seed=4), DDPM("linear", "eps"), adapter=ControlNet(pixels_per_latent=4))
    with pytest.raises(ValueError, match="other base weights"):
        other.check_checkpoint(checkpoint, "test")


def test_our_controlnet_in_latent_space_and_saved_weights_reload(tmp_path):
    base = _our_unet(seed=6)
    model = ControlNet(input_space="latents", conditioning_channels=4).apply(base)
    x, t, cond = _our_inputs(factor=1)
    cond = cond.replace(control=_randn(2, 1, 4, 8, 8, seed=3))
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), base(x, t, cond))
        _perturb(model.controlnets[0], seed=7)
        ours = model(x, t, cond)
    (file,) = save_controlnets(model, tmp_path)
    assert file.name == "controlnet.safetensors"
    again = ControlNet(input_space="latents", conditioning_channels=4, pretrained=str(file)).apply(_our_unet(seed=6))
    with torch.no_grad():
        assert torch.equal(again(x, t, cond), ours)
    with pytest.raises(ValueError, match="another ControlNet"):
        ControlNet(pretrained=str(file)).apply(_our_unet(seed=6))


# --- the wrapped diffusers UNet -------------------------------------------------------------------------
def _diffusers_unet(seed: int = 0, **kwargs) -> DiffusersUNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = DiffusersUNet(config=TINY_SD_UNET, in_channels=4, token_dim=WIDTH, **kwargs)
    _perturb(unet, seed + 100)
    return unet.eval()


def _sd_inputs(k: int = 1, seed: int = 1):
    """Latents 8x8, the control 64x64 pixels in [-1, 1]; t on DDPM steps (N t - 1 = 299, 799)."""
    x, t = _randn(2, 4, 8, 8, seed=seed), torch.tensor([300 / N, 800 / N])
    control = _randn(2, k, 3, 64, 64, seed=seed + 1).clamp(-1, 1)
    return x, t, Conditioning(tokens=_randn(2, 5, WIDTH, seed=seed + 2), control=control)


def test_diffusers_unet_controlled_is_its_base_at_initialisation():
    base = _diffusers_unet()
    model = ControlNet().apply(base)
    assert isinstance(model.controlnets[0], DiffusersControlNet)
    x, t, cond = _sd_inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), base(x, t, cond))


def _diffusers_reference(unet, controlnets, x, steps, tokens, images, scales):
    """diffusers itself: ControlNetModel (MultiControlNetModel for several), then the UNet with the residuals."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    if len(controlnets) == 1:
        down, mid = controlnets[0](x, steps, encoder_hidden_states=tokens, controlnet_cond=images[0],
                                   conditioning_scale=scales[0], return_dict=False)
    else:
        down, mid = MultiControlNetModel(controlnets)(x, steps, encoder_hidden_states=tokens, controlnet_cond=images,
                                                      conditioning_scale=scales, return_dict=False)
    return unet(x, steps, encoder_hidden_states=tokens, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)[0]


@pytest.mark.parametrize("scales", [[0.7], [0.5, -1.3]], ids=["one", "two"])
def test_diffusers_controlnets_equal_diffusers_given_the_same_weights(scales):
    base = _diffusers_unet(seed=1)
    k = len(scales)
    model = ControlNet(num_controls=k, control_scale=scales).apply(base)
    for i, net in enumerate(model.controlnets):
        _perturb(net, seed=20 + i)
    x, t, cond = _sd_inputs(k=k)
    steps = torch.tensor([299.0, 799.0])
    assert torch.equal(base.timestep(t), steps)
    images = [(cond.control[:, i] + 1) / 2 for i in range(k)]  # diffusers' pipelines feed [0, 1]
    with torch.no_grad():
        ours = model(x, t, cond)
        theirs = _diffusers_reference(base.unet, [n.controlnet for n in model.controlnets], x, steps, cond.tokens,
                                      images, scales)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(ours, base(x, t, cond), atol=1e-4)  # the ControlNets act
        # control_scale set again (at sampling) is diffusers' controlnet_conditioning_scale.
        new = [0.25] * k
        assert set_control_scale(model, 0.25) == 1 and model.control_scale == new
        theirs = _diffusers_reference(base.unet, [n.controlnet for n in model.controlnets], x, steps, cond.tokens,
                                      images, new)
        torch.testing.assert_close(model(x, t, cond), theirs, rtol=1e-6, atol=1e-6)


def test_saved_controlnet_loads_with_from_pretrained_and_as_adapter_pretrained(tmp_path):
    from diffusers import ControlNetModel

    base = _diffusers_unet(seed=2)
    module = DiffusionModule(base, DDPM("scaled_linear", "eps"), adapter=ControlNet(), ema_decay=0.5)
    _perturb(module.ema.module.controlnets[0], seed=30)
    x, t, cond = _sd_inputs()
    with torch.no_grad():
        ours = module.ema.module(x, t, cond)
    (directory,) = module.adapter.write_outputs(module, tmp_path)
    assert directory == tmp_path / "controlnet" and (directory / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ControlNetModel.from_pretrained(directory).eval()
    with torch.no_grad():
        theirs = _diffusers_reference(base.unet, [loaded], x, torch.tensor([299.0, 799.0]), cond.tokens,
                                      [(cond.control[:, 0] + 1) / 2], [1.0])
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        # A pipeline repository's layout (controlnet/ in it) and the ControlNet's own directory both load.
        for pretrained, subfolder in ((str(tmp_path), "controlnet"), (str(directory), "controlnet")):
            again = ControlNet(pretrained=pretrained, subfolder=subfolder).apply(_diffusers_unet(seed=2))
            torch.testing.assert_close(again(x, t, cond), ours, rtol=0, atol=0)


def test_a_stable_diffusion_controlnet_pipeline_denoiser_call_is_ours(tmp_path):
    """One step of StableDiffusionControlNetPipeline: what its UNet returns for the inputs it was given
    (latents, timestep, the control image preprocessed by the pipeline) is our Controlled output."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    base = _diffusers_unet(seed=3)
    model = ControlNet(control_scale=0.6).apply(base)
    _perturb(model.controlnets[0], seed=40)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE_CONFIGS["sd"])
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=base.unet, controlnet=model.controlnets[0].controlnet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pixels = (_randn(64, 64, 3, seed=5).sigmoid() * 255).round().to(torch.uint8).numpy()
    calls = []
    pipe.unet.register_forward_hook(lambda m, args, kwargs, out: calls.append((args, kwargs, out)), with_kwargs=True)
    tokens = _randn(1, 5, WIDTH, seed=6)
    with torch.no_grad():
        pipe(prompt_embeds=tokens, image=Image.fromarray(pixels), num_inference_steps=1, guidance_scale=1.0,
             controlnet_conditioning_scale=0.6, latents=_randn(1, 4, 8, 8, seed=7), output_type="latent")
        (args, kwargs, out), = calls
        latents, step = args[0], args[1]
        control = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1  # our batches' [-1, 1]
        t = (step.reshape(1).float() + 1) / N
        ours = model(latents, t, Conditioning(tokens=tokens, control=control[:, None]))
    torch.testing.assert_close(ours, out[0], rtol=1e-5, atol=1e-5)


def test_the_base_dtype_may_be_bfloat16_with_a_float32_controlnet():
    model = ControlNet(base_dtype="bfloat16").apply(_diffusers_unet(seed=4))
    assert model.base.unet.dtype == torch.bfloat16 and model.controlnets[0].controlnet.dtype == torch.float32
    x, t, cond = _sd_inputs()
    with torch.no_grad():
        assert model(x, t, cond).dtype == torch.float32


# --- refusals ---------------------------------------------------------------------------------------------
def test_bad_controls_are_refused_with_what_to_give():
    model = ControlNet(pixels_per_latent=4).apply(_our_unet())
    x, t, cond = _our_inputs()
    with pytest.raises(ValueError, match="cond.control is None"):
        model(x, t, cond.replace(control=None))
    with pytest.raises(ValueError, match="holds 2 controls.*1 ControlNet"):
        model(x, t, cond.replace(control=cond.control.repeat(1, 2, 1, 1, 1)))
    with pytest.raises(ValueError, match=r"control of shape \(2, 3, 32, 32\).*pixels_per_latent"):
        model(x, t, cond.replace(control=cond.control[..., :16, :16]))
    with pytest.raises(ValueError, match=r"3 values for 1 ControlNets"):
        model.control_scale = [1.0, 2.0, 3.0]
    diffusers_model = ControlNet().apply(_diffusers_unet())
    x, t, cond = _sd_inputs()
    with pytest.raises(ValueError, match=r"control of shape \(2, 3, 64, 64\)"):
        diffusers_model(x, t, cond.replace(control=cond.control[..., :32, :32]))
    with pytest.raises(ValueError, match="ControlNetModel reads pixels"):
        ControlNet(input_space="latents").apply(_diffusers_unet())
    with pytest.raises(ValueError, match="token_mask"):
        ControlNet().apply(_diffusers_unet(token_mask=True))
    with pytest.raises(ValueError, match="lists 1 ControlNets for num_controls=2"):
        ControlNet(num_controls=2, pretrained=["a"])
    with pytest.raises(ValueError, match="power of 2"):
        ControlNet(pixels_per_latent=3).apply(_our_unet())
    unet = _our_unet()
    with pytest.raises(ValueError, match="different spaces"):
        Controlled(unet, [UNetControlNet(unet), UNetControlNet(unet, 4, input_space="latents")])
    with pytest.raises(ValueError, match="no ControlNet for backbone"):
        controlnet_for(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="holds no ControlNet"):
        set_control_scale(torch.nn.Linear(2, 2), 1.0)


def test_sampling_takes_the_control_as_an_input_and_control_scale_set_on_the_module():
    """DiffusionModule.sample(inputs={"conditioning_image": ...}) reaches the ControlNet through
    image_condition=control (in both branches of guidance); set_control_scale(module, 0) gives the base's
    samples exactly."""
    from diffusion.conditioning.image_inputs import Control

    def build(adapter, image_condition=None):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(8)
            unet = build_unet("unet_tiny", in_channels=4, norm_groups=8)
        _perturb(unet, 108)
        return DiffusionModule(unet, DDPM("linear", "eps"), adapter=adapter, image_shape=(4, 8, 8),
                               image_condition=image_condition).eval()

    controlled, frozen = build(ControlNet(pixels_per_latent=4), Control()), build(Frozen())
    _perturb(controlled.ema.module.controlnets[0], seed=9)
    control = _randn(2, 1, 3, 32, 32, seed=4)

    def sample(module, **kwargs):
        return module.sample(2, steps=3, sampler="ddim", decode=False, generator=torch.Generator().manual_seed(0),
                             **kwargs)

    with torch.no_grad():
        with pytest.raises(ValueError, match=r"needs batch keys \['conditioning_image'\]"):
            sample(controlled)
        acted = sample(controlled, inputs={"conditioning_image": control})
        assert set_control_scale(controlled, 0.0) == 2  # the backbone and its EMA copy
        unscaled = sample(controlled, inputs={"conditioning_image": control})
        base = sample(frozen)
    assert torch.equal(unscaled, base) and not torch.allclose(acted, base, atol=1e-4)


def test_an_sdxl_controlnet_gets_the_added_conditions_as_diffusers_passes_them():
    """SDXL's text_embeds and time ids go to the ControlNet as to the UNet (ControlNetModel.from_unet copies
    its added time embedding)."""
    from tests.test_sdxl import POOLED, TINY_SDXL_UNET
    from tests.test_sdxl import WIDTH as SDXL_WIDTH

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        base = DiffusersUNet(config=TINY_SDXL_UNET, in_channels=4, token_dim=SDXL_WIDTH, pooled_dim=POOLED).eval()
    _perturb(base, 105)
    model = ControlNet(control_scale=0.8).apply(base)
    x, t, _ = _sd_inputs()
    cond = Conditioning(tokens=_randn(2, 5, SDXL_WIDTH, seed=11), pooled=_randn(2, POOLED, seed=12),
                        time_ids=torch.tensor([[64, 64, 0, 0, 64, 64], [80, 72, 4, 2, 64, 64]]),
                        control=_randn(2, 1, 3, 64, 64, seed=13).clamp(-1, 1))
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), base(x, t, cond))
        _perturb(model.controlnets[0], seed=14)
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids.float()}
        steps = torch.tensor([299.0, 799.0])
        down, mid = model.controlnets[0].controlnet(x, steps, encoder_hidden_states=cond.tokens,
                                                    controlnet_cond=(cond.control[:, 0] + 1) / 2,
                                                    conditioning_scale=0.8, added_cond_kwargs=added, return_dict=False)
        theirs = base.unet(x, steps, encoder_hidden_states=cond.tokens, added_cond_kwargs=added,
                           down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        torch.testing.assert_close(model(x, t, cond), theirs, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(theirs, base(x, t, cond), atol=1e-4)


def test_adapter_controlnet_composes_from_its_config(tmp_path):
    from hydra.utils import instantiate

    from tests.tiny_encoders import group_config

    adapter = instantiate(group_config("adapter", "controlnet", tmp_path), _convert_="all")
    assert isinstance(adapter, ControlNet) and not adapter.trains_base and adapter.name == "controlnet"
    assert adapter.num_controls == 1 and adapter.input_space is None and adapter.pixels_per_latent is None
