"""The adapter group (what trains) and LoRA through peft: only the LoRA weights train, are averaged and
saved, with the hash of the base they were trained on; rank and alpha as configured (against the
formula W x + alpha / r B A x); diffusers loads our LoRA file and gives our output; a merged LoRA is
the LoRA model. Nothing is downloaded: tiny random models stand in for released ones."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion import cli
from diffusion.adapters import DEFAULT_TARGETS, Frozen, LoRA, merged, save_diffusers_lora
from diffusion.backbones import DiffusersUNet, build_dit
from diffusion.conditioning import Conditioning
from diffusion.schedules import DDPM
from diffusion.training.module import DiffusionModule
from tests.conftest import FAST, StopAtStep, compose_config  # noqa: F401 - StopAtStep: by its Hydra path
from tests.seeded import randn as _randn
from tests.tiny_encoders import (  # noqa: F401 - no_network: any connection fails the test
    TINY_SD_UNET,
    TINY_VAE_CONFIGS,
    no_network,
    save_tiny_hf,
    save_tiny_sd_unet,
)

WIDTH = TINY_SD_UNET["cross_attention_dim"]
DIGITS = [o for o in FAST if not o.startswith("backbone")]  # the default backbone: dit_digits


def _unet(directory: Path | None = None, seed: int = 0) -> DiffusersUNet:
    if directory is not None:
        save_tiny_sd_unet(directory, seed)
        return DiffusersUNet(pretrained=str(directory), in_channels=4, token_dim=WIDTH).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiffusersUNet(config=TINY_SD_UNET, in_channels=4, token_dim=WIDTH).eval()


def _randomise_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA's B starts at zero (the model is then its base); random A and B make the update visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _unet_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    return _randn(2, 4, 8, 8, seed=seed), torch.tensor([0.3, 0.8]), Conditioning(tokens=_randn(2, 5, WIDTH, seed=seed + 1))


# --- what trains -----------------------------------------------------------------------------------
def test_lora_steps_move_only_the_lora_weights_and_the_ema_averages_only_them():
    backbone = _unet(seed=3)
    module = DiffusionModule(backbone, DDPM("scaled_linear", "eps"), adapter=LoRA(rank=2, alpha=4.0), ema_decay=0.5)
    lora = {n: p for n, p in module.backbone.named_parameters() if ".lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    base = {n: p.detach().clone() for n, p in module.backbone.named_parameters() if ".lora_" not in n}
    assert not any(p.requires_grad for n, p in module.backbone.named_parameters() if n in base)
    # Only the attention projections are adapted (diffusers' defaults), in every attention block.
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert adapted == {"to_q", "to_k", "to_v", "0"}
    optimizer = module.configure_optimizers()["optimizer"]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in lora.values()}
    start = {n: p.detach().clone() for n, p in lora.items()}
    x, t, cond = _unet_inputs()
    for _ in range(3):
        loss = module.objective(partial(module.model(module.backbone), cond=cond), x, t=t).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        module.ema.update(module.backbone)
    after = dict(module.backbone.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())  # the base did not move
    assert all(not torch.equal(after[n], start[n]) for n in lora if ".lora_B." in n)  # B left zero
    # The EMA copy shares the base tensors (no second copy) and averages the LoRA weights alone.
    ema = dict(module.ema.module.named_parameters())
    assert all(ema[n] is after[n] for n in base)
    assert all(not torch.equal(ema[n], after[n]) and not torch.equal(ema[n], start[n]) for n in lora if ".lora_B." in n)
    # A checkpoint's state holds the trained weights and their averages, no base weight.
    state = module.state_dict()
    assert set(state) == {f"{owner}.{n}" for owner in ("backbone", "ema.module") for n in lora} | {"ema.num_updates"}


def test_rank_and_alpha_reach_peft_as_the_formula():
    """A LoRA linear is W x + b + (alpha / r) B A x, computed here by hand from its tensors."""
    backbone = build_dit(name="dit_tiny", in_channels=1, num_classes=10)
    LoRA(rank=3, alpha=7.0, dropout=0.25).apply(backbone)
    _randomise_lora(backbone)
    layer = backbone.blocks[0].attn.qkv
    assert layer.r["default"] == 3 and layer.lora_alpha["default"] == 7.0
    assert layer.lora_dropout["default"].p == 0.25
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape[0] == 3 and B.shape[1] == 3
    x = _randn(5, layer.in_features, seed=2)
    base = layer.get_base_layer()
    expected = x @ base.weight.T + base.bias + 7.0 / 3 * (x @ A.T @ B.T)
    layer.eval()  # no dropout
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # DiT's defaults: attention and MLP linears, not the patch embedding or the adaLN linears ...
    names = {n.split(".lora_")[0] for n, _ in backbone.named_parameters() if ".lora_" in n}
    assert names == {f"blocks.{i}.{m}" for i in range(len(backbone.blocks)) for m in DEFAULT_TARGETS["DiT"][:2]
                     + DEFAULT_TARGETS["DiT"][-2:]}
    # ... which adaln=true adds.
    with_adaln = LoRA(adaln=True).apply(build_dit(name="dit_tiny", in_channels=1, num_classes=10))
    assert with_adaln.blocks[0].adaLN_modulation[1].r["default"] == 8
    assert with_adaln.final_layer.adaLN_modulation[1].r["default"] == 8


def test_targets_that_match_nothing_are_refused_with_the_names_that_exist():
    with pytest.raises(ValueError, match=r"\['nope'\] match no module of DiT.*blocks\.0\.attn\.qkv"):
        LoRA(targets=["attn.qkv", "nope"]).apply(build_dit(name="dit_tiny", in_channels=1))
    with pytest.raises(ValueError, match="adapter.rank"):
        LoRA(rank=0)
    with pytest.raises(ValueError, match="adapter.alpha"):
        LoRA(alpha=0)


def test_frozen_trains_nothing_and_says_so():
    module = DiffusionModule(_unet(), DDPM("scaled_linear", "eps"), adapter=Frozen())
    assert not any(p.requires_grad for p in module.backbone.parameters())
    assert set(module.state_dict()) == {"ema.num_updates"}  # the base is recorded by its hash alone
    with pytest.raises(ValueError, match="adapter=frozen leaves no parameter"):
        module.configure_optimizers()


# --- from the command line, on the digits DiT ------------------------------------------------------
@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """A base (2 full steps: the zero-initialised heads of a fresh DiT would pass no gradient to a LoRA),
    then 4 LoRA steps from it, straight and stopped at step 2 then resumed."""
    from hydra.core.global_hydra import GlobalHydra

    root = tmp_path_factory.mktemp("lora")
    cli.train(compose_config("train", [*DIGITS, "trainer.max_steps=2"], root / "base"))
    base = root / "base" / "checkpoints" / "last.ckpt"
    lora = [*DIGITS, "adapter=lora", "adapter.rank=4", "adapter.alpha=2", f"adapter.base={base}",
            "model.optim.decay=constant", "model.optim.optimizer.weight_decay=0.01"]
    cli.train(compose_config("train", lora, root / "straight"))
    stop = ["+callbacks.stop._target_=tests.conftest.StopAtStep", "+callbacks.stop.step=2"]
    cli.train(compose_config("train", [*lora, *stop], root / "resumed"))
    for path in (root / "resumed" / "checkpoints").glob("*.ckpt"):
        if torch.load(path, weights_only=True)["global_step"] != 2:
            path.unlink()
    cli.train(compose_config("train", [*lora, "ckpt_path=last"], root / "resumed"))
    GlobalHydra.instance().clear()
    return base, root / "straight" / "checkpoints" / "last.ckpt", root / "resumed" / "checkpoints" / "last.ckpt"


def test_adapter_lora_from_the_command_line_trains_and_saves_only_the_lora(lora_runs):
    base_path, path, _ = lora_runs
    checkpoint = torch.load(path, weights_only=True)
    base = torch.load(base_path, weights_only=True)["state_dict"]
    assert checkpoint["global_step"] == 4 and checkpoint["adapter"]["name"] == "lora"
    state = checkpoint["state_dict"]
    assert all(".lora_" in k for k in state if k != "ema.num_updates") and len(state) > 1
    # The optimiser held the LoRA weights alone (one state per parameter of its groups).
    params = [i for group in checkpoint["optimizer_states"][0]["param_groups"] for i in group["params"]]
    assert len(params) == sum(k.startswith("backbone.") for k in state)
    model = cli.load_module(path)
    assert model.backbone.blocks[0].attn.qkv.scaling["default"] == 2 / 4
    own = model.backbone.state_dict()
    for key, value in base.items():  # the base is the base checkpoint's EMA backbone, untouched
        if key.startswith("ema.module."):
            name = key.removeprefix("ema.module.")
            name = name if name in own else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            assert torch.equal(own[name], value), name
    assert any(state[k].abs().sum() > 0 for k in state if ".lora_B." in k)  # B moved from zero
    assert model.sample(2, steps=2).shape == (2, 1, 8, 8)


def test_a_lora_run_resumes_where_it_stopped(lora_runs):
    _, straight, resumed = lora_runs
    assert (resumed.parents[1] / ".hydra" / "resumed" / "step_0000002" / "resume.yaml").is_file()  # not restarted
    a, b = (torch.load(p, weights_only=True) for p in (straight, resumed))
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=1e-5, atol=1e-6)


def test_another_base_or_another_adapter_is_refused(lora_runs, tmp_path):
    base_path, path, _ = lora_runs
    checkpoint = cli.read_checkpoint(path)
    other = torch.load(base_path, weights_only=True)
    key = next(k for k in other["state_dict"] if k.startswith("ema.module.") and k.endswith("qkv.weight"))
    other["state_dict"][key] = other["state_dict"][key] + 1e-3
    torch.save(other, tmp_path / "other.ckpt")
    config = OmegaConf.create(checkpoint["run_config"])
    config.adapter.base = str(tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="trained on other base weights.*sha256"):
        cli.build_module(config).check_checkpoint(checkpoint, "checkpoint")
    config.adapter = {"_target_": "diffusion.adapters.Full"}
    with pytest.raises(ValueError, match="trained with adapter=lora, this model is built with adapter=full"):
        cli.build_module(config).check_checkpoint(checkpoint, "checkpoint")


def test_export_merges_the_lora_into_the_base(lora_runs, tmp_path):
    from safetensors.torch import load_file

    _, path, _ = lora_runs
    model = cli.load_module(path)
    out = cli.export(compose_config("export", [f"ckpt={path}", f"out={tmp_path / 'export'}"], tmp_path))
    config = OmegaConf.load(out / "config.yaml")
    assert config.adapter._target_ == "diffusion.adapters.Full"
    with pytest.raises(ValueError, match="lora_format=kohya: .* adapter=lora on DiT.*diffusers UNet"):
        cli.export(compose_config("export", [f"ckpt={path}", f"out={tmp_path / 'no'}", "lora_format=kohya"], tmp_path))
    with pytest.raises(ValueError, match="lora_format='comfy' is not supported; allowed values: 'diffusers', 'kohya'"):
        cli.export(compose_config("export", [f"ckpt={path}", "lora_format=comfy"], tmp_path))
    assert not (tmp_path / "no").exists()
    plain = cli.build_module(config).backbone
    plain.load_state_dict(load_file(out / "ema.safetensors"))  # the plain backbone's names, every one
    x, t = _randn(3, 1, 8, 8, seed=4), torch.tensor([0.2, 0.5, 0.9])
    cond = Conditioning(labels=torch.tensor([1, 2, 3]))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x, t, cond), model.ema.module(x, t, cond), rtol=1e-4, atol=1e-5)


def test_merged_is_the_unmerged_model():
    backbone = LoRA(rank=4, alpha=3.0).apply(_unet(seed=2))
    _randomise_lora(backbone)
    plain = merged(backbone)
    assert plain.state_dict().keys() == _unet().state_dict().keys()
    x, t, cond = _unet_inputs()
    with torch.no_grad():
        lora_out, merged_out, base_out = backbone(x, t, cond), plain(x, t, cond), _unet(seed=2)(x, t, cond)
    torch.testing.assert_close(merged_out, lora_out, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(lora_out, base_out, atol=1e-3)  # the LoRA changes the output
    assert any(".lora_" in n for n in backbone.state_dict())  # the original is left as it was


# --- diffusers loads our file ----------------------------------------------------------------------
def _tiny_sd_pipeline(tmp_path: Path, unet_directory: Path):
    """A tiny StableDiffusionPipeline around the UNet saved in ``unet_directory`` (random VAE and CLIP)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    clip = save_tiny_hf("clip_text", tmp_path / "clip")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE_CONFIGS["sd"])
    return StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel.from_pretrained(clip), tokenizer=AutoTokenizer.from_pretrained(clip),
        unet=UNet2DConditionModel.from_pretrained(unet_directory),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _pipeline_loads_and_matches(tmp_path: Path, backbone, load) -> None:
    """``load(pipe)`` applies our file to a pipeline of the base UNet; its UNet then gives our output."""
    pipe = _tiny_sd_pipeline(tmp_path, tmp_path / "unet")
    x, t, cond = _unet_inputs()
    steps = backbone.timestep(t)
    with torch.no_grad():
        before = pipe.unet(x, steps, encoder_hidden_states=cond.tokens).sample
        load(pipe)
        theirs = pipe.unet(x, steps, encoder_hidden_states=cond.tokens).sample
        ours = backbone(x, t, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, ours, atol=1e-3)  # the file was applied


