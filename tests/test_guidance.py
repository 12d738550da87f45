"""Classifier-free guidance as a wrapper of the denoiser."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from diffusion.samplers import ClassifierFreeGuidance, concat_conditions, euler, grids
from diffusion.schedules import FlowMatching


@dataclass
class Cond:
    tokens: torch.Tensor | None
    pooled: torch.Tensor | None


class CountingModel:
    def __init__(self):
        self.batches = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        return x * cond.pooled[:, :1, None, None] + t[:, None, None, None]


def _conds(b=3):
    g = torch.Generator().manual_seed(0)
    return Cond(None, torch.randn(b, 4, generator=g)), Cond(None, torch.zeros(b, 4))


def test_scale_one_is_the_conditional_model_in_one_call():
    model, (cond, null) = CountingModel(), _conds()
    x, t = torch.randn(3, 2, 5, 5), torch.rand(3)
    out = ClassifierFreeGuidance(model, cond, null, 1.0)(x, t)
    torch.testing.assert_close(out, x * cond.pooled[:, :1, None, None] + t[:, None, None, None])
    assert model.batches == [3]


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_guidance_is_extrapolation_in_one_batched_call(scale):
    model, (cond, null) = CountingModel(), _conds()
    x, t = torch.randn(3, 2, 5, 5), torch.rand(3)
    out = ClassifierFreeGuidance(model, cond, null, scale)(x, t)
    c, u = model(x, t, cond), model(x, t, null)
    torch.testing.assert_close(out, u + scale * (c - u))
    assert model.batches[0] == 6  # conditional and unconditional together


def test_guided_sampling_runs_with_any_sampler():
    model, (cond, null) = CountingModel(), _conds()
    out = euler(ClassifierFreeGuidance(model, cond, null, 4.0), FlowMatching(), torch.randn(3, 2, 5, 5), grids.uniform(3))
    assert out.shape == (3, 2, 5, 5) and model.batches == [6, 6, 6]


def test_concat_conditions_over_structures():
    a = {"y": torch.ones(2), "c": (torch.zeros(2, 3), None)}
    b = {"y": torch.zeros(2), "c": (torch.ones(2, 3), None)}
    both = concat_conditions(a, b)
    assert both["y"].tolist() == [1, 1, 0, 0] and both["c"][0].shape == (4, 3) and both["c"][1] is None
    assert concat_conditions(None, None) is None
    with pytest.raises(TypeError, match="same structure"):
        concat_conditions(torch.ones(2), None)
