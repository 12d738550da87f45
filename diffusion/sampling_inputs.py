"""sample.py's image inputs: ``control=``, ``image=`` with ``mask=`` (inpainting) and ``ip_image=``.

Each names an image file or a folder of images (sorted by path); image i of the job takes file
``i % n``, so a folder of n conditions is cycled over ``num`` samples, the same for any batch size,
number of processes or resume. ``control`` may be a list, one path per ControlNet of the model.
Files are resized to cover the model's image size and center-cropped (as validation images are),
into [-1, 1]; a mask is read as grayscale, 1 (fill) where it is brighter than mid-grey. The files'
sha256 go into the job's manifest, so a resumed job with other inputs is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from diffusion.data.images import IMAGE_EXTS, list_images, load_rgb, resize_crop
from diffusion.files import file_sha256

#: sample.py's option -> the batch key the image condition reads.
OPTIONS = {"control": "conditioning_image", "image": "image", "mask": "mask", "ip_image": "ip_image"}


def _files(option: str, value: Any) -> list[Path]:
    path = Path(str(value))
    if path.is_dir():
        files = list_images(path, IMAGE_EXTS)
        if not files:
            raise FileNotFoundError(f"{option}={value}: the folder holds no images ({', '.join(IMAGE_EXTS)})")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{option}={value}: no such image file or folder")
    return [path]


def _load(option: str, path: Path, size: tuple[int, int], channels: int) -> Tensor:
    """(C, H, W) in [-1, 1], or a (1, H, W) mask in {0, 1}."""
    try:
        image, _ = resize_crop(load_rgb(path, size), size, "center")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{option}: cannot read the image {path} ({e}); replace or remove it") from e
    if option == "mask":
        return torch.from_numpy((np.asarray(image.convert("L")) > 127).astype(np.float32))[None]
    array = np.asarray(image.convert("L"))[..., None] if channels == 1 else np.asarray(image)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def control_images(value: Any, num: int, size: tuple[int, int]) -> "np.ndarray":
    """The conditions of ``num`` samples as uint8 (num, H, W, 3): file i % n of ``control=`` (the first
    ControlNet's where it lists several), resized and center-cropped to ``size`` as sampling loads them."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = list(value)[0]
    files = _files("control", value)
    images = [_load("control", f, tuple(size), 3) for f in files]
    stacked = torch.stack([images[i % len(images)] for i in range(num)])
    return ((stacked + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@dataclass
class SamplingInputs:
    """Every option's images, loaded once; ``batch(indices)`` is the request of those samples."""

    images: dict[str, list[Tensor] | list[list[Tensor]]]  # batch key -> its files' images (control: per ControlNet)
    manifest: dict[str, Any]  # option -> the files' sha256, for the job's manifest

    def batch(self, indices: range) -> dict[str, Tensor]:
        out = {}
        for key, images in self.images.items():
            if key == "conditioning_image":  # (B, K, C, H, W): one image per ControlNet
                out[key] = torch.stack([torch.stack([ims[i % len(ims)] for ims in images]) for i in indices])
            else:
                out[key] = torch.stack([images[i % len(images)] for i in indices])
        return out


def load_inputs(cfg: Any, model: Any) -> SamplingInputs | None:
    """The image inputs that ``cfg`` gives for ``model``; refused by name where the model takes other ones."""
    given = {option: cfg.get(option) for option in OPTIONS if cfg.get(option) is not None}
    condition = model.image_condition
    if condition is None:
        if given:
            raise ValueError(f"{', '.join(given)}=...: this checkpoint's model takes no image condition; leave them out")
        return None
    wanted = [option for option, key in OPTIONS.items() if key in condition.request_keys]
    unknown, missing = sorted(set(given) - set(wanted)), [o for o in wanted if o not in given]
    if unknown or missing:
        raise ValueError(f"this model's image_condition={condition.name} takes {', '.join(f'{o}=PATH' for o in wanted)} "
                         f"(an image file or a folder); got {', '.join(f'{o}=' for o in given) or 'none'}")
    factor = model.autoencoder.downsample_factor if model.autoencoder is not None else 1
    size = (model.image_shape[1] * factor, model.image_shape[2] * factor)
    channels = model.autoencoder.image_channels if model.autoencoder is not None else model.image_shape[0]
    images: dict[str, Any] = {}
    manifest: dict[str, Any] = {}
    for option in wanted:
        value = given[option]
        if option == "control":
            paths = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
            expected = len(model.backbone.controlnets)
            if len(paths) != expected:
                raise ValueError(f"control={value}: the model has {expected} ControlNet(s); give one path each, "
                                 f"control='[a, b]' for two")
            groups = [_files(option, p) for p in paths]
            images[OPTIONS[option]] = [[_load(option, f, size, channels) for f in files] for files in groups]
            manifest[option] = [[file_sha256(f) for f in files] for files in groups]
        else:
            files = _files(option, value)
            images[OPTIONS[option]] = [_load(option, f, size, channels) for f in files]
            manifest[option] = [file_sha256(f) for f in files]
    return SamplingInputs(images, manifest)
