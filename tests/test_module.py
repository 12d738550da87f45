"""The LightningModule's own jobs, each checked from outside: the optimiser from config with weight
decay on matrices only, what checkpoints keep (everything trainable; frozen parts by hash), one
sample grid per optimiser step asked for, prompts in a text model's grids, and a guidance scale
that sample.py keeps unless told otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion import cli
from diffusion.backbones import build_dit
from diffusion.conditioning import ClassLabels
from diffusion.frozen import FrozenModule
from diffusion.schedules import FlowMatching
from diffusion.training.module import DiffusionModule
from diffusion.training.optim import OptimConfig
from diffusion.training.optim import parameter_groups
from tests.conftest import compose_config
from tests.make_captioned_folder import make_captioned_folder


def test_weight_decay_reaches_the_weight_matrices_only():
    """One AdamW step with zero gradients moves a parameter only through decoupled weight decay:
    matrices shrink by lr * wd, biases, the label table and norm scales do not move."""
    torch.manual_seed(0)
    model = build_dit("dit_tiny", in_channels=1, num_classes=10)
    model.extra_norm = nn.LayerNorm(8)  # affine norm scales: kept out of decay too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    assert embeddings  # the label table
    for name, param in model.named_parameters():
        decayed = before[name].ndim >= 2 and name not in embeddings
        expected = before[name] * (1 - 0.1 * 0.5) if decayed else before[name]
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-7, msg=name)


def test_the_optimiser_is_any_partial_from_the_config(train_config):
    cfg = train_config("model.optim.optimizer._target_=torch.optim.SGD", "~model.optim.optimizer.betas",
                       "+model.optim.optimizer.momentum=0.9", "model.optim.optimizer.weight_decay=0.01",
                       "model.optim.decay=constant")
    optimizer = cli.build_module(cfg).configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.SGD
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["initial_lr"] == 1e-3


class _LearnedLabels(ClassLabels):
    """A trainable conditioner: a learned scale on top of the labels."""

    def __init__(self):
        super().__init__(10)
        self.scale = nn.Parameter(torch.ones(3))


class _FrozenTable(FrozenModule):
    def __init__(self):
        super().__init__()
        self.table = nn.Linear(4, 4)
        self._freeze()


def test_checkpoints_keep_what_trains_and_leave_out_what_is_frozen():
    conditioner = _LearnedLabels()
    conditioner.frozen = _FrozenTable()  # a frozen part inside a trainable one
    module = DiffusionModule(build_dit("dit_tiny", in_channels=1, num_classes=10), FlowMatching(),
                             conditioner=conditioner, image_shape=(1, 8, 8))
    state = module.state_dict()
    assert "conditioner.scale" in state
    assert not [k for k in state if k.startswith("conditioner.frozen.")]
    assert set(module.frozen_weights()) == {"conditioner.frozen"}
    with torch.no_grad():
        conditioner.scale.fill_(3.0)
    other = DiffusionModule(build_dit("dit_tiny", in_channels=1, num_classes=10), FlowMatching(),
                            conditioner=_LearnedLabels(), image_shape=(1, 8, 8))
    other.conditioner.frozen = _FrozenTable()
    other.load_state_dict(state)
    assert other.conditioner.scale.tolist() == [3.0, 3.0, 3.0]


def test_one_sample_grid_per_optimiser_step_asked_for(train_config, tmp_path, monkeypatch):
    """Accumulating 2 batches a step, grids every 2 steps over 4 steps: steps 2 and 4, once each (the
    end of training does not sample step 4 again)."""
    calls = []
    original = DiffusionModule.sample

    def counted(self, *args, **kwargs):
        calls.append(self.trainer.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionModule, "sample", counted)
    cli.train(train_config("trainer.accumulate_grad_batches=2", "model.sampling.every_n_steps=2"))
    assert calls == [2, 4]
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png")) == ["step_0000002.png",
                                                                                  "step_0000004.png"]


def test_the_grids_of_a_text_model_show_its_prompts(tmp_path, monkeypatch):
    from diffusion.conditioning import TextPrompts

    root = make_captioned_folder(tmp_path / "images", n=8, sizes=[(32, 32)])
    asked = []
    original = TextPrompts.make

    def spy(self, values, num, device):
        asked.append(list(values))
        return original(self, values, num, device)

    monkeypatch.setattr(TextPrompts, "make", spy)
    cfg = compose_config("train", ["experiment=t2i_tiny", f"data.module.root={root}", "trainer.max_steps=2",
                                   "trainer.val_check_interval=1000", "model.sampling.num_images=4",
                                   "model.sampling.steps=2", "trainer.enable_progress_bar=false"], tmp_path / "run")
    cli.train(cfg)
    assert asked == [["a red circle", "a blue square"] * 2]
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "samples" / "step_0000002.png")
    assert grid.size == (2 * (32 + 2), 2 * (32 + 2))  # a column per prompt, 1-pixel borders


def test_sample_keeps_the_runs_guidance_scale_whatever_the_sampler(train_config, tmp_path, monkeypatch):
    cli.train(train_config("model.sampling.cfg_scale=4"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    used = []
    original = DiffusionModule.sample

    def spy(self, *args, **kwargs):
        used.append((kwargs["sampler"], kwargs["cfg_scale"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionModule, "sample", spy)
    for k, extra in enumerate((["sampler=heun"], ["sampler=heun", "cfg_scale=2"])):
        cli.sample(compose_config("sample", [f"ckpt={ckpt}", *extra, "steps=2", "num=2", "progress=false",
                                             f"out={tmp_path / f'out{k}'}"], tmp_path))
    assert used == [("heun", 4.0), ("heun", 2.0)]


def test_a_lr_schedule_outside_a_trainer_needs_its_length():
    assert OptimConfig(decay="constant", warmup_steps=2).lr_multiplier(None)(5) == 1.0
    with pytest.raises(ValueError, match="needs trainer.max_steps > 0"):
        OptimConfig(decay="cosine").lr_multiplier(None)
    assert OptimConfig(decay="linear", warmup_steps=0, min_lr_ratio=0.0).lr_multiplier(10)(5) == 0.5
