"""Class-labelled image folders in ImageNet's layout, ``root/<class>/<image>`` (images directly in
the class folder or nested below it), as a Dataset and a LightningDataModule.

The classes are the sub-folder names sorted, so ImageNet's synset folders (n01440764, ...) get the
standard indices 0..999. Images are preprocessed as ADM and DiT do (:func:`center_crop_arr`), with
an optional horizontal flip keyed to (seed, epoch, index) as the caption folders key theirs. Items
are ``{"image": (3, R, R) in [-1, 1], "label": int64, "path", "index"}``.

The class list (names in index order) is what gives a label its meaning, so it travels with the
run: the data module's ``state_dict`` (Lightning writes it into every checkpoint, under the
module's class name, and a resume with other class names is refused) and ``classes.json`` in the
run directory (and in a cache directory, which a run from the cache copies).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffusion.data.batching import batch_sampler, epoch_of
from diffusion.data.splits import SplitDataModule
from diffusion.data.images import (
    ReplacesBadImages,
    IMAGE_EXTS,
    augmentation_generator,
    list_images,
    load_rgb,
    scan_headers,
    to_tensor,
)
from diffusion.training.randomness import sample_seed

CLASS_NAMES_FILE = "classes.json"  # in a run directory and a cache directory: the class names in index order
_SPLIT_STREAM = int.from_bytes(b"valsplit", "big")  # keys the held-out split apart from other draws


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's preprocessing (Dhariwal & Nichol 2021, guided-diffusion's image_datasets.py; DiT and
    SiT use it too): halve with a box filter while the short side is at least twice ``image_size``,
    resize bicubically so the short side is ``image_size``, crop the centre. (H, W, C) uint8."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.Resampling.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _visible_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_image(folder: Path, exts: Sequence[str]) -> bool:
    """Whether any image lies under ``folder`` (stops at the first: cheap on ImageNet's folders)."""
    for p in folder.rglob("*"):
        if p.suffix.lower() in exts and p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts):
            return True
    return False


def find_classes(root: str | Path, key: str = "data.module.root",
                 image_exts: Sequence[str] = IMAGE_EXTS) -> list[str]:
    """The class names of a class folder, sorted: its visible sub-folders, each holding images.
    Refused: a missing folder, one without class folders, an empty class, images outside any class."""
    root, exts = Path(root), tuple(e.lower() for e in image_exts)
    if not root.is_dir():
        raise FileNotFoundError(f"class folder {root} does not exist; set {key} to a folder of class folders "
                                "(root/<class>/<image>, as ImageNet's train/)")
    names = _visible_dirs(root)
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in exts)
    if loose:
        raise ValueError(f"{root} holds images outside any class folder ({', '.join(loose[:3])}"
                         f"{' ...' if len(loose) > 3 else ''}); {key} must be a folder of class folders, "
                         "root/<class>/<image>: move them into one, or use data=image_folder for unlabelled images")
    if not names:
        raise ValueError(f"{root} holds no class folders; {key} must be a folder of class folders, "
                         "root/<class>/<image> (as ImageNet's train/)")
    if empty := [n for n in names if not _has_image(root / n, exts)]:
        raise ValueError(f"class folder(s) {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} under {root} "
                         f"hold no images ({', '.join(exts)}); fill them or remove them")
    return names


def check_num_classes(names: Sequence[str], num_classes: int | None, root: Path) -> None:
    if num_classes is None:
        return
    if len(names) != num_classes:
        raise ValueError(f"data.num_classes={num_classes}, but {root} holds {len(names)} class folders "
                         f"({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}); set data.num_classes="
                         f"{len(names)} (the label embedding is sized by it), or point data.module.root at a "
                         f"folder of {num_classes} classes")


def write_class_names(directory: str | Path, names: Sequence[str]) -> Path:
    path = Path(directory) / CLASS_NAMES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"class_names": list(names)}, indent=1))
    return path


def read_class_names(directory: str | Path) -> list[str] | None:
    """The class names written by :func:`write_class_names` in ``directory``; None if none are."""
    path = Path(directory) / CLASS_NAMES_FILE
    return json.loads(path.read_text())["class_names"] if path.is_file() else None


