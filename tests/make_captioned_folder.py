"""A tiny synthetic image-caption folder for tests: coloured shapes on a grey background,
captions like "a red circle", in each caption layout the data module reads."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
DEFAULT_SIZES = ((64, 48), (48, 64), (64, 64))


def synthetic_items(
    n: int = 12, sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, uncaptioned: int = 0
) -> list[dict]:
    """What :func:`make_captioned_folder` writes, item by item: ``file_name`` (relative; every
    fourth in ``sub/``, every third a JPEG), ``caption`` (None for the last ``uncaptioned``),
    ``size`` (width, height), ``colour`` and ``shape``."""
    items = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        name = f"img_{i:03d}.{'jpg' if i % 3 == 2 else 'png'}"
        items.append({
            "file_name": f"sub/{name}" if i % 4 == 3 else name,
            "caption": None if i >= n - uncaptioned else f"a {colour} {shape}",
            "size": tuple(sizes[i % len(sizes)]),
            "colour": colour,
            "shape": shape,
        })
    return items


def draw(colour: str, shape: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    img = Image.new("RGB", (w, h), (128, 128, 128))
    pen = ImageDraw.Draw(img)
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(w // 2, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)], fill=COLOURS[colour])
    return img


def make_captioned_folder(root: str | Path, n: int = 12, sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
                          layout: str = "csv", corrupt: int = 0, uncaptioned: int = 0) -> Path:
    """Write ``n`` images (sizes ``(width, height)`` in turn) with captions as ``layout``
    ("csv": metadata.csv, "jsonl": metadata.jsonl, "txt": sidecar .txt files), plus ``corrupt``
    bad files with captions: ``bad_000.png`` random bytes (header unreadable), ``bad_001.png`` a
    truncated PNG (header fine, decoding fails), alternating. Returns ``root``."""
    if layout not in ("csv", "jsonl", "txt"):
        raise ValueError(f"layout must be csv, jsonl or txt, got {layout!r}")
    root = Path(root)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    rows = []
    for item in synthetic_items(n, sizes, uncaptioned):
        draw(item["colour"], item["shape"], item["size"]).save(root / item["file_name"], quality=95)
        if item["caption"] is not None:
            rows.append((item["file_name"], item["caption"]))
    rng = np.random.default_rng(0)
    for k in range(corrupt):
        path = root / f"bad_{k:03d}.png"
        if k % 2 == 0:
            path.write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
        else:  # noise compresses badly, so cutting the file in half cuts into the pixel data
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        rows.append((path.name, "a broken file"))
    if layout == "csv":
        with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("file_name", "text"), *rows])
    elif layout == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows))
    else:
        for file_name, text in rows:
            (root / file_name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    return root
