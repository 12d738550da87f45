"""sampler=ddpm_learned: ancestral DDPM with the model's learned variance (diffusion.variance),
on any sub-grid of the training steps, respaced as ADM does."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm import tqdm

from diffusion.samplers.grids import check_grid
from diffusion.samplers.noise import NoiseSource, randn
from diffusion.samplers.solvers import Callback, Denoiser, StepInfo
from diffusion.schedules import DDPM, Schedule
from diffusion.variance import PosteriorTable, check_ddpm, split_variance


def grid_steps(schedule: DDPM, grid: Tensor) -> Tensor:
    """The training steps of a sampling grid: every time but the last at ``(i + 1) / N``, the last 0."""
    grid = check_grid(grid)
    n = schedule.num_steps
    steps = grid[:-1] * n - 1
    off = (steps - steps.round()).abs() > 1e-6
    if grid[-1] != 0 or bool(off.any()):
        bad = grid[:-1][off][:3].tolist() if bool(off.any()) else []
        raise ValueError(f"sampler=ddpm_learned steps over the training steps of the DDPM, t = (i + 1) / {n}, down "
                         f"to t = 0; the grid {'ends at ' + format(grid[-1].item(), 'g') if not bad else 'has'} "
                         f"{'times off the steps: ' + str(bad) if bad else ''}. Use a DDPM grid "
                         "(grid=linspace, trailing or leading) or a uniform one with steps dividing N")
    return steps.round().long().flip(0)  # increasing


@torch.no_grad()
def ddpm_learned(
    model: Denoiser,
    schedule: Schedule,
    x: Tensor,
    grid: Tensor,
    *,
    clip_denoised: bool = False,
    generator: NoiseSource | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral DDPM with the model's learned variance (ADM's ``p_sample_loop``, DiT's sampler).

    ``grid`` holds kept training steps at ``t = (i + 1) / N`` and ends at 0; the chain over the kept
    steps is respaced as ADM does (:class:`PosteriorTable`), so 250 of 1000 steps sample as DiT.
    Each step draws ``x_{k-1} ~ N(posterior mean at x0_hat, exp(model log variance))``; the last
    step returns the mean, i.e. ``x0_hat`` (no noise). ``clip_denoised`` clips ``x0_hat`` to
    [-1, 1] (ADM's pixel models; DiT's latents leave it off). The model is called
    ``model(x, t, return_variance=True)`` and returns 2C channels: prediction, then ``v``."""
    schedule = check_ddpm(schedule, "sampler=ddpm_learned")
    steps = grid_steps(schedule, grid)
    table = PosteriorTable.from_schedule(schedule, steps)
    # Per step, as Python floats (computed once): the posterior mean's coefficients and the two log variances.
    coef_x0, coef_xt = table.coef_x0.tolist(), table.coef_xt.tolist()
    log_beta, log_tilde = table.betas.log().tolist(), table.posterior_log_variance_clipped.tolist()
    times = check_grid(grid).tolist()
    coefficients = schedule.at(check_grid(grid)).unbind()
    t_dtype = torch.promote_types(x.dtype, torch.float32)
    total = len(steps)
    for n, k in enumerate(tqdm(range(total - 1, -1, -1), disable=not progress, desc="sampling", leave=False)):
        t_batch = torch.full((x.shape[0],), times[n], device=x.device, dtype=t_dtype)
        prediction, v = split_variance(model(x, t_batch, return_variance=True), x.shape[1])
        x0, _ = coefficients[n].split(x, prediction)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = torch.add(x0 * coef_x0[k], x, alpha=coef_xt[k])
        if k > 0:  # log variance frac log beta + (1 - frac) log beta~, frac = (v + 1) / 2; its half for the std
            log_std = (v.to(x.dtype) + 1).mul_(0.25 * (log_beta[k] - log_tilde[k])).add_(0.5 * log_tilde[k])
            x = mean.addcmul_(log_std.exp_(), randn(x.shape, generator, x.device, x.dtype))
        else:
            x = mean
        if callback is not None:
            callback(StepInfo(n, total, times[n], times[n + 1], x, x0))
    return x

ddpm_learned.needs_learned_variance = True  # type: ignore[attr-defined]  # DiffusionModule.sample checks the model
