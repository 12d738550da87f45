"""DDPM (Ho et al. 2020): a discrete table of betas, seen in continuous time."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffusion._checks import check_choice
from diffusion.schedules.base import Schedule
from diffusion.schedules.betas import check_betas, make_betas, rescale_zero_terminal_snr


class DDPM(Schedule):
    """Variance-preserving path ``x_t = sqrt(abar) x0 + sqrt(1 - abar) xT`` from a beta table.

    Training step ``i`` in 0..N-1 (diffusers' ``timestep = i``) sits at ``t = (i + 1) / N``, and
    ``t = 0`` is clean data (abar = 1, diffusers' ``set_alpha_to_one``). Between steps
    ``alpha = sqrt(abar)`` is interpolated linearly and ``sigma = sqrt(1 - alpha^2)``, so the path
    stays variance preserving and continuous-time samplers and time distributions apply as they are.

    Args:
        beta_schedule: "linear" (Ho et al.), "scaled_linear" (Stable Diffusion) or "cosine"
            (Nichol & Dhariwal); ignored when ``betas`` is given.
        prediction: "eps", "v" or "x0".
        num_steps: N, the number of training steps.
        beta_start, beta_end: override the paper's ends of a linear kind.
        zero_terminal_snr: rescale the table so t = 1 is pure noise (Lin et al. 2024); needs
            prediction "v" or "x0", since eps cannot be turned back into x0 at zero SNR.
        betas: an explicit table of N betas (e.g. a model's trained betas).
    """

    def __init__(
        self,
        beta_schedule: str = "linear",
        prediction: str = "eps",
        num_steps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        zero_terminal_snr: bool = False,
        betas: Sequence[float] | Tensor | None = None,
    ):
        super().__init__(check_choice("prediction", prediction, ("eps", "v", "x0")))
        if zero_terminal_snr and prediction == "eps":
            raise ValueError(
                "zero_terminal_snr=True with prediction='eps' is singular at t = 1 (x0 cannot be recovered "
                "from a noise prediction at zero SNR, Lin et al. 2024); use prediction='v' or 'x0'"
            )
        if betas is None:
            table = make_betas(beta_schedule, num_steps, beta_start, beta_end)
        else:
            table = torch.as_tensor(betas, dtype=torch.float64).clone()
            if table.ndim != 1 or table.numel() != num_steps:
                raise ValueError(f"betas must hold num_steps={num_steps} values, got shape {tuple(table.shape)}")
        check_betas(table)
        if zero_terminal_snr:
            table = check_betas(rescale_zero_terminal_snr(table))
        self.beta_schedule = beta_schedule if betas is None else "custom"
        self.num_steps = num_steps
        self.zero_terminal_snr = zero_terminal_snr
        self.betas = table
        self.alphas_cumprod = torch.cumprod(1 - table, 0)
        # Knots of alpha at t = k / N, k = 0..N; knot 0 is clean data.
        self._knots = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod.sqrt()])
        self._knot_cache: dict[torch.device, Tensor] = {}

    def _alpha64(self, t: Tensor) -> Tensor:
        knots = self._knot_cache.get(t.device)
        if knots is None:
            knots = self._knot_cache.setdefault(t.device, self._knots.to(t.device))
        pos = t.to(torch.float64) * self.num_steps
        i = pos.floor().clamp(0, self.num_steps - 1)
        lo = knots[i.long()]
        return lo + (pos - i) * (knots[i.long() + 1] - lo)

    def alpha(self, t: Tensor) -> Tensor:
        return self._alpha64(t).to(t.dtype)

    def sigma(self, t: Tensor) -> Tensor:
        # In float64, then cast: 1 - alpha^2 near t = 0 loses every digit in float32.
        return (1 - self._alpha64(t) ** 2).clamp_min(0).sqrt().to(t.dtype)

    @property
    def first_trained_time(self) -> float:
        return 1 / self.num_steps  # training step 0

    def timestep_to_t(self, timestep: Tensor | int) -> Tensor:
        """diffusers' integer timestep i -> continuous t = (i + 1) / N."""
        return (torch.as_tensor(timestep, dtype=torch.float64) + 1) / self.num_steps
