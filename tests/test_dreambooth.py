"""DreamBooth: instance images with one prompt, class images generated once by the base model and
reused (a folder of another generator refused, a partial one topped up with the same images), and
the prior-preservation loss mean(instance) + w * mean(class) against diffusers' formula computed
directly. Tiny random SD parts (tests/tiny_encoders.py); nothing is downloaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from diffusion import cli
from diffusion.backbones import build_dit
from diffusion.conditioning import ClassLabels
from diffusion.data.dreambooth import (
    RECORD,
    PriorPreservationCollate,
    class_image_path,
    prior_preservation_weights,
)
from diffusion.schedules import DDPM
from diffusion.training.module import DiffusionModule
from tests.conftest import FAST, compose_config
from tests.make_captioned_folder import make_captioned_folder
from tests.tiny_encoders import no_network, save_tiny_hf, save_tiny_sd_unet  # noqa: F401 - no_network: autouse

CLASS_PROMPT = "a photo of dog"
pytestmark = pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")


# --- the loss ----------------------------------------------------------------------------------------
def _digits_module(cond_dropout: float = 0.0) -> DiffusionModule:
    backbone = build_dit(name="dit_tiny", in_channels=1, num_classes=10)
    torch.nn.init.normal_(backbone.final_layer.linear.weight, std=0.1)  # the zero-initialised head: a real output
    return DiffusionModule(backbone, DDPM("linear", "eps"), conditioner=ClassLabels(10), cond_dropout=cond_dropout,
                           image_shape=(1, 8, 8))


def _batch(n_instance: int, n_class: int, weight: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    item = lambda i: {"image": torch.randn(1, 8, 8, generator=g), "label": i % 10}  # noqa: E731
    pairs = [{"instance": item(i), "class": item(i + 3)} for i in range(max(n_instance, n_class))]
    if n_instance == n_class:
        return PriorPreservationCollate(weight)(pairs)
    batch = torch.utils.data.default_collate([p["instance"] for p in pairs[:n_instance]]
                                             + [p["class"] for p in pairs[:n_class]])
    batch["loss_weight"] = prior_preservation_weights(n_instance, n_class, weight)
    return batch


def _diffusers_loss(module: DiffusionModule, batch: dict, n_instance: int, weight: float) -> torch.Tensor:
    """train_dreambooth.py's loss from the same t and noise: the prediction and target chunked into the
    instance and class halves, F.mse_loss(..., "mean") of each, the class one times prior_loss_weight."""
    x0 = batch["image"]
    draws = module._draws(x0, key=(module.seed, 0), drop_probability=0.0)
    k = module.schedule.at(draws.t).like(x0)
    with torch.no_grad():
        pred = module.backbone(k.add_noise(x0, draws.noise), draws.t, module.conditioner(batch))
    target = k.target(x0, draws.noise)
    return (F.mse_loss(pred[:n_instance], target[:n_instance], reduction="mean")
            + weight * F.mse_loss(pred[n_instance:], target[n_instance:], reduction="mean"))


@pytest.mark.parametrize("n_instance,n_class,weight", [(3, 3, 1.0), (2, 2, 0.3), (2, 5, 2.5)])
def test_the_prior_preservation_loss_is_diffusers_formula(n_instance, n_class, weight):
    module = _digits_module()
    batch = _batch(n_instance, n_class, weight)
    with torch.no_grad():
        loss = module.training_step(batch, 0)
    expected = _diffusers_loss(module, batch, n_instance, weight)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    # Not the plain mean over the batch (which would halve the sum with equal halves).
    with torch.no_grad():
        plain = module.training_step({k: v for k, v in batch.items() if k != "loss_weight"}, 0)
    assert not torch.allclose(plain, expected, rtol=1e-3)


def test_no_weight_or_unit_weights_leave_the_loss_bit_for_bit():
    module = _digits_module(cond_dropout=0.1)
    batch = _batch(4, 4, 1.0)
    plain = {k: v for k, v in batch.items() if k != "loss_weight"}
    with torch.no_grad():
        a = module.training_step(plain, 0)
        b = module.training_step({**plain, "loss_weight": torch.ones(8)}, 0)
        c = module.training_step({**plain, "loss_weight": None}, 0)
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match=r"loss_weight.*one weight per sample"):
        module.training_step({**plain, "loss_weight": torch.ones(3)}, 0)


def test_a_batch_holds_the_instance_images_then_as_many_class_images(tmp_path):
    from diffusion.data import DreamBoothDataModule

    instance = make_captioned_folder(tmp_path / "instance", n=3, sizes=[(32, 32)], layout="txt")
    classes = make_captioned_folder(tmp_path / "classes", n=5, sizes=[(32, 32)], layout="txt")
    for i, path in enumerate(sorted(p for p in classes.rglob("*") if p.suffix in (".png", ".jpg"))):
        shutil.copy(path, class_image_path(classes, i))  # as generated images are named
    dm = DreamBoothDataModule(instance, "a photo of sks dog", resolution=16, batch_size=2, class_prompt=CLASS_PROMPT,
                              class_dir=classes, num_class_images=5, prior_loss_weight=0.5)
    dm.setup()
    assert len(dm.train_set) == 5  # the larger set's length, as diffusers'
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert batch["caption"] == ["a photo of sks dog"] * 2 + [CLASS_PROMPT] * 2  # sidecar captions ignored
    assert batch["is_class"].tolist() == [False, False, True, True]
    torch.testing.assert_close(batch["loss_weight"], torch.tensor([2.0, 2.0, 1.0, 1.0]))
    plain = DreamBoothDataModule(instance, "a photo of sks dog", resolution=16, batch_size=2, prior_preservation=False)
    plain.setup()
    batch = next(iter(plain.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and "loss_weight" not in batch
    with pytest.raises(ValueError, match="class_prompt"):
        DreamBoothDataModule(instance, "a photo of sks dog", class_dir=classes)
    with pytest.raises(ValueError, match="instance_prompt"):
        DreamBoothDataModule(instance, " ", prior_preservation=False)
    with pytest.raises(ValueError, match="class_images has no option"):
        DreamBoothDataModule(instance, "x", class_prompt="y", class_dir=classes, class_images={"stepz": 2})


# --- class images from the base model, from the command line ----------------------------------------
class SampleCounter:
    """Counts DiffusionModule.sample calls for the class prompt (the training-end grids use others)."""

    def __init__(self, monkeypatch):
        self.images, real = 0, DiffusionModule.sample

        def counted(module, num, condition=None, **kwargs):
            if isinstance(condition, list) and condition and condition[0] == CLASS_PROMPT:
                self.images += num
            return real(module, num, condition, **kwargs)

        monkeypatch.setattr(DiffusionModule, "sample", counted)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dreambooth")
    save_tiny_sd_unet(root / "unet", seed=1)
    return {"unet": root / "unet", "clip": save_tiny_hf("clip_text", root / "clip"),
            "instance": make_captioned_folder(root / "instance", n=2, sizes=[(64, 64)], layout="txt"),
            "class_dir": root / "class_images", "root": root}


def _overrides(parts, *extra: str) -> list[str]:
    fast = [o for o in FAST if not o.startswith(("backbone", "data.module.batch_size", "model.sampling.num_images"))]
    return [
        *fast, "trainer.max_steps=2", "trainer.limit_val_batches=0", "experiment=finetune_sd15", "data=dreambooth",
        f"backbone.pretrained={parts['unet']}", "vae=tiny_sd", f"text_encoder.pretrained={parts['clip']}",
        "text_encoder.max_length=16", f"data.module.instance_dir={parts['instance']}",
        "data.module.instance_prompt=a photo of sks dog", f"data.module.class_prompt={CLASS_PROMPT}",
        f"data.module.class_dir={parts['class_dir']}", "data.module.num_class_images=3",
        "data.module.class_images.batch_size=2", "data.module.resolution=64", "data.module.num_workers=0",
        "data.module.batch_size=1", "model.sampling.num_images=2", "model.optim.optimizer.lr=1e-3",
        "~callbacks.sample_grids", *extra,
    ]


@pytest.fixture(scope="module")
def runs(parts):
    """A LoRA run that generates the class images, then a full fine-tune of the same base that reuses
    them, then the LoRA run resumed to one more step."""
    counts = {}
    lora = ["adapter=lora", "adapter.rank=2"]
    with pytest.MonkeyPatch.context() as mp:
        counter = SampleCounter(mp)
        for name, extra, run in (("lora", lora, "lora"), ("full", ["adapter=full"], "full"),
                                 ("resumed", [*lora, "ckpt_path=last", "trainer.max_steps=3"], "lora")):
            before = counter.images
            cli.train(compose_config("train", _overrides(parts, *extra), parts["root"] / run))
            counts[name] = counter.images - before
    return counts


def test_class_images_are_generated_once_by_the_base_and_reused(parts, runs):
    assert runs == {"lora": 3, "full": 0, "resumed": 0}  # the full fine-tune of the same base and the resume: none
    class_dir = parts["class_dir"]
    assert sorted(p.name for p in class_dir.glob("*.png")) == [f"class_{i:05d}.png" for i in range(3)]
    record = json.loads((class_dir / RECORD).read_text())
    assert record["prompt"] == CLASS_PROMPT and record["sampler"] == "ddim" and record["steps"] == 2
    assert record["cfg_scale"] == 7.5 and record["image_shape"] == [3, 64, 64]
    assert len(record["base_weights_sha256"]) == 64
    assert set(record["frozen_weights"]) == {"autoencoder", "conditioner.encoder"}
    for name, prefix, step in (("lora", ".lora_", 3), ("full", "backbone.unet.", 2)):
        checkpoint = torch.load(parts["root"] / name / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == step
        assert any(prefix in k for k in checkpoint["state_dict"])


def test_a_class_folder_of_another_prompt_or_of_unknown_images_is_refused(parts, runs, tmp_path):
    with pytest.raises(ValueError, match=r"made otherwise than this run(.|\n)*prompt: folder \"a photo of dog\""):
        cli.train(compose_config("train", _overrides(parts, "data.module.class_prompt=a photo of cat"), tmp_path / "r"))
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # refused before writing
    other = parts["root"] / "other_base"
    save_tiny_sd_unet(other, seed=7)
    with pytest.raises(ValueError, match="base_weights_sha256"):
        cli.train(compose_config("train", _overrides(parts, f"backbone.pretrained={other}"), tmp_path / "r"))
    unknown = make_captioned_folder(tmp_path / "unknown", n=2, sizes=[(64, 64)], layout="txt")
    with pytest.raises(ValueError, match="no class_images.json"):
        cli.train(compose_config("train", _overrides(parts, f"data.module.class_dir={unknown}"), tmp_path / "r"))


def test_a_partial_folder_is_topped_up_with_the_same_images(parts, runs, tmp_path, monkeypatch):
    class_dir = tmp_path / "class_images"
    shutil.copytree(parts["class_dir"], class_dir)
    before = {i: class_image_path(class_dir, i).read_bytes() for i in range(3)}
    class_image_path(class_dir, 1).unlink()  # as a run killed while it generated would leave it
    cfg = compose_config("train", _overrides(parts, f"data.module.class_dir={class_dir}",
                                             "data.module.num_class_images=4"), tmp_path / "run")
    counter = SampleCounter(monkeypatch)
    datamodule = instantiate(cfg.data.module)
    datamodule.check_class_images(cli.build_module(cfg))
    datamodule.prepare_data()
    assert counter.images == datamodule.generated == 2  # index 1 again, and index 3
    for i in range(3):  # image 1 is made again byte for byte, in another batch than the first time
        assert class_image_path(class_dir, i).read_bytes() == before[i]
    assert class_image_path(class_dir, 3).is_file()


def test_cache_dir_is_refused_with_the_reason(parts, tmp_path):
    with pytest.raises(ValueError, match="does not train from cache_dir.*leave cache_dir out"):
        cli.train(compose_config("train", _overrides(parts, f"cache_dir={tmp_path / 'cache'}"), tmp_path / "r"))
    with pytest.raises(ValueError, match="does not train from cache_dir"):
        cli.cache(compose_config("train", _overrides(parts, f"cache_dir={tmp_path / 'cache'}"), tmp_path / "r"))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_dreambooth_lora_runs_on_each_wrapped_family(family, tmp_path):
    """data=dreambooth adapter=lora with finetune_sdxl / sd3 / flux on tiny saved parts: the base makes
    its class images (with its own sampler and guidance), then a step trains on both halves."""
    from tests.tiny_mmdit import overrides as mmdit_overrides, save_pipeline_parts

    root = tmp_path / "model"
    if family == "sdxl":
        from tests.test_sdxl import _save_pipeline_encoders, tiny_sdxl_unet

        _save_pipeline_encoders(root)
        tiny_sdxl_unet().save_pretrained(root / "unet")
        parts = [f"backbone.pretrained={root}", "vae=tiny_sd", f"text_encoder.pretrained={root}"]
    else:
        save_pipeline_parts(root, family)
        parts = mmdit_overrides(root, family)
    instance = make_captioned_folder(tmp_path / "instance", n=2, sizes=[(64, 64)], layout="txt")
    fast = [o for o in FAST if not o.startswith(("backbone", "data.module.batch_size", "model.sampling.num_images"))]
    cfg = compose_config("train", [
        *fast, "trainer.max_steps=1", "trainer.limit_val_batches=0", f"experiment=finetune_{family}",
        "data=dreambooth", *parts, f"data.module.instance_dir={instance}",
        "data.module.instance_prompt=a photo of sks dog", f"data.module.class_prompt={CLASS_PROMPT}",
        f"data.module.class_dir={tmp_path / 'class_images'}", "data.module.num_class_images=2",
        "data.module.class_images.steps=1", "data.module.resolution=64", "data.module.num_workers=0",
        "data.module.batch_size=1", "model.sampling.num_images=2", "~callbacks.sample_grids",
        "adapter=lora", "adapter.rank=2",
    ], tmp_path / "run")
    metrics = cli.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert len(list((tmp_path / "class_images").glob("class_*.png"))) == 2
    record = json.loads((tmp_path / "class_images" / RECORD).read_text())
    assert record["steps"] == 1 and record["cfg_scale"] == cfg.model.sampling.cfg_scale
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(".lora_" in k for k in state) and not any("base_layer" in k for k in state)  # the LoRA alone