@dataclass(frozen=True)
class ClassRecord:
    path: Path
    label: int


@dataclass
class ClassScan:
    """The readable images of a class folder, and the files whose header could not be read."""

    root: Path
    class_names: list[str]
    records: list[ClassRecord]
    bad: list[Path]
    total: int  # files found, readable or not: what the bad fraction is a fraction of


def scan_class_folder(root: str | Path, class_names: Sequence[str], max_bad_fraction: float = 0.05,
                      image_exts: Sequence[str] = IMAGE_EXTS) -> ClassScan:
    """List each class's images (sorted by relative path) and read their headers; unreadable ones are skipped."""
    root = Path(root)
    paths, labels = [], []
    for label, name in enumerate(class_names):
        found = list_images(root / name, image_exts)
        paths += found
        labels += [label] * len(found)
    label_of = dict(zip(paths, labels))
    _, good, bad = scan_headers(root, paths, max_bad_fraction)
    return ClassScan(root, list(class_names), [ClassRecord(p, label_of[p]) for p in good], bad, len(paths))


def _subset(scan: ClassScan, ids: Sequence[int]) -> ClassScan:
    # Both splits keep the folder's header failures and file count: the bad fraction is the folder's.
    return ClassScan(scan.root, scan.class_names, [scan.records[i] for i in ids], scan.bad, scan.total)


def split_per_class(scan: ClassScan, val_fraction: float, seed: int) -> tuple[ClassScan, ClassScan]:
    """``(train, val)``: ``val_fraction`` of each class held out (at least one image of a class of
    two or more, never all), chosen by a generator keyed to (seed, label), so a class's split does
    not depend on the other classes."""
    members: dict[int, list[int]] = {}
    for i, record in enumerate(scan.records):
        members.setdefault(record.label, []).append(i)
    train_ids, val_ids = [], []
    for label, ids in members.items():
        generator = torch.Generator().manual_seed(sample_seed(seed, _SPLIT_STREAM, label))
        order = [ids[j] for j in torch.randperm(len(ids), generator=generator).tolist()]
        n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
        val_ids += order[:n_val]
        train_ids += order[n_val:]
    return _subset(scan, sorted(train_ids)), _subset(scan, sorted(val_ids))


class ImageClassDataset(ReplacesBadImages):
    """The images of a :class:`ClassScan`, preprocessed by :func:`center_crop_arr` to ``resolution``
    square, with ``label`` the index of their class.

    The flip's coin is drawn from a generator seeded with (``seed``, epoch, index), as
    :class:`~diffusion.data.captions.ImageCaptionDataset` draws it: each sample is flipped the same
    way whatever the worker, the number of workers or processes, and after a resume.

    Decoding is :func:`~diffusion.data.images.load_rgb`'s: EXIF-upright, transparency on white
    (ADM and DiT's loaders only convert to RGB; the two differ on such files alone).

    An image that fails to decode is counted and replaced by the next readable image of its class,
    so the batch stays full and the label true; the count lives in shared memory (DataLoader
    workers add up to one total), and more bad files than ``max_bad_fraction`` stops the run.
    """

    def __init__(self, scan: ClassScan, resolution: int = 256, hflip: bool = False,
                 max_bad_fraction: float = 0.05, seed: int = 0):
        if not scan.records:
            raise ValueError(f"no readable images under {scan.root}")
        self.scan, self.records = scan, scan.records
        self.class_names = scan.class_names
        self.resolution, self.hflip, self.max_bad_fraction, self.seed = resolution, hflip, max_bad_fraction, seed
        self._group([record.label for record in self.records])

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch = epoch_of(index)
        index = range(len(self))[index]  # negative indices, and IndexError past the end
        label = self.records[index].label
        found = self._readable(index, label, lambda record: load_rgb(record.path))  # full size: ADM's box
        if found is not None:  # halvings start from the full image
            candidate, img = found
            generator = augmentation_generator(self.seed, epoch, index)  # the asked-for sample's key
            flip = bool(torch.rand((), generator=generator) < 0.5)
            image = to_tensor(Image.fromarray(center_crop_arr(img, self.resolution)))
            if self.hflip and flip:
                image = image.flip(-1)
            return {"image": image, "label": torch.tensor(label, dtype=torch.long),
                    "path": str(self.records[candidate].path), "index": candidate}
        raise RuntimeError(f"every image of class {self.class_names[label]!r} under {self.scan.root} is unreadable")


