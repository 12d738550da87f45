"""The ImageNet-256 recipes hold their papers' settings (Peebles & Xie 2023, Table 1 and section 5;
Ma et al. 2024, section 4), their tiny variants differ from them only in size, and the whole path runs
at tiny size: class folder, cache, training from the cache, sampling on two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, compose_config, run_script
from tests.make_class_folder import make_class_folder

# What both papers train with: SD-VAE ft-EMA latents, AdamW 1e-4 constant without weight decay,
# batch 256, EMA 0.9999, class dropout 0.1, horizontal flips, 1000 classes at 256 px, cfg 1.5.
SHARED = {
    "vae.pretrained": "stabilityai/sd-vae-ft-ema",
    "vae.sample_posterior": True,
    "data.module.resolution": 256,
    "data.module.hflip": True,
    "data.num_classes": 1000,
    "conditioning.dropout": 0.1,
    "global_batch_size": 256,
    "model.ema_decay": 0.9999,
    "model.optim.optimizer._target_": "torch.optim.AdamW",
    "model.optim.optimizer.lr": 1e-4,
    "model.optim.optimizer.weight_decay": 0.0,
    "model.optim.warmup_steps": 0,
    "model.optim.decay": "constant",
    "model.sampling.cfg_scale": 1.5,
    "backbone.name": "dit_xl_2",
    "trainer.gradient_clip_val": None,
}
RECIPES = {
    "imagenet256_dit_xl_2": {
        "schedule.schedule._target_": "diffusion.schedules.DDPM",
        "schedule.schedule.beta_schedule": "linear",
        "schedule.schedule.num_steps": 1000,
        "schedule.schedule.prediction": "eps",
        "schedule.time_distribution._target_": "diffusion.timesteps.DiscreteUniform",
        "schedule.grid.spacing": "linspace",  # DiT's space_timesteps(1000, "250")
        "backbone.learn_sigma": True,  # trained with the hybrid loss, sampled with the learned variance
        "model.vlb_weight": 0.001,
        "model.sampling.sampler": "ddpm_learned",
        "model.sampling.steps": 250,
    },
    "imagenet256_sit_xl_2": {
        "schedule.schedule._target_": "diffusion.schedules.FlowMatching",
        "schedule.time_distribution._target_": "diffusion.timesteps.Uniform",
        "schedule.weighting._target_": "diffusion.weighting.NoWeighting",
        "model.sampling.sampler": "heun",
        "model.sampling.steps": 125,
    },
}


def _get(cfg, dotted: str):
    node = cfg
    for key in dotted.split("."):
        node = node[key]
    return node


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_holds_the_papers_settings(recipe, tmp_path):
    cfg = compose_config("train", [f"experiment={recipe}"], tmp_path)
    expected = {**SHARED, **RECIPES[recipe]}
    got = {key: _get(cfg, key) for key in expected}
    assert got == expected


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_tiny_variant_differs_only_in_size(recipe, tmp_path):
    full = compose_config("train", [f"experiment={recipe}"], tmp_path)
    tiny = compose_config("train", [f"experiment={recipe}_tiny"], tmp_path)
    sized = {"vae.pretrained", "data.module.resolution", "data.num_classes", "global_batch_size", "backbone.name"}
    for key, value in {**SHARED, **RECIPES[recipe]}.items():
        if key not in sized and key != "model.sampling.steps":
            assert _get(tiny, key) == value, key
    assert tiny.schedule == full.schedule
    assert tiny.backbone.name == "dit_tiny" and tiny.vae.pretrained is None


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without a launcher's variables (the test may itself run under one)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "TORCHELASTIC", "GROUP_", "ROLE_", "LOCAL_WORLD")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)} | {"PYTHONPATH": str(ROOT), **extra}


def test_class_folder_to_evaluator_files_through_cache_train_and_two_process_sampling(tmp_path):
    """Done-when 1 of the ImageNet issue, at tiny size: a class folder is cached (latents and labels),
    trained on from the cache alone, and sampled by two torchrun processes and by the SLURM template,
    into the files ADM's evaluator reads; both launches give the same images."""
    root = make_class_folder(tmp_path / "classes", classes=4, per_class=4, size=(40, 36))
    recipe = ["experiment=imagenet256_dit_xl_2_tiny", f"data.module.root={root}", f"cache_dir={tmp_path / 'cache'}"]
    proc = run_script("cache.py", *recipe, cwd=tmp_path, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "classes").rename(tmp_path / "moved")  # training reads the cache, not the images
    run = tmp_path / "run"
    proc = run_script("train.py", *recipe, f"hydra.run.dir={run}", "logger=none", "trainer.enable_progress_bar=false",
                      cwd=tmp_path, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert json.loads((run / "classes.json").read_text())["class_names"] == sorted(p.name for p in
                                                                                 (tmp_path / "moved").iterdir())

    job = [f"ckpt={ckpt}", "num=10", "batch_size=3", "labels=uniform", "steps=3", "progress=false"]
    out = tmp_path / "torchrun"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
                           str(ROOT / "sample.py"), *job, f"out={out}", "device=cpu", "precision=32"],
                          cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["labels"]
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 3)
    assert labels.dtype.kind == "i" and labels.shape == (10,) and set(labels) <= {0, 1, 2, 3}
    record = json.loads((out / "samples.json").read_text())
    assert {"ckpt", "ckpt_sha256", "sampler", "steps", "grid", "cfg_scale", "seed", "precision"} <= set(record)
    assert record["sampler"] == "ddpm_learned" and record["steps"] == 3 and record["cfg_scale"] == 1.5
    assert record["world_size"] == 2 and record["precision"] == "32"

    # The SLURM template's body, one task (srun faked): auto device and precision are float32 on the CPU here.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"srun": 'exec "$@"', "python": f'exec {sys.executable} "$@"'}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="11",
                     SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", VENV=str(tmp_path / "no-venv"),
                     OMP_NUM_THREADS="1")  # as torchrun sets it: float sums in the same order
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "sample.sbatch"), *job, f"out={tmp_path / 'srun'}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "srun" / "samples.npz") as npz:
        # The same images up to float rounding: the two launches batch the samples differently (a
        # sample alone in srun's last batch of 1 is in a batch of 2 under torchrun), and BLAS rounds a
        # matrix product by its shape; a pixel on a quantisation boundary may move one level.
        differ = npz["arr_0"].astype(int) - images.astype(int)
        assert np.abs(differ).max() <= 1 and (differ != 0).mean() < 1e-3, np.abs(differ).max()
        np.testing.assert_array_equal(npz["labels"], labels)
