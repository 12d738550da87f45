"""The batch sampler of every data module: batches of one group, split over ranks by the sampler so
that the global batches do not depend on the world size, and resumable mid-epoch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffusion.data.batching import EpochIndex, GlobalBatchSampler, batch_sampler
from diffusion.data.captions import ImageCaptionDataModule
from diffusion.data.digits import DigitsDataModule
from tests.make_captioned_folder import make_captioned_folder

BUCKET_IDS = [0] * 7 + [1] * 5 + [2] * 9 + [3] * 2  # 23 images in 4 buckets
SHAPES = [(4, 8, 8), (4, 6, 10), (4, 10, 6)] * 13 + [(4, 6, 10)] * 5  # 44 latents of 3 shapes, interleaved


def _ranks(groups, batch_size: int, num_replicas: int, **kwargs) -> list[list[list[int]]]:
    return [list(GlobalBatchSampler(groups, batch_size, num_replicas=num_replicas, rank=r, **kwargs))
            for r in range(num_replicas)]


def _fake_trainer(world_size: int = 1, global_rank: int = 0, processed: int = 0) -> SimpleNamespace:
    """A trainer whose run has processed ``processed`` training batches in all."""
    progress = SimpleNamespace(total=SimpleNamespace(processed=processed))
    return SimpleNamespace(world_size=world_size, global_rank=global_rank,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_are_single_group_and_len_is_exact(drop_last):
    sampler = GlobalBatchSampler(BUCKET_IDS, batch_size=3, drop_last=drop_last, seed=1)
    batches = list(sampler)
    assert len(sampler) == len(batches) == (2 + 1 + 3 + 0 if drop_last else 3 + 2 + 3 + 1)
    assert all(len({BUCKET_IDS[i] for i in batch}) == 1 for batch in batches)
    seen = [i for batch in batches for i in batch]
    assert len(seen) == len(set(seen))
    if drop_last:
        assert all(len(batch) == 3 for batch in batches)
    else:
        assert sorted(seen) == list(range(len(BUCKET_IDS)))
    # batches of several groups are interleaved, not group after group
    assert [BUCKET_IDS[b[0]] for b in batches] != sorted(BUCKET_IDS[b[0]] for b in batches)


@pytest.mark.parametrize("drop_last", [True, False])
def test_one_group_given_as_a_count(drop_last):
    sampler = GlobalBatchSampler(10, 4, drop_last=drop_last, seed=2)
    batches = list(sampler)
    assert len(sampler) == len(batches) == (2 if drop_last else 3)
    assert sorted(len(b) for b in batches) == ([4, 4] if drop_last else [2, 4, 4])


def test_set_epoch_changes_the_order_deterministically():
    a, b = GlobalBatchSampler(BUCKET_IDS, 2, seed=3), GlobalBatchSampler(BUCKET_IDS, 2, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(GlobalBatchSampler(BUCKET_IDS, 2, seed=4)) != first
    assert a.sampler is a  # where Lightning calls set_epoch


def test_unshuffled_sampler_keeps_the_order():
    batches = list(GlobalBatchSampler(BUCKET_IDS, 4, shuffle=False, drop_last=False))
    assert [i for batch in batches for i in batch] == list(range(len(BUCKET_IDS)))
    assert list(GlobalBatchSampler(7, 3, shuffle=False, drop_last=False)) == [[0, 1, 2], [3, 4, 5], [6]]
    # ranks take consecutive slices of each global batch
    assert _ranks(4, 2, 2, shuffle=False) == [[[0, 1]], [[2, 3]]]


def test_training_ranks_get_disjoint_full_batches_of_equal_count():
    ranks = _ranks(BUCKET_IDS, 2, 3, seed=0)
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) > 0
    assert len(ranks[0]) == len(GlobalBatchSampler(BUCKET_IDS, 2, num_replicas=3, rank=1))
    assert all(len(batch) == 2 for r in ranks for batch in r)
    flat = [i for r in ranks for batch in r for i in batch]
    assert len(flat) == len(set(flat))


@pytest.mark.parametrize("num_replicas", [2, 3, 4, 8])
def test_evaluation_ranks_cover_every_sample_with_equal_counts(num_replicas):
    ranks = _ranks(BUCKET_IDS, 2, num_replicas, shuffle=False, drop_last=False)
    assert len({len(r) for r in ranks}) == 1
    assert all(len(r) == len(GlobalBatchSampler(BUCKET_IDS, 2, num_replicas=num_replicas, drop_last=False))
               for r in ranks)
    for step in zip(*ranks):  # the ranks' k-th batches: one group, equal non-empty shares
        assert len({len(batch) for batch in step}) == 1 and len(step[0]) > 0
        assert len({BUCKET_IDS[i] for batch in step for i in batch}) == 1
    assert {i for r in ranks for batch in r for i in batch} == set(range(len(BUCKET_IDS)))


@pytest.mark.parametrize("groups", [BUCKET_IDS, SHAPES, 37])
@pytest.mark.parametrize("seed, epoch", [(0, 0), (1, 0), (0, 3), (7, 11)])
def test_global_batches_do_not_depend_on_the_world_size(groups, seed, epoch):
    """Rank r's k-th batch is the r-th slice of the k-th batch of one process with the global batch size."""
    global_batch = 4
    for drop_last in (True, False):
        single = GlobalBatchSampler(groups, global_batch, seed=seed, drop_last=drop_last)
        single.set_epoch(epoch)
        expected = list(single)
        for num_replicas in (1, 2, 4):
            samplers = [GlobalBatchSampler(groups, global_batch // num_replicas, seed=seed, drop_last=drop_last,
                                           num_replicas=num_replicas, rank=r) for r in range(num_replicas)]
            for s in samplers:
                s.set_epoch(epoch)
            steps = [[i for batch in step for i in batch] for step in zip(*samplers)]
            assert len(steps) == len(samplers[0]) == len(expected)
            if drop_last:
                assert steps == expected
            else:  # the same, up to the padding of each group's last global batch
                assert all(step[:len(batch)] == batch for step, batch in zip(steps, expected))


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_resume_yields_the_tail_of_an_uninterrupted_epoch(num_replicas):
    def sampler(rank: int) -> GlobalBatchSampler:
        return GlobalBatchSampler(SHAPES, 2, seed=5, num_replicas=num_replicas, rank=rank)

    for rank in range(num_replicas):
        straight = sampler(rank)
        straight.set_epoch(2)
        epoch = list(straight)
        for k in range(len(epoch) + 1):
            resumed = sampler(rank)
            resumed.resume(2, k)
            assert len(resumed) == len(epoch)  # len is the full epoch, even when resumed
            assert list(resumed) == epoch[k:]
            assert list(resumed) == epoch  # one-shot: the next pass starts from the beginning


