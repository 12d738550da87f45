"""Memory of fine-tuning: gradient checkpointing of the wrapped diffusers models (the same gradients,
full and LoRA, and the blocks really run again in backward), bf16 base weights under an fp32 LoRA, and
8-bit AdamW (bitsandbytes) against torch's AdamW. Tiny random models; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion.adapters import LoRA
from diffusion.backbones import DiffusersUNet, FluxTransformer, SD3Transformer
from diffusion.conditioning import Conditioning
from tests.conftest import CONF
from tests.seeded import randn as _randn
from tests.tiny_encoders import TINY_SD_UNET, no_network  # noqa: F401 - no_network: autouse
from tests.tiny_mmdit import POOLED, WIDTH, tiny_transformer

KINDS = ["unet", "sd3", "flux"]


def _backbone(kind: str, **kwargs) -> torch.nn.Module:
    """A tiny wrapped model of ``kind``, its weights fixed by the seed whatever the options."""
    if kind == "unet":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return DiffusersUNet(config=TINY_SD_UNET, in_channels=4, token_dim=TINY_SD_UNET["cross_attention_dim"],
                                 **kwargs)
    theirs = tiny_transformer(kind, seed=0)
    cls = SD3Transformer if kind == "sd3" else FluxTransformer
    extra = {"guidance": 3.5} if kind == "flux" else {}
    model = cls(config=dict(theirs.config), in_channels=16, token_dim=WIDTH, pooled_dim=POOLED, **extra, **kwargs)
    model.transformer.load_state_dict(theirs.state_dict())
    return model


def _inputs(kind: str) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    if kind == "unet":
        width = TINY_SD_UNET["cross_attention_dim"]
        return _randn(2, 4, 8, 8, seed=1), torch.tensor([0.3, 0.8]), Conditioning(tokens=_randn(2, 5, width, seed=2))
    cond = Conditioning(tokens=_randn(2, 5, WIDTH, seed=2), pooled=_randn(2, POOLED, seed=3))
    return _randn(2, 16, 8, 8, seed=1), torch.tensor([0.3, 0.8]), cond


def _with_lora(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    targets = None if kind == "unet" else ["to_q", "to_k", "to_v"]
    LoRA(rank=2, alpha=4.0, targets=targets).apply(model)
    g = torch.Generator().manual_seed(5)  # B starts at zero: random A and B give both gradients
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _block_type(kind: str) -> type:
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    # The UNet's transformer blocks: all are checkpointed (its mid block's first resnet is not).
    return {"unet": BasicTransformerBlock, "sd3": JointTransformerBlock, "flux": FluxTransformerBlock}[kind]


def _grads_and_block_calls(model: torch.nn.Module, kind: str) -> tuple[dict[str, torch.Tensor], set[int]]:
    """The gradients of a loss on ``model``'s output, and how many times its blocks ran (forward and backward)."""
    calls: dict[int, int] = {}
    blocks = [m for m in model.modules() if isinstance(m, _block_type(kind))]
    assert blocks
    # A pre-hook: torch's recomputation stops once it has what backward needs, before forward hooks run.
    hooks = [b.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
             for i, b in enumerate(blocks)]
    model.train()
    x, t, cond = _inputs(kind)
    model(x, t, cond).square().mean().backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return grads, {calls.get(i, 0) for i in range(len(blocks))}


# --- gradient checkpointing --------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients_and_runs_each_block_again(kind, adapter):
    plain, checkpointed = _backbone(kind), _backbone(kind, gradient_checkpointing=True)
    if adapter == "lora":
        plain, checkpointed = _with_lora(plain, kind), _with_lora(checkpointed, kind)
    expected, runs = _grads_and_block_calls(plain, kind)
    got, runs_checkpointed = _grads_and_block_calls(checkpointed, kind)
    # Every trainable parameter gets its gradient: with LoRA only the LoRA weights train, their inputs
    # (the frozen blocks' activations) need no grad, and the checkpoint must still reach them.
    trainable = {n for n, p in checkpointed.named_parameters() if p.requires_grad}
    assert got.keys() == trainable == expected.keys()
    if adapter == "lora":
        assert trainable and all(".lora_" in n for n in trainable)
        assert all(got[n].abs().sum() > 0 for n in trainable if ".lora_B" in n)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert runs == {1} and runs_checkpointed == {2}  # every block is recomputed in backward


@pytest.mark.parametrize("option", ["sd15_unet", "sd21_unet", "sdxl_unet", "sd3_transformer", "flux_transformer"])
def test_the_wrapped_backbone_options_expose_gradient_checkpointing(option):
    cfg = OmegaConf.load(Path(CONF) / "backbone" / f"{option}.yaml")
    if "defaults" in cfg:  # sd21/sdxl build on sd15's file
        cfg = OmegaConf.merge(OmegaConf.load(Path(CONF) / "backbone" / "sd15_unet.yaml"), cfg)
    assert cfg.gradient_checkpointing is False


