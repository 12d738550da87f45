"""Image files for training: listing, header-only scans, decoding, resize-to-cover and crop.

Setup reads only headers (size and EXIF orientation), so scanning a large folder costs one small
read a file; pixels are decoded in ``__getitem__``. Sizes are ``(width, height)`` as PIL gives
them; targets are ``(height, width)`` as tensors have them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from diffusion._checks import check_choice
from diffusion.training.randomness import sample_seed

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESAMPLE = Image.Resampling.BICUBIC
BAD_FRACTION_KEY = "data.module.max_bad_fraction"  # the config key named in errors
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the image upright (as PIL's ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}
# Leads the key of augmentation draws, so they never share a stream with the training draws
# (keyed (seed, epoch, batch, position), epochs far below this).
_AUGMENTATION_STREAM = int.from_bytes(b"augment", "big")


class TooManyBadImagesError(RuntimeError):
    """More unreadable images than ``max_bad_fraction`` allows."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    size: tuple[int, int]  # (width, height), upright
    caption: str
    has_caption: bool
    conditioning: Path | None = None  # its conditioning image file, when the folder has them


@dataclass
class FolderScan:
    """The readable images of a folder, and the files whose header could not be read."""

    root: Path
    records: list[ImageRecord]
    bad: list[Path]
    total: int  # files found, readable or not: what the bad fraction is a fraction of


def list_images(root: str | Path, exts: Iterable[str] = IMAGE_EXTS) -> list[Path]:
    """Image files under ``root`` (recursive; hidden files and folders skipped), sorted by their
    relative path so every run sees the same order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; set data.module.root to a folder of images")
    exts = {e.lower() for e in exts}

    def wanted(p: Path) -> bool:
        hidden = any(part.startswith(".") for part in p.relative_to(root).parts)
        return p.suffix.lower() in exts and not hidden and p.is_file()

    found = [p for p in root.rglob("*") if wanted(p)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _orientation(img: Image.Image) -> int:
    # From the EXIF parsed with the header only: PNG's getexif() would decode the whole image.
    raw = img.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return int(exif.get(_ORIENTATION_TAG, 1))


def read_size(path: str | Path) -> tuple[int, int]:
    """Upright ``(width, height)`` from the header, without decoding pixels."""
    with Image.open(path) as img:
        w, h = img.size
        return (h, w) if _orientation(img) in _SWAPS_AXES else (w, h)


def check_bad_fraction(bad: Sequence[Path], total: int, max_bad_fraction: float, root: Path) -> None:
    if len(bad) > max_bad_fraction * total:
        first = ", ".join(str(p) for p in bad[:5])
        raise TooManyBadImagesError(
            f"{len(bad)} of {total} image files under {root} are unreadable or corrupt "
            f"({len(bad) / max(total, 1):.1%}), more than max_bad_fraction={max_bad_fraction}; first: {first}. "
            f"Fix or remove them, or raise {BAD_FRACTION_KEY}."
        )


def scan_headers(
    root: Path, paths: Sequence[Path], max_bad_fraction: float
) -> tuple[list[tuple[int, int]], list[Path], list[Path]]:
    """``(sizes, good paths, bad paths)``; files whose header can't be read are bad, logged in one
    warning, and the run stops if they are more than ``max_bad_fraction`` of all files."""
    sizes, good, bad = [], [], []
    for path in paths:
        try:
            sizes.append(read_size(path))
            good.append(path)
        except Exception:  # noqa: BLE001 - PIL raises many types for malformed headers; all mean "unreadable"
            bad.append(path)
    if bad:
        logger.warning("skipping %d of %d image files under %s with unreadable headers: %s%s", len(bad), len(paths),
                       root, ", ".join(str(p) for p in bad[:5]), " ..." if len(bad) > 5 else "")
    check_bad_fraction(bad, len(paths), max_bad_fraction, root)
    return sizes, good, bad


def cover_size(size: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` of ``size`` scaled (aspect kept) to the smallest size covering ``target_hw``."""
    (w, h), (th, tw) = size, target_hw
    scale = max(tw / w, th / h)
    return max(tw, round(w * scale)), max(th, round(h * scale))


