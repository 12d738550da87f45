"""Checkpoints written atomically: a kill during a save leaves the previous checkpoint whole."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file beside the target, then rename it over the target (atomic on
    POSIX): readers, and a restart after a crash, see the old checkpoint or the new one, never half."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, target)


def check_state_fits(expected: dict[str, Any], found: dict[str, Any], source: str) -> None:
    """Refuse a state dict of another model (another backbone or size), naming what differs."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(found) if tuple(expected[k].shape) != tuple(found[k].shape))
    if missing or unexpected or mismatched:

        def show(names: list[str]) -> str:
            return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "") if names else "none"

        raise ValueError(
            f"{source} does not fit this model (another backbone or size?): missing {show(missing)}; "
            f"unexpected {show(unexpected)}; shape differs {show(mismatched)}"
        )


def check_frozen_weights(expected: dict[str, str], found: dict[str, str] | None, source: str) -> None:
    """Refuse a checkpoint trained with other frozen parts (VAE, text encoder) than the ones this
    model was rebuilt with: their weights are not in checkpoints, only the hashes compared here."""
    if found is None:
        log.warning("%s records no hashes of its frozen parts (written before they were recorded); "
                    "their weights cannot be checked against this model's", source)
        return
    differing = [f"{name}: checkpoint {found.get(name, 'none')}, this model {expected.get(name, 'none')}"
                 for name in sorted(set(expected) | set(found)) if expected.get(name) != found.get(name)]
    if differing:
        raise ValueError(
            f"{source} was trained with other frozen weights than this model's (sha256 of their weights):\n  "
            + "\n  ".join(differing)
            + "\nbuild the model with the VAE and text encoder the run used (vae=..., text_encoder=..., the run's seed "
            "for random-weight encoders), or train a new model"
        )


def check_adapter(name: str, base_sha256: str | None, found: dict[str, Any] | None, source: str,
                  base_dtype: str | None = None) -> None:
    """Refuse a checkpoint trained with another adapter, or an adapter trained on other base weights
    (they are not in the checkpoint: only their sha256, compared here; it is taken of the weights as
    built, float32, before ``adapter.base_dtype`` casts them), or with base weights stored in another
    dtype (``base_dtype``; checkpoints without one were float32)."""
    found = found or {"name": "full", "base_weights_sha256": None}
    if found.get("name") != name:
        raise ValueError(f"{source} was trained with adapter={found.get('name')}, this model is built with "
                         f"adapter={name}; build it with adapter={found.get('name')}")
    trained_dtype = found.get("base_dtype", "float32")
    if base_dtype is not None and name != "full" and trained_dtype != base_dtype:
        raise ValueError(f"{source} holds an adapter={name} trained on base weights stored in {trained_dtype}, this "
                         f"model stores them in {base_dtype} (the base weights' sha256 is the same); build it with "
                         f"adapter.base_dtype={trained_dtype}")
    if found.get("base_weights_sha256") != base_sha256:
        raise ValueError(
            f"{source} holds an adapter={name} trained on other base weights than this model's backbone (sha256 "
            f"{found.get('base_weights_sha256')} there, {base_sha256} here); build the backbone the run used "
            "(the same backbone.pretrained weights, or the run's seed for a random backbone)"
        )
