"""Samplers and time grids, written once for every theory; and ddpm_learned, for models with learned variance."""

import inspect
from functools import partial
from typing import Any, Callable

from diffusion._checks import check_choice
from diffusion.samplers import grids
from diffusion.samplers.guidance import ClassifierFreeGuidance, concat_conditions
from diffusion.samplers.learned import ddpm_learned
from diffusion.samplers.noise import PerSampleNoise
from diffusion.samplers.sde import DIFFUSION_FORMS, dpmpp_2m_sde, euler_ancestral, sde
from diffusion.samplers.solvers import StepInfo, ancestral, ddim, dpmpp_2m, euler, heun

#: Sampler functions by name, as configs and the command line refer to them.
SAMPLERS: dict[str, Callable] = {
    "euler": euler,
    "ddim": ddim,
    "ancestral": ancestral,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "sde": sde,
}

#: Samplers of one kind of model only, reached by name like the others: ``ddpm_learned`` needs a
#: DDPM model with learned variance (diffusion.variance).
MODEL_SAMPLERS: dict[str, Callable] = {"ddpm_learned": ddpm_learned}
_BY_NAME = {**SAMPLERS, **MODEL_SAMPLERS}

# What every sampler takes from its caller, not from a config's options.
_CALL_ARGUMENTS = ("model", "schedule", "x", "grid", "generator", "callback", "progress")


def sampler_options(name: str) -> tuple[str, ...]:
    """The options of sampler ``name`` a config may set (e.g. ``sde``'s ``diffusion_form``)."""
    parameters = inspect.signature(get_sampler(name)).parameters.values()
    return tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in _CALL_ARGUMENTS)


def get_sampler(name: str | Callable, **options: Any) -> Callable:
    """The sampler function called ``name``, with ``options`` bound (ValueError names an unknown
    name or option). A function passes through unchanged, so a sampler with its options bound can
    be handed on where a name is taken."""
    if callable(name) and not options:
        return name
    function = _BY_NAME[check_choice("sampler", name, _BY_NAME)]
    if not options:
        return function
    allowed = sampler_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"sampler={name} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(allowed) or 'none'}")
    return partial(function, **options)


__all__ = [
    "DIFFUSION_FORMS",
    "MODEL_SAMPLERS",
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "PerSampleNoise",
    "StepInfo",
    "ancestral",
    "concat_conditions",
    "ddim",
    "ddpm_learned",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "euler_ancestral",
    "euler",
    "get_sampler",
    "grids",
    "heun",
    "sampler_options",
    "sde",
]