def load_rgb(path: str | Path, target_hw: tuple[int, int] | None = None) -> Image.Image:
    """Decode to upright RGB. With ``target_hw``, a JPEG is decoded at a reduced scale that still
    covers it (``draft``), several times faster for photos much larger than the training size."""
    with Image.open(path) as img:
        orientation = _orientation(img)
        if target_hw is not None:
            w, h = img.size
            upright = (h, w) if orientation in _SWAPS_AXES else (w, h)
            cw, ch = cover_size(upright, target_hw)
            img.draft("RGB", (ch, cw) if orientation in _SWAPS_AXES else (cw, ch))
        img.load()  # raises here for truncated or corrupt data
        if orientation in _UPRIGHT:
            img = img.transpose(_UPRIGHT[orientation])
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Transparent pixels often hold black or junk colours; composite on white, as viewers show them.
            rgba = img.convert("RGBA")
            out = Image.new("RGB", rgba.size, (255, 255, 255))
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out
        return img.convert("RGB")


def resize_crop(
    img: Image.Image, target_hw: tuple[int, int], crop: str = "center", generator: torch.Generator | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover ``target_hw`` and crop to it; returns the crop and its ``(top, left)``.
    A random crop draws its offsets from ``generator`` (required: a dataset seeds one per sample,
    so the crop does not depend on which worker loads it or on what was drawn before)."""
    check_choice("crop", crop, ("center", "random"))
    if crop == "random" and generator is None:
        raise ValueError("resize_crop(crop='random') needs a generator: pass a torch.Generator seeded for this sample")
    th, tw = target_hw
    cw, ch = cover_size(img.size, target_hw)
    if (cw, ch) != img.size:
        img = img.resize((cw, ch), RESAMPLE)
    if crop == "center":
        top, left = (ch - th) // 2, (cw - tw) // 2
    else:
        top = int(torch.randint(0, ch - th + 1, (), generator=generator).item())
        left = int(torch.randint(0, cw - tw + 1, (), generator=generator).item())
    return img.crop((left, top, left + tw, top + th)), (top, left)


def augmentation_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's random crop and flip, seeded with (seed, epoch, index) only:
    a resumed run, another number of workers or of processes augment each sample the same way."""
    return torch.Generator().manual_seed(sample_seed(seed, _AUGMENTATION_STREAM, epoch, index))


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    array = np.array(img, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants
    return torch.from_numpy(array).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ReplacesBadImages(Dataset):
    """A dataset of image records in groups (a size bucket, a class) that replaces an image whose
    pixels fail to decode by the next readable one of its group, so a batch stays full and of one
    kind. The failures are counted in shared memory (DataLoader workers add up to one total) with
    the unreadable headers of the scan, and more than ``max_bad_fraction`` of all files stops the run.
    Subclasses call ``_group(groups)`` with each record's group and decode through ``_readable``."""

    scan: Any  # .root, .bad, .total: a FolderScan or a scan of class folders
    records: Sequence[Any]  # each with .path
    max_bad_fraction: float

    def _group(self, groups: Sequence[int]) -> None:
        self.members: dict[int, list[int]] = {}
        for index, group in enumerate(groups):
            self.members.setdefault(group, []).append(index)
        self.position = {i: n for members in self.members.values() for n, i in enumerate(members)}
        self.decode_bad = torch.zeros(len(self.records), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def bad_paths(self) -> list[Path]:
        """Files skipped so far: unreadable headers at setup, then failed decodes."""
        return [*self.scan.bad, *(self.records[i].path for i in self.decode_bad.nonzero().flatten().tolist())]

    @property
    def num_bad(self) -> int:
        return len(self.scan.bad) + int(self.decode_bad.sum())

    def _readable(self, index: int, group: int, decode: Callable[[Any], Any]) -> tuple[int, Any] | None:
        """``(candidate, decoded)``: record ``index`` decoded, or the next readable record of its group;
        None when none of the group decodes. ``decode`` raising for any of a sample's files (its image,
        its conditioning image) makes the whole sample bad."""
        members, start = self.members[group], self.position[index]
        for step in range(len(members)):
            candidate = members[(start + step) % len(members)]
            if self.decode_bad[candidate]:
                continue
            try:
                return candidate, decode(self.records[candidate])
            except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean "unreadable"
                self.decode_bad[candidate] = True
                logger.warning("skipping unreadable image %s (%s: %s)", self.records[candidate].path, type(e).__name__, e)
                check_bad_fraction(self.bad_paths, self.scan.total, self.max_bad_fraction, self.scan.root)
        return None
