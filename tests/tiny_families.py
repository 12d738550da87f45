"""Tiny random parts of each wrapped model family (SD 1.5, SDXL, SD3, FLUX) saved as the hub holds them,
with the overrides that point ``experiment=finetune_<family>`` at them; and the fine-tune-then-export
run several tests check against diffusers."""

from __future__ import annotations

from pathlib import Path

from diffusion import cli
from tests.conftest import FAST, compose_config
from tests.make_captioned_folder import make_captioned_folder

FAMILIES = ("sd15", "sdxl", "sd3", "flux")


def tiny_family(family: str, root: Path) -> list[str]:
    """Save tiny parts of ``family`` under ``root``; the overrides of a finetune_<family> run on them."""
    if family == "sd15":
        from tests.tiny_encoders import save_tiny_hf, save_tiny_sd_unet

        save_tiny_sd_unet(root / "unet", seed=1)
        clip = save_tiny_hf("clip_text", root / "clip")
        return [f"backbone.pretrained={root / 'unet'}", "vae=tiny_sd", f"text_encoder.pretrained={clip}",
                "text_encoder.max_length=16"]
    if family == "sdxl":
        from tests.test_sdxl import _save_pipeline_encoders, tiny_sdxl_unet

        _save_pipeline_encoders(root)
        tiny_sdxl_unet().save_pretrained(root / "unet")
        return [f"backbone.pretrained={root}", "vae=tiny_sd", f"text_encoder.pretrained={root}"]
    from tests.tiny_mmdit import overrides, save_pipeline_parts

    save_pipeline_parts(root, family)
    return overrides(root, family)


def finetune_overrides(family: str, parts: list[str], *extra: str) -> list[str]:
    """A short finetune_<family> run on tiny parts (64 px, batch 2), ``extra`` last."""
    fast = [o for o in FAST if not o.startswith(("backbone", "data.module.batch_size", "model.sampling.num_images"))]
    return [*fast, f"experiment=finetune_{family}", *parts, "data.module.resolution=64", "data.module.batch_size=2",
            "data.module.num_workers=0", "model.sampling.num_images=2", *extra]


def lora_finetune_and_export(family: str, parts: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """Two LoRA steps (rank 2, alpha 1: a loader that assumed alpha = rank would scale wrongly) on a
    tiny captioned folder, then export.py; (checkpoint, export directory)."""
    images = make_captioned_folder(tmp_path / "images", n=4, sizes=[(64, 64)], layout="csv")
    cli.train(compose_config("train", finetune_overrides(
        family, parts, "trainer.max_steps=2", f"data.module.root={images}", "model.optim.optimizer.lr=1e-2",
        "adapter=lora", "adapter.rank=2", "adapter.alpha=1", "model.ema_decay=0.5"), tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    return ckpt, cli.export(compose_config("export", [f"ckpt={ckpt}", f"out={tmp_path / 'export'}"], tmp_path))
