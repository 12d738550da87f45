"""A tiny synthetic class folder for tests, in ImageNet's layout root/<class>/<image>: one colour
per class, coloured shapes on a grey background, PNGs and JPEGs, some nested below the class folder.

Class names are synset-like (``n01440764``) drawn at random, and written in an order that is not
the sorted one, so a test can tell that labels follow the sorted names."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def synset_names(classes: int, seed: int = 0) -> list[str]:
    """The class names :func:`make_class_folder` writes, in the (unsorted) order it writes them."""
    rng = np.random.default_rng(seed)
    names: list[str] = []
    while len(names) < classes:
        name = f"n{int(rng.integers(1_000_000, 15_000_000)):08d}"
        if name not in names:
            names.append(name)
    if classes > 1 and names == sorted(names):  # keep the written order unsorted
        names.reverse()
    return names


def class_colour(k: int, classes: int) -> tuple[int, int, int]:
    """The colour of the k-th class written: hues evenly spaced."""
    r, g, b = colorsys.hsv_to_rgb(k / max(classes, 1), 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_shape(colour: tuple[int, int, int], shape: str, size: tuple[int, int], offset: tuple[int, int]) -> Image.Image:
    w, h = size
    dx, dy = offset
    img = Image.new("RGB", (w, h), (128, 128, 128))
    pen = ImageDraw.Draw(img)
    box = (w // 4 + dx, h // 4 + dy, 3 * w // 4 + dx, 3 * h // 4 + dy)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([((box[0] + box[2]) // 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    return img


def make_class_folder(root: str | Path, classes: int = 4, per_class: int = 6, size: tuple[int, int] = (48, 40),
                      seed: int = 0) -> Path:
    """Write ``per_class`` images of ``size`` (width, height) in each of ``classes`` class folders
    under ``root``; every third image is a JPEG, every fourth lies in a ``sub/`` folder of its
    class. Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for k, name in enumerate(synset_names(classes, seed)):
        (root / name / "sub").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            offset = tuple(int(v) for v in rng.integers(-size[0] // 8, size[0] // 8 + 1, 2))
            img = draw_shape(class_colour(k, classes), SHAPES[i % len(SHAPES)], size, offset)
            file = f"{name}_{i:04d}.{'JPEG' if i % 3 == 2 else 'png'}"
            img.save(root / name / ("sub" if i % 4 == 3 else "") / file, quality=95)
    return root
