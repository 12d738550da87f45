"""evaluate.py end to end with the transformers extractors (diffusion.evaluation.hub) on tiny random CLIP and
DINOv2 directories: clip_score, cmmd and fd_dinov2 equal a direct computation.

The direct computations run transformers alone: its PIL image processors saved with each tiny model
(the preprocessing our extractors document), CLIPModel's / Dinov2Model's own embeddings, and the
metrics written out here in numpy (CLIP score, CMMD's Gaussian MMD) or with scipy.linalg.sqrtm (the
Fréchet distance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import transformers as tf

from diffusion.evaluation.job import evaluate
from diffusion.sampling_job import write_outputs
from tests.test_evaluate import REF_NUM, config, data_ref, digits_reference_images, images
from tests.tiny_encoders import no_network  # noqa: F401 (fixture)
from tests.tiny_extractors import save_tiny_clip, save_tiny_dinov2

SIZE = 8  # the tiny networks' input size, the digits' size: the samples at it need no resize
PROMPTS = ["a red cat", "a photo of a dog", "the blue sea", "a small green tree", "a big house", "a car on the sky"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), image_size=SIZE, patch_size=4)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"), image_size=SIZE, patch_size=4)


def prompted_samples(directory: Path, n: int, height: int, width: int) -> Path:
    """samples.npz as sample.py writes it for a text model: arr_0 and a prompt per image (cycled)."""
    x = np.ascontiguousarray(images(n, seed=11, size=max(height, width))[:, :height, :width])
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    directory.mkdir(parents=True)
    return write_outputs(directory, x, ("prompts", prompts), {"note": "test samples"})


# --- transformers alone --------------------------------------------------------------------------
def clip_embeddings(directory: Path, x: np.ndarray, prompts: list[str] | None = None):
    """L2-normalised CLIP image (and text) embeddings of uint8 NHWC images, by transformers alone."""
    processor = tf.CLIPImageProcessorPil.from_pretrained(directory)
    model = tf.CLIPModel.from_pretrained(directory).eval()
    pixels = processor(images=list(x), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        image = getattr(image, "pooler_output", image)  # a tensor, or an output object in newer transformers
        image = (image / image.norm(dim=-1, keepdim=True)).double().numpy()
        if prompts is None:
            return image
        batch = tf.AutoTokenizer.from_pretrained(directory)(prompts, padding=True, return_tensors="pt")
        text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        text = getattr(text, "pooler_output", text)
        return image, (text / text.norm(dim=-1, keepdim=True)).double().numpy()


def dinov2_cls(directory: Path, x: np.ndarray) -> np.ndarray:
    processor = tf.BitImageProcessorPil.from_pretrained(directory)
    pixels = processor(images=list(x), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return tf.Dinov2Model.from_pretrained(directory).eval()(pixel_values=pixels).pooler_output.double().numpy()


def gaussian_mmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """CMMD's definition: scale * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)), k = exp(-|a-b|^2 / 2 sigma^2),
    every pair (the diagonal too)."""
    def k(a, b):
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * sigma**2)).mean()

    return scale * (k(x, x) + k(y, y) - 2 * k(x, y))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(root)))


# --- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width", [(SIZE, SIZE), (12, 16)])  # as the network's input; resized and cropped
def test_clip_score_equals_clipmodels(clip_dir, tmp_path, height, width):
    npz = prompted_samples(tmp_path / "samples", 10, height, width)
    record = evaluate(config(tmp_path, f"samples={npz}", "ref=none", "metrics=[clip_score]",
                             f"extractors.clip.model={clip_dir}", "batch_size=4"))
    image, text = clip_embeddings(clip_dir, np.load(npz)["arr_0"], [PROMPTS[i % 6] for i in range(10)])
    cosines = (image * text).sum(1)
    direct = float(np.mean(100 * np.maximum(cosines, 0)))
    assert (cosines > 0).any() and (cosines < 0).any()  # both sides of the clamp are met
    # (12, 16): our torch resize is PIL's to +-1 level on a few pixels (tests/test_hub_extractors.py).
    tolerance = 1e-6 if (height, width) == (SIZE, SIZE) else 1e-3
    assert record["metrics"] == {"clip_score": pytest.approx(direct, rel=tolerance)}
    assert record["extractors"]["clip"]["model"] == str(clip_dir)
    assert record["reference"] is None


def test_cmmd_against_the_digits_equals_a_direct_mmd(clip_dir, tmp_path):
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images(24, seed=1))
    cache = tmp_path / "ref"
    args = [f"samples={samples}", "metrics=[cmmd]", f"extractors.clip.model={clip_dir}", "batch_size=16"]
    from_data = evaluate(config(tmp_path, *args, f"out={tmp_path / 'a'}", "ref=data", "data=digits",
                                f"ref_num={REF_NUM}", f"ref_cache={cache}"))
    # The reference.npz that run wrote serves as ref=PATH.npz, with every real embedding CMMD needs.
    from_file = evaluate(config(tmp_path, *args, f"out={tmp_path / 'b'}", f"ref={cache / 'reference.npz'}"))

    fake = clip_embeddings(clip_dir, np.load(samples)["arr_0"])
    real = clip_embeddings(clip_dir, digits_reference_images())
    direct = gaussian_mmd(real, fake)
    assert direct > 1e-3  # the digits and the colour patterns differ
    assert from_data["metrics"] == {"cmmd": pytest.approx(direct, rel=1e-4)}
    assert from_file["metrics"] == from_data["metrics"]
    assert from_data["reference"]["num"] == REF_NUM


def test_fd_dinov2_against_the_digits_equals_scipys_frechet_distance(dinov2_dir, refs_dir, tmp_path):
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images(40, seed=3))  # more than the 32 feature dimensions: the plain name
    record = evaluate(config(tmp_path, f"samples={samples}", "metrics=[fd_dinov2]", "batch_size=16",
                             f"extractors.dinov2.model={dinov2_dir}", f"extractors.dinov2.image_size={SIZE}",
                             *data_ref(refs_dir)))
    direct = frechet(dinov2_cls(dinov2_dir, np.load(samples)["arr_0"]), dinov2_cls(dinov2_dir, digits_reference_images()))
    assert direct > 1
    assert record["metrics"] == {"fd_dinov2": pytest.approx(direct, rel=1e-5)}
    assert record["extractors"]["dinov2"]["model"] == str(dinov2_dir) and "8x8" in record["extractors"]["dinov2"]["preprocessing"]


@pytest.fixture(scope="module")
def refs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("refs")
