"""Frozen pretrained parts (autoencoders, text encoders): eval mode and no gradients for good,
and a hash of their weights for fingerprints."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the state_dict, keys sorted, each tensor's name, dtype, shape and bytes.

    Hashes the tensors as they are (current dtype), so a float16 copy of a model differs from
    its float32 original; that is wanted, their outputs differ too.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenModule(nn.Module):
    """Subclasses call ``_freeze()`` last in ``__init__``; the module then stays in eval mode
    when a parent is put in train mode (the weights are fixed, and no dropout may change an
    encoding with the training phase)."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def weights_sha256(self) -> str:
        """:func:`weights_sha256` of this module, computed once per dtype (the weights are fixed)."""
        dtype = next((t.dtype for t in self.state_dict().values()), None)
        cached = self.__dict__.get("_weights_sha256")
        if cached is None or cached[0] != dtype:
            cached = (dtype, weights_sha256(self))
            self.__dict__["_weights_sha256"] = cached
        return cached[1]

    @property
    def device(self) -> torch.device:
        """Where its weights are."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """What its weights are stored in."""
        return next(self.parameters()).dtype

    def train(self, mode: bool = True) -> "FrozenModule":
        return super().train(False)
