"""Random crop and flip keyed to (seed, epoch, sample): the same for any number of DataLoader
workers or processes and after a resume, different from one epoch to the next."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion import cli
from diffusion.data.batching import EpochIndex
from diffusion.data.captions import ImageCaptionDataModule, ImageCaptionDataset
from diffusion.data.images import augmentation_generator, load_rgb, resize_crop, to_tensor
from tests.conftest import logged_losses
from tests.make_captioned_folder import make_captioned_folder


def _noise_folder(root: Path, n: int = 8, size: tuple[int, int] = (48, 40)) -> Path:
    """Noise images: no symmetry, so every crop offset and every flip shows in the pixels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def _epochs(loader, epochs=(0, 1)) -> dict[int, dict[int, torch.Tensor]]:
    """``{epoch: {dataset index: image}}``, iterating the same loader as Lightning does."""
    seen = {}
    for epoch in epochs:
        loader.batch_sampler.set_epoch(epoch)
        seen[epoch] = {int(i): image for batch in loader for i, image in zip(batch["index"], batch["image"])}
    return seen


def test_crops_and_flips_do_not_depend_on_the_workers_and_change_with_the_epoch(tmp_path):
    root = _noise_folder(tmp_path / "images")
    seen = {}
    for num_workers in (0, 2):
        torch.manual_seed(num_workers)  # the global generator plays no part
        dm = ImageCaptionDataModule(root, resolution=32, batch_size=4, crop="random", hflip=True,
                                    num_workers=num_workers, seed=3)
        seen[num_workers] = _epochs(dm.train_dataloader())  # persistent workers: one dataset copy, two epochs
    for epoch in (0, 1):
        assert sorted(seen[0][epoch]) == sorted(seen[2][epoch]) == list(range(8))
        for i, image in seen[0][epoch].items():
            assert torch.equal(image, seen[2][epoch][i]), (epoch, i)
    changed = [not torch.equal(seen[0][0][i], seen[0][1][i]) for i in range(8)]
    assert sum(changed) >= 6, changed  # 12 crop offsets x 2 flips: a repeat has probability 1/24


def test_random_crop_draws_from_the_generator_it_is_given():
    img = Image.new("RGB", (40, 32))
    with pytest.raises(ValueError, match=r"crop='random'\) needs a generator"):
        resize_crop(img, (32, 32), "random")
    offsets = {resize_crop(img, (32, 32), "random", torch.Generator().manual_seed(s))[1] for s in range(20)}
    again = {resize_crop(img, (32, 32), "random", torch.Generator().manual_seed(s))[1] for s in range(20)}
    assert offsets == again and len(offsets) > 1 and all(top == 0 and 0 <= left <= 8 for top, left in offsets)


def test_an_epoch_index_is_an_int_that_keeps_its_epoch_through_pickling():
    index = EpochIndex(5, epoch=3)
    back = pickle.loads(pickle.dumps(index))
    assert back == 5 and back.epoch == 3 and isinstance(back, int)
    assert torch.arange(10)[index] == 5 and range(10)[index] == 5  # datasets that ignore the epoch see an int


def test_a_replaced_bad_image_is_augmented_with_the_key_of_the_sample_asked_for(tmp_path):
    root = make_captioned_folder(tmp_path, n=6, sizes=[(48, 40)], corrupt=2)  # bad_001.png: decoding fails
    ds = ImageCaptionDataset(root, resolution=32, crop="random", hflip=True, max_bad_fraction=0.5, seed=7)
    bad = next(i for i, r in enumerate(ds.records) if r.path.name == "bad_001.png")
    item = ds[EpochIndex(bad, 1)]
    assert item["index"] != bad and torch.equal(ds[EpochIndex(bad, 1)]["image"], item["image"])
    # The replacement file, cropped and flipped with the draws of the key (seed, epoch, asked-for index).
    generator = augmentation_generator(7, 1, bad)
    flip = bool(torch.rand((), generator=generator) < 0.5)
    crop, _ = resize_crop(load_rgb(ds.records[item["index"]].path), (32, 32), "random", generator)
    expected = to_tensor(crop).flip(-1) if flip else to_tensor(crop)
    assert torch.equal(item["image"], expected)
    assert not torch.equal(ds[EpochIndex(item["index"], 1)]["image"], item["image"])  # its own key draws otherwise


def test_random_crop_and_flip_resume_exactly(train_config, tmp_path):
    """``crop=random hflip=true``: a run stopped at step 3 and resumed (with DataLoader workers) logs
    the losses of an uninterrupted run (without workers), across the end of an epoch."""
    root = make_captioned_folder(tmp_path / "images", n=16, sizes=[(64, 40), (40, 64), (56, 48)])
    common = ["data=image_folder", f"data.module.root={root}", "data.module.resolution=16", "data.module.crop=random",
              "data.module.hflip=true", "conditioning=none", "data.module.batch_size=4",  # 4 batches an epoch
              "trainer.max_steps=6", "trainer.val_check_interval=1000", "callbacks.checkpoint.every_n_train_steps=1"]
    cli.train(train_config(*common, "data.module.num_workers=0", run_dir=tmp_path / "straight"))
    workers = [*common, "data.module.num_workers=2"]
    cli.train(train_config(*workers, "+callbacks.stop._target_=tests.conftest.StopAtStep", "+callbacks.stop.step=3",
                           run_dir=tmp_path / "first"))
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    cli.train(train_config(*workers, f"ckpt_path={ckpt}", run_dir=tmp_path / "resumed"))
    straight, first, after = (logged_losses(tmp_path / d) for d in ("straight", "first", "resumed"))
    assert sorted(first) == [0, 1, 2] and sorted(after) == [3, 4, 5]
    for step, loss in {**first, **after}.items():
        assert loss == pytest.approx(straight[step], rel=1e-6, abs=0), step
