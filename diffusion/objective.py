"""The training objective of a theory: draw t and noise, form x_t, regress the model's target."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from diffusion.schedules import Schedule
from diffusion.timesteps import TimeDistribution, Uniform
from diffusion.weighting import LossWeighting, NoWeighting

#: ``model(x_t, t) -> output`` of the shape of ``x_t``; ``t`` has shape (B,).
Denoiser = Callable[[Tensor, Tensor], Tensor]


@dataclass
class LossOutput:
    loss: Tensor  # scalar: mean over the batch of the weighted per-sample loss
    per_sample: Tensor  # (B,) weighted loss of each sample, for per-t diagnostics
    t: Tensor  # (B,) the times drawn


@dataclass
class DiffusionObjective:
    """``loss = w(t) * mean((model(x_t, t) - (c x0 + d xT))^2)`` with ``x_t = alpha x0 + sigma xT``."""

    schedule: Schedule
    time_distribution: TimeDistribution = field(default_factory=Uniform)
    weighting: LossWeighting = field(default_factory=NoWeighting)

    def __post_init__(self) -> None:
        self.weighting.check(self.schedule)  # e.g. min-SNR refuses zero terminal SNR
        self.time_distribution.bind(self.schedule)  # shifts act on its log-SNR, noise levels map to its times

    def __call__(
        self,
        model: Denoiser,
        x0: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Draws ``t`` and ``noise`` unless given (fixed values make validation losses comparable)."""
        t, noise = self.draw(x0, t, noise, generator)
        per_sample, t = self.per_sample_loss(model, x0, t, noise)
        return LossOutput(per_sample.mean(), per_sample, t)

    def per_sample_loss(self, model: Denoiser, x0: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``(weighted loss of each sample, the times it was taken at)``; a subclass adds terms
        (diffusion.variance.HybridObjective)."""
        k = self.schedule.at(t)
        kx = k.like(x0)
        output = model(kx.add_noise(x0, noise), t)
        if output.shape != x0.shape:
            raise ValueError(f"model output has shape {tuple(output.shape)}, expected the input's {tuple(x0.shape)}")
        error = (output.float() - kx.target(x0, noise).float()) ** 2
        return error.flatten(1).mean(1) * self.weighting(k).float(), t

    def draw(self, x0: Tensor, t: Tensor | None, noise: Tensor | None,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``(t, noise)``: those given, else drawn (t from the time distribution, standard normal noise)."""
        if t is None:
            t = self.time_distribution.sample(x0.shape[0], size=tuple(x0.shape[-2:]), generator=generator, device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return t, noise
