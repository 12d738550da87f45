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
from diffusion.schedules import Coefficients


class LossWeighting(ABC):
    """Per-sample weight of the mean squared error on the model's target, from the
    coefficients at the samples' times (``schedule.at(t)``, fields of shape (B,))."""

    @abstractmethod
    def __call__(self, k: Coefficients) -> Tensor: ...


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
    ``min(SNR, gamma)`` for x0 prediction. The paper's gamma is 5."""

    def __init__(self, gamma: float = 5.0):
        self.gamma = check_positive("gamma", gamma)

    def x0_weight(self, snr: Tensor) -> Tensor:
        return snr.clamp(max=self.gamma)

    def __repr__(self) -> str:
        return f"MinSNR(gamma={self.gamma})"
