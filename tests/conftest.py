"""Shared fixtures: composing the project's Hydra configs in-process, as train.py would."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from diffusion.runs import register_resolvers

register_resolvers()  # conf/train.yaml's hydra.run.dir uses ${run_dir:...}

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

# A few steps of a tiny run; every test that trains starts from these.
FAST = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.checkpoint.every_n_train_steps=2",
    "model.optim.warmup_steps=2",
    "model.sampling.steps=2",
    "model.sampling.num_images=10",
    "model.sampling.every_n_steps=0",
    "data.module.batch_size=16",
    "backbone=dit_tiny",
]


def run_script(script: str, *args: str, cwd: Path, timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python ROOT/script args...`` in ``cwd`` with the project importable, output captured."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def logged_losses(run: Path) -> dict[int, float]:
    """``{step: train/loss}`` from a run directory's CSV log."""
    with open(run / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def train_tiny_checkpoint(run: Path) -> Path:
    """A tiny class-conditional DiT (10 digit classes, 8x8 pixels, flow matching) trained 2 steps in
    ``run``; its last.ckpt."""
    from diffusion import cli

    cli.train(compose_config("train", [*FAST, "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=2"],
                             run))
    return run / "checkpoints" / "last.ckpt"


def compose_config(config_name: str, overrides: list[str], run_dir: Path) -> DictConfig:
    """The config @hydra.main would pass, with the run directory at ``run_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


@pytest.fixture
def train_config(tmp_path):
    """``train_config(*overrides, run_dir=None)`` -> a composed fast training config."""

    def make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        return compose_config("train", [*FAST, *overrides], run_dir or tmp_path / "run")

    return make


class StopAtStep:
    """A callback that stops training after ``step`` optimiser steps, as a preemption would."""

    def __new__(cls, step: int):
        import lightning as L

        class _Stop(L.Callback):
            def on_train_batch_end(self, trainer, *args, **kwargs):
                if trainer.global_step >= step:
                    trainer.should_stop = True

        return _Stop()


class PoisonBatch:
    """A callback that turns one process's batch into NaNs at one step: a fault on one rank only."""

    def __new__(cls, rank: int, step: int):
        import lightning as L

        class _Poison(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_rank == rank and trainer.global_step == step:
                    batch["image"].fill_(float("nan"))

        return _Poison()