# --- 8-bit AdamW --------------------------------------------------------------------------------
def test_adamw_8bit_follows_torch_adamw_closely_with_8_bit_moments():
    pytest.importorskip("bitsandbytes")
    from diffusion.training.optim import adamw_8bit, parameter_groups

    def run(make) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
        x, y = _randn(32, 128, seed=1), _randn(32, 8, seed=2)
        optimizer = make(parameter_groups(model))
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(5):
            (model(x) - y).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return {n: p.detach() - start[n] for n, p in model.named_parameters()}, optimizer

    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    expected, _ = run(lambda groups: torch.optim.AdamW(groups, **settings))
    got, optimizer = run(lambda groups: adamw_8bit(groups, **settings))
    for name in expected:  # the 5 updates: within the moments' quantisation error, and not exactly equal
        error = (got[name] - expected[name]).norm() / expected[name].norm()
        assert error < 0.03, (name, error)
    weight = optimizer.param_groups[0]["params"][0]  # 128 x 64 = 8192 >= min_8bit_size: 8-bit moments
    assert weight.numel() == 8192 and optimizer.state[weight]["state1"].dtype == torch.uint8
    assert not torch.equal(got["0.weight"], expected["0.weight"])
    assert optimizer.param_groups[1]["weight_decay"] == 0.0  # our groups pass through


def test_adamw_8bit_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    import sys

    from diffusion.training.optim import adamw_8bit

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now fails
    with pytest.raises(ValueError, match="pip install 'bitsandbytes>=0.50'"):
        adamw_8bit([torch.nn.Parameter(torch.zeros(3))])


# --- bf16 base weights --------------------------------------------------------------------------
def _lora_module(kind: str, base_dtype: str):
    from diffusion.schedules import DDPM
    from diffusion.training.module import DiffusionModule

    targets = None if kind == "unet" else ["to_q", "to_k", "to_v"]
    module = DiffusionModule(_backbone(kind), DDPM("scaled_linear", "eps"),
                             adapter=LoRA(rank=2, alpha=4.0, targets=targets, base_dtype=base_dtype))
    g = torch.Generator().manual_seed(5)  # the same random LoRA in both, so that it shows in the output
    with torch.no_grad():
        for name, p in module.backbone.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_base_weights_halve_their_memory_and_keep_a_float32_lora_that_trains(kind):
    full, half = _lora_module(kind, "float32"), _lora_module(kind, "bfloat16")
    base = [p for p in half.backbone.parameters() if not p.requires_grad]
    lora = [p for p in half.backbone.parameters() if p.requires_grad]
    assert base and lora and all(p.dtype == torch.bfloat16 for p in base)
    assert all(p.dtype == torch.float32 for p in lora)
    assert 2 * _bytes(base) == _bytes(p for p in full.backbone.parameters() if not p.requires_grad)
    ema_base = [p for n, p in half.ema.module.named_parameters() if ".lora_" not in n]
    assert {id(p) for p in ema_base} == {id(p) for p in base}  # the EMA copy shares them: no second copy
    # The output: within bf16's rounding of float32's (8 bits of mantissa, about 0.4% per weight).
    x, t, cond = _inputs(kind)
    with torch.no_grad():
        expected, got = full.backbone(x, t, cond), half.backbone(x, t, cond)
    assert got.dtype == torch.float32 and not torch.equal(got, expected)
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    # The LoRA trains in float32: float32 gradients, and the optimiser's state in float32.
    optimizer = half.configure_optimizers()["optimizer"]
    start = [p.detach().clone() for p in lora]
    half.backbone(x, t, cond).square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    optimizer.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    assert any(not torch.equal(p, s) for p, s in zip(lora, start))
    assert all(p.grad is None for p in base)


def test_a_bf16_run_loads_its_own_checkpoints_and_names_the_dtype_of_another():
    half = _lora_module("unet", "bfloat16")
    checkpoint = {"state_dict": half.state_dict()}
    half.on_save_checkpoint(checkpoint)
    assert checkpoint["adapter"]["base_dtype"] == "bfloat16"
    _lora_module("unet", "bfloat16").check_checkpoint(checkpoint, "ckpt")  # its own: accepted
    full = _lora_module("unet", "float32")
    assert full.base_weights_sha256 == half.base_weights_sha256  # hashed as built, before the cast
    with pytest.raises(ValueError, match="stored in bfloat16, this model stores them in float32.*"
                                         "adapter.base_dtype=bfloat16"):
        full.check_checkpoint(checkpoint, "ckpt")
    # The saved LoRA weights are float32; the base weights are not saved at all.
    assert all(v.dtype == torch.float32 for k, v in checkpoint["state_dict"].items() if ".lora_" in k)
    assert not any(k.startswith("backbone.") and ".lora_" not in k for k in checkpoint["state_dict"])


