"""DiT ControlNet-Transformer (PixArt-delta): identity at initialisation, equal to a plain loop over the
paper's equations, trains only itself, and refuses bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from diffusion.backbones.dit import DiT
from diffusion.backbones.dit_controlnet import DiTControlNet
from diffusion.backbones.layers import sincos_pos_embed_2d
from diffusion.conditioning.types import Conditioning

DEPTH, HIDDEN, CHANNELS, SIZE = 4, 32, 4, 8
KINDS = ("labels", "text")


def tiny_dit(kind: str, **options) -> DiT:
    extra = dict(num_classes=10) if kind == "labels" else dict(token_dim=16, pooled_dim=8)
    return DiT(in_channels=CHANNELS, patch_size=2, hidden_size=HIDDEN, depth=DEPTH, num_heads=4, **extra, **options)


def perturb(module: torch.nn.Module, generator: torch.Generator, std: float = 0.2) -> None:
    """Random weights everywhere, so that zero-initialised layers no longer hide anything."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator))


def trained_base(kind: str, seed: int = 0, **options) -> DiT:
    """A tiny DiT with every weight nonzero: a stand-in for a pretrained base."""
    torch.manual_seed(seed)
    base = tiny_dit(kind, **options)
    perturb(base, torch.Generator().manual_seed(seed + 1))
    return base


def inputs(kind: str, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Conditioning, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, SIZE, SIZE, generator=g)
    t = torch.rand(batch, generator=g)
    if kind == "labels":
        cond = Conditioning(labels=torch.randint(0, 11, (batch,), generator=g))
    else:
        mask = torch.ones(batch, 5, dtype=torch.bool)
        mask[0, 3:] = False
        cond = Conditioning(tokens=torch.randn(batch, 5, 16, generator=g), mask=mask,
                            pooled=torch.randn(batch, 8, generator=g))
    control = torch.randn(batch, CHANNELS, SIZE, SIZE, generator=g)
    return x, t, cond, control


def controlled(base: DiT, net: DiTControlNet, x, t, cond, control) -> torch.Tensor:
    return base(x, t, cond, control_residuals=net(x, t, cond, control))