def test_argument_errors_name_the_value():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        GlobalBatchSampler(10, 0)
    with pytest.raises(ValueError, match="rank=2, num_replicas=2"):
        GlobalBatchSampler(10, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="rank=-1"):
        GlobalBatchSampler(10, 2, rank=-1)
    with pytest.raises(ValueError, match="num_replicas must be >= 1, got 0"):
        GlobalBatchSampler(10, 2, num_replicas=0, rank=0)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        GlobalBatchSampler(10, 2, seed=-1)
    with pytest.raises(ValueError, match="got -3"):
        GlobalBatchSampler(-3, 2)
    with pytest.raises(ValueError, match="batches_done must be >= 0, got -1"):
        GlobalBatchSampler(10, 2).resume(0, -1)


def test_sampler_refuses_a_sampler_in_place_of_groups():
    with pytest.raises(TypeError, match="use_distributed_sampler=false"):
        GlobalBatchSampler(iter(BUCKET_IDS), 2)
    with pytest.raises(TypeError, match="use_distributed_sampler=false"):
        GlobalBatchSampler(torch.utils.data.DistributedSampler(range(8), num_replicas=2, rank=0), 2)


def test_helper_takes_rank_world_size_and_the_runs_position_from_the_trainer():
    """A training sampler starts each iteration where the run's count of batches stands: epoch
    count // len, after count % len batches, whatever epoch Lightning believes it is in."""
    alone = batch_sampler(None, BUCKET_IDS, 2, train=True, seed=1)
    assert (alone.num_replicas, alone.rank, alone.shuffle, alone.drop_last) == (1, 0, True, True)
    straight = GlobalBatchSampler(BUCKET_IDS, 2, seed=1, num_replicas=2, rank=1)
    trainer = _fake_trainer(2, 1, processed=3 * len(straight) + 2)
    evaluation = batch_sampler(trainer, BUCKET_IDS, 2, train=False, seed=1)
    assert (evaluation.num_replicas, evaluation.rank, evaluation.shuffle, evaluation.drop_last) == (2, 1, False, False)
    assert len(list(evaluation)) == len(evaluation)  # evaluation never skips
    resumed = batch_sampler(trainer, BUCKET_IDS, 2, train=True, seed=1)
    straight.set_epoch(3)
    assert list(resumed) == list(straight)[2:] and resumed.epoch == 3
    trainer.fit_loop.epoch_loop.batch_progress.total.processed = 4 * len(straight)  # the next epoch, from its start
    straight.set_epoch(4)
    assert list(resumed) == list(straight)


