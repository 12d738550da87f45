"""Folders of images with captions, as a Dataset and a LightningDataModule.

Captions come from ``metadata.csv`` or ``metadata.jsonl`` at the root (columns ``file_name``,
relative and possibly in a subfolder, and ``text``: Hugging Face's imagefolder convention), else
from ``.txt`` files beside the images (same stem). An image without a caption trains
unconditionally: caption ``""`` and ``has_caption`` False. Items are
``{"image": (3, H, W) in [-1, 1], "caption", "has_caption", "path", "index"}`` and SDXL's
micro-conditioning of the image (diffusion.conditioning.micro): ``original_size`` (h, w of the file),
``crop_top_left`` (top, left in the resized image, of the flipped image when flipped) and
``target_size`` (H, W).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch.utils.data import DataLoader

from diffusion._checks import check_choice
from diffusion.data.batching import batch_sampler, epoch_of
from diffusion.data.buckets import BucketConfig, assign_buckets, make_buckets
from diffusion.data.splits import SplitDataModule
from diffusion.data.images import (
    ReplacesBadImages,
    IMAGE_EXTS,
    FolderScan,
    ImageRecord,
    augmentation_generator,
    cover_size,
    list_images,
    load_rgb,
    resize_crop,
    scan_headers,
    to_tensor,
)

logger = logging.getLogger(__name__)
CROPS = ("center", "random")


def _key(file_name: str) -> str:
    return PurePosixPath(file_name.replace("\\", "/")).as_posix().removeprefix("./")


def read_metadata(root: Path, caption_column: str = "text") -> tuple[Path, dict[str, str]] | None:
    """``(metadata file, {relative path: caption})`` from metadata.csv / .jsonl, or None if neither exists."""
    found = [root / name for name in ("metadata.csv", "metadata.jsonl") if (root / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"{root} holds both metadata.csv and metadata.jsonl; keep one")
    if not found:
        return None
    meta = found[0]
    if meta.suffix == ".csv":
        with meta.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
            rows = list(csv.DictReader(f))
    else:
        rows = []
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{meta}, line {n}: not valid JSON ({e})") from e
    captions: dict[str, str] = {}
    for n, row in enumerate(rows, 1):
        if "file_name" not in row or caption_column not in row:
            raise ValueError(f"{meta}, row {n}: needs columns 'file_name' and {caption_column!r}, has {sorted(row)}")
        key = _key(str(row["file_name"]))
        if not (root / key).is_file():
            raise FileNotFoundError(f"{meta}, row {n}: file_name {row['file_name']!r} does not exist under {root}")
        if key in captions:
            raise ValueError(f"{meta}, row {n}: file_name {key!r} is listed twice")
        captions[key] = "" if row[caption_column] is None else str(row[caption_column]).strip()
    return meta, captions


def read_captions(root: Path, images: Sequence[Path], caption_column: str = "text") -> list[str | None]:
    """The caption of each image (None: it has none), from the metadata file or else sidecars."""
    metadata = read_metadata(root, caption_column)
    if metadata is not None:
        meta, captions = metadata
        keys = {p.relative_to(root).as_posix() for p in images}
        if unlisted := sorted(set(captions) - keys):
            raise ValueError(f"{meta} lists files that are not images of {root} (image_exts?): {unlisted[:5]}")
        return [captions.get(p.relative_to(root).as_posix()) for p in images]
    sidecars = (p.with_suffix(".txt") for p in images)
    return [s.read_text(encoding="utf-8").strip() if s.is_file() else None for s in sidecars]


def scan_folder(root: str | Path, max_bad_fraction: float = 0.05, image_exts: Iterable[str] = IMAGE_EXTS,
                caption_column: str = "text") -> FolderScan:
    """List the images, read their captions and header sizes; unreadable headers are skipped."""
    root, image_exts = Path(root), tuple(image_exts)
    paths = list_images(root, image_exts)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(image_exts)}) under {root}")
    captions = read_captions(root, paths, caption_column)
    sizes, good, bad = scan_headers(root, paths, max_bad_fraction)
    caption_of = dict(zip(paths, captions))
    records = [ImageRecord(p, s, caption_of[p] or "", bool(caption_of[p])) for p, s in zip(good, sizes)]
    if missing := sum(not r.has_caption for r in records):
        logger.warning("%d of %d images under %s have no caption; they train unconditionally (caption '')",
                       missing, len(records), root)
    return FolderScan(root, records, bad, total=len(paths))


class ImageCaptionDataset(ReplacesBadImages):
    """Images of a folder (or of a :class:`FolderScan`), resized and cropped to ``resolution``
    square, or with ``buckets`` to the closest aspect-ratio bucket of about that area.

    A random crop and flip are drawn from a generator seeded with (``seed``, epoch, index): the
    epoch comes with the index from the data module's sampler (a plain int index is epoch 0), so
    each sample is augmented the same way whatever the worker, the number of workers or of
    processes, and after a resume. The flip's coin is drawn first, so the crop does not change it.

    An image that fails to decode is counted and replaced by the next readable image of its
    bucket, so batches stay full; the replacement is augmented with the key of the sample asked
    for. The count lives in shared memory, so DataLoader workers add up to one total, and more bad
    files than ``max_bad_fraction`` of all stops the run.
    """

    def __init__(
        self,
        root: str | Path | FolderScan,
        resolution: int = 256,
        buckets: bool | BucketConfig | Mapping[str, Any] = False,
        crop: str = "center",
        hflip: bool = False,
        max_bad_fraction: float = 0.05,
        image_exts: Iterable[str] = IMAGE_EXTS,
        caption_column: str = "text",
        seed: int = 0,
    ):
        if isinstance(root, FolderScan):
            self.scan = root
        else:
            self.scan = scan_folder(root, max_bad_fraction, image_exts, caption_column)
        self.records = self.scan.records
        if not self.records:
            raise ValueError(f"no readable images under {self.scan.root}")
        self.resolution, self.crop, self.hflip = resolution, check_choice("crop", crop, CROPS), hflip
        self.max_bad_fraction, self.seed = max_bad_fraction, seed
        self.bucket_config = BucketConfig.coerce(buckets)
        if self.bucket_config is None:
            self.buckets, self.bucket_ids = [(resolution, resolution)], [0] * len(self.records)
        else:
            self.buckets = make_buckets(resolution, self.bucket_config.multiple, self.bucket_config.max_ratio)
            self.bucket_ids = assign_buckets([r.size for r in self.records], self.buckets)
        self._group(self.bucket_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch = epoch_of(index)
        index = range(len(self))[index]  # negative indices, and IndexError past the end
        bucket = self.bucket_ids[index]
        found = self._readable(index, bucket, lambda record: load_rgb(record.path, self.buckets[bucket]))
        if found is not None:
            candidate, img = found
            record = self.records[candidate]
            generator = augmentation_generator(self.seed, epoch, index)  # the asked-for sample's key
            flip = bool(torch.rand((), generator=generator) < 0.5)
            target = self.buckets[bucket]
            cover_w, _ = cover_size(img.size, target)  # the width resize_crop resizes to
            img, (top, left) = resize_crop(img, target, self.crop, generator)
            image = to_tensor(img)
            if self.hflip and flip:
                image = image.flip(-1)
                # diffusers' SDXL script flips before it crops: the same pixels, cropped from the right.
                left = cover_w - target[1] - left
            width, height = record.size
            return {"image": image, "caption": record.caption, "has_caption": record.has_caption,
                    "path": str(record.path), "index": candidate,
                    "original_size": torch.tensor([height, width]), "crop_top_left": torch.tensor([top, left]),
                    "target_size": torch.tensor(target)}
        raise RuntimeError(f"every image of bucket {self.buckets[bucket]} under {self.scan.root} is unreadable")


class ImageCaptionDataModule(SplitDataModule):
    """Image-caption folders for training; ``image_shape`` is the nominal (square) resolution.

    Validation: ``val_root`` (another folder) or a fixed ``val_fraction`` of ``root`` chosen by
    ``seed``; with neither there is no validation. Validation images are center-cropped, unflipped.
    """

    num_classes = None

    def __init__(
        self,
        root: str | Path,
        resolution: int = 256,
        batch_size: int = 16,
        buckets: bool | BucketConfig | Mapping[str, Any] = False,
        crop: str = "center",
        hflip: bool = False,
        val_fraction: float = 0.0,
        val_root: str | Path | None = None,
        num_workers: int = 0,
        seed: int = 0,
        max_bad_fraction: float = 0.05,
        caption_column: str = "text",
        image_exts: Sequence[str] = IMAGE_EXTS,
    ):
        super().__init__()
        self.check_split(val_fraction, val_root)
        for key, folder in (("root", root), ("val_root", val_root)):
            if folder is not None and not Path(folder).is_dir():
                raise FileNotFoundError(f"image folder {folder} does not exist; set data.module.{key} to a folder of images")
        self.root, self.resolution, self.batch_size = Path(root), resolution, batch_size
        self.buckets, self.crop, self.hflip = BucketConfig.coerce(buckets), check_choice("crop", crop, CROPS), hflip
        self.val_fraction, self.val_root, self.num_workers, self.seed = val_fraction, val_root, num_workers, seed
        self.max_bad_fraction = max_bad_fraction
        self.scan_kwargs = dict(max_bad_fraction=max_bad_fraction, image_exts=tuple(image_exts),
                                caption_column=caption_column)
        self.train_set: ImageCaptionDataset | None = None
        self.val_set: ImageCaptionDataset | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    def _dataset(self, scan: FolderScan, train: bool) -> ImageCaptionDataset:
        return ImageCaptionDataset(scan, self.resolution, self.buckets, self.crop if train else "center",
                                   self.hflip and train, self.max_bad_fraction, seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        scan = scan_folder(self.root, **self.scan_kwargs)
        val_scan = scan_folder(self.val_root, **self.scan_kwargs) if self.val_root is not None else None
        if self.val_fraction:
            order = torch.randperm(len(scan.records), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = max(1, round(self.val_fraction * len(order)))
            val_ids, train_ids = sorted(order[:n_val]), sorted(order[n_val:])
            # Both splits keep the folder's header failures and file count: the bad fraction is the folder's.
            val_scan = FolderScan(scan.root, [scan.records[i] for i in val_ids], scan.bad, scan.total)
            scan = FolderScan(scan.root, [scan.records[i] for i in train_ids], scan.bad, scan.total)
        self.train_set = self._dataset(scan, train=True)
        self.val_set = self._dataset(val_scan, train=False) if val_scan is not None else None

    def _loader(self, dataset: ImageCaptionDataset, train: bool) -> DataLoader:
        # Groups by (H, W) rather than bucket index: the same batches, and errors name the shapes.
        groups = [dataset.buckets[b] for b in dataset.bucket_ids] if self.buckets is not None else len(dataset)
        sampler = batch_sampler(self.trainer, groups, self.batch_size, train=train, seed=self.seed)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)