def test_a_stable_diffusion_pipeline_loads_our_lora_file_and_gives_our_output(tmp_path):
    backbone = _unet(tmp_path / "unet", seed=4)
    adapter = LoRA(rank=4, alpha=2.0)  # alpha != rank: a loader that assumed alpha = r would scale by 1, not 1/2
    adapter.apply(backbone)
    _randomise_lora(backbone, seed=5)
    file = save_diffusers_lora(backbone, adapter, tmp_path / "lora")
    assert file.name == "pytorch_lora_weights.safetensors"
    _pipeline_loads_and_matches(tmp_path, backbone, lambda pipe: pipe.load_lora_weights(tmp_path / "lora"))


# The kohya layout by hand, for TINY_SD_UNET: one cross-attention down block, the mid block, one
# cross-attention up block of layers_per_block + 1 = 2 attentions, each of one transformer block.
KOHYA_EXPECTED = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0":
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k":
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
}


def test_the_kohya_file_has_kohyas_key_layout_and_the_real_alpha(tmp_path):
    from safetensors import safe_open

    from diffusion.adapters import save_kohya_lora

    backbone = _unet(seed=4)
    adapter = LoRA(rank=4, alpha=2.0)
    adapter.apply(backbone)
    _randomise_lora(backbone, seed=5)
    file = save_kohya_lora(backbone, adapter, tmp_path / "kohya.safetensors")
    with safe_open(file, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    # 4 transformer blocks x 2 attentions x 4 projections, each with down, up and alpha.
    assert len(state) == 4 * 2 * 4 * 3
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in state)
    for module, path in KOHYA_EXPECTED.items():
        layer = backbone.unet.get_submodule(path)
        assert torch.equal(state[f"{module}.lora_down.weight"], layer.lora_A["default"].weight)  # (rank, in)
        assert torch.equal(state[f"{module}.lora_up.weight"], layer.lora_B["default"].weight)  # (out, rank)
        assert state[f"{module}.lora_down.weight"].shape[0] == 4
        assert state[f"{module}.alpha"].shape == () and state[f"{module}.alpha"].item() == 2.0
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2"
    with pytest.raises(ValueError, match="a diffusers UNet backbone.*not DiT"):
        save_kohya_lora(LoRA().apply(build_dit(name="dit_tiny", in_channels=1)), adapter, tmp_path / "dit.safetensors")


