"""Several processes, nodes and SLURM on the CPU (gloo): DDP and FSDP2 train as one process with the
same global batch, resume exactly, stop together; two nodes over loopback; a simulated SLURM job
saves on its signal, requeues and resumes; bad input to the scale-out settings is refused."""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import pytest
import torch

from diffusion import cli
from tests.conftest import CONF, FAST, ROOT, logged_losses, run_script


def test_global_batch_size_is_split_over_processes_and_accumulation(train_config, monkeypatch):
    assert cli.per_device_batch_size(64, 4, 2) == 8
    with pytest.raises(ValueError, match=r"global_batch_size=30 is not divisible by world size 4 x accumulate_grad_batches 2"):
        cli.per_device_batch_size(30, 4, 2)
    # A run of global batch 24 with 2 accumulated batches (the config's own batch is 16): each
    # batch holds 12 samples and each of the 4 optimiser steps sees 24.
    from diffusion.training.module import DiffusionModule

    events = []
    training_step, optimizer_step = DiffusionModule.training_step, DiffusionModule.optimizer_step

    def record_batch(self, batch, batch_idx):
        events.append(len(batch["image"]))
        return training_step(self, batch, batch_idx)

    def record_step(self, *args, **kwargs):  # runs the closure, so the last batch's training_step, first
        optimizer_step(self, *args, **kwargs)
        events.append("step")

    monkeypatch.setattr(DiffusionModule, "training_step", record_batch)
    monkeypatch.setattr(DiffusionModule, "optimizer_step", record_step)
    cli.train(train_config("global_batch_size=24", "trainer.accumulate_grad_batches=2"))
    assert events == [12, 12, "step"] * 4


def test_an_unknown_strategy_name_is_refused(train_config):
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=r"invalid strategy name: `strategy='fsdq'`.*Example choices"):
        cli.train(train_config("+trainer.strategy=fsdq"))