def reference(base: DiT, net: DiTControlNet, x, t, cond, control) -> torch.Tensor:
    """PixArt-delta's ControlNet-Transformer as its released code interleaves it, written out from the
    modules: base block 0, then for i < N the copy C_i (the first one on h_1 + W_before E(control)) and
    base block i + 1 on h + W_after_i(copy output); then the remaining base blocks and the final layer."""
    p, n = base.patch_size, net.num_blocks

    def embed(image):  # patch embedding + 2-D sin-cos positions
        pos = sincos_pos_embed_2d(HIDDEN, image.shape[-2] // p, image.shape[-1] // p)
        return base.x_embedder(image) + pos

    c = base.t_embedder(t)
    if cond.labels is not None:
        c = c + base.y_embedder(cond.labels)
    if cond.pooled is not None:
        c = c + base.pooled_embedder(cond.pooled)
    tokens = base.token_embedder(cond.tokens) if cond.tokens is not None else None
    run = lambda block, h: block(h, c, tokens, cond.mask)  # noqa: E731

    h = run(base.blocks[0], embed(x))
    g = h + net.before_proj(embed(control))
    for i in range(n):
        g = run(net.copies[i], g)
        h = h + net.after_proj[i](g)
        if i + 1 < DEPTH:
            h = run(base.blocks[i + 1], h)
    for i in range(n + 1, DEPTH):
        h = run(base.blocks[i], h)
    out = base.final_layer(h, c)
    return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=SIZE // p, p=p, q=p)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_blocks", [1, 2, DEPTH])
def test_equals_the_base_at_initialisation(kind, num_blocks):
    base = trained_base(kind)
    net = DiTControlNet(base, num_blocks=num_blocks)
    x, t, cond, control = inputs(kind)
    with torch.no_grad():
        expected = base(x, t, cond)
        residuals = net(x, t, cond, control)
        got = base(x, t, cond, control_residuals=residuals)
    assert expected.abs().mean() > 0.1  # the base is not the zero model
    assert len(residuals) == num_blocks
    assert all(r.shape == (2, (SIZE // 2) ** 2, HIDDEN) for r in residuals)
    assert torch.equal(got, expected)
    # the copies start as the base's blocks; the ControlNet's state holds nothing of the base
    for i in range(num_blocks):
        for (name, a), b in zip(net.copies[i].state_dict().items(), base.blocks[i].state_dict().values()):
            assert torch.equal(a, b), name
    assert not any(k.startswith("base") for k in net.state_dict())
    assert {id(p) for p in net.parameters()}.isdisjoint(id(p) for p in base.parameters())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_blocks", [1, 2, DEPTH])
def test_equals_a_plain_loop_over_the_papers_equations(kind, num_blocks):
    base = trained_base(kind)
    net = DiTControlNet(base, num_blocks=num_blocks)
    perturb(net, torch.Generator().manual_seed(7))  # linears nonzero, copies apart from the base
    x, t, cond, control = inputs(kind, seed=3)
    with torch.no_grad():
        got = controlled(base, net, x, t, cond, control)
        expected = reference(base, net, x, t, cond, control)
        plain = base(x, t, cond)
    assert (got - plain).abs().max() > 1e-2  # the control changes the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_output_and_gradients(kind):
    def grads(checkpointing: bool):
        base = trained_base(kind, gradient_checkpointing=checkpointing)
        base.requires_grad_(False)
        net = DiTControlNet(base, num_blocks=2)
        assert net.gradient_checkpointing is checkpointing
        perturb(net, torch.Generator().manual_seed(7))
        x, t, cond, control = inputs(kind)
        out = controlled(base, net, x, t, cond, control)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    (out, g), (out_ckpt, g_ckpt) = grads(False), grads(True)
    torch.testing.assert_close(out_ckpt, out)
    for a, b in zip(g_ckpt, g):
        torch.testing.assert_close(a, b)


def test_its_gradients_never_reach_the_base():
    """Even with the base trainable, the ControlNet's outputs depend on no base parameter's gradient."""
    base = trained_base("text")
    net = DiTControlNet(base, num_blocks=2)
    perturb(net, torch.Generator().manual_seed(7))
    x, t, cond, control = inputs("text")
    sum(r.square().sum() for r in net(x, t, cond, control)).backward()
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_only_the_controlnet_and_the_output_follows_the_control(kind):
    base = trained_base(kind)
    base.requires_grad_(False)  # what adapter=controlnet does
    frozen = copy.deepcopy(base.state_dict())
    net = DiTControlNet(base, num_blocks=2)
    start = copy.deepcopy(net.state_dict())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, t, cond, control = inputs(kind, batch=4)
    target = base(x, t, cond).detach() + control  # only the control can explain the difference
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = F.mse_loss(controlled(base, net, x, t, cond, control), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in base.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in base.state_dict().items())
    assert all(not torch.equal(v, start[k]) for k, v in net.state_dict().items())  # every part moved
    with torch.no_grad():
        a = controlled(base, net, x, t, cond, control)
        b = controlled(base, net, x, t, cond, torch.zeros_like(control))
    assert (a - b).abs().max() > 1e-3


def test_bf16_autocast_base():
    base = trained_base("labels", bf16_autocast=True)
    net = DiTControlNet(base, num_blocks=2)
    perturb(net, torch.Generator().manual_seed(7))
    x, t, cond, control = inputs("labels")
    with torch.no_grad():
        out = controlled(base, net, x, t, cond, control)
        ref = reference(base, net, x, t, cond, control)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, ref, rtol=0.1, atol=0.1)  # bf16 rounding


def test_bad_input_is_refused():
    base = trained_base("labels")
    net = DiTControlNet(base, num_blocks=2)
    x, t, cond, control = inputs("labels")
    with pytest.raises(ValueError, match="latent space.*x_t's shape"):
        net(x, t, cond, torch.randn(2, 3, SIZE * 8, SIZE * 8))  # a pixel-space image
    with pytest.raises(ValueError, match="latent space"):
        net(x, t, cond, None)
    with pytest.raises(ValueError, match="cond.labels"):
        net(x, t, Conditioning(), control)
    residuals = net(x, t, cond, control)
    with pytest.raises(ValueError, match="5 control_residuals.*only 4 blocks"):
        base(x, t, cond, control_residuals=residuals * 2 + residuals[:1])
    with pytest.raises(ValueError, match=r"control_residuals\[1\] has shape \(2, 16, 16\)"):
        base(x, t, cond, control_residuals=[residuals[0], residuals[1][..., :16]])
    with pytest.raises(TypeError, match="needs a DiT base"):
        DiTControlNet(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("num_blocks", [0, DEPTH + 1])
def test_num_blocks_outside_the_depth_is_refused(num_blocks):
    with pytest.raises(ValueError, match=f"num_blocks={num_blocks} must be between 1 and the base's depth {DEPTH}"):
        DiTControlNet(tiny_dit("labels"), num_blocks=num_blocks)


def test_a_copy_of_base_and_controlnet_together_keeps_them_together():
    """The ControlNet holds its base by reference: deepcopying both (EMA, merged copies) must make the
    copied ControlNet read the copied base, and its state dict alone must round-trip."""
    base = trained_base("labels")
    net = DiTControlNet(base, num_blocks=2)
    perturb(net, torch.Generator().manual_seed(7))
    pair = copy.deepcopy(torch.nn.ModuleDict({"base": base, "net": net}))
    assert pair["net"].base is pair["base"]
    x, t, cond, control = inputs("labels")
    with torch.no_grad():
        expected = controlled(base, net, x, t, cond, control)
        assert torch.equal(controlled(pair["base"], pair["net"], x, t, cond, control), expected)
        fresh = DiTControlNet(base, num_blocks=2)
        fresh.load_state_dict(net.state_dict())
        assert torch.equal(controlled(base, fresh, x, t, cond, control), expected)
