"""Preemption under SLURM: save where the requeued job resumes, and requeue."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes (array tasks: ``<array job>_<task>``)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


class RequeueOnSIGTERM(L.Callback):
    """SLURM preempts a job with SIGTERM. Lightning saves and requeues on its requeue signal
    (SIGUSR1, sent before the time limit with ``#SBATCH --signal=SIGUSR1@90``) but on SIGTERM only
    stops the loop; this saves ``hpc_ckpt_<n+1>.ckpt`` in the run directory, where Lightning looks
    when the requeued job starts, and requeues the job."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        root = Path(trainer.default_root_dir)
        versions = [int(p.stem.rsplit("_", 1)[1]) for p in root.glob("hpc_ckpt_*.ckpt")]
        path = root / f"hpc_ckpt_{max(versions, default=0) + 1}.ckpt"
        trainer.save_checkpoint(path)
        job = slurm_job_id()
        if job and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            log.info("SIGTERM: saved %s; requeue of job %s %s", path, job,
                     "done" if result.returncode == 0 else f"failed: {result.stderr.strip()}")