@pytest.mark.parametrize("signum", ["SIGUSR1", "SIGTERM"])
def test_a_simulated_slurm_job_saves_on_a_signal_requeues_and_resumes_in_the_same_directory(signum, tmp_path):
    """SIGUSR1: SLURM's warning before the time limit; SIGTERM: preemption."""
    import os
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'requeued'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
           "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NNODES": "1",
           "SLURM_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1"}
    fast = [o for o in FAST if not o.startswith("trainer.max_steps")]
    cmd = [sys.executable, str(ROOT / "train.py"), *fast, "trainer.max_steps=100000", "trainer.val_check_interval=1000"]
    run = tmp_path / "outputs" / "4242"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((run / "checkpoints").glob("step_*.ckpt")) and time.time() < deadline:  # training is under way
        time.sleep(0.2)
    os.kill(proc.pid, getattr(signal, signum))
    while not list(run.glob("hpc_ckpt_*.ckpt")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # let the requeue call finish
    proc.kill()  # SLURM ends the job (after SIGTERM, the run has already stopped by itself)
    proc.wait()
    saved = sorted(run.glob("hpc_ckpt_*.ckpt"))
    assert saved, f"no checkpoint saved on {signum}"
    assert "requeue 4242" in (tmp_path / "requeued").read_text()
    # After SIGUSR1 Lightning trains on until SLURM ends the job, so later step checkpoints may follow
    # the hpc one: the requeued job resumes from whichever was written last.
    from diffusion.runs import newest_checkpoint

    newest = newest_checkpoint(run)
    step = torch.load(newest, weights_only=True)["global_step"]
    assert step >= torch.load(saved[-1], weights_only=True)["global_step"]

    # The requeued job: same job id, same command; it resumes from the checkpoint in outputs/4242.
    target = step + 3 + (step + 3) % 2  # checkpoints are written every 2 steps
    again = subprocess.run([*cmd[:-2], f"trainer.max_steps={target}", "trainer.val_check_interval=1000"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {newest}" in (run / "train.log").read_text()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == target


def test_two_processes_launched_as_two_nodes_over_loopback_train_together(tmp_path):
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    procs = []
    for node in (0, 1):
        env = {**base, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "NODE_RANK": str(node)}
        cmd = [sys.executable, str(ROOT / "train.py"), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1",
               "trainer.num_nodes=2", *FAST, f"hydra.run.dir={tmp_path / f'node{node}'}"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert torch.load(tmp_path / "node0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert "world_size=2" in errors[0] or "GLOBAL_RANK: 0, MEMBER: 1/2" in errors[0] + (tmp_path / "node0" / "train.log").read_text()


def test_the_slurm_launcher_config_composes_with_its_options(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=4", "hydra.launcher.gpus_per_node=4",
                                          "hydra.launcher.partition=gpu", "hydra.launcher.account=lab",
                                          "hydra.launcher.timeout_min=60"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (4, 4, 4)
    assert (launcher.partition, launcher.account, launcher.timeout_min) == ("gpu", "lab", 60)


def test_two_processes_train_as_one_process_with_the_same_global_batch(train_config, tmp_path):
    """FSDP2 over two CPU processes (gloo), batch 16 each, against one process with batch 32 (DDP: in
    the resume test below, which checks the same of its two launches).

    The data modules give each process its half of the same global batch, and each sample's t, noise
    and dropout are keyed to its place in that batch, so the two runs compute the same gradients: the
    logged loss (the mean over processes) and the final weights agree to float32 rounding (all-reduce
    order, a mean of means). The multi-process checkpoint then samples in one process.
    """
    strategy = "fsdp"
    cli.train(train_config("global_batch_size=32", run_dir=tmp_path / "single"))
    result = run_script("train.py", f"trainer={strategy}", "trainer.accelerator=cpu", "trainer.devices=2", *FAST,
                        "global_batch_size=32", f"hydra.run.dir={tmp_path / strategy}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    single, multi = logged_losses(tmp_path / "single"), logged_losses(tmp_path / strategy)
    assert sorted(multi) == sorted(single) == [0, 1, 2, 3]
    for step, loss in single.items():
        assert multi[step] == pytest.approx(loss, rel=1e-6, abs=0), step  # measured: <= 1e-7
    ckpt = tmp_path / strategy / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    reference = torch.load(tmp_path / "single" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == reference["global_step"] == 4
    assert state["state_dict"].keys() == reference["state_dict"].keys()
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(state["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)  # measured: 3e-8
    assert cli.load_module(ckpt).sample(4, steps=2).shape == (4, 1, 8, 8)


def test_two_process_ddp_trains_as_one_process_and_resumes_exactly(train_config, tmp_path):
    """Two DDP processes (gloo), batch 16 each, train as one process with batch 32: the data modules
    give each process its half of the same global batch, and each sample's t, noise and dropout are
    keyed to its place in it. Stopped at step 3 and resumed in a new pair of processes, they continue
    with the uninterrupted process's losses and end on its weights: the data position and the draws do
    not depend on the world size either. The two-process checkpoint then samples in one process."""
    common = ["global_batch_size=32", "trainer.max_steps=6", "trainer.val_check_interval=1000",
              "callbacks.checkpoint.every_n_train_steps=1"]
    cli.train(train_config(*common, run_dir=tmp_path / "straight"))
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *FAST, *common]
    first = run_script("train.py", *ddp, "+callbacks.stop._target_=tests.conftest.StopAtStep", "+callbacks.stop.step=3",
                       f"hydra.run.dir={tmp_path / 'first'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    resumed = run_script("train.py", *ddp, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'resumed'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight, before, after = (logged_losses(tmp_path / run) for run in ("straight", "first", "resumed"))
    assert sorted(before) == [0, 1, 2] and sorted(after) == [3, 4, 5]  # steps 1..3 and 4..6 (logged 0-based)
    for step, loss in {**before, **after}.items():
        assert loss == pytest.approx(straight[step], rel=1e-6, abs=0), step  # measured: <= 1e-7
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    reference = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == reference["global_step"] == 6
    assert state["state_dict"].keys() == reference["state_dict"].keys()
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(state["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
    assert cli.load_module(last).sample(4, steps=2).shape == (4, 1, 8, 8)


def test_a_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    """The finiteness check reads the loss averaged over processes, so a NaN on rank 1 alone stops both
    ranks together (no rank is left waiting in a collective) and before the step's checkpoint: the
    gradients were averaged, so rank 0's weights are NaN too, though its own loss was finite."""
    result = run_script("train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *FAST,
                        "trainer.max_steps=6", "trainer.val_check_interval=1000",
                        "+callbacks.poison._target_=tests.conftest.PoisonBatch", "+callbacks.poison.rank=1",
                        "+callbacks.poison.step=3", f"hydra.run.dir={tmp_path / 'run'}",  # step 4: a checkpointed one
                        cwd=tmp_path, timeout=300)
    assert result.returncode != 0 and "non-finite training loss" in result.stderr, result.stderr[-3000:]
    for path in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):  # last.ckpt and step_*.ckpt
        kept = torch.load(path, weights_only=True)
        assert kept["global_step"] == 2, path.name
        assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point()), path.name


def test_the_sbatch_template_runs_on_a_fresh_checkout(tmp_path):
    """SLURM opens --output/--error before the script runs and creates no folder, so each folder they
    name must exist in a fresh checkout; the script body then trains (fake srun and scontrol) in
    outputs/<job id>, with the job's log linked from there."""
    import os
    import re
    import shutil
    from pathlib import Path

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the project's git checkout (what a fresh clone holds: git ls-files)")
    checkout = tmp_path / "checkout"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if (ROOT / name).is_file():  # a file deleted in the work tree is not in a checkout of it either
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    script = checkout / "scripts" / "slurm" / "train.sbatch"
    job = "4343"
    patterns = {"%j": job, "%x": "diffusion", "%A": job, "%a": "0", "%u": "user", "%N": "node0", "%%": "%"}
    for match in re.finditer(r"^#SBATCH\s+(--output|--error|-o|-e)[=\s]+(\S+)", script.read_text(), re.MULTILINE):
        path = re.sub("|".join(patterns), lambda m: patterns[m.group()], match.group(2))
        assert (checkout / path).parent.is_dir(), f"{match.group(1)}={match.group(2)}: {Path(path).parent} does not exist"

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"srun": 'exec "$@"', "scontrol": f'echo "$@" >> {tmp_path / "scontrol"}',
                       "python": f'exec {sys.executable} "$@"'}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("PYTHONPATH", "VENV")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_SUBMIT_DIR=str(checkout), SLURM_JOB_ID=job,
               SLURM_JOB_NAME="diffusion", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NODEID="0",
               SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1",
               SLURM_NODELIST="localhost")
    overrides = ["trainer.accelerator=cpu", "trainer.precision=32", *FAST]

    def submit(job_id: str) -> tuple[int, str]:  # SLURM runs the script in the submit directory, log opened
        log = checkout / f"slurm-{job_id}.out"
        with log.open("w") as out:
            rc = subprocess.run(["bash", str(script), *overrides], cwd=checkout, env={**env, "SLURM_JOB_ID": job_id},
                                stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode
        return rc, log.read_text()

    rc, log = submit(job)
    assert rc == 0, log[-3000:]
    run = checkout / "outputs" / job
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert (run / f"slurm-{job}.out").resolve() == (checkout / f"slurm-{job}.out").resolve()
    assert f"run directory outputs/{job}" in log and "max_steps=4" in log
    assert "no virtual environment at .venv" in log  # and the python on PATH ran

    # With a .venv in the checkout, its activate script is sourced before srun.
    venv_bin = checkout / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text('#!/bin/sh\necho "venv python $@"\n')
    (venv_bin / "python").chmod(0o755)
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    rc, log = submit("4344")
    assert rc == 0 and "venv python train.py trainer=ddp" in log, log[-3000:]


class EMASharesTheBase(L.Callback):
    """A callback (by its Hydra path) that fails a LoRA run whose EMA copy holds a base of its own:
    under FSDP2 too, its fixed parameters must be the backbone's (sharded) ones, one copy per process."""

    def on_train_start(self, trainer, module) -> None:
        ours, theirs = dict(module.backbone.named_parameters()), dict(module.ema.module.named_parameters())
        base = [n for n, p in ours.items() if not p.requires_grad]
        assert base and all(theirs[n] is ours[n] for n in base), "the EMA copy holds its own base weights"
        assert all(theirs[n] is not p for n, p in ours.items() if p.requires_grad)  # its averages are its own


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
    """A base (2 full steps: a fresh DiT's zero-initialised heads would pass a LoRA no gradient), then 4
    LoRA steps from it in one process with global batch 32, validated (with the EMA) after step 2."""
    from tests.conftest import compose_config

    root = tmp_path_factory.mktemp("lora_distributed")
    cli.train(compose_config("train", [*FAST, "trainer.max_steps=2"], root / "base"))
    base = root / "base" / "checkpoints" / "last.ckpt"
    lora = [*FAST, "global_batch_size=32", "adapter=lora", "adapter.rank=4", "adapter.alpha=2", f"adapter.base={base}",
            "model.ema_decay=0.5"]
    cli.train(compose_config("train", lora, root / "single"))
    return root, lora


def _validation_losses(run) -> dict[int, float]:
    import csv

    with open(run / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_on_two_processes_trains_as_one_process(strategy, lora_reference):
    """adapter=lora under DDP (no unused-parameter error: the frozen base is no DDP parameter) and FSDP2
    (the EMA copy keeps sharing the backbone's sharded base, and validates through the backbone with its
    averages swapped in): the losses, the EMA's validation losses (and steps trained after them, on the
    weights put back) and the LoRA weights and their averages are those of one process. The FSDP2 run
    stops after step 2 and resumes (its checkpoints leave the base out)."""
    root, lora = lora_reference
    launch = ["train.py", f"trainer={strategy}", "trainer.accelerator=cpu", "trainer.devices=2", *lora,
              "+callbacks.shares._target_=tests.test_distributed.EMASharesTheBase", f"hydra.run.dir={root / strategy}"]
    if strategy == "fsdp":
        first = run_script(*launch, "+callbacks.stop._target_=tests.conftest.StopAtStep", "+callbacks.stop.step=2",
                           cwd=root)
        assert first.returncode == 0, first.stderr[-3000:]
        launch.append("ckpt_path=last")
    result = run_script(*launch, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    if strategy == "fsdp":  # resumed from step 2, not started again
        assert "Restoring states from the checkpoint path" in (root / strategy / "train.log").read_text()
    single, multi = logged_losses(root / "single"), logged_losses(root / strategy)
    assert sorted(multi) == sorted(single) == [0, 1, 2, 3]
    for step, loss in single.items():
        assert multi[step] == pytest.approx(loss, rel=1e-6, abs=0) and loss == loss, step  # finite, equal
    validated, ours = _validation_losses(root / "single"), _validation_losses(root / strategy)
    assert ours and all(ours[step] == pytest.approx(validated[step], rel=1e-6, abs=0) for step in ours)
    state = torch.load(root / strategy / "checkpoints" / "last.ckpt", weights_only=True)
    reference = torch.load(root / "single" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == reference["global_step"] == 4 and state["adapter"] == reference["adapter"]
    assert state["state_dict"].keys() == reference["state_dict"].keys()
    assert all(".lora_" in k for k in state["state_dict"] if k != "ema.num_updates")  # no base weight saved
    assert any(v.abs().sum() > 0 for k, v in reference["state_dict"].items() if ".lora_B." in k)  # B moved from 0
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(state["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
