"""Training from the command-line configs: every option composes, every theory x backbone
trains, a run resumes, a checkpoint samples, and bad input stops with a clear message.
Several processes, nodes and SLURM: test_distributed.py."""

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
from tests.conftest import CONF, FAST, ROOT, compose_config, logged_losses, run_script
from tests.make_captioned_folder import make_captioned_folder
from tests.make_class_folder import make_class_folder


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
    if option == "image_classes":
        extra = [f"data.module.root={make_class_folder(tmp_path / 'classes', classes=3)}", "data.num_classes=3",
                 "data.module.batch_size=2"]
    if option == "dreambooth":  # prior preservation would need the base model's class images first
        extra = [f"data.module.instance_dir={make_captioned_folder(tmp_path / 'images')}",
                 "data.module.instance_prompt=a photo of sks dog", "data.module.prior_preservation=false"]
    if option in ("text", "t2i_tiny"):
        extra.append("text_encoder=openclip_tiny")
    if option == "t2i_tiny" or option.startswith(("finetune_", "textual_inversion_")):
        extra.append(f"data.module.root={make_captioned_folder(tmp_path / 'images')}")
    if option.startswith("textual_inversion_"):  # the new word is the user's to name
        extra += ["adapter.placeholder_token='<cat-toy>'", "adapter.initializer_token=cat"]
    cfg = compose_config("train", [f"{group}={option}", *extra], tmp_path)
    node = cfg[group] if group != "experiment" else None  # experiments override the global config

    def built_by(obj, config) -> bool:  # the object is what the config's _target_ names
        target = config._target_.rsplit(".", 1)[1]
        return type(obj).__name__ == target or getattr(obj, "__name__", None) == target

    if group == "backbone" and node._target_.endswith(("SD3Transformer", "FluxTransformer")):  # tests/tiny_mmdit.py
        from tests.tiny_mmdit import check_tiny_backbone_option

        check_tiny_backbone_option(node)
    elif group == "backbone" and "pretrained" in node:  # a released model's (nothing downloads here): tiny, random
        from omegaconf import OmegaConf

        from diffusion.conditioning import Conditioning
        from tests.tiny_encoders import TINY_SD_UNET

        config, width, pooled = TINY_SD_UNET, TINY_SD_UNET["cross_attention_dim"], {}
        if node.get("time_ids") is not None:  # SDXL's added conditions: a tiny text_time UNet (tests/test_sdxl.py)
            from tests.test_sdxl import POOLED, TINY_SDXL_UNET, WIDTH

            config, width, pooled = TINY_SDXL_UNET, WIDTH, {"pooled_dim": POOLED}
        tiny = OmegaConf.merge(node, {"pretrained": None, "config": config})
        model = instantiate(tiny, in_channels=4, token_dim=width, **pooled)
        x = torch.zeros(2, 4, 32, 32)
        cond = Conditioning(tokens=torch.zeros(2, 3, width),
                            pooled=torch.zeros(2, pooled["pooled_dim"]) if pooled else None)
        assert model(x, torch.full((2,), 0.5), cond).shape == x.shape
    elif group == "backbone":
        with torch.device("meta"):  # the paper's sizes, without their memory
            model = instantiate(node, in_channels=4)
        x = torch.empty(2, 4, 32, 32, device="meta")
        assert model(x, torch.empty(2, device="meta")).shape == x.shape  # the shape contract, on meta
    elif group == "schedule":
        from diffusion.objective import DiffusionObjective
        from diffusion.samplers.grids import bind_schedule

        parts = {key: instantiate(node[key]) for key in ("schedule", "time_distribution", "weighting")}
        assert all(built_by(parts[key], node[key]) for key in parts)
        objective = DiffusionObjective(**{"schedule": parts["schedule"], "time_distribution": parts["time_distribution"],
                                          "weighting": parts["weighting"]})  # checks the combination
        objective.schedule.at(0.5)  # checks the theory
        grid = bind_schedule(instantiate(node.grid), objective.schedule)(4)  # as the module binds it
        assert grid.shape == (5,) and grid[0] == 1 and grid[-1] == 0
    elif group == "sampler":
        from diffusion.samplers import get_sampler, sampler_options

        assert get_sampler(node.name).__name__ == node.name and {"name", "steps"} <= set(node)
        assert set(node) - {"name", "steps"} <= set(sampler_options(node.name))  # e.g. sde's diffusion_form
    elif group == "data":
        module = instantiate(node.module)
        module.setup()
        assert tuple(node.image_shape) == tuple(module.image_shape)
    elif group in ("conditioning", "experiment"):
        if cfg.backbone.get("pretrained"):  # fine-tuning a released model: tiny random parts of its kinds
            cfg = _with_tiny_released_parts(cfg, tmp_path)
        elif cfg.get("vae") is not None and cfg.vae.get("pretrained"):
            # A recipe with a hub VAE (nothing downloads here): its choices checked as composed, then
            # built with the random tiny VAE and backbone of the same architectures.
            assert cfg.vae.pretrained.startswith("stabilityai/") and cfg.vae.scaling_factor is None
            cfg = compose_config("train", [f"{group}={option}", *extra, "vae=tiny_sd", "backbone=dit_tiny"], tmp_path)
            assert cfg.vae.pretrained is None and cfg.backbone.name == "dit_tiny"  # the overrides won
        model = cli.build_module(cfg)
        assert type(model.conditioner).__name__ == cfg.conditioning.conditioner._target_.rsplit(".", 1)[1]
    elif group in ("logger", "callbacks"):
        import lightning as L
        from lightning.pytorch.loggers import Logger

        assert all(isinstance(instantiate(c), Logger if group == "logger" else L.Callback) for c in node.values())
    elif group == "trainer" and node.accelerator == "gpu" and not torch.cuda.is_available():
        with pytest.raises(Exception, match="(?i)gpu|cuda"):  # composes; needs a GPU to build
            instantiate(node)
    else:
        trainer = instantiate(node)
        assert str(trainer.precision) in (str(node.precision), f"{node.precision}-true")
        assert trainer.max_steps == node.max_steps


