"""Folders of images with captions, as a Dataset and a LightningDataModule.

Captions come from ``metadata.csv`` or ``metadata.jsonl`` at the root (columns ``file_name``,
relative and possibly in a subfolder, and ``text``: Hugging Face's imagefolder convention), else
from ``.txt`` files beside the images (same stem). An image without a caption trains
unconditionally: caption ``""`` and ``has_caption`` False. Items are
``{"image": (3, H, W) in [-1, 1], "caption", "has_caption", "path", "index"}`` and SDXL's
micro-conditioning of the image (diffusion.conditioning.micro): ``original_size`` (h, w of the file),
``crop_top_left`` (top, left in the resized image, of the flipped image when flipped) and
``target_size`` (H, W).

With a source of conditioning images (diffusion.data.conditioning_images: a metadata column, a
parallel folder or an on-the-fly annotator), items also hold ``conditioning_image`` (3, H, W) in
[-1, 1], resized, cropped, flipped and bucketed with its image.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from PIL import Image

import torch
from torch.utils.data import DataLoader

from diffusion._checks import check_choice
from diffusion.data.batching import batch_sampler, epoch_of
from diffusion.data.masks import mask_generator, random_mask
from diffusion.data.buckets import BucketConfig, assign_buckets, make_buckets
from diffusion.data.splits import SplitDataModule
from diffusion.data.annotators import annotate, annotator_identity
from diffusion.data.conditioning_images import (
    check_annotator,
    check_one_source,
    crop_like,
    folder_conditioning,
    inside,
    same_shape,
)
from diffusion.data.images import (
    ReplacesBadImages,
    IMAGE_EXTS,
    FolderScan,
    ImageRecord,
    augmentation_generator,
    check_bad_fraction,
    cover_size,
    list_images,
    load_rgb,
    read_size,
    resize_crop,
    scan_headers,
    to_tensor,
)

logger = logging.getLogger(__name__)
CROPS = ("center", "random")


def _key(file_name: str) -> str:
    return PurePosixPath(file_name.replace("\\", "/")).as_posix().removeprefix("./")


class Metadata(NamedTuple):
    path: Path  # metadata.csv or metadata.jsonl
    captions: dict[str, str]  # relative path -> caption
    conditioning: dict[str, Path]  # relative path -> its conditioning file (empty without a column)


def read_metadata(root: Path, caption_column: str = "text", conditioning_column: str | None = None) -> Metadata | None:
    """The captions (and with ``conditioning_column`` the conditioning files, relative to ``root``)
    of metadata.csv / .jsonl, or None if neither exists. Missing files are errors naming the row."""
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
    columns = ["file_name", caption_column, *([conditioning_column] if conditioning_column else [])]
    captions: dict[str, str] = {}
    conditioning: dict[str, Path] = {}
    for n, row in enumerate(rows, 1):
        if any(column not in row for column in columns):
            raise ValueError(f"{meta}, row {n}: needs columns {', '.join(map(repr, columns))}, has {sorted(row)}")
        key = _key(str(row["file_name"]))
        if not (root / key).is_file():
            raise FileNotFoundError(f"{meta}, row {n}: file_name {row['file_name']!r} does not exist under {root}")
        if key in captions:
            raise ValueError(f"{meta}, row {n}: file_name {key!r} is listed twice")
        captions[key] = "" if row[caption_column] is None else str(row[caption_column]).strip()
        if conditioning_column:
            value = row[conditioning_column]
            if value is None or not str(value).strip():
                raise ValueError(f"{meta}, row {n}: {key!r} has no conditioning image in column "
                                 f"{conditioning_column!r}; every image needs one")
            path = root / _key(str(value).strip())
            if not path.is_file():
                raise FileNotFoundError(f"{meta}, row {n}: conditioning image {value!r} (column "
                                        f"{conditioning_column!r}) does not exist under {root}")
            conditioning[key] = path
    if conditioning and (both := sorted(set(captions) & {p.relative_to(root).as_posix() for p in conditioning.values()})):
        raise ValueError(f"{meta}: {both[:5]} are listed both as file_name and as conditioning images; "
                         "a conditioning image is not a training image")
    return Metadata(meta, captions, conditioning)


def read_captions(root: Path, images: Sequence[Path], metadata: Metadata | None) -> list[str | None]:
    """The caption of each image (None: it has none), from the metadata file or else sidecars."""
    if metadata is not None:
        keys = {p.relative_to(root).as_posix() for p in images}
        if unlisted := sorted(set(metadata.captions) - keys):
            raise ValueError(f"{metadata.path} lists files that are not images of {root} (image_exts?): {unlisted[:5]}")
        return [metadata.captions.get(p.relative_to(root).as_posix()) for p in images]
    sidecars = (p.with_suffix(".txt") for p in images)
    return [s.read_text(encoding="utf-8").strip() if s.is_file() else None for s in sidecars]


def _conditioning_of(root: Path, images: list[Path], metadata: Metadata | None, conditioning_column: str | None,
                     conditioning_root: str | Path | None, image_exts: tuple[str, ...]) -> list[Path | None]:
    if conditioning_root is not None:
        return list(folder_conditioning(root, images, conditioning_root, image_exts))
    if conditioning_column is None:
        return [None] * len(images)
    assert metadata is not None
    if unlisted := [p for p in images if p.relative_to(root).as_posix() not in metadata.conditioning]:
        raise ValueError(f"{len(unlisted)} images under {root} have no row in {metadata.path}, so no conditioning "
                         f"image (column {conditioning_column!r}): {', '.join(map(str, unlisted[:5]))}; list them")
    return [metadata.conditioning[p.relative_to(root).as_posix()] for p in images]


def scan_folder(root: str | Path, max_bad_fraction: float = 0.05, image_exts: Iterable[str] = IMAGE_EXTS,
                caption_column: str = "text", conditioning_column: str | None = None,
                conditioning_root: str | Path | None = None) -> FolderScan:
    """List the images, read their captions and header sizes; unreadable headers are skipped.

    With ``conditioning_column`` (of the metadata file) or ``conditioning_root`` (a parallel folder)
    each record names its conditioning file, whose header is read too: an unreadable one makes its
    sample bad (counted with the unreadable images), one of another shape than its image is an
    error. Conditioning files under ``root`` are not training images."""
    root, image_exts = Path(root), tuple(image_exts)
    check_one_source(conditioning_column, conditioning_root, None)
    metadata = read_metadata(root, caption_column, conditioning_column) if root.is_dir() else None
    if conditioning_column is not None and metadata is None:
        raise FileNotFoundError(f"data.module.conditioning_column={conditioning_column!r} is a column of metadata.csv "
                                f"or metadata.jsonl, and {root} has neither")
    paths = list_images(root, image_exts)
    if metadata is not None and metadata.conditioning:
        conditioning_files = set(metadata.conditioning.values())
        paths = [p for p in paths if p not in conditioning_files]
    if conditioning_root is not None and (parts := inside(Path(conditioning_root), root)) is not None:
        paths = [p for p in paths if p.relative_to(root).parts[:len(parts)] != parts]
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(image_exts)}) under {root}")
    captions = read_captions(root, paths, metadata)
    conditioning = _conditioning_of(root, paths, metadata, conditioning_column, conditioning_root, image_exts)
    sizes, good, bad = scan_headers(root, paths, max_bad_fraction)
    caption_of, conditioning_of = dict(zip(paths, captions)), dict(zip(paths, conditioning))
    records, bad_conditioning = [], []
    for path, size in zip(good, sizes):
        if (file := conditioning_of[path]) is not None:
            try:
                file_size = read_size(file)
            except Exception:  # noqa: BLE001 - as scan_headers: any failure means "unreadable"
                bad_conditioning.append(file)
                continue
            if not same_shape(size, file_size):
                raise ValueError(f"conditioning image {file} is {file_size[0]}x{file_size[1]} and its image {path} "
                                 f"{size[0]}x{size[1]}: not the same shape; it must be the image's size or a rescale")
        records.append(ImageRecord(path, size, caption_of[path] or "", bool(caption_of[path]), file))
    if bad_conditioning:
        logger.warning("skipping %d images under %s whose conditioning image has an unreadable header: %s%s",
                       len(bad_conditioning), root, ", ".join(map(str, bad_conditioning[:5])),
                       " ..." if len(bad_conditioning) > 5 else "")
        bad = [*bad, *bad_conditioning]
        check_bad_fraction(bad, len(paths), max_bad_fraction, root)
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

    Conditioning images (``conditioning_column``, ``conditioning_root``, or ``annotator`` with
    ``annotator_options``; see diffusion.data.conditioning_images) take the crop and flip of their
    image, drawn once: the image is augmented as it would be without them. An annotator sees the
    image's final crop, flipped.

    An image that fails to decode (or whose conditioning image fails to) is counted and replaced by
    the next readable sample of its bucket, so batches stay full; the replacement is augmented with
    the key of the sample asked for. The count lives in shared memory, so DataLoader workers add up
    to one total, and more bad files than ``max_bad_fraction`` of all stops the run.
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
        conditioning_column: str | None = None,
        conditioning_root: str | Path | None = None,
        annotator: str | None = None,
        annotator_options: Mapping[str, Any] | None = None,
        masks: bool = False,
    ):
        check_one_source(conditioning_column, conditioning_root, annotator)
        self.masks = masks  # a random inpainting mask per (seed, epoch, index): diffusion.data.masks
        if isinstance(root, FolderScan):
            if conditioning_column is not None or conditioning_root is not None:
                raise ValueError("a FolderScan holds its conditioning files already; pass conditioning_column or "
                                 "conditioning_root to scan_folder")
            self.scan = root
        else:
            self.scan = scan_folder(root, max_bad_fraction, image_exts, caption_column, conditioning_column,
                                    conditioning_root)
        self.records = self.scan.records
        if not self.records:
            raise ValueError(f"no readable images under {self.scan.root}")
        with_files = sum(r.conditioning is not None for r in self.records)
        if with_files not in (0, len(self.records)):
            raise ValueError(f"{with_files} of {len(self.records)} images under {self.scan.root} have a conditioning "
                             "image; all or none must")
        if with_files and annotator is not None:
            raise ValueError(f"the images under {self.scan.root} have conditioning files and annotator={annotator!r} "
                             "is set too; conditioning images come from one source at most")
        self.annotator, self.annotator_options = annotator, check_annotator(annotator, annotator_options)
        self.has_conditioning = bool(with_files) or annotator is not None
        self.resolution, self.crop, self.hflip = resolution, check_choice("crop", crop, CROPS), hflip
        self.max_bad_fraction, self.seed = max_bad_fraction, seed
        self.bucket_config = BucketConfig.coerce(buckets)
        if self.bucket_config is None:
            self.buckets, self.bucket_ids = [(resolution, resolution)], [0] * len(self.records)
        else:
            self.buckets = make_buckets(resolution, self.bucket_config.multiple, self.bucket_config.max_ratio)
            self.bucket_ids = assign_buckets([r.size for r in self.records], self.buckets)
        self._group(self.bucket_ids)

    def _decode(self, record: ImageRecord, target: tuple[int, int]) -> tuple[Image.Image, Image.Image | None]:
        image = load_rgb(record.path, target)
        if record.conditioning is None:
            return image, None
        try:
            return image, load_rgb(record.conditioning, target)
        except Exception as e:  # noqa: BLE001 - any failure makes the sample bad; say which file it was
            raise OSError(f"its conditioning image {record.conditioning} is unreadable ({type(e).__name__}: {e})") from e

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch = epoch_of(index)
        index = range(len(self))[index]  # negative indices, and IndexError past the end
        bucket = self.bucket_ids[index]
        target = self.buckets[bucket]
        found = self._readable(index, bucket, lambda record: self._decode(record, target))
        if found is None:
            raise RuntimeError(f"every image of bucket {target} under {self.scan.root} is unreadable")
        candidate, (img, conditioning) = found
        record = self.records[candidate]
        generator = augmentation_generator(self.seed, epoch, index)  # the asked-for sample's key
        coin = bool(torch.rand((), generator=generator) < 0.5)  # drawn with or without hflip: the crop's draws follow
        flip = self.hflip and coin
        cover = cover_size(img.size, target)  # the size resize_crop resizes to
        img, (top, left) = resize_crop(img, target, self.crop, generator)
        conditioning_image = None
        if conditioning is not None:
            conditioning_image = to_tensor(crop_like(conditioning, cover, target, top, left))
            conditioning_image = conditioning_image.flip(-1) if flip else conditioning_image
        elif self.annotator is not None:  # the training view itself, flipped first: exactly annotate(image)
            view = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img
            conditioning_image = to_tensor(annotate(view, self.annotator, **self.annotator_options))
        image = to_tensor(img)
        if flip:
            image = image.flip(-1)
            # diffusers' SDXL script flips before it crops: the same pixels, cropped from the right.
            left = cover[0] - target[1] - left
        item = {"image": image}
        if conditioning_image is not None:
            item["conditioning_image"] = conditioning_image
        if self.masks:  # drawn for the sample asked for, like its crop: a replacement keeps the mask's key
            item["mask"] = random_mask(*target, mask_generator(self.seed, epoch, index))
        width, height = record.size
        return {**item, "caption": record.caption, "has_caption": record.has_caption,
                "path": str(record.path), "index": candidate,
                "original_size": torch.tensor([height, width]), "crop_top_left": torch.tensor([top, left]),
                "target_size": torch.tensor(target)}


class ImageCaptionDataModule(SplitDataModule):
    """Image-caption folders for training; ``image_shape`` is the nominal (square) resolution.

    Validation: ``val_root`` (another folder) or a fixed ``val_fraction`` of ``root`` chosen by
    ``seed``; with neither there is no validation. Validation images are center-cropped, unflipped.

    Conditioning images (batches gain ``conditioning_image``), from one source at most:
    ``conditioning_column`` of the metadata file, ``conditioning_root`` (with ``val_root``, also
    ``val_conditioning_root``), or ``annotator`` (``canny``, ``grayscale``, ``low_resolution``,
    ``depth``) with ``annotator_options`` (``low``/``high``: Canny's thresholds, 100/200; ``factor``: 8;
    ``model``: the depth estimator, a hub id or a local directory, Intel/dpt-hybrid-midas).
    ``masks``: each item a random inpainting ``mask`` (image_condition=inpaint), new each epoch.
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
        conditioning_column: str | None = None,
        conditioning_root: str | Path | None = None,
        val_conditioning_root: str | Path | None = None,
        annotator: str | None = None,
        annotator_options: Mapping[str, Any] | None = None,
        masks: bool = False,
    ):
        super().__init__()
        self.masks = masks
        self.check_split(val_fraction, val_root)
        for key, folder in (("root", root), ("val_root", val_root)):
            if folder is not None and not Path(folder).is_dir():
                raise FileNotFoundError(f"image folder {folder} does not exist; set data.module.{key} to a folder of images")
        check_one_source(conditioning_column, conditioning_root, annotator)
        if (val_root is not None and conditioning_root is not None) != (val_conditioning_root is not None):
            raise ValueError("data.module.val_conditioning_root is the conditioning folder of val_root: set it when "
                             "both val_root and conditioning_root are set, and only then")
        self.annotator, self.annotator_options = annotator, check_annotator(annotator, annotator_options)
        self.conditioning_root, self.val_conditioning_root = conditioning_root, val_conditioning_root
        self.root, self.resolution, self.batch_size = Path(root), resolution, batch_size
        self.buckets, self.crop, self.hflip = BucketConfig.coerce(buckets), check_choice("crop", crop, CROPS), hflip
        self.val_fraction, self.val_root, self.num_workers, self.seed = val_fraction, val_root, num_workers, seed
        self.max_bad_fraction = max_bad_fraction
        self.scan_kwargs = dict(max_bad_fraction=max_bad_fraction, image_exts=tuple(image_exts),
                                caption_column=caption_column, conditioning_column=conditioning_column)
        self.train_set: ImageCaptionDataset | None = None
        self.val_set: ImageCaptionDataset | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    @property
    def conditioning_source(self) -> dict[str, Any] | None:
        """Where the conditioning images come from (None: there are none), e.g. for a cache's fingerprint."""
        if self.annotator is not None:
            source = {"annotator": self.annotator, "options": dict(sorted(self.annotator_options.items()))}
            identity = annotator_identity(self.annotator, self.annotator_options)  # a model's weights, if any
            return {**source, "weights": identity} if identity is not None else source
        if self.scan_kwargs["conditioning_column"] is not None:
            return {"conditioning_column": self.scan_kwargs["conditioning_column"]}
        if self.conditioning_root is not None:
            return {"conditioning_root": str(self.conditioning_root)}
        return None

    def _dataset(self, scan: FolderScan, train: bool) -> ImageCaptionDataset:
        return ImageCaptionDataset(scan, self.resolution, self.buckets, self.crop if train else "center",
                                   self.hflip and train, self.max_bad_fraction, seed=self.seed,
                                   annotator=self.annotator, annotator_options=self.annotator_options,
                                   masks=self.masks)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        scan = scan_folder(self.root, conditioning_root=self.conditioning_root, **self.scan_kwargs)
        val_scan = None
        if self.val_root is not None:
            val_scan = scan_folder(self.val_root, conditioning_root=self.val_conditioning_root, **self.scan_kwargs)
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
