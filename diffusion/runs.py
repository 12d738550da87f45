"""Run directories: one per run, found again to resume it, and left as they were by a command that
fails before it trains.

A run lives in one directory (``outputs/<date>/<time>``, ``outputs/<SLURM job id>`` or
``hydra.run.dir``) holding its checkpoints, logs, samples and the configs it was launched with. A
resumed run continues in its own directory:

- ``ckpt_path=last``: the newest checkpoint of the run directory given by ``hydra.run.dir``, or,
  without it, of the newest run under ``outputs/`` and ``multirun/`` (whose directory then becomes
  the run directory, see :func:`run_dir`);
- ``ckpt_path=PATH``: that checkpoint, in the run directory of this command (a new one by default);
- no ``ckpt_path`` in a directory that holds checkpoints: a requeued SLURM job resumes from the
  newest; anything else is refused, since it would overwrite that run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

RUN_ROOTS = ("outputs", "multirun")


def checkpoints_of(run: Path) -> list[Path]:
    """A run's resumable checkpoints: ``checkpoints/*.ckpt`` and the ``hpc_ckpt_N.ckpt`` written on
    a SLURM signal (temporary files of an interrupted save excluded)."""
    found = [*(run / "checkpoints").glob("*.ckpt"), *run.glob("hpc_ckpt_*.ckpt")]
    return [p for p in found if not p.name.startswith(".")]


def run_of(checkpoint: Path) -> Path:
    """The run directory of a checkpoint: ``run/checkpoints/x.ckpt`` or ``run/hpc_ckpt_N.ckpt``."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def newest_checkpoint(run: Path) -> Path | None:
    """The checkpoint of ``run`` written last (``last.ckpt``, or an hpc checkpoint saved after it)."""
    found = checkpoints_of(run)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def newest_run(roots: tuple[str, ...] = RUN_ROOTS) -> Path:
    """The run directory under ``roots`` whose newest checkpoint is the most recent."""
    runs = {p.parent.parent for root in roots if Path(root).is_dir() for p in Path(root).glob("**/checkpoints/*.ckpt")}
    runs |= {p.parent for root in roots if Path(root).is_dir() for p in Path(root).glob("**/hpc_ckpt_*.ckpt")}
    latest = {run: newest_checkpoint(run) for run in runs}
    latest = {run: ckpt for run, ckpt in latest.items() if ckpt is not None}
    if not latest:
        where = " or ".join(f"{Path(r).resolve()}/" for r in roots)
        raise FileNotFoundError(f"no run with a checkpoint under {where} to take the newest of; train one first, or "
                                "name a checkpoint file (train.py ckpt_path=PATH, sample.py ckpt=PATH)")
    return max(latest, key=lambda run: latest[run].stat().st_mtime)


def run_dir(ckpt_path: Any, default: str) -> str:
    """The ``run_dir`` resolver of ``hydra.run.dir``: the newest run's directory for
    ``ckpt_path=last``, so that the run continues where it lives; ``default`` otherwise."""
    return str(newest_run()) if str(ckpt_path) == "last" else default


def register_resolvers() -> None:
    """Make ``${run_dir:...}`` known to the configs; entry points call this before Hydra starts."""
    if not OmegaConf.has_resolver("run_dir"):
        OmegaConf.register_new_resolver("run_dir", run_dir)


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def resume_checkpoint(ckpt_path: str | os.PathLike | None, run: Path) -> Path | None:
    """What a run in directory ``run`` resumes from (see the module docstring), or None for a new run."""
    if ckpt_path is None:
        existing = newest_checkpoint(run)
        if existing is None:
            return None
        if in_slurm_job():  # a requeued job: continue where it stopped
            return existing
        raise FileExistsError(
            f"the run directory {run} already holds a run ({existing.relative_to(run)}); continue it with "
            "ckpt_path=last, or start a new run in another directory (leave out hydra.run.dir)"
        )
    if str(ckpt_path) == "last":
        found = newest_checkpoint(run)
        if found is None:
            raise FileNotFoundError(f"ckpt_path=last: the run directory {run} holds no checkpoint "
                                    "(checkpoints/*.ckpt or hpc_ckpt_*.ckpt); pass ckpt_path=PATH or another hydra.run.dir")
        return found
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass an existing file or ckpt_path=last")
    return path


def write_launch_record(run: Path, config: dict[str, Any], overrides: list[str], resumed_from: Path | None,
                        step: int) -> Path:
    """Keep the configuration and overrides of each launch in ``run/.hydra``: a new run's as
    ``config.yaml`` / ``overrides.yaml`` (Hydra's names), a resume's beside them under
    ``resumed/step_<N>/`` so the run's first configuration is never overwritten."""
    folder = run / ".hydra" if resumed_from is None else run / ".hydra" / "resumed" / f"step_{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), folder / "overrides.yaml")
    if resumed_from is not None:
        OmegaConf.save(OmegaConf.create({"checkpoint": str(resumed_from), "step": step}), folder / "resume.yaml")
    return folder
