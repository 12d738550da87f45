"""sample.py as a sampling job: each image drawn from (seed, its index), so the images do not depend on
the batch size, the number of processes (torchrun, srun) or a resume; outputs in the layout of ADM's
evaluator; the device and precision; and the refusals of bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion import cli, precision, sampling_job, sampling_options
from diffusion.samplers import PerSampleNoise
from diffusion.training.randomness import sample_seed
from tests.conftest import FAST, ROOT, compose_config, run_script


def _train(directory: Path, *overrides: str) -> Path:
    result = run_script("train.py", *FAST, "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=2",
                        *overrides, f"hydra.run.dir={directory}", cwd=directory.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return directory / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny class-conditional DiT (10 digit classes, 8x8 pixels, flow matching) trained 2 steps."""
    return _train(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def ddpm_ckpt(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("ddpm") / "run", "schedule=ddpm", "backbone=unet_tiny")


def _config(ckpt: Path, out: Path, *overrides: str):
    return compose_config("sample", [f"ckpt={ckpt}", f"out={out}", "steps=3", "progress=false", "device=cpu",
                                     "precision=32", *overrides], out.parent)


def _sample(ckpt: Path, out: Path, *overrides: str) -> dict[str, np.ndarray]:
    npz = cli.sample(_config(ckpt, out, *overrides))
    assert npz == out / "samples.npz"
    with np.load(npz) as saved:
        return dict(saved)


# --- one seed per image ----------------------------------------------------------------------
def test_per_sample_noise_draws_each_row_from_its_own_seed():
    noise = PerSampleNoise([11, 12, 13])
    first, second = noise.randn((3, 2, 4)), noise.randn((3, 5))
    for row, seed in enumerate([11, 12, 13]):
        g = torch.Generator().manual_seed(seed)  # reference: one generator per row, draws in order
        torch.testing.assert_close(first[row], torch.randn(2, 4, generator=g), rtol=0, atol=0)
        torch.testing.assert_close(second[row], torch.randn(5, generator=g), rtol=0, atol=0)
    with pytest.raises(ValueError, match="first dimension must be the number of samples"):
        noise.randn((2, 4))


@pytest.mark.parametrize("sampler", ["sampler=ancestral", "sampler=ddim eta=1", "sampler=heun", "sampler=sde",
                                     "sampler=dpmpp_2m_sde"])
def test_images_do_not_depend_on_the_batch_size(sampler, ckpt, tmp_path):
    """Images 0..7 with guidance, in batches of 8, 3 and 1: each image's initial noise and the noise the
    stochastic samplers add come from its own seed. Bit for bit on this CPU (float32 matmuls of a
    tiny DiT); then independently: image 5 alone from the module with noise seeded (seed, 5)."""
    args = [*sampler.split(), "cfg_scale=2", "num=8", "labels=uniform"]
    outs = {b: _sample(ckpt, tmp_path / f"b{b}", *args, f"batch_size={b}")["arr_0"] for b in (8, 3, 1)}
    np.testing.assert_array_equal(outs[3], outs[8])
    np.testing.assert_array_equal(outs[1], outs[8])
    model = cli.load_module(ckpt)
    name, *rest = sampler.removeprefix("sampler=").split()
    label = sampling_options.uniform_labels(0, [5], 10)
    image = model.sample(1, label, sampler=name, steps=3, cfg_scale=2.0, eta=1.0 if rest else None,
                         generator=PerSampleNoise([sample_seed(0, 5)]))
    reference = ((image + 1) * 127.5).clamp(0, 255).to(torch.uint8)[0, 0]  # ADM's conversion
    np.testing.assert_array_equal(outs[8][5, :, :, 0], reference.numpy())
    assert len({outs[8][i].tobytes() for i in range(8)}) == 8  # and the images differ from each other


# --- several processes ---------------------------------------------------------------------
def _clean_env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "TORCHELASTIC", "GROUP_", "ROLE_", "LOCAL_WORLD")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)} | {"PYTHONPATH": str(ROOT)}


JOB = ["sampler=ancestral", "cfg_scale=2", "num=10", "labels=uniform"]


def _script_args(ckpt: Path, out: Path, *overrides: str) -> list[str]:
    return [f"ckpt={ckpt}", f"out={out}", "steps=3", "progress=false", "device=cpu", "precision=32", *JOB, *overrides]