def test_a_stable_diffusion_pipeline_loads_our_kohya_file_and_gives_our_output(tmp_path):
    """diffusers converts the kohya keys itself (its non-diffusers LoRA path), alpha read from the file."""
    from diffusion.adapters import save_kohya_lora

    backbone = _unet(tmp_path / "unet", seed=4)
    # alpha != rank (a wrong alpha fails), and beyond the attention projections: linears of the feed-forward
    # and the resnets' time projection and convolutions, whose underscored names diffusers has to undo.
    adapter = LoRA(rank=4, alpha=3.0, targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2",
                                               "time_emb_proj", "conv1"])
    adapter.apply(backbone)
    _randomise_lora(backbone, seed=6)
    file = save_kohya_lora(backbone, adapter, tmp_path / "kohya" / "my_lora.safetensors")
    _pipeline_loads_and_matches(tmp_path, backbone,
                                lambda pipe: pipe.load_lora_weights(file.parent, weight_name=file.name))


# --- the config group --------------------------------------------------------------------------------
@pytest.mark.parametrize("option,target", [("full", "Full"), ("lora", "LoRA"), ("frozen", "Frozen")])
def test_each_adapter_option_builds_the_module(option, target, tmp_path):
    module = cli.build_module(compose_config("train", [*FAST, f"adapter={option}"], tmp_path))
    assert type(module.adapter).__name__ == target
    trains = {n for n, p in module.backbone.named_parameters() if p.requires_grad}
    every = {n for n, _ in module.backbone.named_parameters()}
    assert trains == {"full": every, "lora": {n for n in every if ".lora_" in n}, "frozen": set()}[option]


