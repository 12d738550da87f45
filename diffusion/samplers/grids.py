"""Time grids for sampling: decreasing float64 tensors from the start time (usually 1) to the
end time (usually 0); a sampler takes one step per consecutive pair."""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from diffusion._checks import check_choice, check_positive
from diffusion.schedules import Schedule
from diffusion.timesteps import time_shift

DDPM_SPACINGS = ("leading", "trailing", "linspace")


def uniform(steps: int, t_start: float = 1.0, t_end: float = 0.0) -> Tensor:
    """``steps + 1`` equally spaced times from ``t_start`` down to ``t_end``."""
    check_positive("steps", steps)
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


def shifted(steps: int, shift: float, t_start: float = 1.0, t_end: float = 0.0,
            schedule: Schedule | None = None) -> Tensor:
    """A uniform grid through the SD3 / FLUX shift; ``shift > 1`` spends more steps at high noise.
    The shift acts on the log-SNR of ``schedule`` (:meth:`Schedule.shift_times`), so it means the same
    for every theory; without one it is the flow-matching map, which diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=...)`` uses too."""
    check_positive("shift", shift)
    grid = uniform(steps, t_start, t_end)
    return time_shift(grid, shift) if schedule is None else schedule.shift_times(grid, shift)


def flow_match_euler(steps: int, shift: float = 1.0, num_train_steps: int = 1000) -> Tensor:
    """The default grid of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=...)`` (SD3's pipeline):
    ``steps`` times uniform from 1 down to the shifted first training time ``1 / num_train_steps``,
    through the shift, then a last step to t = 0; ``steps + 1`` times in all. (FLUX's pipeline uses
    :func:`shifted` instead: uniform from 1 to ``1 / steps``.)"""
    check_positive("steps", steps)
    n = int(check_positive("num_train_steps", num_train_steps))
    last = time_shift(torch.tensor(1 / n, dtype=torch.float64), check_positive("shift", shift))
    times = time_shift(torch.linspace(1.0, float(last), steps, dtype=torch.float64), shift)
    return torch.cat([times, torch.zeros(1, dtype=torch.float64)])


def geometric(steps: int, schedule: Schedule, sigma_min: float = 0.01, sigma_max: float = 50.0) -> Tensor:
    """Noise levels ``sigma / alpha`` geometric from ``sigma_max`` down to ``sigma_min`` (uniform in
    log-SNR), mapped to the schedule's times, then a last step to t = 0: the VE sampler's grid
    (Song et al. 2021; EDM Table 1, "VE"). ``sigma_max`` is capped at the schedule's end."""
    return karras(steps, schedule, sigma_min, sigma_max, rho=math.inf)


