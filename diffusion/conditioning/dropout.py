"""Condition dropout for classifier-free guidance (Ho & Salimans 2022).

During training each sample's condition is replaced, with probability p, by
the null condition: the null class for labels, the text encoder's embedding of
the empty prompt for text. The null condition is an argument, so one function
serves every kind of condition; backbones never drop anything themselves.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from diffusion.conditioning.types import KEPT_FIELDS, Conditioning


def drop_condition(
    cond: Conditioning,
    null: Conditioning,
    p: float,
    generator: torch.Generator | None = None,
    drop: Tensor | None = None,
) -> Conditioning:
    """Replace each sample's condition by `null` with probability `p`, independently per sample.

    `null` has batch size 1 (broadcast) or B. Its fields must match `cond`'s,
    except that a missing mask on either side means "all tokens real". `drop` (B,) bool, when
    given, is the per-sample choice already drawn (True = null; training draws it per sample).
    The :data:`KEPT_FIELDS` (a control, concatenated latents, image sizes) are ``cond``'s, never dropped.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"Condition dropout probability must lie in [0, 1], got {p}.")
    if cond.is_empty:
        return cond
    batch = cond.batch_size
    assert batch is not None
    null = null.replace(**dict.fromkeys(KEPT_FIELDS))  # a null condition's own kept fields are not used
    null = null.expand(batch) if null.batch_size == 1 else null
    if null.batch_size not in (None, batch):  # None: nothing but kept fields to drop (a control alone)
        raise ValueError(f"Null condition must have batch size 1 or {batch} (the condition's), got {null.batch_size}.")
    if p == 0.0:
        return cond

    device = next(t for _, t in cond.items()).device
    if drop is None:
        rand_device = generator.device if generator is not None else device
        drop = torch.rand(batch, generator=generator, device=rand_device) < p  # (B,) True = use null
    elif drop.shape != (batch,) or drop.dtype != torch.bool:
        raise ValueError(f"Condition dropout: drop must be a bool tensor of shape ({batch},), got "
                         f"{drop.dtype} {tuple(drop.shape)}.")
    drop = drop.to(device)

    cond, null = _fill_masks(cond), _fill_masks(null)
    out: dict[str, Tensor | None] = {}
    for f in dataclasses.fields(Conditioning):
        a, n = getattr(cond, f.name), getattr(null, f.name)
        if f.name in KEPT_FIELDS or (a is None and n is None):
            out[f.name] = a
            continue
        if a is None or n is None:
            raise ValueError(
                f"Condition dropout: field '{f.name}' is {'None' if a is None else 'set'} in the condition "
                f"but {'None' if n is None else 'set'} in the null condition; they must have the same fields."
            )
        if a.shape != n.shape:
            raise ValueError(
                f"Condition dropout: null '{f.name}' has shape {tuple(n.shape)}, expected the condition's {tuple(a.shape)}."
            )
        keep_shape = (batch,) + (1,) * (a.ndim - 1)
        out[f.name] = torch.where(drop.view(keep_shape), n.to(a.dtype), a)
    return Conditioning(**out)


def _fill_masks(c: Conditioning) -> Conditioning:
    """Materialise an absent mask as all-True so a masked and an unmasked side can be mixed."""
    if c.tokens is not None and c.mask is None:
        return c.replace(mask=torch.ones(c.tokens.shape[:2], dtype=torch.bool, device=c.tokens.device))
    return c


class ConditionDropout:
    """`drop_condition` with its probability bound, for Hydra configs: `ConditionDropout(p=0.1)(cond, null)`."""

    def __init__(self, p: float = 0.1) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Condition dropout probability must lie in [0, 1], got {p}.")
        self.p = p

    def __call__(self, cond: Conditioning, null: Conditioning, generator: torch.Generator | None = None) -> Conditioning:
        return drop_condition(cond, null, self.p, generator)

    def __repr__(self) -> str:
        return f"ConditionDropout(p={self.p})"