def _with_tiny_released_parts(cfg, tmp_path):
    """A fine-tuning recipe of a released model with its hub parts checked as composed, then replaced
    by tiny random ones of the same kinds: the UNet (saved as on the hub), the VAE and the text encoder."""
    from omegaconf import open_dict

    from tests.tiny_encoders import TINY_OPENCLIP_CONFIG, TINY_VAE_CONFIGS, save_tiny_hf, save_tiny_sd_unet
    from tests.tiny_mmdit import TARGETS, with_tiny_pipeline_parts

    if cfg.backbone._target_.endswith(TARGETS):  # SD3 / FLUX: a tiny pipeline directory
        return with_tiny_pipeline_parts(cfg, tmp_path)

    assert cfg.backbone.pretrained.startswith(("runwayml/", "stabilityai/"))
    assert cfg.vae.pretrained.startswith(("stabilityai/", "madebyollin/"))  # SDXL's fp16-safe VAE
    if cfg.backbone.get("time_ids") is not None:  # SDXL: a tiny pipeline directory, as tests/test_sdxl.py saves it
        from tests.test_sdxl import _save_pipeline_encoders, tiny_sdxl_unet

        root = _save_pipeline_encoders(tmp_path / "sdxl")
        tiny_sdxl_unet().save_pretrained(root / "unet")
        with open_dict(cfg):
            cfg.backbone.pretrained = str(root)
            cfg.vae.pretrained, cfg.vae.config = None, TINY_VAE_CONFIGS["sd"]
            cfg.text_encoder.pretrained = str(root)
        return cfg
    with open_dict(cfg):
        save_tiny_sd_unet(tmp_path / "unet")
        cfg.backbone.pretrained = str(tmp_path / "unet")
        cfg.vae.pretrained, cfg.vae.config = None, TINY_VAE_CONFIGS["sd"]
        if cfg.text_encoder._target_.endswith("HFTextEncoder"):
            cfg.text_encoder.pretrained = str(save_tiny_hf("clip_text", tmp_path / "clip"))
            cfg.text_encoder.max_length = 16
        else:
            cfg.text_encoder.model_name, cfg.text_encoder.pretrained = "tiny-clip", None
            cfg.text_encoder.model_config = TINY_OPENCLIP_CONFIG
    return cfg


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
    out = tmp_path / "samples"
    cfg = compose_config("sample", [f"ckpt={ckpt}", "sampler=dpmpp_2m", "steps=3", "cfg_scale=2", "num=12",
                                    "labels=[1,2,3]", f"out={out}", "progress=false"], tmp_path)
    assert cli.sample(cfg) == out / "samples.npz" and (out / "grid.png").is_file()
    saved = __import__("numpy").load(out / "samples.npz")
    assert saved["arr_0"].shape == (12, 8, 8, 3) and saved["labels"].tolist() == [1, 2, 3] * 4


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
    fast = [o for o in FAST if not o.startswith("backbone")]
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
    out = tmp_path / "script"
    result = run_script("sample.py", f"ckpt={ckpt}", "sampler=dpmpp_2m", "steps=3", "cfg_scale=3", "num=10",
                        "batch_size=4", "labels=[4,2]", "grid=karras", "device=cpu", "precision=32", f"out={out}",
                        "png=true", "progress=false", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "samples.npz").is_file() and (out / "grid.png").is_file() and (out / "samples.json").is_file()
    assert len(list((out / "images").glob("*.png"))) == 10
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


def test_a_resumed_run_in_the_same_directory_continues_the_same_wandb_run(tmp_path, monkeypatch):
    from diffusion.loggers import wandb_logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    first = wandb_logger(save_dir=tmp_path / "run")
    second = wandb_logger(save_dir=tmp_path / "run")
    other = wandb_logger(save_dir=tmp_path / "other")
    assert first._id == second._id != other._id


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
    straight, resumed = logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(6, 14))  # steps 7..14 (logged 0-based)
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], abs=1e-6), step
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    reference = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_with_float32_weights(precision, train_config, tmp_path):
    """Autocast runs the backbone in half precision; weights, optimiser state and EMA stay float32."""
    cli.train(train_config(f"trainer.precision={precision}"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    floats = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in floats)
    losses = logged_losses(tmp_path / "run")
    assert sorted(losses) == [0, 1, 2, 3] and all(map(math.isfinite, losses.values()))
