"""Flow matching on the straight path (rectified flow; Liu et al. 2022, Lipman et al. 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion.schedules.base import Schedule
from diffusion.timesteps import time_shift



class FlowMatching(Schedule):
    """``x_t = (1 - t) x0 + t xT``; by default the model predicts the velocity
    ``d x_t / dt = xT - x0`` (c = -1, d = 1). Any other standard prediction also works."""

    def __init__(self, prediction: str = "velocity"):
        super().__init__(prediction)

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def alpha_dot(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -1.0)

    def sigma_dot(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def shift_times(self, t: Tensor, shift: float) -> Tensor:
        # The log-SNR shift of the base class, in closed form on this path (Esser et al. 2024, eq. 23).
        return t if shift == 1 else time_shift(t, shift)