def test_bf16_base_weights_are_refused_for_a_backbone_that_computes_in_float32():
    from diffusion.backbones import build_dit
    from diffusion.adapters import Frozen

    dit = build_dit(name="dit_tiny", in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="adapter.base_dtype=bfloat16: DiT computes in its inputs' dtype"):
        LoRA(base_dtype="bfloat16").apply(dit)
    with pytest.raises(ValueError, match="adapter.base_dtype='float16' is not supported"):
        Frozen(base_dtype="float16")


def test_a_bf16_text_encoder_holds_half_the_bytes_and_gives_float32_close_to_float32s(tmp_path):
    from diffusion.encoders import HFTextEncoder
    from tests.tiny_encoders import save_tiny_hf

    path = save_tiny_hf("clip", tmp_path / "clip")
    full, half = HFTextEncoder(str(path), max_length=8), HFTextEncoder(str(path), max_length=8, dtype="bfloat16")
    assert 2 * _bytes(half.parameters()) == _bytes(full.parameters())
    assert half.fingerprint()["dtype"] == "bfloat16" != full.fingerprint()["dtype"]  # caches tell them apart
    expected, got = full(["a red circle", "a cat"]), half(["a red circle", "a cat"])
    for field in ("tokens", "pooled"):
        a, b = getattr(expected, field), getattr(got, field)
        assert b.dtype == torch.float32 and not torch.equal(a, b)
        assert (a - b).abs().max() <= 0.05 * a.abs().max(), field
    with pytest.raises(ValueError, match="text_encoder.dtype='int8' is not supported"):
        HFTextEncoder(str(path), dtype="int8")


# --- all of them from the command line ----------------------------------------------------------
def test_a_lora_fine_tune_with_every_memory_option_trains_and_resumes(tmp_path):
    """experiment=finetune_sd15 with LoRA, gradient checkpointing, bf16 base weights, a bf16 text encoder
    and (when bitsandbytes is installed) 8-bit AdamW: it trains, its checkpoint resumes, sample.py's
    loading rebuilds the bf16 base."""
    import importlib.util

    from diffusion import cli
    from tests.conftest import FAST, compose_config
    from tests.make_captioned_folder import make_captioned_folder
    from tests.tiny_encoders import save_tiny_hf, save_tiny_sd_unet

    save_tiny_sd_unet(tmp_path / "unet", seed=1)
    clip = save_tiny_hf("clip_text", tmp_path / "clip")
    images = make_captioned_folder(tmp_path / "images", n=4, sizes=[(64, 64)], layout="csv")
    fast = [o for o in FAST if not o.startswith(("backbone", "data.module.batch_size", "trainer.max_steps"))]
    eight_bit = importlib.util.find_spec("bitsandbytes") is not None
    optimiser = ["model.optim.optimizer._target_=diffusion.training.optim.adamw_8bit",
                 "+model.optim.optimizer.min_8bit_size=1"] if eight_bit else []  # tiny tensors: 8 bits too
    overrides = [
        *fast, "experiment=finetune_sd15", f"backbone.pretrained={tmp_path / 'unet'}", "vae=tiny_sd",
        f"text_encoder.pretrained={clip}", "text_encoder.max_length=16", f"data.module.root={images}",
        "data.module.resolution=64", "data.module.batch_size=2", "data.module.num_workers=0",
        "adapter=lora", "adapter.rank=2", "adapter.base_dtype=bfloat16", "backbone.gradient_checkpointing=true",
        "text_encoder.dtype=bfloat16", "callbacks.checkpoint.every_n_train_steps=1", *optimiser,
    ]
    cli.train(compose_config("train", [*overrides, "trainer.max_steps=2"], tmp_path / "run"))
    cli.train(compose_config("train", [*overrides, "trainer.max_steps=3", "ckpt_path=last"], tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 3 and saved["adapter"]["base_dtype"] == "bfloat16"
    state = saved["optimizer_states"][0]["state"]
    if eight_bit:  # bitsandbytes' layout; step 3: the resumed run went on from the saved moments
        quantised = [s["__bnb_optimizer_quant_state__"] for s in state.values()]
        assert state and all(q["state1"].dtype == q["state2"].dtype == torch.uint8 for q in quantised)
        assert all(s["step"] == 3 for s in state.values())
    model = cli.load_module(ckpt)
    assert model.backbone.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model.backbone.named_parameters() if ".lora_" in n)
    assert model.backbone.unet.down_blocks[0].gradient_checkpointing
    images = model.sample(1, ["a red circle"], steps=2)
    assert torch.isfinite(images).all()
    # export.py merges the LoRA into the float32 base as released, not into its bf16 copy.
    from safetensors.torch import load_file

    from tests.tiny_encoders import tiny_sd_unet

    out = cli.export(compose_config("export", [f"ckpt={ckpt}", f"out={tmp_path / 'export'}"], tmp_path))
    exported, released = load_file(out / "ema.safetensors"), tiny_sd_unet(seed=1).state_dict()
    assert exported["unet.conv_in.weight"].dtype == torch.float32
    torch.testing.assert_close(exported["unet.conv_in.weight"], released["conv_in.weight"], rtol=0, atol=0)
