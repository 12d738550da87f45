"""Samplers written once over the path ``(alpha, sigma)`` and the model's estimates
``(x0_hat, xT_hat)``, so each works for every theory, including one written tomorrow.

Each is a plain function ``(model, schedule, x, grid, ...) -> x`` with ``model(x_t, t)`` returning
the model output (``t`` of shape (B,)). Conditioning and guidance wrap the model beforehand.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from diffusion.schedules import Coefficients, Schedule
from diffusion.samplers.grids import check_grid
from diffusion.samplers.noise import NoiseSource, randn

Denoiser = Callable[[Tensor, Tensor], Tensor]


class StepInfo(NamedTuple):
    """What a progress callback receives after each step."""

    index: int  # step number, 0-based
    total: int  # number of steps
    t: float  # time at the start of the step
    s: float  # time at its end
    x: Tensor  # the sample at s
    x0_hat: Tensor  # the model's estimate of the data at t


Callback = Callable[[StepInfo], None]


class _Step(NamedTuple):
    index: int
    total: int
    t: float
    s: float
    kt: Coefficients  # matrix at t, as Python floats
    ks: Coefficients  # matrix at s
    t_batch: Tensor  # t repeated over the batch, what the model receives


def _steps(schedule: Schedule, x: Tensor, grid: Tensor, progress: bool) -> Iterator[_Step]:
    """Coefficients of the whole grid are computed once, so each step costs only tensor ops
    on the sample and the model call."""
    grid = check_grid(grid)
    coeffs = schedule.at(grid).unbind()
    times = grid.tolist()
    n = len(times) - 1
    # The model sees t in at least float32: in bf16, t = 0.999 would read as 0.996.
    t_dtype = torch.promote_types(x.dtype, torch.float32)
    for i in tqdm(range(n), disable=not progress, desc="sampling", leave=False):
        t_batch = torch.full((x.shape[0],), times[i], device=x.device, dtype=t_dtype)
        yield _Step(i, n, times[i], times[i + 1], coeffs[i], coeffs[i + 1], t_batch)


def _estimate(model: Denoiser, x: Tensor, step_t: Tensor, k: Coefficients) -> tuple[Tensor, Tensor]:
    return k.split(x, model(x, step_t))


def _report(callback: Callback | None, st: _Step, x: Tensor, x0: Tensor) -> None:
    if callback is not None:
        callback(StepInfo(st.index, st.total, st.t, st.s, x, x0))


@torch.no_grad()
def ddim(
    model: Denoiser,
    schedule: Schedule,
    x: Tensor,
    grid: Tensor,
    *,
    eta: float = 0.0,
    generator: NoiseSource | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021). ``eta = 0`` is the deterministic step
    ``x_s = alpha_s x0_hat + sigma_s xT_hat`` (Euler for flow matching); ``eta = 1`` draws from the
    posterior q(x_s | x_t, x0 = x0_hat), i.e. DDPM ancestral sampling. For any path the posterior
    noise is ``eta * (sigma_s / sigma_t) * sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2)``."""
    for st in _steps(schedule, x, grid, progress):
        x0, xT = _estimate(model, x, st.t_batch, st.kt)
        kt, ks = st.kt, st.ks
        if eta == 0 or ks.sigma == 0:
            x = ks.add_noise(x0, xT)
        else:
            variance = (eta * ks.sigma / kt.sigma) ** 2 * (kt.sigma**2 - (kt.alpha / ks.alpha) ** 2 * ks.sigma**2)
            variance = min(max(variance, 0.0), ks.sigma**2)
            noise = randn(x.shape, generator, x.device, x.dtype)  # per sample with a PerSampleNoise
            x = torch.add(x0 * ks.alpha, xT, alpha=math.sqrt(ks.sigma**2 - variance))
            x.add_(noise, alpha=math.sqrt(variance))
        _report(callback, st, x, x0)
    return x


def euler(model: Denoiser, schedule: Schedule, x: Tensor, grid: Tensor, **kwargs) -> Tensor:
    """The deterministic first-order step: flow-matching Euler, DDIM with eta = 0."""
    return ddim(model, schedule, x, grid, eta=0.0, **kwargs)


