"""OpenCLIPImageEncoder: open_clip's evaluation transform in torch and ``model.encode_image``, on tiny random
open_clip ViTs (nothing downloads); and the image prompt it makes feeding our DiT's IP-Adapter from the
command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.encoders.image import OpenCLIPImageEncoder
from diffusion.encoders.openclip import _register
from tests.conftest import FAST, compose_config

#: A tiny CLIP of open_clip's classic architecture; 24 px inputs, embeddings of 12 (vision width 16).
TINY = {
    "embed_dim": 12,
    "vision_cfg": {"image_size": 24, "layers": 2, "width": 16, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
# Landscape and portrait with odd margins (torchvision's CenterCrop rounds them), a square, and upscaling.
SIZES = [(61, 37), (30, 53), (24, 24), (17, 13)]


def _pil_images(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for w, h in SIZES:  # smooth content plus noise: a resize moves pixels by more than one level
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / 5 + c) * np.cos(yy / 7 - c) for c in range(3)], -1) * 100 + 128
        images.append(Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)))
    return images


def _tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as our data gives it: (1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1


def _reference(model_name: str, seed: int = 0, **kwargs):
    """open_clip's own model and evaluation transform, the weights of the same seed as the encoder's."""
    import open_clip

    torch.manual_seed(seed)
    model, _, transform = open_clip.create_model_and_transforms(model_name, **kwargs)
    return model.eval(), transform


def _unnormalise(pixels: torch.Tensor, encoder: OpenCLIPImageEncoder) -> torch.Tensor:
    return pixels * encoder.std + encoder.mean


def test_the_encoder_is_open_clips_transform_and_encode_image():
    """Each image's pixels are open_clip's preprocess of the PIL image up to one 8-bit level, and the
    embeddings are model.encode_image of them (unnormalised), one token each."""
    torch.manual_seed(0)
    encoder = OpenCLIPImageEncoder("tiny", model_config=TINY)
    model, transform = _reference(_register("tiny", TINY), seed=0)
    assert torch.equal(weights := next(encoder.model.parameters()), next(model.visual.parameters()))
    assert weights.requires_grad is False and encoder.embed_dim == 12 and encoder.size == 24
    for image in _pil_images(seed=1):
        ours = encoder.preprocess(_tensor(image))
        theirs = transform(image)[None]
        assert ours.shape == theirs.shape == (1, 3, 24, 24)
        diff = (_unnormalise(ours, encoder) - _unnormalise(theirs, encoder)).abs()
        assert diff.max() <= 1 / 255 + 1e-5, (image.size, diff.max() * 255)
        levels = (_unnormalise(ours, encoder) * 255).round(), (_unnormalise(theirs, encoder) * 255).round()
        assert (levels[0] == levels[1]).float().mean() > 0.75  # rounded to 8 bits, most are theirs exactly
        with torch.no_grad():
            expected = model.encode_image(theirs)
        embeds = encoder(_tensor(image))
        assert embeds.shape == (1, 1, 12) and embeds.dtype == torch.float32
        torch.testing.assert_close(embeds[:, 0], expected, atol=2e-2, rtol=2e-2)  # pixels differ by a level
        torch.testing.assert_close(encoder.model(ours), model.encode_image(ours), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(expected.norm(dim=-1), torch.ones(1))  # encode_image's, not normalised
    assert torch.equal(encoder.null_embeds(3), torch.zeros(3, 1, 12))


def test_a_local_directory_in_open_clips_hub_layout_gives_its_weights_and_preprocessing(tmp_path):
    """`local-dir:` (the layout of open_clip's hf-hub repositories: open_clip_config.json and the weights)
    loads those weights, and the preprocessing follows its preprocess_cfg (mean, std, bilinear)."""
    from safetensors.torch import save_file

    model, _ = _reference(_register("tiny", TINY), seed=3)
    preprocess_cfg = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": preprocess_cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "open_clip_model.safetensors")

    encoder = OpenCLIPImageEncoder(f"local-dir:{tmp_path}")
    reference, transform = _reference(f"local-dir:{tmp_path}")
    assert encoder.interpolation == "bilinear"
    torch.testing.assert_close(encoder.mean.flatten(), torch.tensor(preprocess_cfg["mean"]))
    for name, p in encoder.model.state_dict().items():
        assert torch.equal(p, model.visual.state_dict()[name]), name
    for image in _pil_images(seed=4)[:2]:
        ours, theirs = encoder.preprocess(_tensor(image)), transform(image)[None]
        assert (_unnormalise(ours, encoder) - _unnormalise(theirs, encoder)).abs().max() <= 1 / 255 + 1e-5
        with torch.no_grad():
            torch.testing.assert_close(encoder(_tensor(image))[:, 0], reference.encode_image(theirs),
                                       atol=2e-2, rtol=2e-2)
    # A checkpoint file as `pretrained` with a registered config gives the same weights as the directory.
    from_file = OpenCLIPImageEncoder("tiny", pretrained=str(tmp_path / "open_clip_model.safetensors"),
                                     model_config=TINY)
    assert from_file.fingerprint()["sha256"] == encoder.fingerprint()["sha256"]
    assert from_file.fingerprint()["source"].startswith("config:")
    torch.manual_seed(0)
    other = OpenCLIPImageEncoder("tiny", model_config=TINY)
    assert other.fingerprint()["sha256"] != encoder.fingerprint()["sha256"]
    assert {"interpolation", "size", "embed_dim", "dtype"} <= set(other.fingerprint())


def test_the_refusals():
    encoder = OpenCLIPImageEncoder("tiny", model_config=TINY)
    with pytest.raises(ValueError, match=r"float images in \[-1, 1\].*divide by 127.5"):
        encoder(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        encoder(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="OpenCLIPImageEncoder: model_config expects keys.*text_cfg"):
        OpenCLIPImageEncoder("tiny", model_config={"embed_dim": 4, "vision_cfg": {}})
    with pytest.raises(ValueError, match="image_encoder.dtype"):
        OpenCLIPImageEncoder("tiny", model_config=TINY, dtype="float64")


def test_the_image_prompt_feeds_our_dits_ip_adapter_from_the_command_line(tmp_path):
    """image_condition=image_prompt_openclip with a tiny encoder: a 2-step IP-Adapter train on a DiT (tokens of
    a tiny OpenCLIP text tower) trained 2 steps before (a new DiT's zero gates would pass no gradient); the
    adapter is of the encoder's width, it alone trains, and its image maps move off their text copies."""
    from diffusion import cli
    from diffusion.ip_adapter import is_ip_parameter
    from tests.make_captioned_folder import make_captioned_folder

    folder = make_captioned_folder(tmp_path / "images", n=4, sizes=[(20, 16)])
    common = [*FAST, "trainer.max_steps=2", "data=image_folder", f"data.module.root={folder}",
              "data.module.resolution=16", "data.module.batch_size=2", "conditioning=text",
              "text_encoder=openclip_tiny", "model.optim.optimizer.lr=1e-2", "model.ema_decay=0.5"]
    cli.train(compose_config("train", common, tmp_path / "base"))
    encoder = [f"image_condition.encoder.{k}={v}" for k, v in (("model_name", "tiny"), ("pretrained", "null"))]
    cfg = compose_config("train", [*common, "image_condition=image_prompt_openclip", *encoder, "adapter=ip_adapter",
                                   f"adapter.base={tmp_path / 'base' / 'checkpoints' / 'last.ckpt'}"], tmp_path / "run")
    cfg.image_condition.encoder.model_config = TINY
    cli.train(cfg)
    model = cli.load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert type(model.adapter).__name__ == "IPAdapter" and model.adapter.image_embed_dim == 12
    assert type(model.image_condition.encoder).__name__ == "OpenCLIPImageEncoder"
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(is_ip_parameter(n) for n in trainable), sorted(trainable)[:5]
    params = dict(model.backbone.named_parameters())
    ip_kv = [n for n in trainable if ".ip_kv.weight" in n]  # the DiT's cross-attentions' image maps, from kv
    assert ip_kv and all(not torch.equal(params[n], params[n.replace(".ip_kv.", ".kv.")]) for n in ip_kv)