class ClassNamesRecord:
    """Keeps ``class_names`` with a run: in every checkpoint (Lightning saves a data module's
    ``state_dict``), checked on resume, and as ``classes.json`` in the run directory."""

    class_names: list[str] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names)} if self.class_names is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("class_names")
        if saved is not None and self.class_names is not None and list(saved) != list(self.class_names):
            differ = [f"{i}: checkpoint {a!r}, data {b!r}" for i, (a, b) in enumerate(zip(saved, self.class_names))
                      if a != b]
            if len(saved) != len(self.class_names):
                differ.insert(0, f"{len(saved)} classes in the checkpoint, {len(self.class_names)} in the data")
            raise ValueError("the checkpoint to resume from was trained on other classes than the data's, so its "
                             f"labels would mean other classes: {'; '.join(differ[:5])}; resume on the run's class "
                             "folder (its names are in the run's classes.json), or train a new model")

    def record_class_names(self) -> None:
        trainer = getattr(self, "trainer", None)
        if self.class_names is not None and trainer is not None and trainer.is_global_zero:
            write_class_names(trainer.default_root_dir, self.class_names)


class ImageClassDataModule(ClassNamesRecord, SplitDataModule):
    """A class folder for training; ``image_shape`` is (3, resolution, resolution) and
    ``num_classes`` the number of class folders, which must equal ``num_classes`` when given.

    Validation: ``val_root`` (another class folder with the same classes) or a fixed
    ``val_fraction`` of each class of ``root`` chosen by ``seed``; with neither there is no
    validation. Validation images are not flipped. The class folders are listed (and checked) when
    the module is made, cheaply; the images' headers are read in ``setup``.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int = 256,
        batch_size: int = 32,
        hflip: bool = True,
        val_fraction: float = 0.0,
        val_root: str | Path | None = None,
        num_classes: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        max_bad_fraction: float = 0.05,
        image_exts: Sequence[str] = IMAGE_EXTS,
    ):
        super().__init__()
        self.check_split(val_fraction, val_root)
        self.root, self.image_exts = Path(root), tuple(image_exts)
        self.class_names = find_classes(self.root, "data.module.root", self.image_exts)
        check_num_classes(self.class_names, num_classes, self.root)
        self.val_root = Path(val_root) if val_root is not None else None
        if self.val_root is not None:
            val_names = find_classes(self.val_root, "data.module.val_root", self.image_exts)
            if val_names != self.class_names:
                missing = sorted(set(self.class_names) - set(val_names))
                extra = sorted(set(val_names) - set(self.class_names))
                raise ValueError(f"data.module.val_root {self.val_root} must hold the same classes as data.module.root "
                                 f"{self.root}: missing from val_root {missing[:5] or 'none'}, only in val_root "
                                 f"{extra[:5] or 'none'}; a label must mean the same class in both")
        self.resolution, self.batch_size, self.hflip = resolution, batch_size, hflip
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        self.max_bad_fraction = max_bad_fraction
        self.train_set: ImageClassDataset | None = None
        self.val_set: ImageClassDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    def _dataset(self, scan: ClassScan, train: bool) -> ImageClassDataset:
        return ImageClassDataset(scan, self.resolution, self.hflip and train, self.max_bad_fraction, self.seed)

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":
            self.record_class_names()
        if self.train_set is not None:
            return
        scan = scan_class_folder(self.root, self.class_names, self.max_bad_fraction, self.image_exts)
        val_scan = None
        if self.val_root is not None:
            val_scan = scan_class_folder(self.val_root, self.class_names, self.max_bad_fraction, self.image_exts)
        elif self.val_fraction:
            scan, val_scan = split_per_class(scan, self.val_fraction, self.seed)
        self.train_set = self._dataset(scan, train=True)
        self.val_set = self._dataset(val_scan, train=False) if val_scan is not None else None

    def _loader(self, dataset: ImageClassDataset, train: bool) -> DataLoader:
        sampler = batch_sampler(self.trainer, len(dataset), self.batch_size, train=train, seed=self.seed)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)
