"""FID while training (``callbacks=[default,quality]``): every ``every_n_steps`` optimiser steps,
``num`` samples from the EMA weights, split over all processes, each image from its own seed
(``(seed, index)``, as sample.py draws them), so that the values of two steps differ by the weights
alone; their TF Inception features against the reference statistics of the run's data, computed once
per run and kept in the run directory. Logged as ``val/fid@<num>`` (and ``val/clip_score@<num>``
for a text-to-image model) to every logger, so that ModelCheckpoint can monitor it:

    python train.py callbacks=[default,quality] callbacks.quality.every_n_steps=5000 callbacks.quality.num=5000 \\
        callbacks.checkpoint.monitor=val/fid@5k callbacks.checkpoint.mode=min callbacks.checkpoint.save_top_k=3

The name always carries the number of samples: FID at a few thousand samples is biased upwards and
compares only with the same number.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion.evaluation import metrics as M
from diffusion.evaluation.features import describe_extractors, extract, feature_name
from diffusion.evaluation.reference import Reference, check_compatible, data_fingerprint, open_reference, reference_from_data
from diffusion.evaluation.sources import ArrayImages
from diffusion.evaluation.suite import short_count
from diffusion.samplers import PerSampleNoise
from diffusion.sampling_job import shard, to_uint8
from diffusion.sampling_options import conditions, noise_seed

log = logging.getLogger(__name__)

INCEPTION = {"_target_": "diffusion.evaluation.inception.InceptionFeatures"}


class QualityMetrics(L.Callback):
    def __init__(self, every_n_steps: int = 5000, num: int = 1000, batch_size: int = 50, seed: int = 0,
                 sampler: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
                 ref: str = "data", ref_split: str = "train", ref_num: int | None = None,
                 extractor: dict | None = None, clip: dict | None = None, prompts: list[str] | None = None,
                 precision: str = "32") -> None:
        for key, value in (("every_n_steps", every_n_steps), ("num", num), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"callbacks.quality.{key}={value!r}: must be an integer >= 1")
        if num < 2:
            raise ValueError(f"callbacks.quality.num={num}: a Fréchet distance needs at least 2 samples")
        self.every_n_steps, self.num, self.batch_size, self.seed = every_n_steps, num, batch_size, seed
        self.sampler, self.steps, self.cfg_scale, self.precision = sampler, steps, cfg_scale, str(precision)
        self.ref, self.ref_split, self.ref_num = ref, ref_split, ref_num
        self.extractor_cfg = dict(extractor or INCEPTION)
        self.clip_cfg, self.prompts = clip, prompts
        self.name = f"fid@{short_count(num)}"
        self._last_step: int | None = None
        self._extractors: dict[str, Any] | None = None
        self._reference: Reference | None = None

    # --- when ------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.num % trainer.world_size:
            raise ValueError(f"callbacks.quality.num={self.num} must be divisible by the {trainer.world_size} processes "
                             "(each samples the same number of batches, as a sharded EMA needs)")
        if pl_module.conditioner.takes == "prompts" and not (self.prompts or pl_module.sampling.prompts):
            raise ValueError("the quality callback of a text-to-image model needs prompts: set callbacks.quality.prompts"
                             "='[\"a prompt\", ...]' (or model.sampling.prompts)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:
            return  # micro-batches of one accumulated step share it
        self._last_step = step
        metrics = {f"val/{name}": value for name, value in self.measure(trainer, pl_module).items()}
        # Straight to the loggers, once, at the step the training metrics of this batch are logged at
        # (pl_module.log from this hook repeats the value at the next step), and into callback_metrics
        # for ModelCheckpoint(monitor=...), which runs after this hook in the same step.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    # --- what ------------------------------------------------------------------------------
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The metrics now: every process samples its share, the statistics are summed over them, and
        every process computes the same value from the sums."""
        device = pl_module.device
        extractors = self._build(device)
        reference = self.reference(trainer, pl_module, extractors)
        mine = shard(self.num, trainer.global_rank, trainer.world_size)
        takes = pl_module.conditioner.takes
        _, every = conditions(takes, pl_module.num_classes, self.num, self.seed,
                              prompts=list(self.prompts or pl_module.sampling.prompts or []) or None)
        images = []
        for start in range(mine.start, mine.stop, self.batch_size):
            indices = range(start, min(start + self.batch_size, mine.stop))
            noise = PerSampleNoise([noise_seed(self.seed, i) for i in indices])
            condition = None if every is None else every[indices.start:indices.stop]
            x = pl_module.sample(len(indices), condition, sampler=self.sampler, steps=self.steps, cfg_scale=self.cfg_scale,
                                 generator=noise, precision=self.precision)
            images.append(to_uint8(x, f"samples at step {trainer.global_step}"))
        source = ArrayImages(np.concatenate(images), "samples")
        check_compatible(reference, self._fingerprints, source.shape, [feature_name("inception", "pool")], "of this run")
        features = extract(source, {"inception": extractors["inception"]}, self._fingerprints, None,
                           batch_size=self.batch_size, device=device, progress=False, local=True)
        stats = features.stats[feature_name("inception", "pool")]
        mu, sigma = reference.stats[feature_name("inception", "pool")]
        values = {self.name: M.frechet_distance(stats.mean(), stats.cov(), mu, sigma)}
        if "clip" in extractors and every is not None and takes == "prompts":
            values[f"clip_score@{short_count(self.num)}"] = self._clip_score(extractors["clip"], source, every[mine.start:mine.stop], device)
        return values

    def _clip_score(self, clip: Any, source: ArrayImages, prompts: list[str], device: torch.device) -> float:
        with torch.inference_mode():
            image = clip(torch.from_numpy(np.array(source.images)).permute(0, 3, 1, 2).to(device))["clip"]
            text = clip.text_features(list(prompts))
        total = torch.tensor([float(M.clip_score(image, text).sum()), float(len(prompts))], dtype=torch.float64,
                             device="cuda" if device.type == "cuda" else "cpu")
        if dist.is_initialized():
            dist.all_reduce(total)
        return float(total[0] / total[1])

    def _build(self, device: torch.device) -> dict[str, Any]:
        if self._extractors is None:
            self._extractors = {"inception": instantiate(self.extractor_cfg)}
            if self.clip_cfg:
                self._extractors["clip"] = instantiate(self.clip_cfg)
            self._fingerprints = describe_extractors({"inception": self._extractors["inception"]})
        return {k: v.to(device).eval() for k, v in self._extractors.items()}

    def reference(self, trainer: L.Trainer, pl_module: L.LightningModule, extractors: dict[str, Any]) -> Reference:
        """The real images' statistics, once per run: ``<run dir>/quality_reference`` (a resumed run reads them)."""
        if self._reference is not None:
            return self._reference
        if self.ref != "data":
            self._reference = open_reference(self.ref)
            return self._reference
        run_config = getattr(pl_module, "run_config", None)
        if not run_config or "data" not in run_config:
            raise ValueError("the quality callback computes reference statistics from the run's data config, and this "
                             "module carries none; set callbacks.quality.ref=PATH.npz")
        data = OmegaConf.create(run_config["data"])
        dataset = instantiate(data.module).dataset(self.ref_split)
        if dataset is None or not len(dataset):
            raise ValueError(f"callbacks.quality.ref_split={self.ref_split}: the run's data has no images there")
        data_fp = data_fingerprint(OmegaConf.to_container(data.module, resolve=True), self.ref_split, self.ref_num, 0)
        cache = Path(trainer.default_root_dir) / "quality_reference"
        log.info("quality: reference statistics of the %s split into %s (once per run)", self.ref_split, cache)
        self._reference = reference_from_data(dataset, data_fp, {"inception": extractors["inception"]}, self._fingerprints,
                                              cache, full=[], batch_size=self.batch_size, device=pl_module.device,
                                              progress=False)
        return self._reference
