"""Stochastic samplers of the reverse SDE, written once over the path ``(alpha, sigma)`` and the
model's estimates ``(x0_hat, xT_hat)``, so each works for every theory.

The score of ``x_t = alpha x0 + sigma xT`` is ``grad log p_t(x) = -E[xT | x_t] / sigma = -xT_hat / sigma``,
so a model of any prediction type gives it. Each sampler draws its noise with
``randn(shape, generator, ...)``: with a PerSampleNoise, every image's draws depend on its own seed alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion._checks import check_choice
from diffusion.samplers.noise import NoiseSource, randn
from diffusion.samplers.solvers import Callback, Denoiser, _estimate, _report, _steps, _Step
from diffusion.schedules import Schedule

#: SiT's diffusion forms (Ma et al. 2024, transport/path.py), as functions of our time t (t = 1 is
#: noise; SiT's time is 1 - t), each with SiT's use of ``diffusion_norm``. "decreasing" and
#: "increasing-decreasing" are named, as in SiT, by their course along the sampling direction.
DIFFUSION_FORMS = ("sigma", "constant", "SBDM", "linear", "decreasing", "increasing-decreasing")


def _check_eta(eta: float) -> float:
    if not 0 <= eta <= 1:
        raise ValueError(f"eta={eta}: must be in [0, 1] (0: deterministic, 1: the full stochastic sampler)")
    return float(eta)


def _diffusion_over_step(form: str, norm: float, st: _Step) -> float:
    """``D(t) * (t - s)``: SiT's diffusion D (noise ``sqrt(2 D dt)``) times the step length.

    "SBDM" is the diffusion of the forward process itself, ``D = g^2 / 2 = sigma^2 d/dt log(sigma / alpha)``;
    ``log(sigma / alpha)`` is integrated over the step exactly, ``D dt = sigma_t^2 h`` with
    ``h = lambda_s - lambda_t``, so no theory needs to define the derivatives of its path."""
    dt, t, kt, ks = st.t - st.s, st.t, st.kt, st.ks
    if form == "SBDM":
        if kt.alpha == 0:
            raise ValueError(f"diffusion_form='SBDM' is infinite at t = {t:g}, where alpha = 0 (pure noise, e.g. "
                             "flow matching at t = 1); start the grid below it or choose diffusion_form='sigma'")
        h = math.log(ks.alpha * kt.sigma / (ks.sigma * kt.alpha))
        return norm * kt.sigma**2 * h
    diffusion = {
        "constant": norm,
        "sigma": norm * kt.sigma,
        "linear": norm * t,
        "decreasing": 0.25 * (1 - norm * math.cos(math.pi * t)) ** 2,  # SiT: 0.25 (norm cos(pi t_sit) + 1)^2
        "increasing-decreasing": norm * math.sin(math.pi * t) ** 2,
    }[form]
    return diffusion * dt


@torch.no_grad()
def sde(
    model: Denoiser,
    schedule: Schedule,
    x: Tensor,
    grid: Tensor,
    *,
    diffusion_form: str = "sigma",
    diffusion_norm: float = 1.0,
    generator: NoiseSource | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler–Maruyama on the reverse SDE with a diffusion coefficient of the user's choice (SiT's
    SDE sampler, Ma et al. 2024), with its last-step denoise.

    Derivation. The probability-flow ODE of the path moves ``x`` with ``v = E[dx_t/dt | x_t] =
    alpha' x0_hat + sigma' xT_hat``. For any ``D(t) >= 0`` the SDE ``dx = [v + D score] dt +
    sqrt(2 D) dW`` has the same marginals ``p_t`` (Fokker–Planck: the ``D`` terms cancel), and its
    time reversal, run from t to s < t, is ``dx = [v - D score] dt + sqrt(2 D) dW_bar``. With
    ``score = -xT_hat / sigma_t``, one Euler–Maruyama step of length ``dt = t - s`` is

        x_s = x_t - dt v + dt D score + sqrt(2 D dt) z.

    Taking ``alpha'`` and ``sigma'`` as their slopes over the step (exact for a linear path such as
    flow matching, where this is SiT's step; no derivatives are needed for DDPM's table) makes
    ``x_t - dt v = alpha_s x0_hat + sigma_s xT_hat``, the deterministic step, so

        x_s = alpha_s x0_hat + (sigma_s - D dt / sigma_t) xT_hat + sqrt(2 D dt) z.

    ``D = 0`` is Euler / DDIM; "SBDM", ``D = g^2 / 2``, is the reverse SDE of the forward process
    (Song et al. 2021). The last step is the deterministic one, no noise and no score term: into
    t = 0 it is ``x0_hat``, SiT's "Tweedie" denoise. One model call per step.

    Args:
        diffusion_form: D(t) up to ``diffusion_norm``, one of :data:`DIFFUSION_FORMS` ("sigma":
            ``D = sigma_t``, SiT's default; "SBDM": ``g^2 / 2``; "linear": ``D = t``; "constant").
        diffusion_norm: SiT's ``diffusion_norm``: the scale of D (0: the deterministic sampler), but
            for "decreasing", ``D = (1 - norm cos(pi t))^2 / 4``, as in SiT.
    """
    check_choice("diffusion_form", diffusion_form, DIFFUSION_FORMS)
    if not (math.isfinite(diffusion_norm) and diffusion_norm >= 0):
        raise ValueError(f"diffusion_norm={diffusion_norm}: must be a finite number >= 0 (the scale of D(t))")
    for st in _steps(schedule, x, grid, progress):
        x0, xT = _estimate(model, x, st.t_batch, st.kt)
        ks = st.ks
        if st.index == st.total - 1:
            x = ks.add_noise(x0, xT)
        else:
            spread = _diffusion_over_step(diffusion_form, float(diffusion_norm), st)  # D dt
            noise = randn(x.shape, generator, x.device, x.dtype)
            x = torch.add(x0 * ks.alpha, xT, alpha=ks.sigma - spread / st.kt.sigma)
            x.add_(noise, alpha=math.sqrt(2 * spread))
        _report(callback, st, x, x0)
    return x


