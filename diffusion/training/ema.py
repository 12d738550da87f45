"""Exponential moving average of a model's weights; the EMA weights are what sampling uses."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``ema = decay_n * ema + (1 - decay_n) * weights`` after each optimiser step, with the
    warm-up ``decay_n = min(decay, (1 + n) / (10 + n))`` (TensorFlow's ExponentialMovingAverage
    with num_updates, as in latent diffusion's LitEma): early averages forget the random
    initialisation quickly. The averaged copy and ``n`` are saved with the module's state.
    Under FSDP2 the copy is sharded like the model, and each process averages its own shards."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True, trainable_only: bool = False):
        """``trainable_only`` (an adapter fixes the base weights): the copy shares the model's
        parameters that do not train instead of holding its own, and only the others are averaged."""
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup, self.trainable_only = decay, warmup, trainable_only
        # deepcopy's memo maps each fixed parameter to itself: the copy holds the same tensor, no second one.
        shared = {id(p): p for p in model.parameters() if not p.requires_grad} if trainable_only else {}
        self.module = copy.deepcopy(model, memo=shared).eval().requires_grad_(False)
        # n twice: the buffer goes into checkpoints; the host's copy gives each update its decay
        # without reading the buffer from the device, which would make the host wait every step.
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._num_updates = 0
        self.register_load_state_dict_post_hook(_count_from_loaded_buffer)

    def current_decay(self) -> float:
        n = self._num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        if hasattr(self.module, "reshard") and not all(hasattr(e, "to_local") for e in self.module.parameters()):
            # An FSDP2 copy whose parameters are gathered: an update would go to a temporary buffer.
            raise RuntimeError("the sharded EMA copy holds gathered parameters; shard it with "
                               "fully_shard_by_block(..., forward_only=True) so that they are resharded after forward")
        pairs = [_alike(e, p) for e, p in zip(self.module.parameters(), model.parameters())
                 if p.requires_grad or not self.trainable_only]
        ema_params = [e for e, _ in pairs]
        if ema_params:  # none with a backbone that does not train (Textual Inversion trains token rows)
            torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for e, p in pairs], 1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(_whole(buffer))
        self.num_updates += 1
        self._num_updates += 1

    def train(self, mode: bool = True) -> "EMA":
        super().train(mode)
        self.module.eval()  # the average is never trained; it stays in eval mode
        return self


def _count_from_loaded_buffer(ema: EMA, incompatible_keys) -> None:
    """After a state dict is loaded (a resume): the host's count from the loaded buffer, read once."""
    ema._num_updates = int(ema.num_updates)


def _alike(ema: torch.Tensor, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The EMA tensor and the parameter in one layout: the local shards when both are sharded
    alike (FSDP2 DTensors: no communication), else the parameter's full value."""
    if hasattr(ema, "to_local"):
        if getattr(param, "placements", None) != ema.placements:
            raise ValueError(f"the EMA is sharded as {ema.placements} but the model as "
                             f"{getattr(param, 'placements', 'unsharded')}; shard both alike")
        return ema.to_local(), param.to_local()
    return ema, _whole(param)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full value of a possibly sharded tensor (an all-gather for an FSDP2 DTensor)."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor
