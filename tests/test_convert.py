"""convert.py: released DiT / SiT weights against the official forward, and the checkpoint it writes.

Random weights in the official layout (a transcription of DiT's models.py, which SiT's repeats) are
converted, and our backbone's forward is compared with diffusers' DiTTransformer2DModel holding
the same weights. diffusers' DiT embeds time with ``Timesteps(flip_sin_to_cos=True,
downscale_freq_shift=1)``: frequencies ``10000^(-k / (half - 1))``, not DiT's ``10000^(-k / half)``;
the reference sets ``downscale_freq_shift=0``, which is DiT's embedding (checked below).
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel
from omegaconf import OmegaConf

from diffusion import cli
from diffusion.conditioning import Conditioning
from diffusion.convert import backbone_overrides, convert, detect_format, infer_sizes
from tests.conftest import FAST, compose_config, run_script
from tests.test_backbones import dit_reference_pos_embed

DEPTH, HIDDEN, HEADS, PATCH, CHANNELS, CLASSES, GRID = 2, 64, 4, 2, 4, 4, 2
N = 1000  # DiT's training steps
TINY = ["vae=tiny_sd", "data.module.resolution=32"]  # offline; latents 4x4x4: a 2x2 grid of patches


def official_state(learn_sigma: bool = True, channels: int = CHANNELS, grid: int = GRID, classes: int = CLASSES,
                   seed: int = 0, zero_variance: bool = False) -> dict[str, torch.Tensor]:
    """A random state dict in DiT's (and SiT's) layout, written out from their models.py, scaled so
    every branch carries signal (the released weights are not zero-initialised any more)."""
    g = torch.Generator().manual_seed(seed)
    d, p = HIDDEN, PATCH
    out = p * p * channels * (2 if learn_sigma else 1)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) / shape[-1] ** 0.5

    def b(n: int) -> torch.Tensor:
        return torch.randn(n, generator=g) * 0.1

    state = {
        "x_embedder.proj.weight": torch.randn((d, channels, p, p), generator=g) / (channels * p * p) ** 0.5,
        "x_embedder.proj.bias": b(d),
        "pos_embed": torch.from_numpy(dit_reference_pos_embed(d, grid, grid)).float()[None],  # fixed, as DiT's
        "t_embedder.mlp.0.weight": w(d, 256), "t_embedder.mlp.0.bias": b(d),
        "t_embedder.mlp.2.weight": w(d, d), "t_embedder.mlp.2.bias": b(d),
        "y_embedder.embedding_table.weight": torch.randn((classes + 1, d), generator=g),
        "final_layer.linear.weight": w(out, d), "final_layer.linear.bias": b(out),
        "final_layer.adaLN_modulation.1.weight": w(2 * d, d) * 0.3, "final_layer.adaLN_modulation.1.bias": b(2 * d),
    }
    for i in range(DEPTH):
        state |= {
            f"blocks.{i}.attn.qkv.weight": w(3 * d, d), f"blocks.{i}.attn.qkv.bias": b(3 * d),
            f"blocks.{i}.attn.proj.weight": w(d, d), f"blocks.{i}.attn.proj.bias": b(d),
            f"blocks.{i}.mlp.fc1.weight": w(4 * d, d), f"blocks.{i}.mlp.fc1.bias": b(4 * d),
            f"blocks.{i}.mlp.fc2.weight": w(d, 4 * d), f"blocks.{i}.mlp.fc2.bias": b(d),
            f"blocks.{i}.adaLN_modulation.1.weight": w(6 * d, d) * 0.3, f"blocks.{i}.adaLN_modulation.1.bias": b(6 * d),
        }
    if zero_variance:  # as SiT leaves it: its forward drops the variance channels, so they never train
        rows = torch.arange(out) % (2 * channels) >= channels
        state["final_layer.linear.weight"][rows] = 0
        state["final_layer.linear.bias"][rows] = 0
    return state


def diffusers_reference(state: dict[str, torch.Tensor], learn_sigma: bool = True,
                        dit_frequencies: bool = True) -> DiTTransformer2DModel:
    """diffusers' DiT with the official weights (the names of its convert_dit_to_diffusers.py: the time
    and label embedders are copied into every block's adaLN)."""
    out_channels = CHANNELS * (2 if learn_sigma else 1)
    model = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HIDDEN // HEADS, in_channels=CHANNELS,
                                  out_channels=out_channels, num_layers=DEPTH, sample_size=GRID * PATCH,
                                  patch_size=PATCH, num_embeds_ada_norm=CLASSES, norm_eps=1e-6).eval()
    ref = {"pos_embed.proj.weight": state["x_embedder.proj.weight"], "pos_embed.proj.bias": state["x_embedder.proj.bias"],
           "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": state["final_layer.linear.weight"], "proj_out_2.bias": state["final_layer.linear.bias"]}
    for i in range(DEPTH):
        block = f"transformer_blocks.{i}"
        for kind in ("weight", "bias"):
            q, k, v = state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)
            ref |= {
                f"{block}.norm1.emb.timestep_embedder.linear_1.{kind}": state[f"t_embedder.mlp.0.{kind}"],
                f"{block}.norm1.emb.timestep_embedder.linear_2.{kind}": state[f"t_embedder.mlp.2.{kind}"],
                f"{block}.norm1.linear.{kind}": state[f"blocks.{i}.adaLN_modulation.1.{kind}"],
                f"{block}.attn1.to_q.{kind}": q, f"{block}.attn1.to_k.{kind}": k, f"{block}.attn1.to_v.{kind}": v,
                f"{block}.attn1.to_out.0.{kind}": state[f"blocks.{i}.attn.proj.{kind}"],
                f"{block}.ff.net.0.proj.{kind}": state[f"blocks.{i}.mlp.fc1.{kind}"],
                f"{block}.ff.net.2.{kind}": state[f"blocks.{i}.mlp.fc2.{kind}"],
            }
        ref[f"{block}.norm1.emb.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
    model.load_state_dict(ref)
    if dit_frequencies:
        for block in model.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0  # DiT's 10000^(-k / half)
    return model


def write(state, path, **wrap):
    torch.save({**wrap, "ema": state} if wrap else state, path)
    return path


def converted(tmp_path, state, name="DiT-tiny.pt", *, fmt="auto", overrides=TINY, **wrap):
    src = write(state, tmp_path / name, **wrap)
    cfg = OmegaConf.create({"src": str(src), "out": str(tmp_path / "converted.ckpt"), "format": fmt,
                            "overrides": list(overrides), "num_heads": HEADS})
    return convert(cfg)


def inputs(batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CHANNELS, GRID * PATCH, GRID * PATCH, generator=g), torch.tensor([0, 3, CLASSES])


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dit")
    state = official_state()
    path = converted(tmp, state)
    return state, path, cli.load_module(path)


def test_converted_dit_predicts_the_official_eps_at_the_integer_step(dit):
    """Ours at t = (i + 1) / N, diffusers' DiT (the official forward) at step i; ours returns the C eps
    channels, and all 2C (eps, variance) with return_variance=True."""
    state, _, model = dit
    ours, reference = model.ema.module, diffusers_reference(state)
    x, labels = inputs()
    for i in (0, 1, 17, 500, 998, 999):
        steps = torch.full((3,), i)
        with torch.no_grad():
            ref = reference(x, steps, labels).sample
            t = (steps.double() + 1) / N
            full = ours(x, t, Conditioning(labels=labels), return_variance=True)
            eps = ours(x, t.float(), Conditioning(labels=labels))  # as the samplers call it
        assert ref.shape == (3, 2 * CHANNELS, 4, 4)
        torch.testing.assert_close(full, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(eps, ref[:, :CHANNELS], rtol=0, atol=1e-5)
        assert ref.abs().max() > 0.3  # the comparison sees signal
    # Without the shift (step i read as i + 1), or with diffusers' own frequencies, it would fail.
    with torch.no_grad():
        t = torch.full((3,), 500 / N, dtype=torch.float64)
        plain = diffusers_reference(state, dit_frequencies=False)(x, torch.full((3,), 499), labels).sample
        shifted = reference(x, torch.full((3,), 500), labels).sample
        ours_499 = ours(x, t, Conditioning(labels=labels), return_variance=True)
    assert (plain - ours_499).abs().max() > 1e-3 and (shifted - ours_499).abs().max() > 1e-3


@pytest.mark.parametrize("learn_sigma", [True, False])  # the released SiT-XL/2 has it, like DiT
def test_converted_sit_predicts_minus_the_official_velocity_at_one_minus_t(learn_sigma, tmp_path):
    """SiT's forward is DiT's on its time (1 at the data), its first C channels kept; ours at
    t = 1 - t_sit predicts our velocity xT - x0, minus SiT's x1 - x0."""
    state = official_state(learn_sigma=learn_sigma, zero_variance=learn_sigma)
    model = cli.load_module(converted(tmp_path, state, "SiT-tiny.pt"))
    ours, reference = model.ema.module, diffusers_reference(state, learn_sigma=learn_sigma)
    x, labels = inputs()
    for t_sit in (0.0, 0.03, 0.5, 0.97, 1.0):
        t = torch.full((3,), t_sit, dtype=torch.float64)
        with torch.no_grad():
            sit = reference(x, t, labels).sample[:, :CHANNELS]  # SiT: x, _ = x.chunk(2, dim=1)
            velocity = ours(x, 1 - t, Conditioning(labels=labels))
        torch.testing.assert_close(velocity, -sit, rtol=0, atol=1e-5)
        assert sit.abs().max() > 0.3
    assert model.run_config["schedule"]["schedule"]["_target_"] == "diffusion.schedules.FlowMatching"


def test_a_converted_checkpoint_carries_its_source_and_samples(dit, tmp_path):
    state, path, model = dit
    checkpoint = cli.read_checkpoint(path)
    source = checkpoint["converted_from"]
    assert source["format"] == "dit" and len(source["sha256"]) == 64 and checkpoint["global_step"] == 0
    assert source["backbone"] == {"name": "dit_tiny", "learn_sigma": True, "time_scale": 1000.0, "time_shift": -1.0}
    assert model.run_config["model"]["sampling"]["sampler"] == "ddpm_learned"  # the DiT recipe's, learned variance
    for key, value in model.backbone.state_dict().items():  # backbone and EMA both hold the weights
        torch.testing.assert_close(model.ema.module.state_dict()[key], value, rtol=0, atol=0)
    out = tmp_path / "samples"
    cli.sample(compose_config("sample", [f"ckpt={path}", "steps=2", "num=2", "progress=false", f"out={out}",
                                         "device=cpu"], tmp_path))
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (2, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
        assert npz["labels"].tolist() == [0, 1]  # the default: the classes cycled


def test_fine_tuning_from_a_converted_checkpoint_starts_from_its_weights_at_step_zero(tmp_path, monkeypatch):
    """train.py ckpt_path=converted.ckpt: Lightning cannot resume it (no optimiser or loop states), so a
    new run starts from its weights. With lr 0 they stay as they were: the run's last checkpoint
    holds the converted weights, after 2 steps counted from 0."""
    theory = ["experiment=smoke", "schedule=ddpm"]  # the digits (1 x 8 x 8, 10 classes): a data module that exists
    state = official_state(channels=1, grid=4, classes=10)
    ckpt = converted(tmp_path, state, fmt="dit", overrides=theory)
    needs = ["++backbone.learn_sigma=true", "++backbone.time_scale=1000.0", "++backbone.time_shift=-1.0"]
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"need backbone settings this run lacks \(learn_sigma: False here, True there, "
                                         r"time_scale: None here, 1000.0 there, time_shift: None here, -1.0 there\); "
                                         r"add \+\+backbone.name=dit_tiny \+\+backbone.learn_sigma=true"):
        cli.train(compose_config("train", [*FAST, *theory, f"ckpt_path={ckpt}"], run))
    assert not run.exists()  # refused before the run directory is written to
    cli.train(compose_config("train", [*FAST, *theory, *needs, f"ckpt_path={ckpt}", "trainer.max_steps=2",
                                       "model.optim.optimizer.lr=0", "model.optim.warmup_steps=0"], run))
    last = cli.read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2
    start = cli.read_checkpoint(ckpt)["state_dict"]
    for key in ("backbone.blocks.1.mlp.fc1.weight", "ema.module.final_layer.linear.weight", "backbone.y_embedder.table.weight"):
        torch.testing.assert_close(last["state_dict"][key], start[key], rtol=0, atol=1e-7)
    assert (run / ".hydra" / "config.yaml").is_file() and not (run / ".hydra" / "resumed").exists()  # a new run
    # The same command again in that directory would restart it from step 0 over its checkpoints: refused,
    # unless it is a requeued SLURM job, which continues its own run.
    again = [*FAST, *theory, *needs, f"ckpt_path={ckpt}", "model.optim.optimizer.lr=0", "model.optim.warmup_steps=0"]
    with pytest.raises(FileExistsError, match="already holds a run .*continue it with ckpt_path=last"):
        cli.train(compose_config("train", again, run))
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    cli.train(compose_config("train", [*again, "trainer.max_steps=3"], run))
    assert cli.read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert (run / ".hydra" / "resumed" / "step_0000002").is_dir()


def test_train_py_saves_are_read_with_their_args_and_the_ema_preferred(tmp_path):
    """DiT's and SiT's train.py save {"model", "ema", "opt", "args"}: args (an argparse Namespace)
    names the model, and the EMA weights are the ones converted."""
    state = official_state(seed=3)
    model_weights = official_state(seed=4)
    src = tmp_path / "0400000.pt"
    torch.save({"model": model_weights, "ema": state, "opt": {}, "args": argparse.Namespace(model="SiT-XL/2")}, src)
    model = cli.load_module(convert(OmegaConf.create({"src": str(src), "out": str(tmp_path / "c.ckpt"), "format": "auto",
                                                      "overrides": TINY, "num_heads": HEADS})))
    assert cli.read_checkpoint(tmp_path / "c.ckpt")["converted_from"]["format"] == "sit"
    expected = -state["final_layer.linear.bias"].view(PATCH * PATCH, 2 * CHANNELS)[:, :CHANNELS]
    torch.testing.assert_close(model.backbone.final_layer.linear.bias.view(PATCH * PATCH, -1)[:, :CHANNELS], expected)


def test_the_format_is_detected_from_args_name_or_the_untrained_variance_head():
    dit, sit = official_state(), official_state(zero_variance=True)
    assert detect_format("auto", dit, None, "DiT-XL-2-256x256.pt") == "dit"
    assert detect_format("auto", dit, None, "SiT-XL-2-256x256.pt") == "sit"
    assert detect_format("auto", dit, {"model": "SiT-XL/2"}, "x.pt") == "sit"
    assert detect_format("auto", dit, None, "weights.pt") == "dit"
    assert detect_format("auto", sit, None, "weights.pt") == "sit"
    assert detect_format("sit", dit, None, "DiT.pt") == "sit"  # given wins
    with pytest.raises(ValueError, match="cannot tell whether x.pt holds DiT or SiT weights"):
        detect_format("auto", official_state(learn_sigma=False), None, "x.pt")
    with pytest.raises(ValueError, match="format='edm' is not supported"):
        detect_format("edm", dit, None, "x.pt")


def test_sizes_are_read_off_the_shapes():
    sizes = infer_sizes(official_state(learn_sigma=False), num_heads=HEADS)
    assert (sizes.depth, sizes.hidden_size, sizes.patch_size, sizes.in_channels, sizes.num_classes, sizes.learn_sigma,
            sizes.grid, sizes.mlp_ratio) == (DEPTH, HIDDEN, PATCH, CHANNELS, CLASSES, False, GRID, 4.0)
    with pytest.raises(ValueError, match="hidden size 64 is none of DiT's .*pass num_heads=N"):
        infer_sizes(official_state())


def test_a_file_of_another_model_is_refused_naming_the_keys_it_lacks(tmp_path):
    other = {"conv_in.weight": torch.zeros(8, 4, 3, 3), "time_embed.0.weight": torch.zeros(8, 8)}
    with pytest.raises(ValueError, match=r"is not a DiT or SiT state dict: it lacks x_embedder.proj.weight, "
                                         r"t_embedder.mlp.0.weight, y_embedder.embedding_table.weight, "
                                         r"blocks.0.attn.qkv.weight, final_layer.linear.weight"):
        converted(tmp_path, other, "unet.pt")
    state = official_state()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.1.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing blocks.1.mlp.fc2.bias; unexpected blocks.1.extra.weight"):
        converted(tmp_path, state)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        torch.save([1, 2], tmp_path / "list.pt")
        convert(OmegaConf.create({"src": str(tmp_path / "list.pt"), "out": str(tmp_path / "o.ckpt"), "format": "dit",
                                  "overrides": [], "num_heads": None}))
    assert not (tmp_path / "converted.ckpt").exists()


def test_a_shape_inconsistent_file_is_refused(tmp_path):
    state = official_state()
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(3 * HIDDEN, HIDDEN)  # block 0 has 4 x hidden
    with pytest.raises(ValueError, match=r"shape differs blocks.1.mlp.fc1.weight \(192, 64\) \(expected \(256, 64\)\)"):
        converted(tmp_path, state)
    state = official_state()
    state["final_layer.linear.weight"] = torch.zeros(20, HIDDEN)
    with pytest.raises(ValueError, match="final_layer.linear.weight has 20 rows; patch 2 and 4 channels give 16"):
        converted(tmp_path, state)
    state = official_state()
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    with pytest.raises(ValueError, match="pos_embed is not DiT's fixed 2-D sin-cos table"):
        converted(tmp_path, state)
    with pytest.raises(ValueError, match="takes 4 latent channels, the run's vae gives 1"):
        converted(tmp_path, official_state(), overrides=["experiment=smoke", "schedule=ddpm"])
    with pytest.raises(ValueError, match="dit weights predict eps on DDPM, the run's schedule is "
                                         "diffusion.schedules.FlowMatching with prediction velocity"):
        converted(tmp_path, official_state(), overrides=["experiment=smoke"])


def test_the_convert_script_takes_its_documented_arguments(tmp_path):
    src = write(official_state(zero_variance=True), tmp_path / "SiT-XL-2-256x256.pt")
    out = tmp_path / "sit.ckpt"
    result = run_script("convert.py", f"src={src}", f"out={out}", 'overrides=["vae=tiny_sd","data.module.resolution=32"]',
                        f"num_heads={HEADS}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"sample:    python sample.py ckpt={out}" in result.stdout
    assert "++backbone.time_scale=-1.0 ++backbone.time_shift=1.0" in result.stdout
    checkpoint = cli.read_checkpoint(out)
    assert checkpoint["converted_from"]["format"] == "sit"
    assert checkpoint["run_config"]["trainer"]["default_root_dir"] == str(tmp_path)  # resolved outside a run
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.glob(".*.tmp"))


def test_the_training_resolution_is_read_off_the_positions(tmp_path):
    """The recipe's 256 px gives 32 x 32 latents; the file's 2 x 2 grid of 2-patches is 4 x 4 latents,
    32 px through the factor-8 VAE: the run's data and samples take that (as DiT-XL-2-512x512.pt's 512)."""
    model = cli.load_module(converted(tmp_path, official_state(), overrides=["vae=tiny_sd"]))
    assert model.run_config["data"]["module"]["resolution"] == 32 and model.image_shape == (4, 4, 4)


def test_the_released_xl_shapes_give_dit_xl_2():
    """The released files' shapes (on the meta device, no memory): DiT-XL/2 of the registry, 675M parameters."""
    d, p = 1152, 2
    with torch.device("meta"):
        state = {k: torch.empty(shape) for k, shape in official_layout_shapes(d, 28, p).items()}
    state["pos_embed"] = torch.from_numpy(dit_reference_pos_embed(d, 16, 16)).float()[None]
    sizes = infer_sizes(state)
    assert (sizes.depth, sizes.hidden_size, sizes.num_heads, sizes.grid, sizes.num_classes) == (28, 1152, 16, 16, 1000)
    assert backbone_overrides(sizes, "dit", 1000) == {"name": "dit_xl_2", "learn_sigma": True, "time_scale": 1000.0,
                                                       "time_shift": -1.0}
    count = sum(v.numel() for k, v in state.items() if k != "pos_embed")
    assert abs(count / 675e6 - 1) < 0.01


def official_layout_shapes(d: int, depth: int, p: int, channels: int = 4, classes: int = 1000) -> dict[str, tuple]:
    """DiT models.py's parameter shapes with learn_sigma (the released files)."""
    shapes = {"x_embedder.proj.weight": (d, channels, p, p), "x_embedder.proj.bias": (d,),
              "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,), "t_embedder.mlp.2.weight": (d, d),
              "t_embedder.mlp.2.bias": (d,), "y_embedder.embedding_table.weight": (classes + 1, d),
              "final_layer.linear.weight": (2 * p * p * channels, d), "final_layer.linear.bias": (2 * p * p * channels,),
              "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,)}
    for i in range(depth):
        shapes |= {f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
                   f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
                   f"blocks.{i}.mlp.fc1.weight": (4 * d, d), f"blocks.{i}.mlp.fc1.bias": (4 * d,),
                   f"blocks.{i}.mlp.fc2.weight": (d, 4 * d), f"blocks.{i}.mlp.fc2.bias": (d,),
                   f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d), f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,)}
    return {k: torch.Size(v) for k, v in shapes.items()}