def test_adapter_full_is_the_module_without_an_adapter(tmp_path):
    """The default changes nothing: the same weights from the same seed, the same state, no record."""
    cfg = compose_config("train", FAST, tmp_path)
    assert cfg.adapter._target_ == "diffusion.adapters.Full"
    torch.manual_seed(0)
    with_full = cli.build_module(cfg)
    del cfg.adapter
    torch.manual_seed(0)
    without = cli.build_module(cfg)
    a, b = with_full.state_dict(), without.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert with_full.base_weights_sha256 is None


def test_a_stable_diffusion_lora_fine_tune_exports_diffusers_files(tmp_path):
    """experiment=finetune_sd15 adapter=lora on a tiny saved UNet; export.py writes the LoRA file, which a
    diffusers UNet loads, and the merged UNet weights, which equal the base UNet with that LoRA."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from tests.tiny_families import lora_finetune_and_export, tiny_family

    ckpt, out = lora_finetune_and_export("sd15", tiny_family("sd15", tmp_path), tmp_path)
    model = cli.load_module(ckpt)
    x, t, cond = _unet_inputs()
    steps = model.ema.module.timestep(t)
    with torch.no_grad():
        ours = model.ema.module(x, t, cond)
        lora_unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
        lora_unet.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
        merged_unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
        merged_unet.load_state_dict({k.removeprefix("unet."): v for k, v in load_file(out / "ema.safetensors").items()})
        base = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()(x, steps, cond.tokens).sample
        saved = UNet2DConditionModel.from_pretrained(out / "unet").eval()  # diffusers' own layout, merged
        for unet in (lora_unet, merged_unet, saved):
            torch.testing.assert_close(unet(x, steps, cond.tokens).sample, ours, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, ours, atol=1e-4)  # the LoRA was trained away from zero
    # lora_format=kohya: the same tensors under kohya's names (the file itself is checked against
    # diffusers' loader above), with alpha 1 of rank 2.
    kohya = cli.export(compose_config("export", [f"ckpt={ckpt}", f"out={tmp_path / 'kohya'}", "lora_format=kohya"],
                                      tmp_path))
    assert not (kohya / "pytorch_lora_weights.safetensors").exists()
    theirs, written = load_file(out / "pytorch_lora_weights.safetensors"), load_file(kohya / "lora_kohya.safetensors")
    expected = {}
    for key, value in theirs.items():
        path, part = key.removeprefix("unet.").rsplit(".lora_", 1)
        module = "lora_unet_" + path.replace(".", "_")
        expected[f"{module}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value
        expected[f"{module}.alpha"] = torch.tensor(1.0)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], v) for k, v in expected.items())
