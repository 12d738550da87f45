"""Bits per dimension of held-out real images under a checkpoint (metrics of kind ``likelihood``,
``conf/metrics/bpd.yaml``): a property of the model on real data, so it needs ``ckpt=`` and no samples.

The images are the first ``num`` of the data config's ``split`` (the checkpoint's data unless ``data=`` is
given), uniformly dequantised, and their log-likelihood is computed through the probability-flow ODE of the
checkpoint's EMA backbone in float32 (diffusion.likelihood). Image ``i``'s dequantisation noise and then its
Hutchinson probes come from its own generator, seeded with ``sample_seed(seed, i, LIKELIHOOD_KEY)``, so the
draws do not depend on the batch or the process. (With the adaptive solver the steps are shared by a batch,
so a value moves with ``batch_size`` by about the tolerance.) The images are split over the processes.

A latent model (an autoencoder) is refused: its ODE gives the likelihood of latents, which is not comparable
with pixel bits per dimension, and the decoder is not invertible to count the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import default_collate

from diffusion.likelihood import bits_per_dim, dequantize, log_likelihood
from diffusion.samplers import PerSampleNoise
from diffusion.training.randomness import sample_seed

LIKELIHOOD_KEY = 0x627064  # "bpd": image i's stream is keyed (seed, i, LIKELIHOOD_KEY)
ODE_OPTIONS = ("t_min", "t_max", "method", "steps", "rtol", "atol", "trace", "probe", "num_probes")
OPTIONS = ("split", "num", "conditional", *ODE_OPTIONS)


def image_noise(seed: int, indices: Sequence[int]) -> PerSampleNoise:
    """The per-image generators of dequantisation and probes (see the module docstring)."""
    return PerSampleNoise([sample_seed(seed, int(i), LIKELIHOOD_KEY) for i in indices])


def model_log_likelihood(module: Any, batch: dict[str, Any], noise: PerSampleNoise, conditional: bool = True,
                         **ode: Any) -> torch.Tensor:
    """Per-image log-likelihood (nats) of a batch of real images under a DiffusionModule's EMA backbone,
    dequantised with ``noise``, which then draws the probes; ``conditional``: given the batch's own
    condition (labels), else the null condition."""
    device = module.device
    images = batch["image"].to(device=device, dtype=torch.float32)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    cond = module.conditioner(batch) if conditional else module.conditioner.null(images.shape[0], device)
    backbone = module.model(module.ema.module)  # on the theory's input map (EDM's c_in, c_noise)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return backbone(x, t, cond=cond)

    x0 = dequantize(images, noise)
    return log_likelihood(model, module.schedule, x0, generator=noise, **ode)


def likelihood_metrics(cfg: DictConfig, specs: Sequence[Any], device: torch.device) -> tuple[dict[str, float], dict]:
    """The values of the ``likelihood`` metrics (mean bits per dimension over the images) and how they
    were made, on every process (the per-image values are summed over the processes)."""
    from diffusion.cli import checkpoint_to_load, load_module, read_checkpoint
    from diffusion.precision import process_env

    if cfg.get("samples"):
        raise ValueError(f"metrics {[s.name for s in specs]} are likelihoods of real images under a model: give "
                         "ckpt=PATH (not samples=), or leave them out of metrics=")
    if cfg.get("ckpt") is None:
        raise ValueError(f"metrics {[s.name for s in specs]} are likelihoods of real images under a model and need "
                         "its checkpoint: pass ckpt=PATH (or ckpt=last)")
    path = checkpoint_to_load(cfg.ckpt)
    run_config = read_checkpoint(path)["run_config"]
    vae = str(OmegaConf.select(OmegaConf.create(run_config), "vae._target_", default=None) or "")
    if vae and not vae.endswith("IdentityAutoencoder"):
        raise ValueError(f"metrics {[s.name for s in specs]}: {path} is a latent model (vae {vae}); its ODE "
                         "likelihood would be of latents, not comparable with pixel bits per dimension. Leave them "
                         "out of metrics=")
    module = load_module(path).to(device)
    data = cfg.get("data") or OmegaConf.create(run_config)["data"]
    rank, world, _ = process_env()
    values, record = {}, {}
    for spec in specs:
        options = dict(spec.params)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"metrics.{spec.name}: unknown option(s) {unknown}; the options are {list(OPTIONS)}")
        dataset = instantiate(data.module).dataset(options.get("split", "val"))
        if dataset is None or not len(dataset):
            raise ValueError(f"metrics.{spec.name}.split={options.get('split')}: the data config has no images there")
        num = options.get("num") or len(dataset)
        if not isinstance(num, int) or not 1 <= num <= len(dataset):
            raise ValueError(f"metrics.{spec.name}.num={num}: need an integer in 1..{len(dataset)} (the split's size)")
        log_px = torch.zeros(num, dtype=torch.float64, device=device)
        ode = {k: options[k] for k in ODE_OPTIONS if k in options}
        mine = list(range(rank, num, world))
        for start in range(0, len(mine), int(cfg.batch_size)):
            indices = mine[start:start + int(cfg.batch_size)]
            batch = default_collate([dataset[i] for i in indices])
            log_px[indices] = model_log_likelihood(module, batch, image_noise(int(cfg.seed), indices),
                                                   bool(options.get("conditional", True)), **ode)
        if dist.is_initialized():
            dist.all_reduce(log_px)  # each image is computed on one process, zero elsewhere
        num_dims = int(np.prod(module.image_shape))
        bpd = bits_per_dim(log_px, num_dims).cpu()
        values[spec.name] = float(bpd.mean())
        if num > 1:  # the standard error of the mean over the images
            values[f"{spec.name}_sem"] = float(bpd.std() / num**0.5)
        record[spec.name] = {"ckpt": str(path), "num_images": num, "num_dims": num_dims, "seed": int(cfg.seed),
                             "batch_size": int(cfg.batch_size), **options,
                             "dequantization": "(round((x + 1) * 127.5) + u) / 128 - 1, u ~ U[0, 1); bpd offset 7"}
    return values, record
