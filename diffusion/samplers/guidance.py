"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper of the denoiser."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

ConditionalModel = Callable[[Tensor, Tensor, Any], Tensor]


def concat_conditions(a: Any, b: Any) -> Any:
    """Concatenate two conditions along the batch: tensors, None, mappings, tuples/lists and
    dataclasses (such as ``Conditioning``) of those, field by field."""
    if a is None and b is None:
        return None
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.cat([a, b])
    if isinstance(a, Mapping) and isinstance(b, Mapping) and a.keys() == b.keys():
        return type(a)({k: concat_conditions(a[k], b[k]) for k in a})
    if isinstance(a, (tuple, list)) and type(a) is type(b) and len(a) == len(b):
        return type(a)(concat_conditions(u, v) for u, v in zip(a, b))
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        return dataclasses.replace(
            a, **{f.name: concat_conditions(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a) if f.init}
        )
    raise TypeError(
        f"cannot batch conditions of types {type(a).__name__} and {type(b).__name__}: the conditional and the "
        "null condition must have the same structure (tensors, None, dicts, tuples or dataclasses of those)"
    )


class ClassifierFreeGuidance:
    """``model_out = u + scale * (c - u)`` with ``c`` the conditional and ``u`` the unconditional
    output. ``scale = 1`` is no guidance (one conditional call); otherwise both run in one
    batched call. Guidance is linear in the model output, so it is the same whatever the theory's
    prediction type: guiding eps, v or velocity guides ``x0_hat`` and ``xT_hat`` alike."""

    def __init__(self, model: ConditionalModel, cond: Any, null_cond: Any, scale: float):
        self.model, self.cond, self.null_cond, self.scale = model, cond, null_cond, float(scale)
        self._both = concat_conditions(cond, null_cond) if self.scale != 1 else None

    def __call__(self, x: Tensor, t: Tensor, *, return_variance: bool = False) -> Tensor:
        """With ``return_variance`` (a model with learned variance, diffusion.variance) the model returns
        2C channels: guidance moves the C prediction channels, and the variance channels are the
        conditional branch's, as DiT's sampler keeps them (DiT guides only the first 3 of its 4
        latent channels; here all C are guided)."""
        kwargs = {"return_variance": True} if return_variance else {}
        if self.scale == 1:
            return self.model(x, t, self.cond, **kwargs)
        out_cond, out_uncond = self.model(torch.cat([x, x]), torch.cat([t, t]), self._both, **kwargs).chunk(2)
        if return_variance:
            c = x.shape[1]
            guided = out_uncond[:, :c] + self.scale * (out_cond[:, :c] - out_uncond[:, :c])
            return torch.cat([guided, out_cond[:, c:]], dim=1)
        return out_uncond + self.scale * (out_cond - out_uncond)
