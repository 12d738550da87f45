"""Tests of the DiT and UNet backbones: shapes, zero init, conditioning, parameter counts, options, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding
from torch import nn

from diffusion.backbones import DIT_CONFIGS, UNET_CONFIGS, DiT, UNet, build_dit, build_unet, dit_config
from diffusion.backbones.layers import sincos_pos_embed_2d, timestep_embedding
from diffusion.conditioning import Conditioning, null_label_condition


def randomize_(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Perturb every parameter so zero-initialised branches carry signal and gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def text_cond(batch: int, length: int = 5, dim: int = 16, pooled: int = 8, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 3:] = False
    return Conditioning(
        tokens=torch.randn(batch, length, dim, generator=g), mask=mask, pooled=torch.randn(batch, pooled, generator=g)
    )


def inputs(batch: int, channels: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=g), torch.rand(batch, generator=g)


def tiny_dit(**kw) -> DiT:
    return build_dit("dit_tiny", **kw)


def tiny_unet(**kw) -> UNet:
    return build_unet("unet_tiny", **kw)


# -- shared layers against independent references --------------------------------------------------
def test_timestep_embedding_matches_diffusers_and_dit_formula() -> None:
    t = torch.tensor([0.0, 0.013, 0.5, 0.999, 1.0])
    ours = timestep_embedding(t, 256)
    ref = get_timestep_embedding(t * 1000, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # DiT's TimestepEmbedder.timestep_embedding, written out: [cos | sin] of t * exp(-ln(1e4) * i / half)
    half = 128
    freqs = np.exp(-np.log(10000) * np.arange(half) / half)
    args = (t.double().numpy() * 1000)[:, None] * freqs[None]
    np.testing.assert_allclose(ours.numpy(), np.concatenate([np.cos(args), np.sin(args)], 1), atol=1e-4)


def dit_reference_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """facebookresearch/DiT models.py get_2d_sincos_pos_embed, with its square grid generalised to h x w."""

    def get_1d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))  # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])
    return np.concatenate([get_1d(embed_dim // 2, grid[0]), get_1d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("h, w", [(4, 4), (16, 16), (3, 7), (8, 2)])
def test_sincos_pos_embed_matches_dit_reference(h: int, w: int) -> None:
    ours = sincos_pos_embed_2d(64, h, w).numpy()
    np.testing.assert_allclose(ours, dit_reference_pos_embed(64, h, w), atol=1e-6)
    if h == w:  # diffusers' version, which rescales non-square grids, agrees on square ones
        ref = get_2d_sincos_pos_embed(64, h, base_size=h, interpolation_scale=1.0)
        np.testing.assert_allclose(ours, ref.numpy(), atol=1e-6)


# -- shapes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "channels, height, width, patch",
    [(1, 8, 8, 2), (3, 16, 8, 2), (4, 12, 20, 4), (16, 8, 24, 2), (4, 32, 32, 8)],
)
def test_dit_output_shape(channels: int, height: int, width: int, patch: int) -> None:
    model = randomize_(tiny_dit(in_channels=channels, patch_size=patch, num_classes=10))
    x, t = inputs(2, channels, height, width)
    out = model(x, t, Conditioning(labels=torch.tensor([3, 10])))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_dit_learn_sigma_returns_the_prediction_and_the_variance_only_when_asked() -> None:
    """The DiT paper's learned-variance head (2C channels; its parameter count below has it) is
    held, but forward returns the C prediction channels, which the objective trains, and all 2C
    only with return_variance=True: no objective or sampler reads a learned variance yet."""
    from diffusion.objective import DiffusionObjective
    from diffusion.schedules import DDPM

    model = randomize_(tiny_dit(learn_sigma=True))
    x, t = inputs(2, 4, 8, 8)
    both = model(x, t, return_variance=True)
    assert both.shape == (2, 8, 8, 8)
    torch.testing.assert_close(model(x, t), both[:, :4], rtol=0, atol=0)
    assert DiffusionObjective(DDPM())(model, x).loss.isfinite()
    with pytest.raises(ValueError, match=r"return_variance=True\) needs a model built with learn_sigma=True"):
        tiny_dit()(x, t, return_variance=True)


def test_time_shift_moves_the_embedded_time() -> None:
    """time_scale * t + time_shift is what the embedding sees: a model with (1000, -1) at t equals
    the default model at t - 1/1000; the default (shift 0) is unchanged."""
    shifted = randomize_(tiny_dit(time_shift=-1.0))
    plain = tiny_dit()
    plain.load_state_dict(shifted.state_dict())
    x, t = inputs(2, 4, 8, 8)
    t = t.double() * 0.5 + 0.25
    torch.testing.assert_close(shifted(x, t), plain(x, t - 1e-3), rtol=0, atol=1e-6)
    assert (shifted(x, t) - plain(x, t)).abs().max() > 1e-4


@pytest.mark.parametrize("channels, height, width", [(1, 8, 8), (3, 16, 24), (4, 32, 32), (16, 8, 16), (4, 24, 8)])
def test_unet_output_shape(channels: int, height: int, width: int) -> None:
    model = randomize_(tiny_unet(in_channels=channels, token_dim=16))
    x, t = inputs(2, channels, height, width)
    out = model(x, t, Conditioning(tokens=torch.randn(2, 3, 16)))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unet_256px_rgb() -> None:
    model = UNet(3, model_channels=16, channel_mult=(1, 1, 2, 2), num_res_blocks=1, attention_levels=(3,),
                 head_dim=16, norm_groups=8)  # fmt: skip
    x, t = inputs(1, 3, 256, 256)
    with torch.no_grad():
        assert model(x, t).shape == x.shape


# -- zero init and conditioning ---------------------------------------------------------------------
def test_dit_is_exactly_zero_at_init() -> None:
    x, t = inputs(3, 4, 8, 8)
    assert torch.equal(tiny_dit(num_classes=10)(x, t, Conditioning(labels=torch.tensor([0, 5, 10]))), torch.zeros_like(x))
    assert torch.equal(tiny_dit(token_dim=16, pooled_dim=8)(x, t, text_cond(3)), torch.zeros_like(x))


def test_unet_is_exactly_zero_at_init_and_blocks_start_as_identity() -> None:
    """ADM zero-initialises the output convolution and the last layer of every residual branch."""
    from diffusion.backbones.unet import AttentionBlock, ResBlock, SpatialTransformer

    x, t = inputs(2, 4, 8, 8)
    tokens = torch.randn(2, 3, 16)
    model = tiny_unet(token_dim=16, num_classes=10)
    assert torch.equal(model(x, t, Conditioning(tokens=tokens, labels=torch.tensor([1, 10]))), torch.zeros_like(x))
    model = tiny_unet()
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock, SpatialTransformer))]
    assert len(blocks) > 5
    with torch.no_grad():
        for block in blocks:
            ch = block.in_layers[0].num_channels if isinstance(block, ResBlock) else block.norm.num_channels
            h = torch.randn(2, ch, 4, 4)
            if isinstance(block, ResBlock):
                torch.testing.assert_close(block(h, torch.randn(2, model.time_embed.mlp[2].out_features)), block.skip(h))
            else:
                torch.testing.assert_close(block(h), h)


def train_steps(model: nn.Module, cond: Conditioning, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t = inputs(4, 4, 8, 8)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        (model(x, t, cond) - target).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("kind", ["labels", "text"])
def test_dit_output_depends_on_the_condition_after_one_optimiser_step(kind: str) -> None:
    """Zero at init; one step moves only the final linear (every other path reaches the loss through
    it), and that is enough: the final adaLN modulation, not zeroed, carries labels and pooled text."""
    torch.manual_seed(0)
    if kind == "labels":
        model = tiny_dit(num_classes=10)
        cond, other = Conditioning(labels=torch.tensor([0, 1, 2, 3])), null_label_condition(4, 10)
    else:
        model = tiny_dit(token_dim=16, pooled_dim=8)
        cond, other = text_cond(4, seed=0), text_cond(4, seed=1)
    x, t = inputs(4, 4, 8, 8, seed=5)
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), torch.zeros_like(x))
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    train_steps(model, cond, 1)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, initial[k])}
    assert moved == {"final_layer.linear.weight", "final_layer.linear.bias"}
    with torch.no_grad():
        assert (model(x, t, cond) - model(x, t, other)).abs().max() > 1e-4


def test_dit_text_tokens_reach_the_output_from_the_second_step() -> None:
    """Tokens alone enter through cross-attention whose output projection starts at zero (PixArt-alpha)."""
    torch.manual_seed(0)
    model = tiny_dit(token_dim=16)
    cond, other = text_cond(4, seed=0).replace(pooled=None), text_cond(4, seed=1).replace(pooled=None)
    x, t = inputs(4, 4, 8, 8, seed=5)
    train_steps(model, cond, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond), model(x, t, other), rtol=0, atol=0)
    train_steps(model, cond, 1)
    with torch.no_grad():
        assert (model(x, t, cond) - model(x, t, other)).abs().max() > 1e-6


@pytest.mark.parametrize("build", [tiny_dit, tiny_unet])
def test_masked_tokens_are_ignored(build) -> None:
    model = randomize_(build(token_dim=16))
    x, t = inputs(2, 4, 8, 8)
    cond = text_cond(2)
    changed = cond.replace(tokens=torch.where(cond.mask[..., None], cond.tokens, torch.randn_like(cond.tokens)))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond.replace(pooled=None)), model(x, t, changed.replace(pooled=None)))
        # ...while a real token matters
        real_changed = cond.replace(tokens=cond.tokens + 1.0, pooled=None)
        assert (model(x, t, cond.replace(pooled=None)) - model(x, t, real_changed)).abs().max() > 1e-4


def test_fully_masked_sample_gives_finite_output() -> None:
    model = randomize_(tiny_dit(token_dim=16))
    x, t = inputs(2, 4, 8, 8)
    cond = Conditioning(tokens=torch.randn(2, 4, 16), mask=torch.zeros(2, 4, dtype=torch.bool))
    assert torch.isfinite(model(x, t, cond)).all()


def test_unet_uses_labels_and_pooled() -> None:
    model = randomize_(tiny_unet(num_classes=10, pooled_dim=8))
    x, t = inputs(2, 4, 8, 8)
    pooled = torch.randn(2, 8)
    with torch.no_grad():
        base = model(x, t, Conditioning(labels=torch.tensor([1, 2]), pooled=pooled))
        assert (base - model(x, t, Conditioning(labels=torch.tensor([3, 10]), pooled=pooled))).abs().max() > 1e-4
        assert (base - model(x, t, Conditioning(labels=torch.tensor([1, 2]), pooled=pooled + 1))).abs().max() > 1e-4


# -- parameter counts: DiT paper, Table 4 (class-conditional ImageNet 256, learn_sigma) -----------------
@pytest.mark.parametrize("name, millions", [("DiT-S/2", 33), ("DiT-B/2", 130), ("DiT-L/2", 458), ("DiT-XL/2", 675)])
def test_dit_parameter_counts_match_the_paper(name: str, millions: int) -> None:
    with torch.device("meta"):  # no memory, no init cost
        model = build_dit(name, in_channels=4, num_classes=1000, learn_sigma=True)
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / (millions * 1e6) - 1) < 0.01, f"{name}: {count:,} parameters, paper {millions}M"


@pytest.mark.parametrize("name", [*DIT_CONFIGS, *UNET_CONFIGS])
def test_every_registry_entry_builds(name: str) -> None:
    with torch.device("meta"):
        model = build_dit(name, num_classes=1000) if name in DIT_CONFIGS else build_unet(name, token_dim=1024)
    if name in DIT_CONFIGS:  # built with the registry's sizes
        entry = DIT_CONFIGS[name]
        assert (len(model.blocks), model.hidden_size) == (entry["depth"], entry["hidden_size"])
    else:
        entry = UNET_CONFIGS[name]
        assert model.conv_in.out_channels == entry["model_channels"]
        assert model.downsample_factor == 2 ** (len(entry["channel_mult"]) - 1)


def test_registry_names() -> None:
    assert dit_config("dit_xl_2") == dit_config("DiT-XL/2") == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert dit_config("DiT-B/8")["patch_size"] == 8
    with pytest.raises(ValueError, match="allowed names: .*DiT-S/2.*dit_tiny"):
        dit_config("DiT-XXL/2")
    with pytest.raises(ValueError, match="unet_tiny"):
        build_unet("unet_huge")


# -- options ---------------------------------------------------------------------------------------
def gradients(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(x, t, cond).pow(2).mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("build", [tiny_dit, tiny_unet])
def test_gradient_checkpointing_changes_no_gradient(build) -> None:
    plain = randomize_(build(token_dim=16, pooled_dim=8, num_classes=10))
    ckpt = build(token_dim=16, pooled_dim=8, num_classes=10, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t = inputs(2, 4, 8, 8)
    cond = text_cond(2).replace(labels=torch.tensor([4, 10]))
    ref, got = gradients(plain, x, t, cond), gradients(ckpt, x, t, cond)
    assert all(g.abs().sum() > 0 for g in ref.values())  # every parameter is exercised
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("build", [tiny_dit, tiny_unet])
def test_bf16_autocast(build) -> None:
    plain = randomize_(build(token_dim=16))
    fast = build(token_dim=16, bf16_autocast=True)
    fast.load_state_dict(plain.state_dict())
    seen: list[torch.dtype] = []
    linear = next(m for m in fast.modules() if isinstance(m, nn.Linear))
    linear.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    x, t = inputs(2, 4, 8, 8)
    cond = Conditioning(tokens=torch.randn(2, 3, 16))
    with torch.no_grad():
        ref, out = plain(x, t, cond), fast(x, t, cond)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize("build", [tiny_dit, tiny_unet])
def test_torch_compile_fullgraph(build) -> None:
    model = randomize_(build(token_dim=16, num_classes=10))
    x, t = inputs(2, 4, 8, 8)
    cond = Conditioning(tokens=torch.randn(2, 3, 16), mask=torch.tensor([[1, 1, 0]] * 2).bool(), labels=torch.tensor([1, 10]))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: any graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, cond), model(x, t, cond))


def test_torch_compile_fullgraph_with_checkpointing_and_backward() -> None:
    model = randomize_(tiny_dit(token_dim=16, gradient_checkpointing=True))
    x, t = inputs(2, 4, 8, 8)
    cond = Conditioning(tokens=torch.randn(2, 3, 16))
    expected = gradients(model, x, t, cond)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # also traces the backward
    model.zero_grad()
    compiled(x, t, cond).pow(2).mean().backward()
    got = {k: p.grad for k, p in model.named_parameters()}
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


# -- bad input: errors name the expected and the received value --------------------------------------
@pytest.mark.parametrize("build", [tiny_dit, tiny_unet])
def test_wrong_channel_count(build) -> None:
    with pytest.raises(ValueError, match=r"in_channels=4.*got x_t with 3 channels"):
        build()(*inputs(1, 3, 8, 8))


def test_dit_size_not_divisible_by_patch() -> None:
    with pytest.raises(ValueError, match=r"divisible by 4 \(the patch size\), got 8x10"):
        tiny_dit(patch_size=4)(*inputs(1, 4, 8, 10))


def test_unet_size_not_divisible_by_downsampling() -> None:
    with pytest.raises(ValueError, match=r"divisible by 2.*got 9x8"):
        tiny_unet()(*inputs(1, 4, 9, 8))


@pytest.mark.parametrize("build", [tiny_dit, tiny_unet])
def test_tokens_of_wrong_width(build) -> None:
    with pytest.raises(ValueError, match=r"token_dim=16, got width 12"):
        build(token_dim=16)(*inputs(2, 4, 8, 8), Conditioning(tokens=torch.randn(2, 3, 12)))


@pytest.mark.parametrize("build", [tiny_dit, tiny_unet])
def test_condition_fields_must_match_the_model(build) -> None:
    x, t = inputs(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"cond.labels, but it is None \(the null class is 10\)"):
        build(num_classes=10)(x, t, Conditioning())
    with pytest.raises(ValueError, match="built without pooled conditioning"):
        build()(x, t, Conditioning(pooled=torch.randn(2, 8)))
    with pytest.raises(ValueError, match="batch size 3, expected x_t's batch size 2"):
        build(num_classes=10)(x, t, null_label_condition(3, 10))


def test_bad_time() -> None:
    model = tiny_dit()
    x, _ = inputs(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"\(2,\), got shape \(\)"):
        model(x, torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"float tensor\), got dtype torch.int64"):
        model(x, torch.tensor([1, 999]))


def test_dit_blocks_see_a_contiguous_residual_stream() -> None:
    """The patch embedding is a transposed view of a convolution; left so, every layer norm and
    residual add would copy to and from that layout (a measured ~3 % of a DiT-S/2 step on CPUs)."""
    model = tiny_dit(num_classes=10)
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    x, t = inputs(2, 4, 8, 8)
    model(x, t, Conditioning(labels=torch.tensor([1, 2])))
    assert seen and all(seen)


def test_unet_channels_last_changes_only_the_memory_layout() -> None:
    """The channels-last layout inside (faster convolutions) gives the same output and gradients,
    returned in the usual layout."""
    torch.manual_seed(0)
    fast = randomize_(tiny_unet(token_dim=16, pooled_dim=8, channels_last=True))
    plain = tiny_unet(token_dim=16, pooled_dim=8, channels_last=False)
    plain.load_state_dict(fast.state_dict())
    x, t = inputs(2, 4, 16, 16)
    cond = text_cond(2)
    out_fast, out_plain = fast(x, t, cond), plain(x, t, cond)
    assert out_fast.is_contiguous()
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    out_fast.square().mean().backward()
    out_plain.square().mean().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
