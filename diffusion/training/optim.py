"""The optimiser of a run: its configuration (any optimiser, a warm-up and a decay of the rate),
and parameter groups with weight decay on weight matrices only.

Decaying norm scales, biases, embedding tables or positional tables pulls them towards zero
for no regularising benefit (they hold offsets and lookups, not feature detectors), as in
timm, DiT's and most transformer codebases. A backbone names further parameters to keep out of
decay with ``no_weight_decay() -> set of names`` (timm's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from diffusion._checks import check_choice
from diffusion.training.lr import LR_DECAYS, warmup_then_decay

#: Modules whose parameters are lookups or normalisation scales, never decayed.
NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """``[{"params": decayed}, {"params": not decayed, "weight_decay": 0.0}]`` over the trainable
    parameters; the first group takes the optimiser's own ``weight_decay``."""
    named_elsewhere = set(getattr(model, "no_weight_decay", lambda: ())())
    exempt = {id(p) for module in model.modules() if isinstance(module, NO_DECAY_MODULES)
              for p in module.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        keep = param.ndim <= 1 or id(param) in exempt or name in named_elsewhere
        (no_decay if keep else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw() -> Callable[..., torch.optim.Optimizer]:
    return partial(torch.optim.AdamW, lr=1e-3)


@dataclass
class OptimConfig:
    """The optimiser (a partial taking the parameter groups, e.g. Hydra's ``_partial_: true``) and the
    learning-rate schedule: linear warm-up, then constant, cosine or linear decay to
    ``min_lr_ratio`` of the rate at ``trainer.max_steps``."""

    optimizer: Callable[..., torch.optim.Optimizer] = field(default_factory=_adamw)
    warmup_steps: int = 100
    decay: str = "constant"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:  # when the model is built, before a run directory is written to
        check_choice("model.optim.decay", self.decay, LR_DECAYS)
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need model.optim.warmup_steps >= 0 and 0 <= model.optim.min_lr_ratio <= 1, got "
                             f"{self.warmup_steps} and {self.min_lr_ratio}")

    def lr_multiplier(self, max_steps: int | None) -> Callable[[int], float]:
        """The multiplier of the base rate at each optimiser step; a decay needs the run's length."""
        if self.decay != "constant" and (max_steps is None or max_steps <= 0):
            raise ValueError(
                f"model.optim.decay={self.decay!r} decays to the end of training, which needs trainer.max_steps > 0 "
                f"(got {max_steps}); set trainer.max_steps, or model.optim.decay=constant"
            )
        return partial(warmup_then_decay, warmup_steps=self.warmup_steps, total_steps=max_steps or 0,
                       decay=self.decay, min_ratio=self.min_lr_ratio)


#: The bitsandbytes release whose 8-bit optimisers were checked here, on the CPU too (its CPU backend).
BITSANDBYTES_MIN = "0.50"


def adamw_8bit(params: Any, lr: float = 1e-3, betas: Any = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, **kwargs: Any) -> torch.optim.Optimizer:
    """bitsandbytes' ``AdamW8bit`` (Dettmers et al. 2022): AdamW with both moments stored in 8 bits,
    block-wise quantised (2 bytes per parameter instead of 8). Tensors under its ``min_8bit_size``
    (4096 elements) keep 32-bit moments. Choose it with
    ``model.optim.optimizer._target_=diffusion.training.optim.adamw_8bit``; it needs the optional
    ``bitsandbytes`` (``pip install -e '.[bnb]'``), which runs on CUDA and, from 0.50, on the CPU."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ValueError("model.optim.optimizer=adamw_8bit needs bitsandbytes, which is not installed: "
                         f"pip install 'bitsandbytes>={BITSANDBYTES_MIN}' (or pip install -e '.[bnb]'), or use "
                         "torch.optim.AdamW") from e
    from packaging.version import Version

    if Version(bitsandbytes.__version__) < Version(BITSANDBYTES_MIN):
        raise ValueError(f"model.optim.optimizer=adamw_8bit: bitsandbytes {bitsandbytes.__version__} is installed; "
                         f"{BITSANDBYTES_MIN} or newer is needed (its CPU backend): pip install -U bitsandbytes")
    return bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                        **kwargs)
