"""Samplers and time grids, written once for every theory."""

from typing import Callable

from diffusion._checks import check_choice
from diffusion.samplers import grids
from diffusion.samplers.guidance import ClassifierFreeGuidance, concat_conditions
from diffusion.samplers.noise import PerSampleNoise
from diffusion.samplers.solvers import StepInfo, ancestral, ddim, dpmpp_2m, euler, heun

#: Sampler functions by name, as configs and the command line refer to them.
SAMPLERS: dict[str, Callable] = {
    "euler": euler,
    "ddim": ddim,
    "ancestral": ancestral,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
}


def get_sampler(name: str) -> Callable:
    """The sampler function called ``name``; ValueError lists the known names."""
    return SAMPLERS[check_choice("sampler", name, SAMPLERS)]


__all__ = [
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "PerSampleNoise",
    "StepInfo",
    "ancestral",
    "concat_conditions",
    "ddim",
    "dpmpp_2m",
    "euler",
    "get_sampler",
    "grids",
    "heun",
]
