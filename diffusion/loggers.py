"""Logger factories that need a decision at run time."""

from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger


def wandb_has_credentials() -> bool:
    """True when wandb could log in without asking: WANDB_API_KEY, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(project: str = "diffusion", save_dir: str | Path = ".", mode: str = "auto", **kwargs) -> WandbLogger:
    """A Weights & Biases logger that never prompts: ``mode="auto"`` logs online when
    credentials exist and offline (to ``save_dir/wandb``, for a later ``wandb sync``) otherwise;
    "online" and "offline" force one. The run id is kept in ``save_dir/wandb_run_id``, so a resumed
    or requeued run in the same directory continues the same W&B run."""
    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"mode={mode!r} is not supported; allowed values: 'auto', 'online', 'offline'")
    offline = mode == "offline" or (mode == "auto" and not wandb_has_credentials())
    if offline:
        os.environ["WANDB_MODE"] = "offline"  # also stops wandb from asking for a login
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("id", run_id(save_dir))
    kwargs.setdefault("resume", "allow")
    return WandbLogger(project=project, save_dir=str(save_dir), offline=offline, **kwargs)


def run_id(save_dir: str | Path) -> str:
    """The W&B run id stored in ``save_dir``, made and stored on first use."""
    path = Path(save_dir) / "wandb_run_id"
    if path.exists():
        return path.read_text().strip()
    new = secrets.token_hex(4)  # 8 lowercase characters, like W&B's own ids
    path.write_text(new)
    return new
