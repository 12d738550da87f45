"""The LightningModule: wires data -> autoencoder -> conditioning -> t and noise -> backbone ->
loss, and owns the optimiser, the EMA of the weights and the sample grids. The parts do the work."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn

from diffusion.adapters import Adapter, Full, base_parameter_names
from diffusion.conditioning import Conditioner, Conditioning, Unconditional, drop_condition
from diffusion.conditioning.image_inputs import ImageCondition
from diffusion.conditioning.micro import with_time_ids
from diffusion.data.batching import batches_processed, check_split_over_processes
from diffusion.frozen import FrozenModule, weights_sha256
from diffusion.objective import DiffusionObjective
from diffusion.precision import autocast_backbone
from diffusion.samplers import ClassifierFreeGuidance, PerSampleNoise, get_sampler, grids
from diffusion.samplers.grids import bind_schedule
from diffusion.samplers.noise import randn
from diffusion.schedules import Schedule, with_model_input
from diffusion.timesteps import TimeDistribution, Uniform
from diffusion.training.checkpoint_io import check_adapter, check_frozen_weights, check_state_fits
from diffusion.training.ema import EMA
from diffusion.training.finite import FiniteLossCheck
from diffusion.training.optim import OptimConfig, parameter_groups
from diffusion.training.randomness import StepDraws, draw_step, keyed_normal
from diffusion.variance import VLB_WEIGHT, check_learned_variance, make_objective
from diffusion.weighting import LossWeighting, NoWeighting


@dataclass
class SamplingConfig:
    """How the module samples: the defaults of ``sample`` and of sample.py, and the training grids
    (diffusion.training.callbacks.SampleGrids)."""

    sampler: str = "euler"
    steps: int = 50
    cfg_scale: float = 1.0  # the run's guidance scale; sample.py keeps it unless given cfg_scale=
    grid: Callable[[int], Tensor] = grids.uniform  # steps -> decreasing times
    every_n_steps: int = 0  # grids every N optimiser steps; 0: only at the end of training
    num_images: int = 64
    prompts: Sequence[str] | None = None  # text-conditioned models: the grids' prompts, a column each


def _takes(function: Callable, name: str) -> bool:
    """Whether ``function`` accepts the keyword ``name`` (itself or through ``**kwargs``)."""
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def weighted_loss(per_sample: Tensor, loss_weight: Tensor) -> Tensor:
    """``mean_i(loss_weight_i * per_sample_i)``: the batch's per-sample weights applied as given, not
    renormalised, so a data module chooses the formula (DreamBooth's weights make it
    ``mean(instance) + prior_loss_weight * mean(class)``). Batches without weights keep the plain mean."""
    if loss_weight.shape != per_sample.shape:
        raise ValueError(f"batch['loss_weight'] has shape {tuple(loss_weight.shape)}, expected one weight per sample "
                         f"{tuple(per_sample.shape)}")
    return (loss_weight.to(per_sample) * per_sample).mean()


VALIDATION_KEY = -1  # keys the validation noise apart from any training draw


class DiffusionModule(L.LightningModule):
    """Frozen parts (:class:`~diffusion.frozen.FrozenModule`: the autoencoder, text encoders) are
    rebuilt from the run's config, so checkpoints leave their weights out and keep their hashes,
    which loading compares; everything else (the backbone, its EMA, a trainable conditioner) is saved."""

    def __init__(
        self,
        backbone: nn.Module,
        schedule: Schedule,
        time_distribution: TimeDistribution | None = None,
        weighting: LossWeighting | None = None,
        conditioner: Conditioner | None = None,
        autoencoder: nn.Module | None = None,
        cond_dropout: float = 0.1,
        optim: OptimConfig | None = None,
        ema_decay: float = 0.999,
        sampling: SamplingConfig | None = None,
        val_times: int = 8,
        image_shape: tuple[int, int, int] | None = None,
        compile: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        offset_noise: float = 0.0,
        vlb_weight: float = VLB_WEIGHT,
        adapter: Adapter | None = None,
        image_condition: ImageCondition | None = None,
    ):
        """``image_shape`` is the (C, H, W) the backbone works in: the latents' shape when an
        autoencoder is given. Batches carry ``image`` (pixels, encoded here) or ``latent``
        (from a cache). ``offset_noise`` adds a per-channel constant of that standard deviation to the
        training noise (diffusion.training.randomness.draw_step); validation keeps plain noise, so its
        losses compare across runs. ``vlb_weight`` is the lambda of the hybrid loss of a backbone that
        learns its variance (learn_sigma; diffusion.variance), 0 to leave its variance head untrained.
        ``adapter`` (diffusion.adapters; default full) says what of the backbone trains: with any but
        full the base weights are fixed, left out of checkpoints and recorded by their sha256.
        ``image_condition`` (diffusion.conditioning.image_inputs) adds a batch's image conditions (a
        ControlNet's control, concatenated latents, an image prompt) to the conditioner's condition."""
        super().__init__()
        if not 0 <= offset_noise < 1:
            raise ValueError(f"offset_noise={offset_noise}: must be in [0, 1) (sgm and the offset-noise recipe use "
                             "0.05-0.1; 0 turns it off)")
        self.offset_noise = float(offset_noise)
        self.adapter = adapter or Full()
        # The hash of the weights the adapter is trained on, taken before it changes the backbone.
        self.base_weights_sha256 = None if self.adapter.trains_base else weights_sha256(backbone)
        backbone = self.adapter.apply(backbone)
        self._base_names = frozenset(() if self.adapter.trains_base else base_parameter_names(backbone))
        # FSDP2's resume loads the checkpoint into the sharded model by the model's own keys, and would refuse
        # the base weights a checkpoint leaves out; check_checkpoint has compared every key already.
        self.strict_loading = self.adapter.trains_base
        self.backbone = backbone
        self.ema = EMA(backbone, ema_decay, trainable_only=not self.adapter.trains_base)
        self.objective: DiffusionObjective = make_objective(backbone, schedule, time_distribution or Uniform(),
                                                           weighting or NoWeighting(), vlb_weight)
        self.conditioner = conditioner or Unconditional()
        self.adapter.attach(self.conditioner)  # Textual Inversion adds its tokens and trainable rows here
        self.image_condition = image_condition
        if image_condition is not None:
            image_condition.bind(backbone)
        self.autoencoder = autoencoder
        self.cond_dropout = cond_dropout
        self.optim = optim or OptimConfig()
        self.sampling = sampling or SamplingConfig()
        self.sampling.grid = bind_schedule(self.sampling.grid, schedule)
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.compile, self.compile_kwargs = compile, dict(compile_kwargs or {})
        self._sharded = False  # configure_model may be called again (e.g. when a run resumes)
        # Each sample's t, noise and dropout coin are keyed to (seed, epoch, batch, its place in the
        # global batch): the same on any number of processes and after a resume (randomness.py).
        self.seed = seed
        self._generator: torch.Generator | None = None
        # Training losses are read two steps late (and before a checkpoint is written), so that the
        # host never waits on the device for them (finite.py).
        self._losses = FiniteLossCheck()
        # Fixed times of the validation loss, mid-points of [0, 1] bins, so runs are comparable.
        self.register_buffer("val_t", (torch.arange(val_times) + 0.5) / val_times, persistent=False)
        self._val_names = [f"val/loss_t{(i + 0.5) / val_times:.2f}" for i in range(val_times)]  # not read off val_t
        self.run_config: dict[str, Any] | None = None  # the resolved config, written into every checkpoint

    @property
    def schedule(self) -> Schedule:
        return self.objective.schedule

    def model(self, backbone: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """The theory's model: ``backbone`` on the theory's input map (EDM's ``c_in x_t`` and
        ``c_noise``; the identity for DDPM and flow matching)."""
        return with_model_input(backbone, self.schedule)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.conditioner, "num_classes", None)

    def latents(self, batch: dict[str, Any], key: tuple[int, ...] | None = None,
                positions: Sequence[int] | None = None) -> Tensor:
        """x0 of the diffusion: cached latents, or the batch's images through the autoencoder. An
        autoencoder that draws from its posterior (SD's fine-tunes) draws each sample's noise from
        ``key`` and the sample's position (default: its place in the global batch, as the step's other
        draws, randomness.py; cache.py passes dataset indices)."""
        if "latent" in batch:
            return batch["latent"]
        images = batch["image"]
        if self.autoencoder is None:
            return images
        if key is None or not getattr(self.autoencoder, "draws_posterior", False):
            return self.autoencoder.encode(images)
        ae = self.autoencoder
        shape = (ae.latent_channels, images.shape[-2] // ae.downsample_factor, images.shape[-1] // ae.downsample_factor)
        if self._generator is None or self._generator.device != images.device:
            self._generator = torch.Generator(device=images.device)
        first = self.global_rank * images.shape[0]
        positions = range(first, first + images.shape[0]) if positions is None else positions
        noise = keyed_normal(shape, key=key, positions=positions, generator=self._generator)
        return ae.encode(images, noise=noise)

    def encode_condition(self, images: Tensor) -> Tensor:
        """A conditioning image's latents: the autoencoder's posterior mode (a function of the image,
        so that a cache holds what training computes), or the pixels without an autoencoder."""
        if self.autoencoder is None:
            return images
        if getattr(self.autoencoder, "draws_posterior", False):
            return self.autoencoder.encode(images, noise=torch.zeros(
                (images.shape[0], self.autoencoder.latent_channels, images.shape[-2] // self.autoencoder.downsample_factor,
                 images.shape[-1] // self.autoencoder.downsample_factor), device=images.device))
        return self.autoencoder.encode(images)

    def condition(self, batch: Mapping[str, Any]) -> Conditioning:
        """The conditioner's condition of a batch with its image conditions (image_condition)."""
        cond = self.conditioner(batch)
        if self.image_condition is None:
            return cond
        return cond.replace(**self.image_condition(batch, self.encode_condition))

    def null_condition(self, cond: Conditioning) -> Conditioning:
        """The null condition of ``cond``, of its batch size: the conditioner's, the image condition's null
        fields (zero image embeddings), and ``cond``'s kept fields (its control, concatenated latents,
        sizes). Condition dropout and classifier-free guidance both take it."""
        null = self.conditioner.null(cond.batch_size or 1, self.device).keeping(cond)
        if self.image_condition is None:
            return null
        fields = self.image_condition.null(dict(cond.items()))
        return null.replace(**{name: value.expand(cond.batch_size, *value.shape[1:]) for name, value in fields.items()})

    def configure_model(self) -> None:
        mesh = self.device_mesh  # set by ModelParallelStrategy (trainer=fsdp)
        if mesh is not None and not self._sharded:
            from diffusion.training.sharding import fully_shard_by_block

            # The EMA copy is sharded like the backbone: each process averages its own shards, with
            # no communication and 1/world of the memory; validation and sampling gather its blocks
            # on every process together, as training does. An adapter's copy shares the fixed base:
            # it takes the backbone's shards of it and runs through the backbone (EMA.share_sharded).
            fully_shard_by_block(self.backbone, mesh["data_parallel"])
            if self.adapter.trains_base:
                fully_shard_by_block(self.ema.module, mesh["data_parallel"], forward_only=True)
            else:
                self.ema.share_sharded(self.backbone)
            self._sharded = True
        if self.compile:  # in place: parameter names, and so checkpoints, stay those of the eager model
            self.backbone.compile(**self.compile_kwargs)

    # --- training -----------------------------------------------------------------------
    def on_train_start(self) -> None:
        check_split_over_processes(self.trainer.train_dataloader, self.trainer.world_size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning logs under its count of optimiser steps, which it restores one ahead from a
        # checkpoint saved at a validation or at the end of training (it assumes a save inside the
        # batch): keep it equal to the steps taken, so a resumed run logs each step under its number.
        loop = self.trainer.fit_loop.epoch_loop
        if loop._batches_that_stepped != self.global_step:
            loop._batches_that_stepped = self.global_step

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self._losses.check()
        key = (self.seed, self._batch_position(batch_idx))
        x0 = self.latents(batch, key)
        draws = self._draws(x0, key=key, drop_probability=self.cond_dropout, offset_noise=self.offset_noise)
        cond = self.condition(batch)
        cond = drop_condition(cond, self.null_condition(cond), self.cond_dropout, drop=draws.drop)
        cond = with_time_ids(cond, batch, self.backbone)  # SDXL's image sizes: kept when the caption is dropped
        out = self.objective(partial(self.model(self.backbone), cond=cond), x0, t=draws.t, noise=draws.noise)
        if batch.get("loss_weight") is not None:  # e.g. DreamBooth's prior preservation (diffusion.data.dreambooth)
            out.loss = weighted_loss(out.per_sample, batch["loss_weight"])
        # The global batch's loss: logged as one process would, and non-finite on every process if on one.
        loss = self._mean_over_processes(out.loss.detach())
        self._losses.record(loss, self.global_step)
        # Not on the progress bar: Lightning would read it on the host after every batch.
        self.log("train/loss", loss)
        return out.loss

    def _batch_position(self, batch_idx: int) -> int:
        """The current batch's place in the run's stream of training batches (0, 1, ... over all
        epochs), which the data modules' samplers also follow: Lightning's epoch count is not used,
        since a run stopped by max_steps is recorded as a finished epoch and would not continue it."""
        if self._trainer is None:
            return batch_idx
        return batches_processed(self.trainer)  # Lightning counts a batch as processed after its step

    def _mean_over_processes(self, value: Tensor) -> Tensor:
        """One all-reduce, which the host does not wait on (Lightning's reduce adds a barrier)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self._trainer is None or self.trainer.world_size == 1 or not distributed:
            return value
        total = value.clone()
        torch.distributed.all_reduce(total)  # a sum: gloo has no average
        return total / self.trainer.world_size

    def _draws(self, x0: Tensor, key: tuple[int, ...], drop_probability: float, offset_noise: float = 0.0) -> StepDraws:
        """t, noise and dropout coins of this process's samples: the global_rank-th slice of the global
        batch (diffusion.data.batching), each keyed to its place in it (randomness.py)."""
        if self._generator is None or self._generator.device != x0.device:
            self._generator = torch.Generator(device=x0.device)
        return draw_step(x0, self.objective.time_distribution, drop_probability, key=key,
                         first_position=self.global_rank * x0.shape[0], generator=self._generator,
                         offset_noise=offset_noise)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: checkpoint callbacks run before that hook and would
        # save an average one update behind the weights.
        self.ema.update(self.backbone)

    def on_train_end(self) -> None:
        self._losses.check(wait_for_all=True)

    # --- validation: fixed times and fixed noise ------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x0 = self.latents(batch, key=(VALIDATION_KEY, batch_idx))
        cond = with_time_ids(self.condition(batch), batch, self.backbone)
        # Noise keyed to each sample's place in the global validation batch, not to the run's seed:
        # the same for every run and every number of processes, so validation losses compare.
        noise = self._draws(x0, key=(VALIDATION_KEY, batch_idx), drop_probability=0.0).noise
        losses = []
        with self.ema.applied(self.backbone) as averaged:
            model = partial(self.model(averaged), cond=cond)
            for t in self.val_t:
                losses.append(self.objective(model, x0, t=t.expand(x0.shape[0]), noise=noise).loss)
        for loss, name in zip(losses, self._val_names):
            self.log(name, loss, batch_size=x0.shape[0], sync_dist=True)
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=x0.shape[0], sync_dist=True)

    # --- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        num: int,
        condition: Any = None,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        generator: torch.Generator | PerSampleNoise | None = None,
        progress: bool = False,
        decode: bool = True,
        grid: Callable[[int], Tensor] | None = None,
        eta: float | None = None,
        precision: str = "32",
        inputs: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """``num`` samples from the EMA weights; ``condition`` is what the conditioner takes (labels,
        prompts; None: cycle the classes, or empty prompts). Decoded to pixels unless ``decode`` is False.
        ``generator`` draws the initial noise and a stochastic sampler's noise: a PerSampleNoise of
        ``num`` seeds makes each sample depend on its own seed alone. ``grid`` (steps -> times) replaces
        the run's; ``eta`` goes to DDIM; ``precision="bf16"`` runs the backbone under bf16 autocast.
        ``inputs``: the request's images for the image condition (image_condition), batch-first with
        ``num`` samples, under the batch keys it reads (``conditioning_image``; ``image`` and ``mask``
        for inpainting; ``ip_image``); a control and concatenated latents stay in both branches of
        guidance (KEPT_FIELDS)."""
        if self.image_shape is None:
            raise ValueError("this module was built without image_shape; pass the (C, H, W) the backbone works in")
        s = self.sampling
        cond = self.conditioner.make(condition, num, self.device)
        if self.image_condition is not None:  # the request's images, made into fields as in training
            request = {name: value.to(self.device) for name, value in (inputs or {}).items()}
            cond = cond.replace(**self.image_condition(request, self.encode_condition))
        elif inputs:
            raise ValueError(f"sample(inputs={sorted(inputs)}): this model takes no image condition (image_condition "
                             "is null); sample it without control, mask or ip_image")
        scale = s.cfg_scale if cfg_scale is None else cfg_scale
        with self.ema.applied(self.backbone) as averaged:  # the EMA weights' module
            backbone = self.model(autocast_backbone(averaged, self.device, precision))
            model = ClassifierFreeGuidance(backbone, cond, self.null_condition(cond), scale)
            times = (grid or s.grid)(steps or s.steps)
            x = randn((num, *self.image_shape), generator, self.device, torch.float32)
            if (prior_std := self.schedule.prior_std(times[0].item())) != 1:  # a variance-exploding path
                x = x * prior_std
            solve = get_sampler(sampler or s.sampler)
            if getattr(getattr(solve, "func", solve), "needs_learned_variance", False):  # ddpm_learned
                check_learned_variance(averaged, self.schedule, f"sampler={getattr(solve, '__name__', 'ddpm_learned')}")
            kwargs: dict[str, Any] = {} if eta is None else {"eta": eta}
            if _takes(solve, "generator"):  # the stochastic samplers (ancestral, ddim with eta > 0) draw from it
                kwargs["generator"] = generator
            x = solve(model, self.schedule, x, times, progress=progress, **kwargs)
        return self.autoencoder.decode(x) if decode and self.autoencoder is not None else x

    # --- optimiser ------------------------------------------------------------------------
    def configure_optimizers(self):
        """The configured optimiser over the backbone, weight decay on its matrices only (see
        diffusion.training.optim), with the warm-up and decay of ``optim`` per optimiser step."""
        max_steps = self._trainer.max_steps if self._trainer is not None else None  # None outside a Trainer
        groups = parameter_groups(self.backbone) + self.adapter.parameter_groups()
        if not any(group["params"] for group in groups):
            raise ValueError(f"adapter={self.adapter.name} leaves no parameter of the backbone to train, and nothing "
                             "else of this model trains; use adapter=full or adapter=lora")
        optimizer = self.optim.optimizer(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.optim.lr_multiplier(max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints ----------------------------------------------------------------------
    def frozen_parts(self) -> dict[str, FrozenModule]:
        """The outermost frozen submodules by name (e.g. ``autoencoder``, ``conditioner.encoder``)."""
        parts: dict[str, FrozenModule] = {}
        for name, module in self.named_modules():
            if isinstance(module, FrozenModule) and not any(name.startswith(f"{p}.") for p in parts):
                parts[name] = module
        return parts

    def frozen_weights(self) -> dict[str, str]:
        """The sha256 of each frozen part's weights, which a checkpoint records in their place."""
        return {name: part.weights_sha256() for name, part in self.frozen_parts().items()}

    def check_checkpoint(self, checkpoint: dict[str, Any], source: str) -> None:
        """Refuse a checkpoint of another model: other trained weights (names or shapes), or other
        frozen encoders than it was trained with."""
        check_adapter(self.adapter.name, self.base_weights_sha256, checkpoint.get("adapter"), source,
                      base_dtype=self.adapter.base_dtype)
        check_state_fits(self.state_dict(), checkpoint["state_dict"], source)
        check_frozen_weights(self.frozen_weights(), checkpoint.get("frozen_weights"), source)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._losses.check(wait_for_all=True)  # never write weights a non-finite loss has updated
        checkpoint["run_config"] = self.run_config
        checkpoint["frozen_weights"] = self.frozen_weights()
        if not self.adapter.trains_base:
            checkpoint["adapter"] = {"name": self.adapter.name, "base_weights_sha256": self.base_weights_sha256,
                                     "base_dtype": self.adapter.base_dtype}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Called with the checkpoint Lightning has loaded, before it applies the weights; FSDP2's strategy
        # (ModelParallelStrategy) has applied and removed them already (train() checked the file before).
        if "state_dict" in checkpoint:
            self.check_checkpoint(checkpoint, "the checkpoint to resume from")

    def _frozen_prefixes(self, prefix: str = "") -> tuple[str, ...]:
        return tuple(f"{prefix}{name}." for name in self.frozen_parts())

    def _base_keys(self, prefix: str = "") -> frozenset[str]:
        """The state keys of the backbone's fixed base weights (an adapter's), in it and in its EMA copy."""
        return frozenset(f"{prefix}{owner}.{name}" for owner in ("backbone", "ema.module") for name in self._base_names)

    def _kept_out(self, prefix: str = "") -> Callable[[str], bool]:
        frozen, base = self._frozen_prefixes(prefix), self._base_keys(prefix)
        return lambda key: key.startswith(frozen) or key in base

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        kept_out = self._kept_out(kwargs.get("prefix", args[1] if len(args) > 1 else ""))
        return type(state)((k, v) for k, v in state.items() if not kept_out(k))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        kept_out = self._kept_out()
        own = {k: v for k, v in super().state_dict().items() if kept_out(k)}
        return super().load_state_dict({**own, **state_dict}, strict=strict, assign=assign)
