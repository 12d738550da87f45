"""Training callbacks of the module: the sample grids a run shows while it trains."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from diffusion.images import to_grid, write_png

log = logging.getLogger(__name__)


class SampleGrids(L.Callback):
    """A grid of samples from the EMA weights every ``model.sampling.every_n_steps`` optimiser steps
    and at the end of training, saved as ``samples/step_<N>.png`` in the run directory and sent to
    the loggers that take images (Weights & Biases, TensorBoard).

    One grid per optimiser step asked for: the micro-batches of gradient accumulation share a
    step, and the end of a run whose last step was just sampled adds none. Class-conditional
    models show a column per class; text-conditional ones a column per prompt of
    ``model.sampling.prompts``. The noise is the same at every step (seed 0), so grids compare.
    A model with an image condition (a control, a mask) samples on the first images of the validation
    set (else the training set), always the same ones, with their own labels or captions.
    """

    def __init__(self) -> None:
        self._last_step: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        every, step = pl_module.sampling.every_n_steps, trainer.global_step
        if every and step > 0 and step % every == 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_grid(trainer, pl_module)

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        step = trainer.global_step
        if step == self._last_step or pl_module.image_shape is None:
            return None
        self._last_step = step
        # Process 0 samples alone, unless the EMA is sharded: then all sample together (each
        # forward gathers the blocks' shards) and process 0 writes.
        if not (trainer.is_global_zero or pl_module._sharded):
            return None
        inputs = None
        if pl_module.image_condition is not None:
            condition, columns, captions, inputs = self._image_request(trainer, pl_module)
        else:
            condition, columns, captions = self._condition(pl_module)
        generator = torch.Generator(device=pl_module.device).manual_seed(0)
        images = pl_module.sample(pl_module.sampling.num_images, condition, generator=generator, inputs=inputs)
        if not trainer.is_global_zero:
            return None
        grid = to_grid(images, nrow=columns)  # (H, W, C) uint8
        path = write_png(grid, Path(trainer.default_root_dir) / "samples" / f"step_{step:07d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [grid], step=step, **({"caption": [captions]} if captions else {}))
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, step, dataformats="HWC")
                if captions:
                    logger.experiment.add_text("samples/prompts", captions, step)
        return path

    def _image_request(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[list | None, int, None, dict]:
        """The first ``num_images`` items of the validation (else training) set: their image inputs, and
        their labels or captions when the model takes them (cycled when the set is smaller)."""
        from torch.utils.data import default_collate

        loaders = []
        for loader in (trainer.val_dataloaders, trainer.train_dataloader):  # a list where there are none or several
            loaders += list(loader) if isinstance(loader, (list, tuple)) else [loader] if loader is not None else []
        dataset = next((loader.dataset for loader in loaders if len(loader.dataset)), None)
        if dataset is None:
            raise ValueError("sample grids of an image-conditioned model take their conditions from the data, and "
                             "this run has none; set model.sampling.every_n_steps=0 and callbacks to skip them")
        num = pl_module.sampling.num_images
        items = [dataset[i % len(dataset)] for i in range(num)]
        keys = set(pl_module.image_condition.needs) | set(pl_module.image_condition.fields)
        batch = default_collate([{k: v for k, v in item.items() if k in keys} for item in items])
        takes = pl_module.conditioner.takes
        condition = None
        if takes == "labels" and all("label" in item for item in items):
            condition = [int(item["label"]) for item in items]
        elif takes == "prompts":
            condition = [str(item.get("caption", "")) for item in items]
        return condition, max(1, round(num ** 0.5)), None, batch

    def _condition(self, pl_module: L.LightningModule) -> tuple[list | None, int | None, str | None]:
        """What the grid is conditioned on, its number of columns and a caption naming them."""
        num, prompts = pl_module.sampling.num_images, pl_module.sampling.prompts
        if pl_module.conditioner.takes != "prompts":
            if prompts:
                raise ValueError("model.sampling.prompts is set, but this model is not text-conditioned "
                                 f"({type(pl_module.conditioner).__name__}); leave it null")
            return None, pl_module.num_classes, None  # None: the classes, cycled
        if not prompts:
            log.warning("sample grids of a text-to-image model without model.sampling.prompts are unconditional "
                        "(empty prompts); set model.sampling.prompts='[\"a prompt\", ...]' to see conditional ones")
            return [""] * num, None, None
        prompts = list(prompts)
        columns = min(len(prompts), num)
        caption = " | ".join(f"column {i + 1}: {p}" for i, p in enumerate(prompts[:columns]))
        return [prompts[i % len(prompts)] for i in range(num)], columns, caption