def test_two_torchrun_processes_write_what_one_process_writes(ckpt, tmp_path):
    one = _sample(ckpt, tmp_path / "one", *JOB, "batch_size=4")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           str(ROOT / "sample.py"), *_script_args(ckpt, tmp_path / "two"), "batch_size=3"]
    result = subprocess.run(cmd, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "two" / "samples.npz") as two:
        assert sorted(two.files) == sorted(one) == ["arr_0", "labels"]
        np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
        np.testing.assert_array_equal(two["labels"], one["labels"])
    assert {r.start for r in sampling_job.done_ranges(tmp_path / "two" / "parts")} == {0, 3, 5, 8}  # 0..4 | 5..9
    assert json.loads((tmp_path / "two" / "samples.json").read_text())["world_size"] == 2


def test_two_srun_tasks_resume_what_one_process_began(ckpt, tmp_path, monkeypatch):
    """srun's environment (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, no torchrun variables), resuming a
    job that one process stopped after a batch of 4: another number of processes and batch size."""
    one = _sample(ckpt, tmp_path / "one", *JOB)
    monkeypatch.setenv(sampling_job.STOP_AFTER_ENV, "1")
    with pytest.raises(sampling_job.StoppedForTest):
        cli.sample(_config(ckpt, tmp_path / "two", *JOB, "batch_size=4"))
    monkeypatch.delenv(sampling_job.STOP_AFTER_ENV)
    procs = []
    for rank in (0, 1):
        env = _clean_env() | {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                              "SLURM_JOB_ID": "7"}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *_script_args(ckpt, tmp_path / "two")],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    with np.load(tmp_path / "two" / "samples.npz") as two:
        np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
    assert [r.start for r in sampling_job.done_ranges(tmp_path / "two" / "parts")] == [0, 4, 5]  # rank 0: 4, rank 1: 5..9


def test_process_environment_of_torchrun_and_srun():
    assert precision.process_env({}) == (0, 1, 0)
    assert precision.process_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}
    assert precision.process_env(slurm) == (5, 6, 2)
    assert precision.process_env({**slurm, "RANK": "0", "WORLD_SIZE": "2"}) == (0, 2, 0)  # torchrun inside srun
    with pytest.raises(ValueError, match="RANK=2 is not in 0..WORLD_SIZE-1=1"):
        precision.process_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_shards_and_pending_batches_cover_every_index_once():
    for num, world in [(10, 3), (7, 8), (50000, 8)]:
        shards = [sampling_job.shard(num, r, world) for r in range(world)]
        assert [i for s in shards for i in s] == list(range(num))
    done = [range(0, 3), range(5, 6)]
    assert sampling_job.pending_batches(range(0, 10), done, 2) == [range(3, 5), range(6, 8), range(8, 10)]
    assert sampling_job.pending_batches(range(4, 6), done, 8) == [range(4, 5)]


# --- resume ----------------------------------------------------------------------------------
def test_a_stopped_job_resumes_to_the_same_images_and_other_arguments_are_refused(ckpt, tmp_path, monkeypatch):
    args = ["sampler=ancestral", "num=10", "batch_size=3", "png=true"]
    straight = _sample(ckpt, tmp_path / "straight", *args)
    out = tmp_path / "job"
    monkeypatch.setenv(sampling_job.STOP_AFTER_ENV, "2")
    with pytest.raises(sampling_job.StoppedForTest):
        cli.sample(_config(ckpt, out, *args))
    assert [(r.start, r.stop) for r in sampling_job.done_ranges(out / "parts")] == [(0, 3), (3, 6)]
    assert not (out / "samples.npz").exists()
    monkeypatch.delenv(sampling_job.STOP_AFTER_ENV)
    (out / "parts" / "000000-000003.npz").unlink()  # and a lost part
    before = (out / "parts" / "000003-000006.npz").stat().st_mtime_ns
    resumed = _sample(ckpt, out, *args[:-2], "batch_size=2", "png=true")  # another batch size: allowed
    assert (out / "parts" / "000003-000006.npz").stat().st_mtime_ns == before  # not sampled again
    ranges = sampling_job.done_ranges(out / "parts")
    assert sorted(i for r in ranges for i in r) == list(range(10))  # none missing, none twice
    np.testing.assert_array_equal(resumed["arr_0"], straight["arr_0"])
    np.testing.assert_array_equal(resumed["labels"], straight["labels"])
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(10)]
    with pytest.raises(ValueError, match=r"(?s)other arguments:.*cfg_scale: 1\.0 there, 3\.0 now.*sampler: "
                                         r"'ancestral' there, 'heun' now.*another out=DIR, or delete the directory"):
        cli.sample(_config(ckpt, out, "sampler=heun", "num=10", "png=true", "cfg_scale=3"))


