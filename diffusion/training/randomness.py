"""The random draws of a training step, keyed to each sample's place in the global batch.

Every sample's time t, noise and condition-dropout coin come from a generator seeded with
(run seed, epoch, batch index, the sample's position in the global batch). So the draws do not
depend on how a global batch is split over processes: one process with batch 32 and two with 16
(whose data modules hand out the two halves of the same global batch, see
``diffusion.data.batching``) draw the same numbers for the same samples, and train the same model.
A resumed run draws what an uninterrupted one would have, with no generator state to save.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.timesteps import TimeDistribution

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def sample_seed(*key: int) -> int:
    """A 63-bit seed from a tuple of integers, mixed so that neighbouring keys seed unrelated streams."""
    h = 0
    for k in key:
        h = _splitmix64(h ^ (k & _MASK))
    return h >> 1


@dataclass
class StepDraws:
    t: Tensor  # (B,) times
    noise: Tensor  # x0's shape and dtype
    drop: Tensor  # (B,) bool: replace this sample's condition by the null condition


def draw_step(
    x0: Tensor,
    time_distribution: TimeDistribution,
    drop_probability: float,
    *,
    key: tuple[int, ...],
    first_position: int,
    generator: torch.Generator,
    offset_noise: float = 0.0,
) -> StepDraws:
    """The draws for the samples of ``x0``, which sit at positions ``first_position, ...`` of the
    global batch identified by ``key`` (e.g. (seed, epoch, batch index)). ``generator`` lives on
    x0's device and is reseeded for each sample: one small draw per sample, ~10 us each on a CPU.

    ``offset_noise`` adds ``offset_noise * N(0, 1)`` per sample and channel to the noise, constant
    over its pixels (offset noise, Guttenberg 2023; sgm's ``offset_noise_level``): a model trained
    so learns to move an image's mean brightness, which standard noise leaves almost untouched
    at the highest noise. It is drawn after the noise, so the other draws stay as they were."""
    size, shape, device = tuple(x0.shape[-2:]), x0.shape[1:], x0.device
    coins, times, noises = [], [], []
    for position in range(first_position, first_position + x0.shape[0]):
        generator.manual_seed(sample_seed(*key, position))
        coins.append(torch.rand(1, generator=generator, device=device))
        times.append(time_distribution.draw(1, generator=generator, device=device))
        noise = torch.randn(shape, generator=generator, device=device, dtype=x0.dtype)
        if offset_noise:
            offset = torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=generator, device=device)
            noise = noise + offset_noise * offset.to(x0.dtype)
        noises.append(noise)
    t = time_distribution.finish(torch.cat(times), size=size)  # the deterministic map, once for the batch
    return StepDraws(t, torch.stack(noises), torch.cat(coins) < drop_probability)


#: Keys the posterior draws of an autoencoder apart from the step's t, noise and coin.
POSTERIOR_STREAM = 0x5AE


def keyed_normal(shape: tuple[int, ...], *, key: tuple[int, ...], first_position: int, count: int,
                 generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """(count, *shape) standard normal draws, sample i's from a generator seeded with (key, stream,
    first_position + i): like :func:`draw_step`'s, independent of the processes and of a resume."""
    out = []
    for position in range(first_position, first_position + count):
        generator.manual_seed(sample_seed(*key, POSTERIOR_STREAM, position))
        out.append(torch.randn(shape, generator=generator, device=generator.device, dtype=dtype))
    return torch.stack(out)
