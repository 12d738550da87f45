"""Variance-exploding paths, ``x_t = x0 + sigma(t) xT``: EDM (Karras et al. 2022) and the VE SDE of
Song et al. 2021. Both are the same two linear definitions as every other theory; what they add is
how the backbone sees its input, :meth:`Schedule.model_input` (EDM's ``c_in`` and ``c_noise``).

With alpha = 1, the log-SNR is ``-2 log sigma``, so the time of a noise level is closed-form here
(:meth:`t_of_sigma`) and the bisection of the base class is never needed.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import Tensor

from diffusion._checks import check_positive
from diffusion.schedules.base import Schedule


class _Exploding(Schedule):
    """alpha = 1; a subclass defines the noise level ``sigma(t)`` and its inverse."""

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def alpha_dot(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    @abstractmethod
    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        """The time at which the noise level is ``sigma`` (float64), clamped to [0, 1]."""

    def t_at_log_snr(self, log_snr: Tensor, iterations: int = 64) -> Tensor:
        return self.t_of_sigma(torch.exp(-0.5 * torch.as_tensor(log_snr, dtype=torch.float64)))

    def _input_scale(self, sigma: Tensor, sigma_data: float | None) -> Tensor | float:
        # EDM's c_in: x_t / sqrt(sigma^2 + sigma_data^2) has the variance of the data's scale, ~1.
        return 1.0 if sigma_data is None else torch.rsqrt(sigma**2 + sigma_data**2)


class EDM(_Exploding):
    """EDM (Karras et al. 2022, Table 1, "ours"): ``x_t = x0 + sigma xT`` with the network ``F`` of
    the preconditioned denoiser ``D = c_skip x_t + c_out F(c_in x_t; c_noise)``.

    The model definition is F's target, ``(x0 - c_skip x_t) / c_out``, which is linear in
    ``(x0, xT)``: ``c = sigma / (s sqrt(sigma^2 + s^2))``, ``d = -s / sqrt(sigma^2 + s^2)`` for
    ``s = sigma_data``. Its input map is ``c_in = 1 / sqrt(sigma^2 + s^2)`` and
    ``c_noise = log(sigma) / 4``, which the backbone embeds as it is (the config sets its
    ``time_scale`` to 1).

    Time is the ``1/rho`` root of the noise level, ``sigma(t) = sigma_max t^rho``, so Karras' grid
    of sigma_max..sigma_min is a uniform grid of t from 1 down to ``(sigma_min / sigma_max)^(1/rho)``.
    """

    def __init__(self, sigma_data: float = 0.5, sigma_max: float = 80.0, rho: float = 7.0):
        super().__init__()
        self.sigma_data = check_positive("sigma_data", sigma_data)
        self.sigma_max = check_positive("sigma_max", sigma_max)
        self.rho = check_positive("rho", rho)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_max * t**self.rho

    def sigma_dot(self, t: Tensor) -> Tensor:
        return self.sigma_max * self.rho * t ** (self.rho - 1)

    def _norm(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.sigma(t) ** 2 + self.sigma_data**2)

    def c(self, t: Tensor) -> Tensor:
        return self.sigma(t) / (self.sigma_data * self._norm(t))

    def d(self, t: Tensor) -> Tensor:
        return -self.sigma_data / self._norm(t)

    def model_input(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigma(t)
        c_in = self._input_scale(sigma, self.sigma_data).reshape(-1, *(1,) * (x_t.ndim - 1))
        return x_t * c_in.to(x_t.dtype), torch.log(sigma) / 4

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        return (sigma / self.sigma_max).clamp(0, 1) ** (1 / self.rho)


class VarianceExploding(_Exploding):
    """The VE SDE of Song et al. 2021 (NCSN++), ``dx = sqrt(d sigma^2 / dt) dw`` from clean data:
    ``sigma(t)^2 = sigma_min^2 ((sigma_max / sigma_min)^(2t) - 1)``, its exact marginal, which is
    0 at t = 0 and ``sqrt(sigma_max^2 - sigma_min^2)`` at t = 1 (NCSN++'s CIFAR-10 range, 0.01..50).
    Above ``sigma_min`` it is geometric in t, as Song et al. parametrise it.

    The model predicts the noise ``xT`` (the score times ``-sigma``), i.e. EDM's VE column with
    ``c_skip = 1, c_out = sigma`` up to F's sign. The backbone's noise label is
    ``c_noise = log(sigma / 2)`` (EDM Table 1); its input is ``x_t / sqrt(sigma^2 + sigma_data^2)``,
    or ``x_t`` itself as in NCSN++ with ``sigma_data=None``.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, sigma_data: float | None = 0.5,
                 prediction: str = "eps"):
        super().__init__(prediction)
        self.sigma_min = check_positive("sigma_min", sigma_min)
        self.sigma_max = check_positive("sigma_max", sigma_max)
        if not sigma_min < sigma_max:
            raise ValueError(f"need sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_data = None if sigma_data is None else check_positive("sigma_data", sigma_data)
        self._log_ratio = math.log(sigma_max / sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        # expm1: near t = 0, r^(2t) - 1 ~ 2t log r loses every digit as a difference.
        return self.sigma_min * torch.sqrt(torch.expm1(2 * self._log_ratio * t))

    def sigma_dot(self, t: Tensor) -> Tensor:
        grow = torch.exp(2 * self._log_ratio * t)
        return self.sigma_min**2 * self._log_ratio * grow / self.sigma(t)

    def model_input(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigma(t)
        c_in = self._input_scale(sigma, self.sigma_data)
        if isinstance(c_in, Tensor):
            x_t = x_t * c_in.reshape(-1, *(1,) * (x_t.ndim - 1)).to(x_t.dtype)
        return x_t, torch.log(sigma / 2)

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        return (torch.log1p((sigma / self.sigma_min) ** 2) / (2 * self._log_ratio)).clamp(0, 1)
