"""Exponential moving average of a model's weights; the EMA weights are what sampling uses."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    """``ema = decay_n * ema + (1 - decay_n) * weights`` after each optimiser step, with the
    warm-up ``decay_n = min(decay, (1 + n) / (10 + n))`` (TensorFlow's ExponentialMovingAverage
    with num_updates, as in latent diffusion's LitEma): early averages forget the random
    initialisation quickly. The averaged copy and ``n`` are saved with the module's state.
    Under FSDP2 the copy is sharded like the model, and each process averages its own shards; a
    ``trainable_only`` copy instead holds the model's own sharded base and runs through the model
    (:meth:`share_sharded`, :meth:`applied`)."""

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
        self._runs_through_model = False  # share_sharded: the copy holds no base of its own to run on
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

    def share_sharded(self, model: nn.Module) -> None:
        """Under FSDP2, for a ``trainable_only`` copy of ``model`` (sharded with fully_shard): the copy's
        fixed parameters become ``model``'s sharded ones and its averages DTensors sharded as ``model``'s
        trainable parameters. The base is then held once: sharding the copy by itself would give it
        shards of its own (FSDP2 replaces a module's parameters by new ones, so the copy's would no longer
        be the model's). Such a copy is not run itself but through ``model`` (:meth:`applied`)."""
        from torch.distributed.tensor import distribute_tensor

        if not self.trainable_only:
            raise ValueError("share_sharded is for an EMA of the trainable parameters alone (trainable_only=True)")
        for (name, ema_param), (other, param) in zip(list(self.module.named_parameters()), model.named_parameters()):
            if name != other or not hasattr(param, "placements"):
                raise ValueError(f"the EMA copy and the model differ ({name} / {other}), or {other} is not sharded; "
                                 "shard the model with fully_shard first")
            if param.requires_grad:  # the average so far, in the model's layout (each process keeps its shard)
                value = distribute_tensor(ema_param.detach().to(param.dtype), param.device_mesh, param.placements)
                param = nn.Parameter(value, requires_grad=False)
            owner, _, attr = name.rpartition(".")
            setattr(self.module.get_submodule(owner), attr, param)
        self._runs_through_model = True

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The module that computes the EMA weights' output: the copy, or for a copy that shares a sharded
        model's base (:meth:`share_sharded`) ``model`` itself with the averages in its trainable
        parameters' place (local shards swapped, no communication), put back on leaving."""
        if not self._runs_through_model:
            yield self.module
            return
        # FSDP2 keeps the root's parameters gathered after a forward (for its backward): gathered copies
        # would not see the swap, nor the swap's undoing, so they are freed before and after.
        reshard = getattr(model, "reshard", lambda: None)
        reshard()
        training = model.training
        model.eval()  # as the copy always is (no dropout)
        with torch.no_grad():
            pairs = [(e.to_local(), p.to_local()) for e, p in zip(self.module.parameters(), model.parameters())
                     if p.requires_grad]
            kept = [p.clone() for _, p in pairs]
            for average, param in pairs:
                param.copy_(average)
        try:
            yield model
        finally:
            reshard()
            model.train(training)
            with torch.no_grad():
                for (_, param), value in zip(pairs, kept):
                    param.copy_(value)

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
