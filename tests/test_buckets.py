"""Aspect-ratio buckets: their shapes, the assignment of images, and the batch sampler."""

from __future__ import annotations

import math

import pytest
from lightning.fabric.utilities.data import _set_sampler_epoch

from diffusion.data.buckets import BucketBatchSampler, assign_buckets, make_buckets
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


BUCKET_IDS = [0] * 7 + [1] * 5 + [2] * 9 + [3] * 2  # 23 images in 4 buckets


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_batches_are_single_bucket_and_len_is_exact(drop_last):
    sampler = BucketBatchSampler(BUCKET_IDS, batch_size=3, drop_last=drop_last, seed=1)
    batches = list(sampler)
    assert len(sampler) == len(batches) == (2 + 1 + 3 + 0 if drop_last else 3 + 2 + 3 + 1)
    assert all(len({BUCKET_IDS[i] for i in batch}) == 1 for batch in batches)
    assert len({BUCKET_IDS[batch[0]] for batch in batches}) > 1
    seen = [i for batch in batches for i in batch]
    assert len(seen) == len(set(seen))
    if drop_last:
        assert all(len(batch) == 3 for batch in batches)
    else:
        assert sorted(seen) == list(range(len(BUCKET_IDS)))
    # batches of several buckets are interleaved, not bucket after bucket
    assert [BUCKET_IDS[b[0]] for b in batches] != sorted(BUCKET_IDS[b[0]] for b in batches)


def test_set_epoch_changes_the_order_deterministically():
    a, b = BucketBatchSampler(BUCKET_IDS, 2, seed=3), BucketBatchSampler(BUCKET_IDS, 2, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(BucketBatchSampler(BUCKET_IDS, 2, seed=4)) != first


def test_unshuffled_sampler_keeps_the_order():
    batches = list(BucketBatchSampler(BUCKET_IDS, 4, shuffle=False, drop_last=False))
    assert [i for batch in batches for i in batch] == list(range(len(BUCKET_IDS)))


def test_ranks_get_disjoint_batches_of_equal_count():
    ranks = [list(BucketBatchSampler(BUCKET_IDS, 2, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    assert len(ranks[0]) == len(BucketBatchSampler(BUCKET_IDS, 2, num_replicas=3, rank=1))
    flat = [i for r in ranks for batch in r for i in batch]
    assert len(flat) == len(set(flat))


def test_sampler_refuses_a_sampler_in_place_of_bucket_ids():
    with pytest.raises(TypeError, match="use_distributed_sampler=false"):
        BucketBatchSampler(iter(BUCKET_IDS), 2)


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