# --- outputs ---------------------------------------------------------------------------------
def test_outputs_are_in_the_layout_evaluators_read(ckpt, tmp_path):
    out = tmp_path / "out"
    saved = _sample(ckpt, out, "num=12", "batch_size=5", "png=true", "seed=3")
    images = saved["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (12, 8, 8, 3)
    assert (images[..., 0] == images[..., 2]).all()  # grayscale digits, repeated to RGB
    assert saved["labels"].tolist() == [i % 10 for i in range(12)]  # the default: cycled, and stored
    np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / "000007.png")), images[7])
    assert Image.open(out / "grid.png").size[0] > 8 * 3
    record = json.loads((out / "samples.json").read_text())
    import hashlib

    assert record["ckpt_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for key, value in {"sampler": "euler", "steps": 3, "seed": 3, "num": 12, "precision": "32", "device": "cpu",
                       "labels_mode": "cycle", "world_size": 1, "eta": None, "grid": "run"}.items():
        assert record[key] == value, key
    assert record["cfg_scale"] == 1.0 and record["code_version"] and len(record["grid_times"]) == 4


def test_the_default_output_directory_is_named_after_the_arguments(ckpt, tmp_path):
    cfg = compose_config("sample", [f"ckpt={ckpt}", "steps=2", "num=2", "progress=false", "device=cpu",
                                    "cfg_scale=1.5", "seed=4"], tmp_path)
    npz = cli.sample(cfg)
    assert npz == ckpt.parent.parent / "samples" / "euler_2_cfg1.5_seed4" / "samples.npz" and npz.is_file()


def test_uint8_conversion_is_adms():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.99999, 1.0, 2.0]).view(1, 1, 1, 8)
    adm = [0, 0, 0, 127, 191, 254, 255, 255]  # ((x + 1) * 127.5).clamp(0, 255).to(uint8): truncation
    assert sampling_job.to_uint8(x)[0, 0, :, 0].tolist() == adm


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_samples_are_refused_not_written(bad, tmp_path):
    """A diverged model's NaN (or a bf16 overflow's inf) would become black / white pixels; the job stops
    at that batch, names how many images and why, and writes no part of it."""
    def draw(indices: range) -> torch.Tensor:
        x = torch.zeros(len(indices), 3, 4, 4)
        if indices.start == 4:
            x[1, 2, 0, 3] = x[3, 0, 1, 1] = bad
        return x

    with pytest.raises(ValueError, match=r"the batch of images 4\.\.7: 2 of 4 images hold NaN or infinite values "
                                         r"\(the first: number 1 of them, from 0\); the model diverged .*overflowed in "
                                         r"bf16 \(try precision=32\)"):
        sampling_job.run_shard(tmp_path, 12, 0, 1, 4, draw, png=True, progress=False)
    assert [(r.start, r.stop) for r in sampling_job.done_ranges(tmp_path / "parts")] == [(0, 4)]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)]


def test_uniform_labels_are_keyed_per_image_and_cover_the_classes():
    labels = sampling_options.uniform_labels(0, range(2000), 10)
    assert sampling_options.uniform_labels(0, range(1500, 2000), 10) == labels[1500:]
    assert set(labels) == set(range(10)) and max(np.bincount(labels)) < 260  # about 200 each
    assert sampling_options.uniform_labels(1, range(50), 10) != labels[:50]


def test_prompts_of_a_text_model_are_stored(tmp_path):
    mode, prompts = sampling_options.conditions("prompts", None, 5, 0, prompts=["a", "b"])
    assert (mode, prompts) == ("prompts", ["a", "b", "a", "b", "a"])
    assert sampling_options.conditions("prompts", None, 2, 0) == ("prompts", ["", ""])
    assert sampling_options.conditions(None, None, 2, 0) == ("none", None)


# --- grids, eta, device, precision -----------------------------------------------------------
def test_grid_and_eta_from_the_command_line(ddpm_ckpt, tmp_path):
    for grid in ("uniform", "shifted", "karras", "trailing", "linspace", "leading"):
        record_dir = tmp_path / grid
        _sample(ddpm_ckpt, record_dir, f"grid={grid}", "sampler=ddim", "eta=0.5", "num=2")
        record = json.loads((record_dir / "samples.json").read_text())
        assert record["grid"] == grid and record["eta"] == 0.5
    from diffusion.samplers import grids

    assert record["grid_times"] == grids.ddpm(3, spacing="leading").tolist()
    karras = json.loads((tmp_path / "karras" / "samples.json").read_text())["grid_times"]
    assert karras == grids.karras(3, cli.load_module(ddpm_ckpt).schedule).tolist()


