"""Conditioning images of an image folder (a ControlNet's condition): where they come from and how
they follow their image through resize, crop and flip.

Three sources, at most one at a time:

- ``conditioning_column``: a column of ``metadata.csv`` / ``metadata.jsonl`` holding each image's
  conditioning file, relative to the root (diffusers' ControlNet example calls it
  ``conditioning_image``);
- ``conditioning_root``: a parallel folder holding, for ``root/sub/a.jpg``, ``conditioning_root/sub/a.*``
  (the same relative path and stem, any image extension);
- ``annotator``: computed on the fly by :func:`diffusion.data.annotators.annotate` from the training
  view of the image, after resize, crop and flip, so that the condition is exactly
  ``annotate(image)`` at the training resolution: Canny edges one pixel wide and binary, as
  users compute them on the image they condition on at sampling (an edge map of the full-size file,
  then resized, would be blurred and grey); a depth map normalised over the crop itself; the pose
  skeleton of the person ViTPose finds in the whole crop (its box).

A file's conditioning image may be of another size than its image, but not of another shape (1 %):
it is resized to the size the image is resized to and cropped at the same offsets, so an image and
a copy of it as its conditioning image give equal tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from diffusion.data.annotators import ANNOTATORS, WEIGHTED, annotate, annotator_identity, check_available
from diffusion.data.images import RESAMPLE, list_images
from diffusion.data.pose import DEFAULT_THRESHOLD, check_threshold

# The settings of each annotator (the keyword arguments of annotate it reads).
ANNOTATOR_OPTIONS = {"canny": ("low", "high"), "grayscale": (), "low_resolution": ("factor",), "depth": ("model",),
                     "pose": ("model", "threshold")}
_KEYS = "data.module.conditioning_column, data.module.conditioning_root or data.module.annotator"


def check_one_source(conditioning_column: str | None, conditioning_root: str | Path | None,
                     annotator: str | None) -> None:
    """At most one source of conditioning images; two or more is an error naming them."""
    given = {"conditioning_column": conditioning_column, "conditioning_root": conditioning_root,
             "annotator": annotator}
    set_ = [f"{key}={value!r}" for key, value in given.items() if value is not None]
    if len(set_) > 1:
        raise ValueError(f"conditioning images come from one source at most, got {', '.join(set_)}; "
                         f"keep one of {_KEYS}")


def check_annotator(annotator: str | None, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The annotator's options as keyword arguments of ``annotate``, checked now (a bad value would
    otherwise fail in a DataLoader worker at the first sample)."""
    options = dict(options or {})
    if annotator is None:
        if options:
            raise ValueError(f"data.module.annotator_options={options} are given without an annotator; "
                             f"set data.module.annotator to one of {', '.join(ANNOTATORS)}")
        return options
    check_available(annotator)
    if unknown := sorted(set(options) - set(ANNOTATOR_OPTIONS[annotator])):
        allowed = ", ".join(ANNOTATOR_OPTIONS[annotator]) or "none"
        raise ValueError(f"annotator {annotator!r} takes no option {', '.join(unknown)}; its options: {allowed}")
    if annotator in WEIGHTED:
        annotator_identity(annotator, options)  # loads the model once for this process: a bad one fails now
    if annotator == "pose":
        check_threshold(options.get("threshold", DEFAULT_THRESHOLD))
    elif annotator not in WEIGHTED:
        annotate(Image.new("RGB", (4, 4)), annotator, **options)  # raises for bad values, naming them
    return options


def folder_conditioning(root: Path, images: Sequence[Path], conditioning_root: str | Path,
                        image_exts: Iterable[str]) -> list[Path]:
    """The conditioning file of each image: the file of ``conditioning_root`` with the image's
    relative path and stem, of any extension of ``image_exts``. A missing or ambiguous one is an error."""
    conditioning_root, image_exts = Path(conditioning_root), tuple(image_exts)
    if not conditioning_root.is_dir():
        raise FileNotFoundError(f"conditioning folder {conditioning_root} does not exist; set "
                                "data.module.conditioning_root to a folder of conditioning images")
    by_stem: dict[str, list[Path]] = {}
    for path in list_images(conditioning_root, image_exts):
        by_stem.setdefault(path.relative_to(conditioning_root).with_suffix("").as_posix(), []).append(path)
    found, missing = [], []
    for image in images:
        stem = image.relative_to(root).with_suffix("").as_posix()
        candidates = by_stem.get(stem, [])
        if len(candidates) > 1:
            raise ValueError(f"image {image} has {len(candidates)} conditioning images in {conditioning_root}: "
                             f"{', '.join(p.name for p in candidates)}; keep one")
        if candidates:
            found.append(candidates[0])
        else:
            missing.append(f"{image} (no {conditioning_root / stem}.*)")
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(images)} images have no conditioning image of the same relative path and "
            f"stem ({', '.join(image_exts)}) under data.module.conditioning_root={conditioning_root}: "
            f"{'; '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return found


def inside(folder: Path, root: Path) -> tuple[str, ...] | None:
    """The parts of ``folder`` relative to ``root`` when it lies inside it (its files are then not
    training images), else None."""
    folder, root = folder.resolve(), root.resolve()
    if folder == root:
        raise ValueError(f"data.module.conditioning_root={folder} is the image folder itself; "
                         "keep the conditioning images in a folder of their own")
    return folder.relative_to(root).parts if folder.is_relative_to(root) else None


def same_shape(size: tuple[int, int], conditioning_size: tuple[int, int]) -> bool:
    """Whether a conditioning image of ``conditioning_size`` (width, height) is ``size`` rescaled:
    aspect ratios within 1 %, or within one pixel's rounding."""
    (w, h), (cw, ch) = size, conditioning_size
    return abs(cw * h - ch * w) <= max(0.01 * cw * h, w, h)  # one conditioning pixel is w or h here


def crop_like(conditioning: Image.Image, cover: tuple[int, int], target_hw: tuple[int, int],
              top: int, left: int) -> Image.Image:
    """``conditioning`` resized to ``cover`` (width, height), the size its image was resized to, and
    cropped at the image's (unflipped) offsets: what :func:`resize_crop` did to the image."""
    if conditioning.size != cover:
        conditioning = conditioning.resize(cover, RESAMPLE)
    th, tw = target_hw
    return conditioning.crop((left, top, left + tw, top + th))
