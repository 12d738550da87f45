"""Training draws keyed to the sample's place in the global batch: split-invariant and reproducible."""

from __future__ import annotations

import pytest
import torch

from diffusion.conditioning import Conditioning, drop_condition
from diffusion.timesteps import LogitNormal, SD3Shift, Uniform
from diffusion.training.randomness import draw_step, sample_seed


def draws(x0, key=(0, 0, 0), first=0, p=0.5, distribution=None):
    return draw_step(x0, distribution or LogitNormal(), p, key=key, first_position=first, generator=torch.Generator())


def test_a_global_batch_draws_the_same_numbers_however_it_is_split():
    x0 = torch.zeros(8, 3, 4, 6)
    shifted = LogitNormal(shift=SD3Shift(reference_size=2))  # a shift that reads the batch's size
    whole = draws(x0, distribution=shifted)
    parts = [draws(x0[i:i + n], first=i, distribution=shifted) for i, n in ((0, 2), (2, 2), (4, 4))]
    for field in ("t", "noise", "drop"):
        assert torch.equal(getattr(whole, field), torch.cat([getattr(p, field) for p in parts])), field


def test_draws_follow_the_key_and_the_position():
    x0 = torch.zeros(4, 1, 8, 8)
    a, again = draws(x0), draws(x0)
    assert torch.equal(a.noise, again.noise) and torch.equal(a.t, again.t)
    for other in (draws(x0, key=(0, 0, 1)), draws(x0, key=(0, 1, 0)), draws(x0, key=(1, 0, 0)), draws(x0, first=4)):
        assert not torch.equal(a.noise, other.noise) and not torch.equal(a.t, other.t)
    assert len({sample_seed(0, 0, 0, i) for i in range(10_000)}) == 10_000
    assert all(0 <= sample_seed(*k) < 2**63 for k in ((0,), (-1, 5), (2**70, 3)))


def test_draws_have_the_right_distribution():
    x0 = torch.zeros(4000, 2, 2, 2, dtype=torch.float64)
    d = draws(x0, p=0.1, distribution=Uniform())
    assert d.noise.dtype == torch.float64 and d.noise.shape == x0.shape
    assert abs(d.noise.mean()) < 0.03 and abs(d.noise.std() - 1) < 0.03
    assert abs(d.t.mean() - 0.5) < 0.02 and abs(d.t.var() - 1 / 12) < 0.005
    assert abs(d.drop.float().mean() - 0.1) < 0.02
    # samples are not correlated with their neighbours (nearby seeds, unrelated streams)
    flat = d.noise.flatten(1)
    assert abs(torch.corrcoef(torch.stack([flat[:-1, 0], flat[1:, 0]]))[0, 1]) < 0.06


def test_condition_dropout_takes_the_drawn_choice_and_checks_it():
    cond, null = Conditioning(labels=torch.tensor([1, 2, 3])), Conditioning(labels=torch.tensor([10]))
    out = drop_condition(cond, null, 0.5, drop=torch.tensor([True, False, True]))
    assert out.labels.tolist() == [10, 2, 10]
    with pytest.raises(ValueError, match=r"drop must be a bool tensor of shape \(3,\)"):
        drop_condition(cond, null, 0.5, drop=torch.tensor([1, 0, 1]))


def test_offset_noise_adds_a_per_channel_constant_and_leaves_the_other_draws():
    """Each sample and channel gets level * N(0, 1) over all its pixels: the per-channel pixel mean
    of the noise has variance level^2 + 1 / (H W), the within-channel deviations stay N(0, 1)."""
    x0 = torch.zeros(3000, 2, 4, 4, dtype=torch.float64)
    plain = draw_step(x0, Uniform(), 0.1, key=(0, 0, 0), first_position=0, generator=torch.Generator())
    offset = draw_step(x0, Uniform(), 0.1, key=(0, 0, 0), first_position=0, generator=torch.Generator(),
                       offset_noise=0.5)
    assert torch.equal(plain.t, offset.t) and torch.equal(plain.drop, offset.drop)
    shift = offset.noise - plain.noise
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift), rtol=0, atol=1e-12)  # constant over pixels
    assert abs(shift[:, :, 0, 0].std().item() - 0.5) < 0.02
    channel_means = offset.noise.mean((2, 3))
    assert abs(channel_means.var().item() - (0.25 + 1 / 16)) < 0.02
    assert abs(torch.corrcoef(shift[:, :, 0, 0].T)[0, 1].item()) < 0.06  # channels independent


def test_offset_noise_out_of_range_is_refused():
    from diffusion.backbones import build_dit
    from diffusion.schedules import FlowMatching
    from diffusion.training.module import DiffusionModule

    with pytest.raises(ValueError, match=r"offset_noise=1.5: must be in \[0, 1\)"):
        DiffusionModule(build_dit("dit_tiny", in_channels=1), FlowMatching(), offset_noise=1.5)