def _ancestral_levels(st: _Step, eta: float) -> tuple[float, float]:
    """Karras' ``get_ancestral_step`` in the path's units: ``(sigma_down, sigma_up)`` times alpha_s.

    In the variance-exploding view ``y = x / alpha`` at level ``tau = sigma / alpha``, Karras'
    ``tau_up = min(tau_s, eta tau_s sqrt(1 - tau_s^2 / tau_t^2))`` and ``tau_down = sqrt(tau_s^2 -
    tau_up^2)``. ``tau_s / tau_t = e^-h`` stays finite where alpha_t = 0, and ``alpha_s tau = sigma_s``."""
    ks, kt = st.ks, st.kt
    ratio = (kt.alpha * ks.sigma) / (kt.sigma * ks.alpha)  # tau_s / tau_t = e^-h
    up = min(ks.sigma, eta * ks.sigma * math.sqrt(max(1 - ratio**2, 0.0)))
    return math.sqrt(max(ks.sigma**2 - up**2, 0.0)), up


@torch.no_grad()
def euler_ancestral(
    model: Denoiser,
    schedule: Schedule,
    x: Tensor,
    grid: Tensor,
    *,
    eta: float = 1.0,
    generator: NoiseSource | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler ancestral in Karras' form (k-diffusion's ``sample_euler_ancestral``): an Euler step of
    the ODE down to the level ``sigma_down``, then fresh noise up to ``sigma_s``.

    In ``y = x / alpha`` the Euler step with ``dy / dtau = (y - x0_hat) / tau = xT_hat`` lands on
    ``x0_hat + tau_down xT_hat``; times alpha_s, ``x_s = alpha_s x0_hat + sigma_down xT_hat +
    sigma_up z`` (see :func:`_ancestral_levels`). It is the same step as DDIM with the same eta:
    ``sigma_up^2 = eta^2 sigma_s^2 (1 - e^-2h)`` is DDIM's posterior variance written in
    ``h = lambda_s - lambda_t``, so at eta = 1 both are DDPM's ancestral sampler. The last step to
    sigma = 0 adds no noise. One model call per step."""
    eta = _check_eta(eta)
    for st in _steps(schedule, x, grid, progress):
        x0, xT = _estimate(model, x, st.t_batch, st.kt)
        ks = st.ks
        if ks.sigma == 0:
            x = ks.add_noise(x0, xT)
        else:
            down, up = _ancestral_levels(st, eta)
            noise = randn(x.shape, generator, x.device, x.dtype)
            x = torch.add(x0 * ks.alpha, xT, alpha=down)
            x.add_(noise, alpha=up)
        _report(callback, st, x, x0)
    return x


@torch.no_grad()
def dpmpp_2m_sde(
    model: Denoiser,
    schedule: Schedule,
    x: Tensor,
    grid: Tensor,
    *,
    eta: float = 1.0,
    generator: NoiseSource | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022; k-diffusion's ``sample_dpmpp_2m_sde``, midpoint variant).

    With ``h = lambda_s - lambda_t`` (``lambda = log(alpha / sigma)``) and ``r = h_prev / h``:

        x_s = (sigma_s / sigma_t) e^(-eta h) x_t + alpha_s (1 - e^(-(1 + eta) h)) [x0_hat + (x0_hat - x0_prev) / 2r]
              + sigma_s sqrt(1 - e^(-2 eta h)) z,

    k-diffusion's variance-exploding step multiplied by alpha_s (there ``x = y alpha``, ``sigma_ve =
    sigma / alpha``, ``e^-h = sigma_ve_s / sigma_ve_t``). eta = 1 is the SDE solver, eta = 0
    DPM-Solver++(2M). First order on the first step (no previous estimate); the last step, to
    sigma = 0, jumps to ``alpha_s x0_hat``. Everything stays finite where alpha_t = 0 (h = inf,
    then e^-h = 0 and the next step's ``1 / r = 0``). One model call per step."""
    eta = _check_eta(eta)
    x0_prev, h_prev = None, math.inf
    for st in _steps(schedule, x, grid, progress):
        kt, ks = st.kt, st.ks
        x0, _ = _estimate(model, x, st.t_batch, kt)
        if ks.sigma == 0:
            x = ks.alpha * x0
        else:
            exp_neg_h = (kt.alpha * ks.sigma) / (kt.sigma * ks.alpha)
            h = -math.log(exp_neg_h) if exp_neg_h > 0 else math.inf
            gain = ks.alpha * -math.expm1(-(1 + eta) * h)  # alpha_s (1 - e^-(1 + eta) h)
            x = torch.add(x * (ks.sigma / kt.sigma * exp_neg_h**eta), x0, alpha=gain)  # e^-eta h, 1 at eta = 0
            if x0_prev is not None:
                x.add_(x0 - x0_prev, alpha=0.5 * gain * h / h_prev)  # the midpoint correction, 1 / 2r
            if eta:
                noise = randn(x.shape, generator, x.device, x.dtype)
                x.add_(noise, alpha=ks.sigma * math.sqrt(-math.expm1(-2 * eta * h)))
            h_prev = h
        x0_prev = x0
        _report(callback, st, x, x0)
    return x
