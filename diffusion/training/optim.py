"""Parameter groups for the optimiser: weight decay on weight matrices only.

Decaying norm scales, biases, embedding tables or positional tables pulls them towards zero
for no regularising benefit (they hold offsets and lookups, not feature detectors), as in
timm, DiT's and most transformer codebases. A backbone names further parameters to keep out of
decay with ``no_weight_decay() -> set of names`` (timm's convention).
"""

from __future__ import annotations

from typing import Any

from torch import nn

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
