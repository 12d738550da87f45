"""The loggers of a run, made to continue it: a resumed run appends to its own logs instead of
starting them again, and a Weights & Biases run continues under the id kept in the run directory.

``resume_at(loggers, step)`` is called once a resume's checkpoint is known and before anything is
logged: the CSV log drops the rows of the steps the resumed run will log again (those after the
checkpoint, logged before a preemption) and appends; TensorBoard purges its events from that step.
"""

from __future__ import annotations

import csv
import netrc
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch import loggers as pl_loggers
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; this one appends to it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def _check_log_dir_exists(self) -> None:  # the parent removes metrics.csv here
        pass

    def keep_steps_before(self, step: int) -> None:
        """Drop the rows of ``step`` and later (rewritten to a temporary file, then renamed)."""
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = reader.fieldnames or [], [r for r in reader if int(float(r["step"])) < step]
        tmp = self.metrics_file_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)


class CSVLogger(pl_loggers.CSVLogger):
    """Lightning's CSV logger (``metrics.csv`` and ``hparams.yaml``) that never deletes a run's log."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def resume_at(self, step: int) -> None:
        self.experiment.keep_steps_before(step)


class TensorBoardLogger(pl_loggers.TensorBoardLogger):
    """Lightning's TensorBoard logger; a resumed run purges the events logged after its checkpoint."""

    def resume_at(self, step: int) -> None:
        if self._experiment is not None:
            raise RuntimeError("TensorBoardLogger.resume_at must be called before anything is logged")
        self._kwargs["purge_step"] = step  # SummaryWriter drops the events of this step and later


def resume_at(loggers: Iterable[Any], step: int) -> None:
    """Prepare each logger that keeps files in the run directory to continue the run at ``step``."""
    for logger in loggers:
        if hasattr(logger, "resume_at"):
            logger.resume_at(step)


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
