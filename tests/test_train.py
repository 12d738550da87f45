"""Training from the command-line configs: every option composes, every theory x backbone
trains, a run resumes, a checkpoint samples, and bad input stops with a clear message."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from diffusion import cli
from diffusion.objective import DiffusionObjective
from tests.conftest import CONF, compose_config
from tests.make_captioned_folder import make_captioned_folder

ROOT = Path(__file__).resolve().parents[1]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ("schedule", "backbone", "sampler", "conditioning", "data", "trainer", "logger", "callbacks",
                      "experiment") for o in _options(g)],
)
def test_every_config_option_composes_and_instantiates(group, option, tmp_path):
    extra = []
    if option == "image_folder":
        extra = [f"data.module.root={make_captioned_folder(tmp_path / 'images')}", "data.module.batch_size=2"]
    if option in ("text", "t2i_tiny"):
        extra.append("text_encoder=openclip_tiny")
    if option == "t2i_tiny":
        extra.append(f"data.module.root={make_captioned_folder(tmp_path / 'images')}")
    cfg = compose_config("train", [f"{group}={option}", *extra], tmp_path)
    node = cfg[group] if group != "experiment" else None  # experiments override the global config
    if group == "backbone":
        with torch.device("meta"):  # the paper's sizes, without their memory
            model = instantiate(node)
        assert isinstance(model, torch.nn.Module)
    elif group == "schedule":
        for key in ("schedule", "time_distribution", "weighting"):
            assert instantiate(node[key]) is not None
        assert instantiate(node.grid)(4).shape == (5,)
    elif group == "sampler":
        from diffusion.samplers import get_sampler

        assert callable(get_sampler(node.name)) and node.steps > 0
    elif group == "data":
        instantiate(node.module).setup()
    elif group in ("conditioning", "experiment"):
        model = cli.build_module(cfg)
        assert type(model.conditioner).__name__ == cfg.conditioning.conditioner._target_.rsplit(".", 1)[1]
    elif group in ("logger", "callbacks"):
        assert all(instantiate(c) is not None for c in node.values())
    elif group == "trainer" and node.accelerator == "gpu" and not torch.cuda.is_available():
        with pytest.raises(Exception, match="(?i)gpu|cuda"):  # composes; needs a GPU to build
            instantiate(node)
    else:
        assert instantiate(node) is not None


@pytest.mark.parametrize("backbone", ["dit_tiny", "unet_tiny"])
@pytest.mark.parametrize("schedule", _options("schedule"))
def test_fast_run_of_each_theory_and_backbone(schedule, backbone, train_config, tmp_path):
    metrics = cli.train(train_config(f"schedule={schedule}", f"backbone={backbone}"))
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "samples" / "step_0000004.png").is_file()
    assert (run / "logs" / "metrics.csv").is_file()
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


def test_text_conditioning_without_a_text_encoder_is_refused(train_config):
    with pytest.raises(ValueError, match="add text_encoder="):
        cli.build_module(train_config("conditioning=text"))


def test_unconditional_training_and_sampling(train_config, tmp_path):
    cli.train(train_config("conditioning=none", "model.sampling.cfg_scale=3"))
    model = cli.load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert model.num_classes is None and model.backbone.num_classes is None
    assert model.sample(3, steps=2).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(3, [1, 2, 3], steps=2)


def test_resume_continues_steps_optimizer_ema_and_lr_schedule(train_config, tmp_path):
    first = tmp_path / "first"
    cli.train(train_config(run_dir=first))
    before = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    assert before["global_step"] == 4
    second = tmp_path / "second"
    cli.train(train_config("trainer.max_steps=8", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", run_dir=second))
    after = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 8
    assert after["state_dict"]["ema.num_updates"].item() == 8
    assert after["lr_schedulers"][0]["last_epoch"] == 8
    adam_steps = {s["step"].item() for s in after["optimizer_states"][0]["state"].values()}
    assert adam_steps == {8.0}


def test_sample_writes_a_grid_and_npz_from_the_checkpoint(train_config, tmp_path):
    cli.train(train_config())
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "grid.png"
    cfg = compose_config("sample", [f"ckpt={ckpt}", "sampler=dpmpp_2m", "steps=3", "cfg_scale=2", "num=12",
                                    "labels=[1,2,3]", f"out={out}", "progress=false"], tmp_path)
    assert cli.sample(cfg) == out and out.is_file()
    saved = __import__("numpy").load(out.with_suffix(".npz"))
    assert saved["images"].shape == (12, 1, 8, 8) and saved["condition"].tolist() == [1, 2, 3] * 4


def test_the_module_rebuilds_from_the_checkpoint_alone(train_config, tmp_path):
    cli.train(train_config("schedule=ddpm_v", "backbone=unet_tiny"))
    model = cli.load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert type(model.backbone).__name__ == "UNet" and model.schedule.prediction == "v"


# --- bad input --------------------------------------------------------------------------
def test_a_missing_checkpoint_path_is_refused(train_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.train(train_config(f"ckpt_path={tmp_path / 'nope.ckpt'}"))


def test_a_checkpoint_of_another_backbone_is_refused(train_config, tmp_path):
    cli.train(train_config(run_dir=tmp_path / "dit"))
    ckpt = tmp_path / "dit" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="does not fit this model"):
        cli.train(train_config("backbone=unet_tiny", f"ckpt_path={ckpt}", run_dir=tmp_path / "unet"))


@pytest.mark.parametrize("bad_step", [3, 4])
def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(bad_step, train_config, tmp_path, monkeypatch):
    """Checked one step late (the host does not wait on the device each step), and before any save:
    a bad step 3 stops at step 4; a bad step 4, which is checkpointed, stops before its checkpoint."""
    original = DiffusionObjective.__call__
    training_calls = []

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if torch.is_grad_enabled():  # a training step (validation runs without grad)
            training_calls.append(1)
            if len(training_calls) == bad_step:  # step 2 was checkpointed
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DiffusionObjective, "__call__", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        cli.train(train_config("trainer.max_steps=10", "trainer.val_check_interval=100"))
    kept = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 2 and all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_multirun_runs_each_job_in_its_own_directory(tmp_path):
    fast = [o for o in __import__("tests.conftest", fromlist=["FAST"]).FAST if not o.startswith("backbone")]
    cmd = [sys.executable, "train.py", "-m", "schedule=fm,ddpm", "backbone=dit_tiny,unet_tiny", "trainer.max_steps=2",
           *[o for o in fast if not o.startswith("trainer.max_steps")], f"hydra.sweep.dir={tmp_path}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    runs = sorted(p.parent.parent.name for p in tmp_path.glob("*/checkpoints/last.ckpt"))
    assert len(runs) == 4, runs
    assert runs == ["0_fm_dit_tiny", "1_fm_unet_tiny", "2_ddpm_dit_tiny", "3_ddpm_unet_tiny"]


def test_all_loggers_together_and_wandb_offline_without_credentials(train_config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    monkeypatch.setenv("WANDB_SILENT", "true")
    cli.train(train_config("logger=[csv,tensorboard,wandb]"))
    run = tmp_path / "run"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "wandb").glob("offline-run-*"))
    assert "model" in (run / "logs" / "hparams.yaml").read_text()  # the full resolved config is logged


def test_the_sample_script_takes_its_documented_arguments(train_config, tmp_path):
    cli.train(train_config())
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "script.png"
    cmd = [sys.executable, str(ROOT / "sample.py"), f"ckpt={ckpt}", "sampler=dpmpp_2m", "steps=3", "cfg_scale=3", "num=10",
           "labels=[4,2]", f"out={out}", "progress=false"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and out.with_suffix(".npz").is_file()
    assert not list(tmp_path.glob("*.log"))  # no log file left in the working directory


def test_a_crash_during_a_checkpoint_save_keeps_the_previous_checkpoint(train_config, tmp_path, monkeypatch):
    cli.train(train_config())
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=True)
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    original = TorchCheckpointIO.save_checkpoint

    def crash_halfway(self, checkpoint, path, storage_options=None):
        if "last" not in Path(path).name:  # step checkpoints save normally; last.ckpt's save dies
            return original(self, checkpoint, path, storage_options)
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")  # the process dies mid-write
        raise RuntimeError("killed during save")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", crash_halfway)
    with pytest.raises(RuntimeError, match="killed during save"):
        cli.train(train_config("trainer.max_steps=8", f"ckpt_path={last}", run_dir=tmp_path / "run"))
    monkeypatch.undo()
    after = torch.load(last, weights_only=True)  # still whole, and still the previous one
    assert after["global_step"] == before["global_step"] == 4
    cli.train(train_config("trainer.max_steps=8", f"ckpt_path={last}", run_dir=tmp_path / "resumed"))
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


def test_export_writes_the_ema_weights_as_safetensors_beside_the_config(train_config, tmp_path):
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    cli.train(train_config("backbone=unet_tiny"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = cli.export(compose_config("export", [f"ckpt={ckpt}", f"out={tmp_path / 'export'}"], tmp_path))
    rebuilt = cli.build_module(OmegaConf.load(out / "config.yaml")).backbone
    rebuilt.load_state_dict(load_file(out / "ema.safetensors"))
    trained = cli.load_module(ckpt)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    cond = trained.conditioner.make([3, 4], 2, torch.device("cpu"))
    torch.testing.assert_close(rebuilt.eval()(x, t, cond), trained.ema.module(x, t, cond))


def test_compiled_backbone_trains_and_keeps_eager_parameter_names(train_config, tmp_path):
    cli.train(train_config("model.compile=true", "+model.compile_kwargs.backend=eager"))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in state if "_orig_mod" in k]
    cli.load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")  # loads into an eager model


def test_global_batch_size_is_split_over_processes_and_accumulation(train_config, tmp_path):
    assert cli.per_device_batch_size(64, 4, 2) == 8
    with pytest.raises(ValueError, match=r"global_batch_size=30 is not divisible by world size 4 x accumulate_grad_batches 2"):
        cli.per_device_batch_size(30, 4, 2)
    cli.train(train_config("global_batch_size=24", "trainer.accumulate_grad_batches=2"))  # 12 a batch


def test_an_unknown_strategy_name_is_refused(train_config):
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=r"invalid strategy name: `strategy='fsdq'`.*Example choices"):
        cli.train(train_config("+trainer.strategy=fsdq"))


def test_a_resumed_run_in_the_same_directory_continues_the_same_wandb_run(tmp_path, monkeypatch):
    from diffusion.loggers import wandb_logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    first = wandb_logger(save_dir=tmp_path / "run")
    second = wandb_logger(save_dir=tmp_path / "run")
    other = wandb_logger(save_dir=tmp_path / "other")
    assert first._id == second._id != other._id


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
    fast = [o for o in __import__("tests.conftest", fromlist=["FAST"]).FAST if not o.startswith("trainer.max_steps")]
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
    step = torch.load(saved[-1], weights_only=True)["global_step"]

    # The requeued job: same job id, same command; it resumes from the checkpoint in outputs/4242.
    target = step + 3 + (step + 3) % 2  # checkpoints are written every 2 steps
    again = subprocess.run([*cmd[:-2], f"trainer.max_steps={target}", "trainer.val_check_interval=1000"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"hpc_ckpt_{len(saved)}.ckpt" in (run / "train.log").read_text()  # restored from it
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == target


def _losses(run: Path) -> dict[int, float]:
    import csv

    with open(run / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_exact_resume_reproduces_the_losses_of_an_uninterrupted_run(train_config, tmp_path):
    """Stopped mid-epoch at step 6 and resumed, steps 7..14 give the losses of a run that never
    stopped: weights, EMA, optimiser, schedule, the data position restored, and the draws keyed to it."""
    common = ["trainer.log_every_n_steps=1", "data.module.batch_size=128", "trainer.val_check_interval=1000"]
    cli.train(train_config(*common, "trainer.max_steps=14", run_dir=tmp_path / "straight"))
    # Same configuration, stopped at step 6 mid-epoch (11 batches an epoch), as a preemption would.
    cli.train(train_config(*common, "trainer.max_steps=14", "+callbacks.stop._target_=tests.conftest.StopAtStep",
                           "+callbacks.stop.step=6", run_dir=tmp_path / "first"))
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    cli.train(train_config(*common, "trainer.max_steps=14", f"ckpt_path={ckpt}", run_dir=tmp_path / "resumed"))
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(6, 14))  # steps 7..14 (logged 0-based)
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], abs=1e-6), step
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    reference = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-6)


def test_two_processes_launched_as_two_nodes_over_loopback_train_together(tmp_path):
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fast = __import__("tests.conftest", fromlist=["FAST"]).FAST
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    procs = []
    for node in (0, 1):
        env = {**base, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "NODE_RANK": str(node)}
        cmd = [sys.executable, str(ROOT / "train.py"), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1",
               "trainer.num_nodes=2", *fast, f"hydra.run.dir={tmp_path / f'node{node}'}"]
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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_as_one_process_with_the_same_global_batch(strategy, train_config, tmp_path):
    """DDP and FSDP2 over two CPU processes (gloo), batch 16 each, against one process with batch 32.

    The data modules give each process its half of the same global batch, and each sample's t, noise
    and dropout are keyed to its place in that batch, so the two runs compute the same gradients: the
    logged loss (the mean over processes) and the final weights agree to float32 rounding (all-reduce
    order, a mean of means). The multi-process checkpoint then samples in one process.
    """
    cli.train(train_config("global_batch_size=32", run_dir=tmp_path / "single"))
    fast = __import__("tests.conftest", fromlist=["FAST"]).FAST
    cmd = [sys.executable, str(ROOT / "train.py"), f"trainer={strategy}", "trainer.accelerator=cpu", "trainer.devices=2",
           *fast, "global_batch_size=32", f"hydra.run.dir={tmp_path / strategy}"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]

    single, multi = _losses(tmp_path / "single"), _losses(tmp_path / strategy)
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


def test_two_process_ddp_resumes_exactly(train_config, tmp_path):
    """Two DDP processes stopped at step 3 and resumed, in a new pair of processes, continue with the
    losses of one uninterrupted process with the same global batch (itself equal to an uninterrupted
    pair, above): the data position and the draws do not depend on the world size either."""
    common = ["global_batch_size=32", "trainer.max_steps=6", "trainer.val_check_interval=1000",
              "callbacks.checkpoint.every_n_train_steps=1"]
    cli.train(train_config(*common, run_dir=tmp_path / "straight"))
    fast = __import__("tests.conftest", fromlist=["FAST"]).FAST
    ddp = [sys.executable, str(ROOT / "train.py"), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           *fast, *common]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run([*ddp, "+callbacks.stop._target_=tests.conftest.StopAtStep", "+callbacks.stop.step=3",
                            f"hydra.run.dir={tmp_path / 'first'}"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    resumed = subprocess.run([*ddp, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'resumed'}"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight, after = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(after) == [3, 4, 5]  # steps 4..6 (logged 0-based)
    for step, loss in after.items():
        assert loss == pytest.approx(straight[step], rel=1e-6, abs=0), step


def test_a_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    """The finiteness check reads the loss averaged over processes, so a NaN on rank 1 alone stops both
    ranks together (no rank is left waiting in a collective) and before the step's checkpoint: the
    gradients were averaged, so rank 0's weights are NaN too, though its own loss was finite."""
    fast = __import__("tests.conftest", fromlist=["FAST"]).FAST
    cmd = [sys.executable, str(ROOT / "train.py"), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           *fast, "trainer.max_steps=6", "trainer.val_check_interval=1000",
           "+callbacks.poison._target_=tests.conftest.PoisonBatch", "+callbacks.poison.rank=1",
           "+callbacks.poison.step=3", f"hydra.run.dir={tmp_path / 'run'}"]  # step 4: a checkpointed one
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0 and "non-finite training loss" in result.stderr, result.stderr[-3000:]
    for path in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):  # last.ckpt and step_*.ckpt
        kept = torch.load(path, weights_only=True)
        assert kept["global_step"] == 2, path.name
        assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point()), path.name


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_with_float32_weights(precision, train_config, tmp_path):
    """Autocast runs the backbone in half precision; weights, optimiser state and EMA stay float32."""
    cli.train(train_config(f"trainer.precision={precision}"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    floats = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in floats)
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == [0, 1, 2, 3] and all(map(math.isfinite, losses.values()))
