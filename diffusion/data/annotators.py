"""Conditioning images computed from an image: with no weights, Canny edges (ControlNet's canny
condition), grayscale and low resolution; with a model's (a hub id or a local directory), depth
(diffusion.data.depth: a transformers depth estimator) and pose (diffusion.data.pose: ViTPose's COCO
keypoints drawn as an OpenPose skeleton). Each maps a PIL RGB image to a PIL RGB image of its size.

``canny`` is OpenCV's ``cv2.Canny(image, low, high)`` (aperture 3, L1 gradient), as diffusers'
ControlNet training example calls it on RGB images, reproduced pixel for pixel in torch so that no
OpenCV is needed: 3x3 Sobel derivatives with replicated borders per channel, at each pixel the
channel of the largest |dx| + |dy|, non-maximum suppression along the gradient direction quantised
with OpenCV's fixed-point tan(22.5 deg), and hysteresis: pixels above ``high`` seed edges that grow
through 8-connected pixels above ``low``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from diffusion._checks import check_choice
from diffusion.data.depth import DEFAULT_DEPTH_MODEL, depth_estimator, depth_identity
from diffusion.data.pose import DEFAULT_POSE_MODEL, DEFAULT_THRESHOLD, pose_estimator, pose_identity

ANNOTATORS = ("canny", "grayscale", "low_resolution", "depth", "pose")
WEIGHTED = ("depth", "pose")  # annotators that load a model
DEFAULT_MODELS = {"depth": DEFAULT_DEPTH_MODEL, "pose": DEFAULT_POSE_MODEL}
# Known annotators this codebase cannot compute, and what they would need.
_OPENPOSE = ("OpenPose's body (and hand/face) weights, which controlnet_aux's OpenposeDetector loads from "
             "lllyasviel/Annotators; this codebase draws OpenPose-style skeletons from ViTPose instead: "
             "annotator=pose")
UNAVAILABLE = {"openpose": _OPENPOSE}
_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)  # tan(22.5 deg) in OpenCV's fixed point


def canny_edges(pixels: Tensor, low: float = 100, high: float = 200) -> Tensor:
    """(H, W) or (H, W, C) uint8 -> (H, W) bool edges, as ``cv2.Canny(pixels, low, high) > 0``."""
    if pixels.dtype != torch.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"canny_edges takes (H, W) or (H, W, C) uint8 pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    if low < 0 or high < 0:
        raise ValueError(f"canny thresholds must be >= 0, got low={low}, high={high}")
    low_i, high_i = int(np.floor(low)), int(np.floor(high))
    if low_i > high_i:
        low_i, high_i = high_i, low_i
    image = (pixels if pixels.ndim == 3 else pixels[..., None]).permute(2, 0, 1).to(torch.int64)  # (C, H, W)
    dx, dy = _sobel(image)
    norm = dx.abs() + dy.abs()
    best = norm.argmax(0, keepdim=True)  # the first channel of the largest magnitude, as OpenCV keeps it
    dx, dy, mag = dx.gather(0, best)[0], dy.gather(0, best)[0], norm.gather(0, best)[0]
    candidate = (mag > low_i) & _local_maximum(mag, dx, dy)
    return _hysteresis(candidate & (mag > high_i), candidate)


def _sobel(image: Tensor) -> tuple[Tensor, Tensor]:
    """OpenCV's 3x3 Sobel dx, dy of (C, H, W) integers, borders replicated."""
    p = F.pad(image[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0].long()  # exact: values < 2^24
    h, w = image.shape[-2:]

    def at(i: int, j: int) -> Tensor:
        return p[:, i:i + h, j:j + w]

    dx = (at(0, 2) - at(0, 0)) + 2 * (at(1, 2) - at(1, 0)) + (at(2, 2) - at(2, 0))
    dy = (at(2, 0) - at(0, 0)) + 2 * (at(2, 1) - at(0, 1)) + (at(2, 2) - at(0, 2))
    return dx, dy


def _local_maximum(mag: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """OpenCV's non-maximum suppression: the magnitude beats its two neighbours across the edge (ties
    go to the pixel before, left or above); outside the image the magnitude is 0."""
    m = F.pad(mag, (1, 1, 1, 1))
    h, w = mag.shape

    def at(di: int, dj: int) -> Tensor:  # the neighbour at row offset di, column offset dj
        return m[1 + di:1 + di + h, 1 + dj:1 + dj + w]

    x, y = dx.abs(), dy.abs() << _SHIFT
    tg22x = x * _TG22
    tg67x = tg22x + (x << (_SHIFT + 1))
    horizontal = (mag > at(0, -1)) & (mag >= at(0, 1))
    vertical = (mag > at(-1, 0)) & (mag >= at(1, 0))
    s_negative = (dx ^ dy) < 0  # the diagonal the gradient points along
    diagonal = torch.where(s_negative, (mag > at(-1, 1)) & (mag > at(1, -1)), (mag > at(-1, -1)) & (mag > at(1, 1)))
    return torch.where(y < tg22x, horizontal, torch.where(y > tg67x, vertical, diagonal))


def _hysteresis(strong: Tensor, weak: Tensor) -> Tensor:
    """The pixels of ``weak`` 8-connected to a pixel of ``strong`` (itself in ``weak``): the connected
    components of ``weak`` (scipy, which scikit-learn brings) that hold a strong pixel."""
    from scipy import ndimage

    labels, _ = ndimage.label(weak.numpy(), structure=np.ones((3, 3), dtype=bool))
    seeded = np.unique(labels[strong.numpy()])
    return torch.from_numpy(np.isin(labels, seeded[seeded > 0]))


def check_available(kind: str) -> str:
    """``kind`` if it is one of ANNOTATORS; a known but unavailable one (openpose) says what it needs."""
    if kind in UNAVAILABLE:
        raise ValueError(f"annotator={kind!r} is not available: it needs {UNAVAILABLE[kind]}; or compute the images "
                         "with controlnet_aux and give them as data.module.conditioning_root (a parallel folder) or "
                         "data.module.conditioning_column")
    return check_choice("annotator", kind, ANNOTATORS)


def annotate(image: Image.Image, kind: str, low: float = 100, high: float = 200, factor: int = 8,
             model: str | None = None, threshold: float = DEFAULT_THRESHOLD) -> Image.Image:
    """The conditioning image of ``image`` (RGB): ``canny`` (white edges on black, thresholds ``low``
    and ``high``), ``grayscale`` (luma in all three channels), ``low_resolution`` (``factor`` times
    smaller by area averaging, then back to the size with bicubic: a super-resolution condition) or
    ``depth`` (the depth map of ``model``, a hub id or a directory, as transformers' depth pipeline
    draws it, in all three channels) or ``pose`` (the OpenPose-style skeleton of the person ViTPose
    ``model`` finds in the whole image, keypoints scoring below ``threshold`` left out). A weighted
    annotator's model (default: DEFAULT_MODELS) is loaded once per process."""
    check_available(kind)
    rgb = image.convert("RGB")
    if kind == "depth":
        return depth_estimator(DEFAULT_DEPTH_MODEL if model is None else model)(rgb)
    if kind == "pose":
        return pose_estimator(DEFAULT_POSE_MODEL if model is None else model)(rgb, threshold)
    if kind == "canny":
        edges = canny_edges(torch.from_numpy(np.asarray(rgb).copy()), low, high)
        return Image.fromarray(np.repeat(edges.numpy().astype(np.uint8)[..., None] * 255, 3, axis=2))
    if kind == "grayscale":
        return rgb.convert("L").convert("RGB")
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"low_resolution annotator: factor must be an integer >= 1, got {factor!r}")
    small = rgb.resize((max(1, rgb.width // factor), max(1, rgb.height // factor)), Image.Resampling.BOX)
    return small.resize(rgb.size, Image.Resampling.BICUBIC)


def annotator_identity(kind: str | None, options: dict | None = None) -> dict | None:
    """What the images of annotator ``kind`` depend on beyond its options, for fingerprints: for a
    weighted annotator its model and the sha256 of its weights (loading it); None for the others."""
    if kind not in WEIGHTED:
        return None
    model = dict(options or {}).get("model", DEFAULT_MODELS[kind])
    return (depth_identity if kind == "depth" else pose_identity)(model)