def ancestral(model: Denoiser, schedule: Schedule, x: Tensor, grid: Tensor, *, generator: NoiseSource | None = None,
              callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DDPM ancestral sampling: DDIM with eta = 1. Its signature names ``generator``, so a caller that
    looks for it there (the theory notebook) passes its noise and does not fall back to the global RNG."""
    return ddim(model, schedule, x, grid, eta=1.0, generator=generator, callback=callback, progress=progress)


@torch.no_grad()
def heun(
    model: Denoiser,
    schedule: Schedule,
    x: Tensor,
    grid: Tensor,
    *,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1).

    The ODE has two natural linear forms, and Euler in either is exactly the DDIM step:
    noise prediction, ``y = x / alpha``, ``tau = sigma / alpha``, ``dy / dtau = xT_hat`` (Karras'
    form), and data prediction, ``z = x / sigma``, ``rho = alpha / sigma``, ``dz / drho = x0_hat``.
    ``tau`` blows up at high noise (it is infinite at t = 1 of flow matching) and ``rho`` at low
    noise, so each step integrates in the one that is bounded on it: ``tau`` (<= 1 on the step)
    if it starts at SNR >= 1, ``rho`` (< 1 at its start) otherwise; neither then divides by a
    vanishing alpha or sigma, whatever the step size. On a variance-exploding path (alpha = 1:
    EDM, VE) ``y`` is ``x`` itself and ``tau`` the noise level, finite everywhere: there every step
    is in Karras' form, as in the paper's Algorithm 1. The trapezoid averages the two estimates:
    ``x_s = (alpha_s / alpha_t) x_t + (sigma_s - alpha_s tau_t) mean(xT_hat)``, or
    ``x_s = (sigma_s / sigma_t) x_t + (alpha_s - sigma_s rho_t) mean(x0_hat)``.
    The last step to sigma = 0 is Euler, as in the paper. Two model calls per step, one on the last."""
    for st in _steps(schedule, x, grid, progress):
        kt, ks = st.kt, st.ks
        x0, xT = _estimate(model, x, st.t_batch, kt)
        x_euler = ks.add_noise(x0, xT)
        if ks.sigma == 0:
            x = x_euler
        else:
            x0_s, xT_s = _estimate(model, x_euler, torch.full_like(st.t_batch, st.s), ks)
            if kt.sigma <= kt.alpha or kt.alpha == 1:
                step = 0.5 * (ks.sigma - ks.alpha * kt.sigma / kt.alpha)
                x = torch.add(x * (ks.alpha / kt.alpha), xT + xT_s, alpha=step)
            else:
                x0 = 0.5 * (x0 + x0_s)
                x = torch.add(x * (ks.sigma / kt.sigma), x0, alpha=ks.alpha - ks.sigma * kt.alpha / kt.sigma)
        _report(callback, st, x, x0)
    return x


@torch.no_grad()
def dpmpp_2m(
    model: Denoiser,
    schedule: Schedule,
    x: Tensor,
    grid: Tensor,
    *,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, data prediction, in
    ``lambda = log(alpha / sigma)``. With ``h = lambda_s - lambda_t`` and ``r = h_prev / h``,
    ``x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) D`` where
    ``D = (1 + 1 / 2r) x0_hat_t - (1 / 2r) x0_hat_prev`` (first order on the first step and on
    the last step to sigma = 0, as diffusers' ``final_sigmas_type="zero"`` and k-diffusion do).
    One model call per step."""
    x0_prev, h_prev = None, None
    for st in _steps(schedule, x, grid, progress):
        kt, ks = st.kt, st.ks
        x0, _ = _estimate(model, x, st.t_batch, kt)
        if ks.sigma == 0:
            x = ks.alpha * x0
        else:
            # e^-h = (alpha_t sigma_s) / (sigma_t alpha_s) stays finite where alpha_t = 0.
            exp_neg_h = (kt.alpha * ks.sigma) / (kt.sigma * ks.alpha)
            h = -math.log(exp_neg_h) if exp_neg_h > 0 else math.inf
            d = x0 if x0_prev is None else torch.add(x0 * (1 + h / (2 * h_prev)), x0_prev, alpha=-h / (2 * h_prev))
            x = torch.add(x * (ks.sigma / kt.sigma), d, alpha=ks.alpha * (1 - exp_neg_h))
            h_prev = h
        x0_prev = x0
        _report(callback, st, x, x0)
    return x
