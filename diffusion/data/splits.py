"""What the folder data modules share: a train and an optional val dataset, made in ``setup``,
each served by the subclass's ``_loader``."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader


class SplitDataModule(L.LightningDataModule):
    """``setup`` sets ``train_set`` and ``val_set`` (None: no validation); ``_loader(dataset, train)``
    batches one of them."""

    train_set: Any = None
    val_set: Any = None

    @staticmethod
    def check_split(val_fraction: float, val_root: Any) -> None:
        """The held-out split: a fraction of the training folder, or another folder, not both."""
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.module.val_fraction must be in [0, 1), got {val_fraction}")
        if val_fraction and val_root is not None:
            raise ValueError("set data.module.val_fraction or data.module.val_root, not both")

    def _loader(self, dataset: Any, train: bool) -> DataLoader:
        raise NotImplementedError

    def dataset(self, split: str) -> Any:
        """The ``"train"`` or ``"val"`` dataset (what a cache encodes), None if there is no such split."""
        self.setup()
        return {"train": self.train_set, "val": self.val_set}[split]

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        return self._loader(self.val_set, train=False) if self.val_set is not None else []
