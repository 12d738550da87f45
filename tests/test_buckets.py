"""Aspect-ratio buckets: their shapes, the assignment of images, and batches of one bucket."""

from __future__ import annotations

import math

import pytest
from lightning.fabric.utilities.data import _set_sampler_epoch

from diffusion.data.buckets import assign_buckets, make_buckets
from diffusion.data.captions import ImageCaptionDataModule, ImageCaptionDataset
from tests.make_captioned_folder import make_captioned_folder

SIZES = [(64, 48), (48, 64), (64, 64), (96, 48), (40, 80), (70, 64)]  # (width, height)


@pytest.mark.parametrize(
    "resolution, multiple, max_ratio", [(1024, 64, 2.0), (256, 32, 2.0), (64, 8, 2.0), (512, 64, 4.0), (96, 16, 1.5)]
)
def test_buckets_respect_multiple_area_and_ratio(resolution, multiple, max_ratio):
    buckets = make_buckets(resolution, multiple, max_ratio)
    assert len(buckets) == len(set(buckets)) > 1
    for h, w in buckets:
        assert h % multiple == 0 and w % multiple == 0
        assert h * w <= resolution**2
        assert (h + multiple) * w > resolution**2 or h * (w + multiple) > resolution**2  # no room for a larger side
        assert 1 / max_ratio <= w / h <= max_ratio
        assert (w, h) in buckets
    assert (resolution, resolution) in buckets
    assert [w / h for h, w in buckets] == sorted(w / h for h, w in buckets)


def test_sdxl_resolutions_are_among_the_1024_buckets():
    sdxl = {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344)}
    assert sdxl <= set(make_buckets(1024))


def test_no_buckets_is_a_clear_error():
    with pytest.raises(ValueError, match="buckets.multiple"):
        make_buckets(32, multiple=64)


def test_each_image_lands_in_the_bucket_of_closest_aspect_ratio(tmp_path):
    buckets = make_buckets(64, 8)
    for (w, h), b in zip(SIZES, assign_buckets(SIZES, buckets)):
        distance = [abs(math.log(w / h) - math.log(bw / bh)) for bh, bw in buckets]
        assert distance[b] == min(distance)
    root = make_captioned_folder(tmp_path, n=6, sizes=SIZES)
    ds = ImageCaptionDataset(root, resolution=64, buckets={"multiple": 8})
    assert ds.buckets == buckets
    for index, record in enumerate(ds.records):
        item = ds[index]
        assert ds.bucket_ids[index] == assign_buckets([record.size], buckets)[0]
        assert item["image"].shape[1:] == ds.buckets[ds.bucket_ids[index]]
    assert ds.buckets[ds.bucket_ids[[r.size for r in ds.records].index((96, 48))]] == (48, 80)  # 2:1 -> widest


def test_datamodule_batches_mix_resolutions_across_the_epoch(tmp_path):
    root = make_captioned_folder(tmp_path, n=24, sizes=SIZES, layout="txt")
    dm = ImageCaptionDataModule(root, resolution=64, batch_size=2, buckets={"multiple": 16}, crop="random",
                                hflip=True)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    shapes = set()
    for batch in batches:
        assert batch["image"].shape[:2] == (2, 3) and len(batch["caption"]) == 2
        hw = tuple(batch["image"].shape[2:])
        ds = dm.train_set
        assert hw in ds.buckets and all(ds.buckets[ds.bucket_ids[i]] == hw for i in batch["index"])
        shapes.add(hw)
    assert len(shapes) > 1
    _set_sampler_epoch(loader, 5)  # how Lightning reaches the sampler each epoch
    assert loader.batch_sampler.epoch == 5
