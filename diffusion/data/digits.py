"""The embedded default dataset: scikit-learn's bundled handwritten digits.

1,797 real 8x8 grayscale images of the digits 0-9 (UCI optical recognition of handwritten
digits), shipped inside scikit-learn, so training needs no download. Pixels hold 0..16 and are
mapped to [-1, 1]. The held-out split is stratified and fixed by a seed, so every run, the
validation loss and the quality benchmark see the same images.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffusion.data.batching import batch_sampler, epoch_of
from diffusion.data.masks import mask_generator, random_mask

NUM_CLASSES = 10


def load_digits_split(val_fraction: float = 0.2, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train": (images, labels), "val": (images, labels)}`` with images (N, 1, 8, 8) in
    [-1, 1] (float32) and labels (N,) int64; each class is split in the same proportion."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(8.0).sub(1.0).unsqueeze(1)  # 0..16 -> [-1, 1]
    labels = torch.from_numpy(digits.target).long()
    generator = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for digit in range(NUM_CLASSES):
        members = torch.nonzero(labels == digit).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_val = round(val_fraction * members.numel())
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    train, val = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    return {"train": (images[train], labels[train]), "val": (images[val], labels[val])}


class _TensorImages(Dataset):
    """Items ``{"image", "label"}``, and with ``masks`` a random inpainting ``mask`` drawn
    for the sample's (seed, epoch, index) (diffusion.data.masks): a new one each epoch."""

    def __init__(self, images: Tensor, labels: Tensor, masks: bool = False, seed: int = 0):
        self.images, self.labels, self.masks, self.seed = images, labels, masks, seed

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        epoch = epoch_of(index)
        index = range(len(self))[index]
        item = {"image": self.images[index], "label": self.labels[index]}
        if self.masks:
            item["mask"] = random_mask(*self.images.shape[-2:], mask_generator(self.seed, epoch, index))
        return item


class DigitsDataModule(L.LightningDataModule):
    """Class-conditional 1x8x8 digits; ``image_shape`` and ``num_classes`` tell the model. ``masks``
    gives each item a random inpainting mask (image_condition=inpaint)."""

    image_shape = (1, 8, 8)
    num_classes = NUM_CLASSES

    def __init__(self, batch_size: int = 128, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0,
                 masks: bool = False):
        super().__init__()
        self.batch_size, self.val_fraction, self.seed, self.num_workers = batch_size, val_fraction, seed, num_workers
        self.masks = masks
        self.splits: dict[str, tuple[Tensor, Tensor]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_digits_split(self.val_fraction, self.seed)

    def dataset(self, split: str) -> Dataset:
        """The ``"train"`` or ``"val"`` split, unshuffled (what a cache encodes)."""
        self.setup()
        return _TensorImages(*self.splits[split], masks=self.masks, seed=self.seed)

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.dataset(split)
        sampler = batch_sampler(self.trainer, len(dataset), self.batch_size, train=train, seed=self.seed)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)
