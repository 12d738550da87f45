"""Loss weightings over time, expressed through the schedule's SNR.

A weighting is defined on the error of ``x0_hat`` (where min-SNR-gamma is stated) and carried
to the model's own target by the square of :attr:`Coefficients.x0_error_scale` = sigma / det,
so it is correct for eps, v, x0 and velocity prediction alike. For eps that factor is 1 / SNR
and for v (variance preserving) 1 / (SNR + 1); dividing v-prediction by SNR is the classic bug.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from diffusion._checks import check_positive
from diffusion.schedules import Coefficients, Schedule

#: An SNR at t = 1 at or below this is zero terminal SNR: alpha(1) = 0 up to float64 rounding
#: (cos(pi / 2)^2 ~ 4e-33); the smallest terminal SNR of a published beta table, the cosine
#: schedule's, is 2.4e-9.
ZERO_SNR = 1e-20


class LossWeighting(ABC):
    """Per-sample weight of the mean squared error on the model's target, from the
    coefficients at the samples' times (``schedule.at(t)``, fields of shape (B,))."""

    @abstractmethod
    def __call__(self, k: Coefficients) -> Tensor: ...

    def check(self, schedule: Schedule) -> None:
        """Raise ValueError if this weighting cannot train ``schedule``; the objective asks when
        it is built."""


class NoWeighting(LossWeighting):
    """Plain mean squared error on the model's target."""

    def __call__(self, k: Coefficients) -> Tensor:
        return torch.ones_like(k.alpha)

    def __repr__(self) -> str:
        return "NoWeighting()"


class SNRWeighting(LossWeighting):
    """A weighting stated on the x0 error as a function of SNR, converted to the target."""

    @abstractmethod
    def x0_weight(self, snr: Tensor) -> Tensor: ...

    def __call__(self, k: Coefficients) -> Tensor:
        scale = k.x0_error_scale
        # At t = 0 (SNR = inf) the x0 error of a target error is 0 while x0_weight may be inf.
        weight = self.x0_weight(k.snr) * scale**2
        return torch.where(scale == 0, torch.zeros_like(weight), weight)


class MinSNR(SNRWeighting):
    """Min-SNR-gamma (Hang et al. 2023): x0-error weight ``min(SNR, gamma)``, i.e.
    ``min(SNR, gamma) / SNR`` for eps, ``min(SNR, gamma) / (SNR + 1)`` for v (VP) and
    ``min(SNR, gamma)`` for x0 prediction. The paper's gamma is 5. A schedule whose SNR reaches
    0 at t = 1 is refused when the objective is built (:meth:`check`)."""

    def __init__(self, gamma: float = 5.0):
        self.gamma = check_positive("gamma", gamma)

    def x0_weight(self, snr: Tensor) -> Tensor:
        return snr.clamp(max=self.gamma)

    def check(self, schedule: Schedule) -> None:
        """Refuses a schedule whose SNR reaches 0 at t = 1 (zero terminal SNR, flow matching):
        min(SNR, gamma) is 0 there, so the step from pure noise, which zero terminal SNR exists
        to train (Lin et al. 2024), would get no weight and the steps next to it almost none."""
        terminal = schedule.at(1.0).snr
        if terminal <= ZERO_SNR:
            raise ValueError(
                f"{self!r} cannot train {schedule!r}: its SNR at t = 1 is {float(terminal):.3g}, where the "
                "min-SNR weight min(SNR, gamma) is 0, so the model would never learn the first sampling step, "
                "from pure noise, that zero terminal SNR is for (Lin et al. 2024). Use NoWeighting "
                "(schedule.weighting._target_=diffusion.weighting.NoWeighting: plain MSE on the target; with "
                "v-prediction its x0 weight is SNR + 1, 1 at t = 1, as Lin et al. train), or keep MinSNR with a "
                "schedule whose SNR stays above 0 (for DDPM, zero_terminal_snr=false)."
            )

    def __repr__(self) -> str:
        return f"MinSNR(gamma={self.gamma})"


class EDMWeighting(SNRWeighting):
    """EDM's loss weight (Karras et al. 2022, eq. 8): ``lambda(sigma) = (sigma^2 + s^2) / (sigma s)^2``
    on the x0 error, ``SNR + 1 / s^2`` for ``s = sigma_data`` in any theory. On EDM's own target F
    it is exactly 1 (``lambda c_out^2 = 1``: the preconditioning is chosen so), so it matters when
    EDM's weighting trains another theory."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = check_positive("sigma_data", sigma_data)

    def x0_weight(self, snr: Tensor) -> Tensor:
        return snr + 1 / self.sigma_data**2

    def __repr__(self) -> str:
        return f"EDMWeighting(sigma_data={self.sigma_data})"
