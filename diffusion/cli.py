"""What train.py, sample.py, cache.py and export.py run: compose, instantiate, run. No logic of
the parts here."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from diffusion.data.cache import CachedDataModule, check_cache_dtype, write_cache
from diffusion.images import save_grid
from diffusion.training.checkpoint_io import check_state_fits
from diffusion.training.module import DiffusionModule

# The EMA copy is kept in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def find_latest_checkpoint(root: str | Path = "outputs") -> Path:
    """The newest ``last.ckpt`` under ``root`` (runs of train.py and its multiruns)."""
    candidates = [p for base in (Path(root), Path("multirun")) if base.exists() for p in base.glob("**/checkpoints/last.ckpt")]
    if not candidates:
        raise FileNotFoundError(f"no checkpoints/last.ckpt under {Path(root).resolve()} or multirun/; pass ckpt=PATH")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def _resolve_checkpoint(path: str | Path | None) -> Path | None:
    if path is None:
        return None
    path = find_latest_checkpoint() if str(path) == "last" else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass an existing file or 'last'")
    return path


def build_module(cfg: DictConfig) -> DiffusionModule:
    """The parts in order: the autoencoder and the conditioner first, then the backbone sized for
    their latents and conditions, then the module that wires them."""
    # Frozen parts built from a config (random weights) must come out the same in cache.py,
    # train.py and sample.py: built under their own RNG seeded with the run's seed.
    # They get plain dicts and lists: diffusers and open_clip do not take OmegaConf's.
    conditioner_cfg = cfg.conditioning.conditioner
    if "encoder" in conditioner_cfg and OmegaConf.select(
        conditioner_cfg, "encoder", throw_on_resolution_failure=False
    ) is None:
        raise ValueError("conditioning=text needs a text encoder: add text_encoder=<an option of conf/text_encoder>, "
                         "e.g. text_encoder=openclip_vit_h")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        autoencoder = instantiate(cfg.vae, _convert_="all") if cfg.get("vae") is not None else None
        conditioner = instantiate(conditioner_cfg, _convert_="all")
    channels, height, width = cfg.data.image_shape
    if autoencoder is not None:
        factor = autoencoder.downsample_factor
        channels, height, width = autoencoder.latent_channels, height // factor, width // factor
    backbone = instantiate(cfg.backbone, in_channels=channels, **conditioner.backbone_kwargs())
    return instantiate(cfg.model, backbone=backbone, conditioner=conditioner, autoencoder=autoencoder,
                       image_shape=(channels, height, width), _convert_="object")


def train(cfg: DictConfig) -> dict[str, float]:
    # Hydra's root handler prints to the console and the run's train.log; Lightning's own
    # handler would print every message a second time.
    logging.getLogger("lightning.pytorch").handlers.clear()
    L.seed_everything(cfg.seed, workers=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model = build_module(cfg)
    model.run_config = resolved
    if cfg.get("cache_dir"):  # read the shards instead of running the encoders
        datamodule = CachedDataModule(cfg.cache_dir, cfg.data.module.batch_size, cache_fingerprint(cfg, model), seed=cfg.seed)
    else:
        datamodule = instantiate(cfg.data.module)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    if cfg.get("global_batch_size"):
        datamodule.batch_size = per_device_batch_size(cfg.global_batch_size, trainer.world_size,
                                                      trainer.accumulate_grad_batches)
    for logger in loggers:
        logger.log_hyperparams(resolved)
    ckpt_path = _resolve_checkpoint(cfg.ckpt_path)  # a checkpoint of another model: DiffusionModule.on_load_checkpoint
    trainer.fit(model, datamodule, ckpt_path=ckpt_path)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def per_device_batch_size(global_batch_size: int, world_size: int, accumulate: int = 1) -> int:
    """The batch each process loads so that one optimiser step sees ``global_batch_size`` samples."""
    shares = world_size * accumulate
    if global_batch_size % shares:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by world size {world_size} x "
            f"accumulate_grad_batches {accumulate} = {shares}; choose a multiple of {shares}"
        )
    return global_batch_size // shares


def cache_fingerprint(cfg: DictConfig, model: DiffusionModule) -> dict[str, Any]:
    """What a cache of this configuration depends on: the encoders (their weights' hashes), the
    data and its transforms, and the dtype it is stored in; not the batch size or the loader's workers."""
    dtype = cfg.get("cache_dtype", "float32")
    check_cache_dtype(dtype)
    data = OmegaConf.to_container(cfg.data.module, resolve=True)
    for key in ("batch_size", "num_workers"):
        data.pop(key, None)
    autoencoder = model.autoencoder.fingerprint() if model.autoencoder is not None else {"class": "none"}
    return {"autoencoder": autoencoder, "conditioner": model.conditioner.fingerprint(), "data": data,
            "image_shape": list(model.image_shape), "dtype": dtype}


def cache(cfg: DictConfig) -> Path:
    """Encode the configured data once (latents and conditions) into ``cfg.cache_dir/{train,val}``."""
    if not cfg.get("cache_dir"):
        raise ValueError("pass cache_dir=PATH: where the cache is written (and later read by train.py cache_dir=PATH)")
    model = build_module(cfg).eval()
    datamodule = instantiate(cfg.data.module)
    fingerprint = cache_fingerprint(cfg, model)

    def encode(batch: dict[str, Any]) -> dict[str, Tensor]:
        return {"latent": model.latents(batch), **model.conditioner.cache(batch)}

    for split in ("train", "val"):
        dataset = datamodule.dataset(split)
        if dataset is not None and len(dataset):
            write_cache(dataset, Path(cfg.cache_dir) / split, encode, fingerprint,
                        shard_size=cfg.get("cache_shard_size", 1024), batch_size=cfg.data.module.batch_size,
                        dtype=fingerprint["dtype"])
    return Path(cfg.cache_dir)


def load_module(path: str | Path) -> DiffusionModule:
    """Rebuild the module a checkpoint was trained with (from the config it carries) and load
    its weights; a checkpoint of another model fails with the differing names."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = checkpoint.get("run_config")
    if config is None:
        raise ValueError(f"{path} carries no run_config: it was not written by this project's train.py")
    model = build_module(OmegaConf.create(config))
    model.run_config = config
    # Without the frozen parts (see DiffusionModule.FROZEN), as checkpoints hold them.
    check_state_fits(model.state_dict(), checkpoint["state_dict"], f"checkpoint {path}")
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def sample(cfg: DictConfig) -> Path:
    path = _resolve_checkpoint(cfg.ckpt or "last")
    model = load_module(path)
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.labels is not None and cfg.get("prompts") is not None:
        raise ValueError("give labels= or prompts=, not both")
    asked = cfg.labels if cfg.labels is not None else cfg.get("prompts")
    condition = None
    if asked is not None:  # repeated to num
        asked = list(asked)
        condition = (asked * ((cfg.num + len(asked) - 1) // len(asked)))[: cfg.num]
    chosen = cfg.get("sampler") or {}  # the sampler group, if one was picked on the command line
    sampler = chosen.get("name") or model.sampling.sampler
    steps = cfg.steps or chosen.get("steps") or model.sampling.steps
    cfg_scale = cfg.cfg_scale if cfg.cfg_scale is not None else chosen.get("cfg_scale")
    images = model.sample(cfg.num, condition, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                          generator=generator, progress=cfg.progress)
    out = Path(cfg.out) if cfg.out else path.parent.parent / "samples" / f"sample_{sampler}_{steps}.png"
    save_grid(images, out, nrow=model.num_classes)
    np.savez(out.with_suffix(".npz"), images=images.numpy(), condition=np.asarray(condition if condition is not None else []))
    print(f"wrote {out} and {out.with_suffix('.npz')}")
    return out


def export(cfg: DictConfig) -> Path:
    """The EMA weights of a checkpoint as ``ema.safetensors``, beside the resolved ``config.yaml``
    that rebuilds the backbone (``build_module(OmegaConf.load(config.yaml)).backbone``)."""
    from safetensors.torch import save_file

    path = _resolve_checkpoint(cfg.ckpt or "last")
    model = load_module(path)
    out = Path(cfg.out) if cfg.out else path.parent.parent / "export"
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in model.ema.module.state_dict().items()}
    save_file(weights, out / "ema.safetensors", metadata={"source": str(path)})
    OmegaConf.save(OmegaConf.create(model.run_config), out / "config.yaml")
    print(f"wrote {out / 'ema.safetensors'} and {out / 'config.yaml'}")
    return out
