"""The theories every test runs over, including one a user writes in a few lines."""

from __future__ import annotations

import torch

from diffusion.samplers import grids
from diffusion.schedules import DDPM, EDM, FlowMatching, Schedule, VarianceExploding


class TrigFlow(Schedule):
    """A new theory by subclassing: alpha = cos(pi t / 2), sigma = sin(pi t / 2), predicting
    v = alpha xT - sigma x0."""

    def alpha(self, t):
        return torch.cos(torch.pi * t / 2)

    def sigma(self, t):
        return torch.sin(torch.pi * t / 2)

    def c(self, t):
        return -self.sigma(t)

    def d(self, t):
        return self.alpha(t)


def _trailing(steps: int) -> torch.Tensor:
    return grids.ddpm(steps, "trailing")


#: name -> (schedule factory, the grid it is sampled on)
THEORIES = {
    "flow": (FlowMatching, grids.uniform),
    "flow-x0": (lambda: FlowMatching("x0"), grids.uniform),
    "trig": (TrigFlow, grids.uniform),
    "ddpm-linear-eps": (lambda: DDPM("linear", "eps"), _trailing),
    "ddpm-linear-v": (lambda: DDPM("linear", "v"), _trailing),
    "ddpm-cosine-x0": (lambda: DDPM("cosine", "x0"), _trailing),
    "ddpm-scaled-v-zero-snr": (lambda: DDPM("scaled_linear", "v", zero_terminal_snr=True), _trailing),
    "edm": (EDM, lambda steps: grids.karras(steps, EDM())),
    "ve": (VarianceExploding, lambda steps: grids.geometric(steps, VarianceExploding())),
}
