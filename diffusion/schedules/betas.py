"""Beta tables of discrete DDPM schedules, in float64."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion._checks import check_choice


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 over 1000 steps."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def scaled_linear_betas(num_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion (Rombach et al. 2022): sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021: alpha_bar(t) = cos^2(pi/2 (t + s) / (1 + s)), betas clipped at 0.999."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


BETA_SCHEDULES = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "cosine": cosine_betas}


def make_betas(name: str, num_steps: int, beta_start: float | None = None, beta_end: float | None = None) -> Tensor:
    """A named beta table; ``beta_start``/``beta_end`` override the paper's values (linear kinds only)."""
    check_choice("beta_schedule", name, BETA_SCHEDULES)
    if name == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("beta_start and beta_end do not apply to beta_schedule='cosine'; leave them unset")
        return cosine_betas(num_steps)
    ends = {k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if v is not None}
    return BETA_SCHEDULES[name](num_steps, **ends)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so that the last step has
    SNR exactly 0 while the first keeps its value."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def check_betas(betas: Tensor) -> Tensor:
    """A beta table must be 1-D, finite, in (0, 1] and non-decreasing (noise only grows)."""
    if betas.ndim != 1 or betas.numel() < 2:
        raise ValueError(f"betas must be a 1-D table of at least 2 steps, got shape {tuple(betas.shape)}")
    if not bool(torch.isfinite(betas).all()) or not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError(
            f"betas must lie in (0, 1]; got min {betas.min().item():g}, max {betas.max().item():g}"
        )
    drops = torch.nonzero(betas[1:] < betas[:-1]).flatten()
    if drops.numel():
        i = drops[0].item()
        raise ValueError(
            f"betas must be non-decreasing; beta[{i + 1}] = {betas[i + 1].item():g} < beta[{i}] = {betas[i].item():g}"
        )
    return betas