def ddpm(steps: int, spacing: str = "leading", num_train_steps: int = 1000, steps_offset: int = 0,
         set_alpha_to_one: bool = True) -> Tensor:
    """The DDPM step spacings of Lin et al. 2024 (Table 2): ``steps`` of the ``num_train_steps``
    training steps i (at t = (i + 1) / N), then a last step to t = 0 (clean data); ``steps + 1``
    times in all. The step indices are diffusers' ``set_timesteps`` values, float64 arithmetic
    and rounding included, so a grid matches a diffusers pipeline step for step. Only
    "trailing" and "linspace" start at the last training step (t = 1), "linspace" from 2 steps
    on; ``steps_offset`` shifts "leading" alone, as in diffusers.

    ``set_alpha_to_one=False`` is diffusers' DDIM / PNDM option of that name (Stable Diffusion's
    scheduler config): the last step goes to training step 0, t = 1/N, instead of clean data, so the
    samples keep that step's noise (sigma ~ 0.03 on SD's betas); a grid whose last step is already
    there ends at it."""
    check_choice("spacing", spacing, DDPM_SPACINGS)
    n = int(check_positive("num_train_steps", num_train_steps))
    if not 0 < steps <= n:
        raise ValueError(f"steps must be in 1..num_train_steps={n}, got {steps}")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset={steps_offset} applies to spacing='leading' only, not {spacing!r}")
    if spacing == "linspace":
        idx = np.linspace(0, n - 1, steps).round()[::-1]
    elif spacing == "leading":
        idx = np.arange(steps)[::-1] * (n // steps) + steps_offset
        if idx[0] >= n:
            raise ValueError(f"steps_offset={steps_offset} puts the first of {steps} leading steps at training step "
                             f"{idx[0]}, past the last ({n - 1}); lower steps_offset or steps")
    else:  # trailing: N - k N / steps for k = 0..steps-1, rounded
        # The float length of np.arange(N, 0, -N / steps) is steps + 1 for 62 of the step counts
        # 1..1000 at N = 1000 (61, 103, 121, ...), the extra value a training step -1 (diffusers
        # has that bug): the values are kept, their count is steps.
        idx = np.round(np.arange(n, 0, -n / steps)[:steps]) - 1
    times = (torch.from_numpy(np.array(idx, dtype=np.float64)) + 1) / n
    if not set_alpha_to_one:
        return times if times[-1] == 1 / n else torch.cat([times, torch.full((1,), 1 / n, dtype=torch.float64)])
    return torch.cat([times, torch.zeros(1, dtype=torch.float64)])


def karras(steps: int, schedule: Schedule, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (eq. 5): noise levels ``sigma / alpha`` uniform in their ``1/rho`` power
    from ``sigma_max`` down to ``sigma_min`` (the paper's 80, 0.002, rho = 7), mapped to this
    schedule's times, then a last step to t = 0. ``sigma_max`` is capped at the schedule's own
    noise level at t = 1 (14.6 for Stable Diffusion's betas), as diffusers and k-diffusion do, and
    ``sigma_min`` at its first trained time (0.0292 at the first of Stable Diffusion's 1000 steps):
    a discrete model is never asked for a noise level below the lowest it was trained at.
    ``rho = inf`` gives geometric levels."""
    check_positive("steps", steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    end = schedule.at(1.0)
    if end.alpha > 0:
        sigma_max = min(sigma_max, (end.sigma / end.alpha).item())
    if (first := schedule.first_trained_time) > 0:  # a discrete model knows no lower noise than its first step
        start = schedule.at(first)
        sigma_min = max(sigma_min, (start.sigma / start.alpha).item())
    if not sigma_min < sigma_max:
        raise ValueError(f"the Karras grid's sigma_min {sigma_min:g} is not below its sigma_max {sigma_max:g} "
                         f"on {schedule!r}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    if math.isinf(rho):  # the limit: geometric levels
        levels = torch.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max)))
    else:
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        levels = (hi + ramp * (lo - hi)) ** rho
    times = schedule.t_at_log_snr(-2 * torch.log(levels))
    return torch.cat([times, torch.zeros(1, dtype=torch.float64)])


def bind_schedule(grid: Callable[..., Tensor], schedule: Schedule) -> Callable[..., Tensor]:
    """A grid function of a config (``steps -> times``) given the run's theory where it takes one
    (``karras``, ``geometric``, ``shifted``) and none was bound, so a config need not build a second."""
    if "schedule" not in inspect.signature(grid).parameters:
        return grid
    if isinstance(grid, partial) and "schedule" in grid.keywords:
        return grid
    return partial(grid, schedule=schedule)


def check_grid(grid: Tensor) -> Tensor:
    """A grid must be 1-D with at least 2 times in [0, 1], strictly decreasing."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"a time grid needs at least 2 times in a 1-D tensor, got shape {tuple(grid.shape)}")
    if not bool(((grid >= 0) & (grid <= 1)).all()):
        raise ValueError(f"grid times must lie in [0, 1], got min {grid.min().item()}, max {grid.max().item()}")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("grid times must be strictly decreasing (from noise at t = 1 towards data at t = 0)")
    return grid
