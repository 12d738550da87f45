"""Concatenated image conditions (issue 15): backbones with zero-initialised extra input channels,
the inpainting condition's layout, the digits' random masks, and inpainting from the command line
(train, sample.py image= mask=, the refusals)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from diffusion import cli
from diffusion.backbones import build_dit, build_unet
from diffusion.backbones.diffusers_unet import DiffusersUNet
from diffusion.conditioning import Conditioning
from diffusion.conditioning.image_inputs import ImageToImage, Inpaint
from diffusion.data import DigitsDataModule
from diffusion.data.masks import mask_generator, random_mask
from diffusion.samplers import PerSampleNoise
from diffusion.sampling_job import to_uint8
from diffusion.sampling_options import noise_seed
from tests.conftest import FAST, ROOT, compose_config
from tests.seeded import randn as _randn
from tests.tiny_encoders import TINY_SD_UNET, tiny_sd_unet


def _without_extra_channels(with_concat: torch.nn.Module, plain: torch.nn.Module, conv: str) -> None:
    """Load ``with_concat``'s weights into ``plain``, the first convolution cut to x_t's channels."""
    state = with_concat.state_dict()
    state[conv] = state[conv][:, : plain.in_channels]
    plain.load_state_dict(state)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_extra_input_channels_start_at_zero_so_the_backbone_ignores_the_condition(kind):
    """At initialisation the backbone with 3 concatenated channels is the one without them, whatever
    the condition; after a step on the condition its output depends on it."""
    torch.manual_seed(0)
    build, conv = (build_unet, "conv_in.weight") if kind == "unet" else (build_dit, "x_embedder.proj.weight")
    model = build(f"{kind}_tiny", in_channels=2, concat_channels=3, num_classes=4)
    plain = build(f"{kind}_tiny", in_channels=2, num_classes=4)
    for p in model.parameters():  # a trained model: nothing is zero but the new channels
        if p.ndim > 1 and p is not dict(model.named_parameters())[conv]:
            torch.nn.init.normal_(p, std=0.05)
    _without_extra_channels(model, plain, conv)
    x, t, labels = _randn(2, 2, 8, 8, seed=1), torch.tensor([0.3, 0.8]), torch.tensor([1, 2])
    cond = Conditioning(labels=labels, concat=_randn(2, 3, 8, 8, seed=2))
    torch.testing.assert_close(model(x, t, cond), plain(x, t, Conditioning(labels=labels)), rtol=0, atol=0)
    weight = dict(model.named_parameters())[conv]
    assert weight[:, 2:].abs().sum() == 0 and weight[:, :2].abs().sum() > 0
    model(x, t, cond).square().mean().backward()
    assert weight.grad[:, 2:].abs().sum() > 0  # the new channels learn


def test_backbones_refuse_a_missing_or_unexpected_concatenated_condition():
    model = build_unet("unet_tiny", in_channels=2, concat_channels=3)
    x, t = torch.zeros(1, 2, 8, 8), torch.full((1,), 0.5)
    with pytest.raises(ValueError, match="cond.concat is None"):
        model(x, t, Conditioning())
    with pytest.raises(ValueError, match=r"cond.concat must be \(B, 3, 8, 8\)"):
        model(x, t, Conditioning(concat=torch.zeros(1, 2, 8, 8)))
    with pytest.raises(ValueError, match="built without concatenated conditions"):
        build_dit("dit_tiny", in_channels=2)(x, t, Conditioning(concat=torch.zeros(1, 3, 8, 8)))


def test_the_wrapped_sd_unet_gains_zero_input_channels_and_saves_them_as_diffusers_reads_them(tmp_path):
    """A 4-channel SD UNet given inpainting's 5 extra channels (InstructPix2Pix's recipe) equals the
    base UNet at first; saved, diffusers reads a 9-channel UNet that our wrapper takes as it is."""
    base = tiny_sd_unet(seed=0)
    base.save_pretrained(tmp_path / "base")
    ours = DiffusersUNet(pretrained=str(tmp_path / "base"), in_channels=4, token_dim=32, concat_channels=5).eval()
    assert ours.unet.config.in_channels == 9 and ours.in_channels == 4
    x, t, tokens = _randn(2, 4, 8, 8, seed=1), torch.tensor([0.25, 0.75]), _randn(2, 3, 32, seed=2)
    cond = Conditioning(tokens=tokens, concat=_randn(2, 5, 8, 8, seed=3))
    with torch.no_grad():
        expected = base(x, ours.timestep(t), encoder_hidden_states=tokens).sample
        torch.testing.assert_close(ours(x, t, cond), expected, rtol=0, atol=0)
        ours.unet.conv_in.weight[:, 4:].normal_()  # trained: the condition now matters
        ours.unet.save_pretrained(tmp_path / "inpaint")
        again = DiffusersUNet(pretrained=str(tmp_path / "inpaint"), in_channels=4, token_dim=32, concat_channels=5)
        torch.testing.assert_close(again.eval()(x, t, cond), ours(x, t, cond))
    from diffusers import UNet2DConditionModel

    assert UNet2DConditionModel.from_pretrained(tmp_path / "inpaint").config.in_channels == 9
    with pytest.raises(ValueError, match="image_condition=inpaint"):  # a 9-channel UNet without the condition
        DiffusersUNet(pretrained=str(tmp_path / "inpaint"), in_channels=4, token_dim=32)
    with pytest.raises(ValueError, match="neither the latents' 4 nor"):
        DiffusersUNet(config={**TINY_SD_UNET, "in_channels": 6}, in_channels=4, token_dim=32, concat_channels=5)


def test_inpainting_condition_is_the_mask_and_the_masked_images_latents():
    """SD's inpainting layout: [the mask at the latents' size (nearest), latents of image * (mask < 0.5)]."""
    image, mask = _randn(2, 3, 16, 16, seed=0).clamp(-1, 1), (torch.rand(2, 1, 16, 16) > 0.5).float()
    encode = lambda x: F.avg_pool2d(x, 4)[:, :2] * 3  # noqa: E731  a stand-in autoencoder: 4x smaller, 2 channels
    concat = Inpaint()({"image": image, "mask": mask}, encode)["concat"]
    assert concat.shape == (2, 3, 4, 4) and Inpaint().concat_channels(2) == 3
    torch.testing.assert_close(concat[:, :1], mask[:, :, ::4, ::4])  # nearest: the top-left pixel of each 4x4
    torch.testing.assert_close(concat[:, 1:], encode(torch.where(mask > 0.5, 0.0, image)))
    cached = {"concat": concat}  # what cache.py stored is used as it is
    assert Inpaint()(cached, encode)["concat"] is concat
    with pytest.raises(ValueError, match=r"needs batch keys \['image', 'mask'\]"):
        Inpaint()({"image": image}, encode)
    with pytest.raises(ValueError, match=r"batch\['mask'\] must be \(B, 1, H, W\)"):
        Inpaint()({"image": image, "mask": mask[:, :, :8]}, encode)
    assert ImageToImage()({"conditioning_image": image}, encode)["concat"].shape == (2, 2, 4, 4)


def test_digit_masks_are_drawn_per_sample_and_epoch_and_loaded_identically():
    data = DigitsDataModule(masks=True, seed=3)
    dataset = data.dataset("train")
    first = dataset[5]["mask"]
    assert first.shape == (1, 8, 8) and set(first.unique().tolist()) <= {0.0, 1.0} and first.sum() > 0
    torch.testing.assert_close(first, random_mask(8, 8, mask_generator(3, 0, 5)))
    masks = torch.stack([dataset[i]["mask"] for i in range(200)])
    full = masks.flatten(1).all(1).float().mean()
    assert 0.02 < full < 0.25  # p_full = 0.1
    coverage = masks.mean()
    assert 0.15 < coverage < 0.7
    assert not torch.equal(random_mask(8, 8, mask_generator(3, 1, 5)), first) or not torch.equal(
        random_mask(8, 8, mask_generator(3, 2, 5)), first)  # a new mask in another epoch
    assert "mask" not in DigitsDataModule().dataset("train")[0]


def _write_png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def test_inpainting_trains_from_the_command_line_and_samples_with_image_and_mask(tmp_path):
    run = tmp_path / "run"
    cli.train(compose_config("train", [*FAST, "experiment=digits_inpaint"], run))
    ckpt = run / "checkpoints" / "last.ckpt"
    model = cli.load_module(ckpt)
    assert type(model.image_condition).__name__ == "Inpaint" and model.backbone.concat_channels == 2
    digits = np.random.default_rng(0).integers(0, 255, (3, 8, 8))
    for i, digit in enumerate(digits):
        _write_png(tmp_path / "images" / f"{i}.png", digit)
    mask = np.zeros((8, 8)); mask[2:6] = 255
    _write_png(tmp_path / "mask.png", mask)
    args = [f"ckpt={ckpt}", "num=4", "batch_size=3", "steps=2", "precision=32", "progress=false",
            f"image={tmp_path / 'images'}", f"mask={tmp_path / 'mask.png'}"]
    npz = cli.sample(compose_config("sample", [*args, f"out={tmp_path / 'out'}"], tmp_path))
    images = np.load(npz)["arr_0"]
    # Image i: file i % 3 under the mask, label i (cycled), its own seed; a direct call reproduces it.
    pixels = torch.from_numpy(digits).float().div(127.5).sub(1)[:, None]
    hole = torch.from_numpy(mask > 127).float()[None, None]
    for i in (0, 3):
        direct = model.sample(1, [i], steps=2, generator=PerSampleNoise([noise_seed(0, i)]),
                              inputs={"image": pixels[i % 3:i % 3 + 1], "mask": hole})
        np.testing.assert_array_equal(to_uint8(direct), images[i:i + 1])
    assert not np.array_equal(images[0], images[3])  # another label and seed on the same request
    for bad, message in [([f"image={tmp_path / 'images'}"], "takes image=PATH, mask=PATH"),
                         ([f"image={tmp_path / 'images'}", f"mask={tmp_path / 'none.png'}"], "no such image file"),
                         ([f"image={tmp_path / 'images'}", f"mask={tmp_path / 'mask.png'}",
                           f"control={tmp_path / 'mask.png'}"], "takes image=PATH, mask=PATH")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            cli.sample(compose_config("sample", [f"ckpt={ckpt}", "num=2", *bad, f"out={tmp_path / 'no'}"], tmp_path))
    assert not (tmp_path / "no").exists()  # refused before the job wrote anything
    # benchmarks/inpainting.py's judge runs on it (its figures are a trained run's: README, Benchmarks).
    import importlib.util

    spec = importlib.util.spec_from_file_location("inpainting", ROOT / "benchmarks" / "inpainting.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = bench.judge(ckpt, num=20, steps=2)
    assert figures["accuracy_real"] > 0.9 and all(np.isfinite(v) for v in figures.values())
    assert figures["accuracy_holed"] < figures["accuracy_real"]  # the middle rows matter
    with pytest.raises(ValueError, match="masks for each sample each epoch|draws a new mask"):
        cli.train(compose_config("train", [*FAST, "experiment=digits_inpaint", f"cache_dir={tmp_path / 'c'}"],
                                 tmp_path / "cached"))


def test_a_model_without_image_condition_refuses_image_inputs(tmp_path):
    from tests.conftest import train_tiny_checkpoint

    ckpt = train_tiny_checkpoint(tmp_path / "run")
    _write_png(tmp_path / "c.png", np.zeros((8, 8)))
    with pytest.raises(ValueError, match="takes no image condition"):
        cli.sample(compose_config("sample", [f"ckpt={ckpt}", "num=2", f"control={tmp_path / 'c.png'}",
                                             f"out={tmp_path / 'out'}"], tmp_path))


def test_a_backbone_without_concat_channels_is_refused_by_name(tmp_path):
    cfg = compose_config("train", [*FAST, "image_condition=inpaint", "data.module.masks=true"], tmp_path)
    cfg.backbone._target_ = "diffusion.backbones.diffusers_mmdit.SD3Transformer"
    with pytest.raises(ValueError, match="takes no concat_channels"):
        cli.build_module(cfg)


def test_super_resolution_trains_on_the_fly_and_from_a_cache_of_the_conditions_latents(tmp_path):
    """image_condition=image_to_image with the low_resolution annotator in latent diffusion: the cache
    stores each sample's condition latents (the autoencoder's mode of its conditioning image), equal
    to what training computes on the fly, and both runs train."""
    from hydra.utils import instantiate

    from diffusion.data.cache import CachedDataset
    from tests.make_captioned_folder import make_captioned_folder

    folder = make_captioned_folder(tmp_path / "images", n=6)
    overrides = [*FAST, "data=image_folder", f"data.module.root={folder}", "data.module.resolution=16",
                 "data.module.batch_size=2", "data.module.annotator=low_resolution",
                 "data.module.annotator_options={factor: 4}", "conditioning=none", "vae=tiny_sd",
                 "image_condition=image_to_image", f"cache_dir={tmp_path / 'cache'}"]
    cfg = compose_config("train", overrides, tmp_path / "cache_run")
    cli.cache(cfg)
    model = cli.build_module(cfg).eval()
    assert model.backbone.concat_channels == 4  # the latents' channels
    source = instantiate(cfg.data.module).dataset("train")
    cached = CachedDataset(tmp_path / "cache" / "train", cli.cache_fingerprint(cfg, model))
    for i in range(2):
        item = source[i]
        with torch.no_grad():
            expected = model.autoencoder.encode(item["conditioning_image"][None])  # the mode: sample_posterior off
        torch.testing.assert_close(cached[i]["concat"].float(), expected[0], rtol=1e-5, atol=1e-5)
    cli.train(compose_config("train", overrides, tmp_path / "from_cache"))
    cli.train(compose_config("train", [o for o in overrides if not o.startswith("cache_dir")], tmp_path / "on_the_fly"))
    assert (tmp_path / "from_cache" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "on_the_fly" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("backbone,extra", [("unet_tiny", []), ("dit_tiny", ["vae=tiny_sd"])])
def test_controlnet_trains_on_the_fly_and_from_the_cache_and_samples_with_control(backbone, extra, tmp_path):
    """adapter=controlnet on a captioned folder with Canny conditioning images: our UNet in pixel space
    (the control in pixels), our DiT in latent space (PixArt-delta: the control's latents). From the
    cache and on the fly the first step's loss is the same; sample.py control=FOLDER control_scale=0
    gives the base's samples (the ControlNet adds nothing), and another scale other ones."""
    from diffusion.controlnet import Controlled
    from tests.conftest import logged_losses
    from tests.make_captioned_folder import make_captioned_folder

    folder = make_captioned_folder(tmp_path / "images", n=6)
    overrides = [*FAST, f"backbone={backbone}", *extra, "data=image_folder", f"data.module.root={folder}",
                 "data.module.resolution=16", "data.module.batch_size=2", "data.module.annotator=canny",
                 "conditioning=text", "text_encoder=openclip_tiny", "adapter=controlnet", "trainer.max_steps=2"]
    cached = [*overrides, f"cache_dir={tmp_path / 'cache'}"]
    cli.cache(compose_config("train", cached, tmp_path / "cache_run"))
    cli.train(compose_config("train", cached, tmp_path / "from_cache"))
    cli.train(compose_config("train", overrides, tmp_path / "on_the_fly"))
    on_the_fly, from_cache = logged_losses(tmp_path / "on_the_fly"), logged_losses(tmp_path / "from_cache")
    assert on_the_fly[0] == pytest.approx(from_cache[0], rel=1e-4)
    ckpt = tmp_path / "on_the_fly" / "checkpoints" / "last.ckpt"
    model = cli.load_module(ckpt)
    assert isinstance(model.backbone, Controlled) and type(model.image_condition).__name__ == "Control"
    assert model.image_condition.space == ("latents" if backbone == "dit_tiny" else "pixels")
    controls = tmp_path / "controls"
    for i in range(2):
        edges = np.zeros((16, 16)); edges[4 + i, :] = 255; edges[:, 8] = 255
        _write_png(controls / f"{i}.png", np.repeat(edges[..., None], 3, axis=2))
    args = ["num=2", "steps=2", "precision=32", "progress=false", f"control={controls}", "prompts=[a red circle]"]
    samples = {}
    for scale in (0, 1):
        npz = cli.sample(compose_config("sample", [f"ckpt={ckpt}", *args, f"control_scale={scale}",
                                                   f"out={tmp_path / f'scale{scale}'}"], tmp_path))
        samples[scale] = np.load(npz)["arr_0"]
    with pytest.raises(ValueError, match="the model has 1 ControlNet"):
        cli.sample(compose_config("sample", [f"ckpt={ckpt}", *args[:-2], f"control=[{controls},{controls}]",
                                             f"out={tmp_path / 'two'}"], tmp_path))
    # sample.py's image i is the direct call on its seed and its control file (i % 2), at its scale.
    request = torch.stack([torch.from_numpy(np.asarray(Image.open(controls / f"{i}.png"))).permute(2, 0, 1)
                           for i in range(2)]).float().div(127.5).sub(1)[:, None]  # (B, K=1, 3, H, W)
    for m in (model.backbone, model.ema.module):
        m.control_scale = 0.0
    direct = model.sample(2, ["a red circle"] * 2, steps=2, generator=PerSampleNoise([noise_seed(0, i) for i in range(2)]),
                          inputs={"conditioning_image": request})
    np.testing.assert_array_equal(to_uint8(direct), samples[0])
    # Trained weights (the zero layers moved: the random base's own output layer is zero too) make the
    # samples depend on the ControlNet at scale 1, and not at scale 0.
    with torch.no_grad():
        for module in (model.backbone, model.ema.module):
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    direct = model.sample(2, ["a red circle"] * 2, steps=2, generator=PerSampleNoise([noise_seed(0, i) for i in range(2)]),
                          inputs={"conditioning_image": request})
    for m in (model.backbone, model.ema.module):
        m.control_scale = 1.0
    moved = model.sample(2, ["a red circle"] * 2, steps=2, generator=PerSampleNoise([noise_seed(0, i) for i in range(2)]),
                         inputs={"conditioning_image": request})
    assert (moved - direct).abs().max() > 1e-3


def test_inpainting_trains_on_a_captioned_folder_in_latent_diffusion(tmp_path):
    """data.module.masks=true gives each image its random mask (the key of the sample asked for, at the
    image's bucket size); image_condition=inpaint trains a text-conditioned latent model on them, with
    the 1 + 4 extra channels of SD's inpainting layout."""
    from hydra.utils import instantiate

    from tests.make_captioned_folder import make_captioned_folder

    folder = make_captioned_folder(tmp_path / "images", n=6)
    overrides = [*FAST, "data=image_folder", f"data.module.root={folder}", "data.module.resolution=16",
                 "data.module.batch_size=2", "data.module.masks=true", "data.module.hflip=true", "vae=tiny_sd",
                 "conditioning=text", "text_encoder=openclip_tiny", "image_condition=inpaint", "backbone=unet_tiny"]
    cfg = compose_config("train", overrides, tmp_path / "run")
    dataset = instantiate(cfg.data.module).dataset("train")
    for i in range(3):
        torch.testing.assert_close(dataset[i]["mask"], random_mask(16, 16, mask_generator(cfg.seed, 0, i)))
    cli.train(cfg)
    model = cli.load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert model.backbone.concat_channels == 5


@pytest.mark.parametrize("overrides,message", [
    (["adapter=controlnet"], r"reads \['conditioning_image'\] of each sample, and the data \(DigitsDataModule\)"),
    (["image_condition=inpaint"], r"gives no \['mask'\]: train on data with masks \(data.module.masks=true\)"),
    (["image_condition=control"], "image_condition=control feeds a ControlNet: add adapter=controlnet"),
    (["adapter=controlnet", "image_condition=inpaint", "data.module.masks=true"], "leave image_condition out"),
])
def test_an_image_condition_the_data_cannot_feed_is_refused_before_the_run(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        cli.train(compose_config("train", [*FAST, *overrides], tmp_path / "run"))
    assert not (tmp_path / "run").exists()
