"""DINOv2 and CLIP extractors on tiny random transformers models saved to a directory, as the hub has them:
the preprocessing against transformers' own image processors, the features against a direct forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from transformers.image_utils import PILImageResampling

from diffusion.evaluation.hub import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, CLIPFeatures, DINOv2Features, resize_bicubic
from tests.tiny_encoders import no_network, save_tiny_hf  # noqa: F401 (no_network: fixture)
from tests.tiny_extractors import save_tiny_dinov2

CLIP_SIZE = 16  # the vision tower of tests.tiny_encoders' "clip_full"


def uint8_images(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_hf("clip_full", tmp_path_factory.mktemp("clip"))


def levels(a: torch.Tensor, b: torch.Tensor, std: tuple[float, ...]) -> torch.Tensor:
    """|a - b| of normalised pixels, back in 0..255 levels."""
    return (a - b).abs() * torch.tensor(std).view(1, 3, 1, 1) * 255


def assert_within_a_level(ours: torch.Tensor, ref: torch.Tensor, std: tuple[float, ...], max_levels: float) -> None:
    """Our torch resize against PIL's / torchvision's uint8 one: integer pixels, which their fixed-point
    weights round differently from float weights on a few pixels; never more than `max_levels`."""
    assert ours.shape == ref.shape
    diff = levels(ours, ref, std)
    assert diff.max() <= max_levels + 1e-3, diff.max()
    assert (diff > 0.5).float().mean() < 0.01


# ---------------------------------------------------------------------------- the resize
@pytest.mark.parametrize("src,dst", [((50, 70), (224, 224)), ((300, 400), (224, 224)), ((64, 64), (299, 299)), ((40, 60), (16, 24))])
def test_resize_is_pils_bicubic(src, dst):
    u = uint8_images(1, 3, *src, seed=1)
    pil = Image.fromarray(u[0].permute(1, 2, 0).numpy()).resize(dst[::-1], Image.BICUBIC)
    ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float()
    ours = resize_bicubic(u.float(), dst)
    assert (ours - ref).abs().max() <= 1
    assert (ours != ref).float().mean() < 0.01
    assert torch.equal(ours, ours.round())  # integer levels, as PIL stores them


# ---------------------------------------------------------------------------- DINOv2
def test_dinov2_preprocessing_matches_bit_image_processors(dinov2_dir):
    u = uint8_images(2, 3, 50, 70)
    ours = DINOv2Features(str(dinov2_dir), local_files_only=True).preprocess(u)
    args = dict(do_resize=True, size={"height": 224, "width": 224}, resample=PILImageResampling.BICUBIC,
                do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=False)
    pil = tf.BitImageProcessorPil(**args)(images=list(u.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
    assert_within_a_level(ours, pil, IMAGENET_STD, 1)
    tv = tf.BitImageProcessor(**args)(images=list(u), return_tensors="pt")["pixel_values"]
    assert_within_a_level(ours, tv, IMAGENET_STD, 2)  # torchvision's uint8 kernel: itself within 2 of PIL


def test_dinov2_features_are_the_final_cls_token(dinov2_dir):
    ext = DINOv2Features(str(dinov2_dir), local_files_only=True)
    u = uint8_images(2, 3, 40, 30, seed=2)
    out = ext.features(u)
    assert ext.feature_dims == {"dinov2": 32}
    assert out["dinov2"].shape == (2, 32) and out["dinov2"].dtype == torch.float32
    ref_model = tf.Dinov2Model.from_pretrained(dinov2_dir).eval()
    with torch.no_grad():
        hidden = ref_model(pixel_values=ext.preprocess(u), output_hidden_states=True)
    # The CLS token of the last block's output, through the final layernorm.
    cls = ref_model.layernorm(hidden.hidden_states[-1])[:, 0]
    torch.testing.assert_close(out["dinov2"], cls, rtol=1e-5, atol=1e-5)
    # NHWC numpy input is the same images.
    torch.testing.assert_close(ext.features(u.permute(0, 2, 3, 1).numpy())["dinov2"], out["dinov2"], rtol=0, atol=0)


def test_dinov2_fingerprint(dinov2_dir, tmp_path):
    a = DINOv2Features(str(dinov2_dir)).fingerprint()
    assert a == DINOv2Features(str(dinov2_dir)).fingerprint()
    other = DINOv2Features(str(save_tiny_dinov2(tmp_path / "other", seed=1))).fingerprint()
    assert other["weights_sha256"] != a["weights_sha256"]
    assert a["model"] == str(dinov2_dir) and "224x224" in a["preprocessing"] and a["precision"] == "32"


def test_dinov2_refuses_float_images(dinov2_dir):
    with pytest.raises(ValueError, match=r"DINOv2Features.*uint8"):
        DINOv2Features(str(dinov2_dir)).features(torch.rand(1, 3, 32, 32))


# ---------------------------------------------------------------------------- CLIP
@pytest.mark.parametrize("shape", [(2, 3, 50, 70), (2, 3, 70, 50), (1, 3, 33, 33), (1, 3, 16, 40)])
def test_clip_preprocessing_matches_clip_image_processors(clip_dir, shape):
    ext = CLIPFeatures(str(clip_dir))
    assert ext.image_size == CLIP_SIZE
    u = uint8_images(*shape, seed=3)
    ours = ext.preprocess(u)
    args = dict(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}, do_convert_rgb=False)
    pil = tf.CLIPImageProcessorPil(**args)(images=list(u.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
    assert_within_a_level(ours, pil, CLIP_STD, 1)
    tv = tf.CLIPImageProcessor(**args)(images=list(u), return_tensors="pt")["pixel_values"]
    assert_within_a_level(ours, tv, CLIP_STD, 3)  # torchvision's uint8 kernel: itself up to 3 from PIL here
    assert tuple(tf.CLIPImageProcessorPil().image_mean) == CLIP_MEAN  # our constants are theirs


def test_clip_features_equal_clipmodels_embeddings(clip_dir):
    ext = CLIPFeatures(str(clip_dir))
    u = uint8_images(2, 3, 24, 20, seed=4)
    prompts = ["a photo of a cat", "a red car on the sea"]
    images = ext.features(u)["clip"]
    texts = ext.text_features(prompts)
    model = tf.CLIPModel.from_pretrained(clip_dir).eval()
    batch = ext.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():  # CLIPModel.forward normalises both embeddings itself
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=ext.preprocess(u))
    assert images.shape == (2, 16) and texts.shape == (2, 16) and ext.feature_dims == {"clip": 16}
    torch.testing.assert_close(images, out.image_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(texts, out.text_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(images.norm(dim=1), torch.ones(2))


def test_clip_text_truncated_to_max_length(clip_dir):
    ext = CLIPFeatures(str(clip_dir))
    words = ("a red cat on the sea with a blue car " * 20).split()  # 180 words
    keep = ext.max_length - 2  # <bos> and <eos> take two places
    long, cut = ext.text_features([" ".join(words), " ".join(words[:keep])])
    torch.testing.assert_close(long, cut, rtol=1e-5, atol=1e-5)
    other = ext.text_features([" ".join(words[: keep - 1])])[0]
    assert not torch.allclose(cut, other)


def test_clip_fingerprint_and_refusals(clip_dir):
    ext = CLIPFeatures(str(clip_dir))
    fp = ext.fingerprint()
    ext.text_features(["a cat"])  # a call sets the tokenizer's truncation: the fingerprint must not move
    assert ext.fingerprint() == fp
    assert set(fp) == {"extractor", "model", "weights_sha256", "preprocessing", "precision", "tokenizer"}
    with pytest.raises(ValueError, match="non-empty list of str"):
        ext.text_features("a cat")
    with pytest.raises(ValueError, match=r"3 \(RGB\) channels"):
        ext.features(torch.zeros(1, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"precision='fp16'"):
        CLIPFeatures(str(clip_dir), precision="fp16")