def test_no_full_batch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"data.module.batch_size=4 x world size 2 = 8 samples from 7 samples"):
        batch_sampler(_fake_trainer(2, 0), 7, 4, train=True, seed=0)
    with pytest.raises(ValueError, match=r"samples per group: \{0: 7, 1: 5, 2: 9, 3: 2\}"):
        batch_sampler(None, BUCKET_IDS, 10, train=True, seed=0)
    assert len(batch_sampler(_fake_trainer(2, 0), 7, 4, train=False, seed=0)) == 1  # evaluation keeps a short batch


def test_digits_batches_of_two_ranks_make_the_batches_of_one_process():
    def loader(world_size: int, rank: int, batch_size: int, train: bool = True):
        dm = DigitsDataModule(batch_size=batch_size, seed=3)
        dm.trainer = _fake_trainer(world_size, rank)
        return dm.train_dataloader() if train else dm.val_dataloader()

    single = [b["image"] for b in loader(1, 0, 64)]
    ranks = [[b["image"] for b in loader(2, r, 32)] for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) > 0
    assert all(torch.equal(one, torch.cat(pair)) for one, pair in zip(single, zip(*ranks)))
    val = [[b["label"] for b in loader(2, r, 32, train=False)] for r in range(2)]
    assert len(val[0]) == len(val[1]) and sum(len(b) for r in val for b in r) >= 360


def test_image_batches_of_two_ranks_are_cropped_and_flipped_as_in_one_process(tmp_path):
    root = make_captioned_folder(tmp_path, n=16, sizes=[(64, 40), (40, 64), (72, 48)])  # larger: crops vary

    def images(world_size: int, rank: int, batch_size: int, epoch: int) -> list[torch.Tensor]:
        torch.manual_seed(rank)  # each process's global generator differs; it plays no part
        dm = ImageCaptionDataModule(root, resolution=32, batch_size=batch_size, buckets={"multiple": 8},
                                    crop="random", hflip=True, seed=2)
        dm.trainer = _fake_trainer(world_size, rank)
        loader = dm.train_dataloader()
        dm.trainer.fit_loop.epoch_loop.batch_progress.total.processed = epoch * len(loader)  # the run's position
        return [b["image"] for b in loader]

    for epoch in (0, 1):
        single = images(1, 0, 4, epoch)
        ranks = [images(2, r, 2, epoch) for r in range(2)]
        assert len(single) == len(ranks[0]) == len(ranks[1]) > 0
        assert all(torch.equal(one, torch.cat(pair)) for one, pair in zip(single, zip(*ranks))), epoch


def test_sampled_indices_carry_their_epoch():
    sampler = GlobalBatchSampler(BUCKET_IDS, 3, seed=1, num_replicas=2, rank=1)
    sampler.set_epoch(4)
    batches = list(sampler)
    assert all(isinstance(i, EpochIndex) and i.epoch == 4 for batch in batches for i in batch)
    sampler.resume(6, 1)
    assert all(i.epoch == 6 for batch in sampler for i in batch)


def test_a_training_loader_not_split_over_processes_is_refused():
    from torch.utils.data import DataLoader, DistributedSampler

    from diffusion.data.batching import check_split_over_processes

    data = list(range(20))
    plain = DataLoader(data, batch_size=4, shuffle=True)
    check_split_over_processes(plain, world_size=1)
    with pytest.raises(ValueError, match=r"not split over the 2 processes.*use_distributed_sampler=true"):
        check_split_over_processes(plain, world_size=2)
    with pytest.raises(ValueError, match="not split over the 4 processes"):  # split for another world size
        check_split_over_processes(DataLoader(data, batch_sampler=GlobalBatchSampler(20, 2, num_replicas=2)), 4)
    check_split_over_processes(DataLoader(data, batch_sampler=GlobalBatchSampler(20, 2, num_replicas=2, rank=1)), 2)
    check_split_over_processes(DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0)), 2)
