"""Autoencoders: KLAutoencoder agrees with diffusers' AutoencoderKL for the SD, SDXL and FLUX
architectures (tiny random weights), scale/shift, chunking, freezing, fingerprints, configs, errors."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from diffusion.autoencoders import Autoencoder, IdentityAutoencoder, KLAutoencoder
from tests.tiny_encoders import TINY_VAE_CONFIGS, group_config, no_network, tiny_vae  # noqa: F401 (fixture)

# (latent channels, scaling_factor, shift_factor) of the real VAEs' configs.
FAMILIES = {"sd": (4, 0.18215, 0.0), "sdxl": (4, 0.13025, 0.0), "flux": (16, 0.3611, 0.1159)}


def images(b: int = 3, h: int = 32, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_kl_matches_diffusers_with_scale_and_shift(family):
    channels, scale, shift = FAMILIES[family]
    vae = tiny_vae(family)
    assert (vae.latent_channels, vae.downsample_factor, vae.scale, vae.shift) == (channels, 8, scale, shift)
    x = images()
    z = vae.encode(x)
    assert z.shape == (3, channels, 4, 3)
    with torch.no_grad():
        raw = vae.vae.encode(x).latent_dist.mode()
        raw_decoded = vae.vae.decode(raw).sample
    torch.testing.assert_close(z, (raw - shift) * scale)
    decoded = vae.decode(z)
    assert decoded.shape == x.shape
    torch.testing.assert_close(decoded, raw_decoded, atol=1e-5, rtol=1e-4)


def test_chunked_equals_unchunked():
    x = images(b=5)
    whole, chunked = tiny_vae("flux", chunk_size=8), tiny_vae("flux", chunk_size=2)
    z = whole.encode(x)
    torch.testing.assert_close(chunked.encode(x), z, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked.decode(z), whole.decode(z), atol=1e-6, rtol=1e-5)


def test_posterior_sample_is_seeded_and_differs_from_mode():
    vae = tiny_vae("sd", sample_posterior=True)
    x = images(b=2)
    a = vae.encode(x, generator=torch.Generator().manual_seed(1))
    b = vae.encode(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, tiny_vae("sd").encode(x))


def test_training_draws_each_samples_posterior_noise_from_its_key_not_the_global_rng():
    """A posterior draw is diffusers' mean + std * eps (eps the sample's own, keyed to (seed, batch,
    position)): the same after a resume (another global RNG state) and on two processes splitting the batch."""
    from diffusion.backbones import build_dit
    from diffusion.schedules import DDPM
    from diffusion.training.module import DiffusionModule

    vae = tiny_vae("sd", sample_posterior=True, chunk_size=2)
    x = images(b=4, h=16, w=16)
    eps = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        posterior = vae.vae.encode(x).latent_dist
    torch.testing.assert_close(vae.encode(x, noise=eps), (posterior.mean + posterior.std * eps) * vae.scale)

    module = DiffusionModule(build_dit(name="dit_tiny", in_channels=4), DDPM("linear", "eps"), autoencoder=vae,
                             image_shape=(4, 2, 2))
    key = (0, 7)
    torch.manual_seed(1)
    first = module.latents({"image": x}, key)
    torch.manual_seed(2)  # a resumed run: the global RNG is elsewhere
    assert torch.equal(module.latents({"image": x}, key), first)
    assert not torch.equal(module.latents({"image": x}, (0, 8)), first)  # the next batch draws anew
    halves = []
    for rank in (0, 1):  # two processes, each with half the global batch
        module._trainer = type("T", (), {"global_rank": rank, "world_size": 2})()
        halves.append(module.latents({"image": x[2 * rank:2 * rank + 2]}, key))
    module._trainer = None
    torch.testing.assert_close(torch.cat(halves), first)


@pytest.mark.parametrize("make", [lambda: tiny_vae("sd"), lambda: IdentityAutoencoder()])
def test_frozen_in_eval_without_gradients(make):
    ae = make()
    parent = nn.ModuleDict({"ae": ae, "head": nn.Linear(2, 2)}).train()
    assert not any(m.training for m in ae.modules())
    assert parent["head"].training
    assert not any(p.requires_grad for p in ae.parameters())
    z = ae.encode(images(b=1))
    assert not z.requires_grad and not ae.decode(z).requires_grad


def test_output_dtype_follows_input_when_the_model_is_bfloat16():
    vae = tiny_vae("sd", dtype="bfloat16")
    assert vae.dtype == torch.bfloat16 and vae.fingerprint()["dtype"] == "bfloat16"
    z = vae.encode(images(b=1, h=16, w=16))
    assert z.dtype == torch.float32 and vae.decode(z).dtype == torch.float32


def test_identity_is_pixel_space():
    ae = IdentityAutoencoder(channels=3)
    x = images()
    assert ae.encode(x) is x and ae.decode(x) is x
    assert (ae.latent_channels, ae.downsample_factor, ae.scale, ae.shift) == (3, 1, 1.0, 0.0)
    assert isinstance(ae, Autoencoder) and ae.fingerprint()["source"] == "identity"


def test_fingerprint_is_stable_json_and_tracks_weights_and_scale():
    fp = tiny_vae("sd", seed=0).fingerprint()
    assert json.loads(json.dumps(fp)) == fp and all(isinstance(v, str) for v in fp.values())
    assert set(fp) == {"class", "source", "sha256", "dtype", "scale", "shift", "channels", "factor"}
    assert tiny_vae("sd", seed=0).fingerprint() == fp
    assert tiny_vae("sd", seed=1).fingerprint()["sha256"] != fp["sha256"]
    sdxl = tiny_vae("sdxl", seed=0).fingerprint()  # same architecture and seed, other scale
    assert sdxl["sha256"] == fp["sha256"] and sdxl["scale"] != fp["scale"]
    assert tiny_vae("sd", scaling_factor=0.5).fingerprint()["scale"] == "0.5"


def test_loads_from_a_local_directory_like_a_hub_id(tmp_path):
    made = tiny_vae("flux", seed=3)
    made.vae.save_pretrained(tmp_path / "vae")
    loaded = KLAutoencoder(pretrained=str(tmp_path), subfolder="vae")
    assert (loaded.scale, loaded.shift, loaded.latent_channels) == (0.3611, 0.1159, 16)
    assert loaded.fingerprint()["sha256"] == made.fingerprint()["sha256"]
    assert loaded.fingerprint()["source"] == f"{tmp_path}/vae"
    x = images(b=2)
    torch.testing.assert_close(loaded.encode(x), made.encode(x))


@pytest.mark.parametrize("option", ["none", "sd", "sdxl", "flux"])
def test_every_vae_config_composes_and_instantiates(option, tmp_path):
    node = group_config("vae", option, tmp_path)
    if option == "none":
        ae = instantiate(node)
        assert isinstance(ae, IdentityAutoencoder)
        return
    assert node.pretrained and node._target_ == "diffusion.autoencoders.KLAutoencoder"
    # The real weights are never downloaded in tests: the same config with a tiny architecture
    # (passed on as a DictConfig, as Hydra does).
    tiny = {"pretrained": None, "subfolder": None, "config": TINY_VAE_CONFIGS[option]}
    ae = instantiate(OmegaConf.merge(node, tiny))
    channels, scale, shift = FAMILIES[option]
    assert (ae.latent_channels, ae.scale, ae.shift) == (channels, scale, shift)


def test_bad_input_names_expected_and_received():
    vae = tiny_vae("sd")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got shape \(2, 4, 32, 32\)"):
        vae.encode(torch.zeros(2, 4, 32, 32))
    with pytest.raises(ValueError, match=r"divisible by the downsample factor 8, got H=30, W=32"):
        vae.encode(torch.zeros(2, 3, 30, 32))
    with pytest.raises(RuntimeError, match=r"in \[-1, 1\], got values in \[0, 255\]"):
        vae.encode(torch.linspace(0, 255, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\), got shape \(2, 16, 4, 4\)"):
        vae.decode(torch.zeros(2, 16, 4, 4))
    with pytest.raises(ValueError, match=r"exactly one of `pretrained`.*got pretrained=None and config=None"):
        KLAutoencoder()
    with pytest.raises(ValueError, match=r"got pretrained='x' and config=a dict"):
        KLAutoencoder(pretrained="x", config=TINY_VAE_CONFIGS["sd"])
    with pytest.raises(ValueError, match=r"dtype='half'.*'float32'"):
        KLAutoencoder(config=TINY_VAE_CONFIGS["sd"], dtype="half")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\), got shape \(1, 3, 8, 8\)"):
        IdentityAutoencoder(channels=1).encode(torch.zeros(1, 3, 8, 8))
