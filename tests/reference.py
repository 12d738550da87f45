"""diffusers' schedulers as an independent reference, run in float64.

diffusers builds its tables and steps in float32 even for float64 inputs. To compare in float64
we run its own scheduler modules with their module-level ``torch.float32`` and ``np.float32``
read as float64: the same code and formulas, at double precision.
"""

from __future__ import annotations

import contextlib
import importlib

import numpy as np
import torch

MODULES = (
    "diffusers.schedulers.scheduling_ddpm",
    "diffusers.schedulers.scheduling_ddim",
    "diffusers.schedulers.scheduling_dpmsolver_multistep",
    "diffusers.schedulers.scheduling_flow_match_euler_discrete",
)

DIFFUSERS_BETA_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# diffusers' defaults are Ho et al.'s ends for every linear kind; Stable Diffusion passes its own.
BETA_ENDS = {"linear": {}, "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012}, "cosine": {}}


class _Float64View:
    """A module whose ``float32`` attribute is ``float64``; everything else passes through."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, "float64" if name == "float32" else name)


@contextlib.contextmanager
def diffusers_float64():
    modules = [importlib.import_module(name) for name in MODULES]
    saved = [(m, m.torch, m.np) for m in modules]
    try:
        for m in modules:
            m.torch, m.np = _Float64View(torch), _Float64View(np)
        yield
    finally:
        for m, t, n in saved:
            m.torch, m.np = t, n


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed smooth non-linear function of (x, t): the same 'network' for both libraries."""
    tt = t.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.8 * x + 0.5 * tt - 0.2) + 0.3 * x * tt
