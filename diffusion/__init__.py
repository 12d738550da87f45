"""Diffusion models for research: a theory is two linear definitions, and every sampler and
loss is derived from them once (see README.md and notebooks/theory.ipynb)."""

from diffusion.objective import DiffusionObjective
from diffusion.samplers import SAMPLERS, ClassifierFreeGuidance, get_sampler, grids
from diffusion.schedules import DDPM, Coefficients, FlowMatching, Schedule

__version__ = "0.1.0"

__all__ = [
    "DDPM",
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "Coefficients",
    "DiffusionObjective",
    "FlowMatching",
    "Schedule",
    "get_sampler",
    "grids",
]
