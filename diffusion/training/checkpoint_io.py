"""Checkpoints written atomically: a kill during a save leaves the previous checkpoint whole."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO


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