def test_bf16_precision_runs_the_backbone_under_autocast(ckpt, tmp_path):
    model = cli.load_module(ckpt)
    linear = next(m for m in model.ema.module.modules() if isinstance(m, torch.nn.Linear))
    dtypes = []
    linear.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    noise = lambda: PerSampleNoise(range(4))  # noqa: E731
    full = model.sample(4, sampler="heun", steps=3, generator=noise())
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    half = model.sample(4, sampler="heun", steps=3, generator=noise(), precision="bf16")
    assert set(dtypes) == {torch.bfloat16} and half.dtype == torch.float32  # the sampler's updates stay float32
    assert not torch.equal(full, half)
    torch.testing.assert_close(half, full, rtol=0, atol=1e-2)
    _sample(ckpt, tmp_path / "bf16", "num=2", "precision=bf16")
    assert json.loads((tmp_path / "bf16" / "samples.json").read_text())["precision"] == "bf16"


def test_device_and_precision_are_resolved(monkeypatch):
    cpu = torch.device("cpu")
    assert precision.resolve_device("cpu") == cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve_device("auto", local_rank=3) == cpu
    with pytest.raises(ValueError, match="device='cuda:1': CUDA is not available"):
        precision.resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert precision.resolve_device("auto", local_rank=3) == torch.device("cuda", 1)  # torchrun's LOCAL_RANK
    assert precision.resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: True)
    assert precision.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: False)
    assert precision.resolve_precision("auto", cpu) == "32"
    assert precision.resolve_precision(32, cpu) == "32" and precision.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.resolve_precision("auto", torch.device("cuda", 0)) == "bf16"


def test_the_sampler_groups_options_from_the_command_line(ckpt, tmp_path):
    """sde's options reach the sampler (no diffusion is Euler, image for image) and the record."""
    options = ["sampler=sde", "sampler.diffusion_form=constant", "sampler.diffusion_norm=0", "num=4"]
    sde_images = _sample(ckpt, tmp_path / "sde", *options)["arr_0"]
    np.testing.assert_array_equal(sde_images, _sample(ckpt, tmp_path / "euler", "sampler=euler", "num=4")["arr_0"])
    record = json.loads((tmp_path / "sde" / "samples.json").read_text())
    assert record["sampler_options"] == {"diffusion_form": "constant", "diffusion_norm": 0}
    assert "sampler_options" not in json.loads((tmp_path / "euler" / "samples.json").read_text())
    noisy = _sample(ckpt, tmp_path / "sde-noisy", "sampler=sde", "num=4")["arr_0"]
    assert not np.array_equal(noisy, sde_images)


# --- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["num=0"], r"num=0: the number of images to sample must be an integer >= 1"),
    (["batch_size=0"], r"batch_size=0: the images of a batch must be an integer >= 1"),
    (["device=tpu"], r"device='tpu' is not supported; allowed values: 'auto', 'cpu', 'cuda', 'cuda:N'"),
    (["precision=16"], r"precision='16' is not supported; allowed values: 'auto', '32', 'bf16'"),
    (["grid=cosine"], r"grid='cosine' is not supported; allowed values: 'uniform', 'shifted'"),
    (["grid=trailing"], r"grid=trailing spaces the training steps of a discrete \(DDPM\) schedule"),
    (["labels=random"], r"labels='random' is not supported; give a list of classes"),
    (["labels=[3,10]"], r"labels=\[3, 10\]: need class labels in 0..9 .*out of range: \[10\]"),
    (["prompts=[cat]"], r"conditioned on class labels 0..9, so prompts= does not apply; sample it with labels="),
    (["sampler=heun", "eta=0.5"], r"eta=0.5 applies to sampler=ddim, euler_ancestral, dpmpp_2m_sde only; sampler=heun ignores it"),
    (["sampler=ddim", "eta=2"], r"eta=2.*must be in \[0, 1\]"),
    (["sampler=sde", "+sampler.diffusion=sigma"], r"sampler=sde has no option diffusion; its options: diffusion_form"),
])
def test_bad_arguments_are_refused_before_anything_is_written(overrides, message, ckpt, tmp_path):
    out = tmp_path / "out"
    cfg = compose_config("sample", [f"ckpt={ckpt}", f"out={out}", "progress=false", *overrides], tmp_path)
    with pytest.raises(ValueError, match=message):
        cli.sample(cfg)
    assert not out.exists()


# --- cache.py on a device ---------------------------------------------------------------------
def test_the_cache_on_the_default_device_equals_the_cpu_cache(train_config, tmp_path):
    caches = {}
    for device in ("cpu", "auto"):
        cli.cache(train_config(f"cache_dir={tmp_path / device}", f"cache_device={device}",
                               "data.module.batch_size=64"))
        root = tmp_path / device
        caches[device] = sorted((p.relative_to(root), p.read_bytes()) for p in root.rglob("*.bin"))
    assert caches["cpu"] and caches["cpu"] == caches["auto"]
    with pytest.raises(ValueError, match="cache_device='gpu' is not supported; allowed values: 'auto', 'cpu'"):
        cli.cache(train_config(f"cache_dir={tmp_path / 'x'}", "cache_device=gpu"))
