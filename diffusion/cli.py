"""What train.py, sample.py, cache.py and export.py run: compose, instantiate, run. No logic of
the parts here."""

from __future__ import annotations

import inspect
import logging
import logging.handlers
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from diffusion.conditioning.micro import MICRO_KEYS
from diffusion.data.cache import CachedDataModule, check_cache_dtype, write_cache
from diffusion.data.classes import write_class_names
from diffusion.loggers import resume_at
from diffusion.runs import (
    in_slurm_job,
    newest_checkpoint,
    newest_run,
    resume_checkpoint,
    run_of,
    write_launch_record,
)
from diffusion.training.module import DiffusionModule

log = logging.getLogger(__name__)

# The EMA copy is kept in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint of this project's train.py, read safely (``weights_only``) and memory-mapped, so
    that checking it reads no weights; anything else is refused with what it is not."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for files that are not checkpoints
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a checkpoint of this project (torch.load: {reason}); pass a .ckpt file "
                         "written by train.py") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or checkpoint.get("run_config") is None:
        raise ValueError(f"{path} is not a checkpoint of this project: it carries no state_dict and run_config "
                         "(written by another program?); pass a .ckpt file written by train.py")
    return checkpoint


def checkpoint_to_load(path: str | Path | None) -> Path:
    """``path``, or with None / "last" the newest checkpoint of the newest run under outputs/."""
    if path is None or str(path) == "last":
        return newest_checkpoint(newest_run())
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass an existing file, or leave ckpt out for "
                                "the newest run's")
    return Path(path)


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
        image_condition = instantiate(cfg.image_condition, _convert_="all") if cfg.get("image_condition") else None
    channels, height, width = cfg.data.image_shape
    if autoencoder is not None:
        factor = autoencoder.downsample_factor
        channels, height, width = autoencoder.latent_channels, height // factor, width // factor
    # What trains of the backbone (conf/adapter). An adapter's base weights are fixed and only hashed in
    # checkpoints: a randomly initialised base is built under the run's seed, so that it comes out the same.
    adapter = instantiate(cfg.adapter, _convert_="all") if cfg.get("adapter") is not None else None
    image_condition = controlled_condition(adapter, image_condition, autoencoder)
    check_image_prompt(adapter, image_condition)
    with torch.random.fork_rng(devices=[], enabled=adapter is not None and not adapter.trains_base):
        if adapter is not None and not adapter.trains_base:
            torch.manual_seed(cfg.seed)
        backbone = instantiate(cfg.backbone, in_channels=channels, **conditioner.backbone_kwargs(),
                               **concat_kwargs(cfg, image_condition, channels))
    if adapter is not None and adapter.base is not None:
        from diffusion.adapters import load_base

        load_base(backbone, adapter, read_checkpoint)
    elif adapter is not None and adapter.name in ("controlnet", "ip_adapter") and _outputs_zero(backbone):
        # Their additions reach the output through the base's own zero-initialised layers (LoRA may adapt those).
        log.warning("adapter=%s fixes a freshly initialised %s, whose zero-initialised output layer stays zero: the "
                    "model's output is 0 whatever the adapter learns. Adapt a trained base: adapter.base=CKPT (a "
                    "checkpoint of this project) or a pretrained backbone", adapter.name, type(backbone).__name__)
    return instantiate(cfg.model, backbone=backbone, conditioner=conditioner, autoencoder=autoencoder,
                       image_shape=(channels, height, width), adapter=adapter, image_condition=image_condition,
                       _convert_="object")


def _outputs_zero(backbone: Any) -> bool:
    """Our DiT's or UNet's last layer as initialised (zero): a base no fixed-base adapter can move."""
    layer = {"DiT": lambda m: m.final_layer.linear, "UNet": lambda m: m.out[-1]}.get(type(backbone).__name__)
    return layer is not None and not bool(layer(backbone).weight.detach().any())


def controlled_condition(adapter: Any, image_condition: Any, autoencoder: Any) -> Any:
    """A ControlNet reads the data's conditioning images: adapter=controlnet brings image_condition=control
    (another image condition beside it is refused), and a pixel ControlNet of a latent model gets the
    autoencoder's factor."""
    from diffusion.adapters import ControlNet
    from diffusion.conditioning.image_inputs import Control

    if not isinstance(adapter, ControlNet):
        if isinstance(image_condition, Control):
            raise ValueError("image_condition=control feeds a ControlNet: add adapter=controlnet")
        return image_condition
    if image_condition is not None and not isinstance(image_condition, Control):
        raise ValueError(f"adapter=controlnet reads the conditioning image as its control, and image_condition="
                         f"{image_condition.name} asks for another condition; leave image_condition out")
    if adapter.pixels_per_latent is None and autoencoder is not None:
        adapter.pixels_per_latent = autoencoder.downsample_factor
    if adapter.latent_shift is None and autoencoder is not None:  # released SD3 ControlNets' unshifted latents
        adapter.latent_shift = autoencoder.shift * autoencoder.scale
    return image_condition if image_condition is not None else Control()


def check_image_prompt(adapter: Any, image_condition: Any) -> None:
    """IP-Adapter and the image prompt come together: each without the other is refused here, not at the
    first step; the adapter's embedding width is the encoder's unless it names one."""
    from diffusion.conditioning.image_inputs import ImagePrompt
    from diffusion.ip_adapter import IPAdapter

    prompted, adapted = isinstance(image_condition, ImagePrompt), isinstance(adapter, IPAdapter)
    if adapted and not prompted:
        raise ValueError("adapter=ip_adapter attends to an image prompt: add image_condition=image_prompt (CLIP; "
                         "image_prompt_openclip, or image_prompt_siglip for SD3: its image encoder makes the embeddings)")
    if prompted and not adapted:
        raise ValueError("image_condition=image_prompt feeds an IP-Adapter: add adapter=ip_adapter")
    if adapted and adapter.image_embed_dim is None:
        adapter.image_embed_dim = int(image_condition.encoder.embed_dim)


def concat_kwargs(cfg: DictConfig, image_condition: Any, latent_channels: int) -> dict[str, int]:
    """``concat_channels`` for a backbone that takes a concatenated condition; a backbone without
    the argument is refused by name rather than by a TypeError deep in Hydra."""
    channels = image_condition.concat_channels(latent_channels) if image_condition is not None else 0
    if not channels:
        return {}
    from hydra.utils import get_method

    target = get_method(cfg.backbone._target_)
    if "concat_channels" not in inspect.signature(target).parameters and not _forwards_kwargs(target):
        raise ValueError(f"image_condition={type(image_condition).__name__.lower()} concatenates {channels} channels "
                         f"to x_t, and backbone {cfg.backbone._target_} takes no concat_channels: use our UNet or DiT, "
                         "or the wrapped SD UNet (backbone=sd15_unet)")
    return {"concat_channels": channels}


def _forwards_kwargs(target: Any) -> bool:
    """A builder that passes its keyword arguments on (build_unet(name, **overrides))."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(target).parameters.values())


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, or resume (see diffusion.runs for which checkpoint and directory). Everything that can
    be refused is checked before the run directory is written to, so a command that fails leaves
    it as it was."""
    # Hydra's root handler prints to the console (and ours to train.log); Lightning's own handlers
    # would print every message a second time.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    held = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)  # until train.log is
    logging.getLogger().addHandler(held)  # opened: a command that is refused writes none of its lines there
    run = Path(cfg.trainer.default_root_dir)
    try:
        return _train(cfg, run, held)
    except Exception:
        if run.is_dir() and not any(run.iterdir()):  # made by Hydra for a command refused before writing
            run.rmdir()
        raise
    finally:
        logging.getLogger().removeHandler(held)
        if held.target is not None:
            logging.getLogger().removeHandler(held.target)
            held.target.close()
        held.close()


def _train(cfg: DictConfig, run: Path, held: logging.handlers.MemoryHandler) -> dict[str, float]:
    ckpt_path = resume_checkpoint(cfg.ckpt_path, run)
    L.seed_everything(cfg.seed, workers=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("cache_dir"):
        check_data_cacheable(cfg)
    datamodule = None if cfg.get("cache_dir") else instantiate(cfg.data.module)  # a missing folder: refused here
    model = build_module(cfg)
    model.run_config = resolved
    check_adapter_cacheable(cfg, model)
    if datamodule is not None:
        check_image_condition_data(model, datamodule)
    if datamodule is None:  # read the shards instead of running the encoders
        datamodule = CachedDataModule(cfg.cache_dir, cfg.data.module.batch_size, cache_fingerprint(cfg, model),
                                      num_workers=cfg.data.module.get("num_workers", 0), seed=cfg.seed)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks)  # loggers: once all is checked
    if cfg.get("global_batch_size"):
        datamodule.batch_size = per_device_batch_size(cfg.global_batch_size, trainer.world_size,
                                                      trainer.accumulate_grad_batches)
    model.optim.lr_multiplier(trainer.max_steps)  # a decaying rate without max_steps is refused here
    step, initial = 0, None
    if ckpt_path is not None:  # another model's checkpoint, or other frozen encoders: refused here
        checkpoint = read_checkpoint(ckpt_path)
        if "converted_from" in checkpoint and (existing := newest_checkpoint(run)) is not None:
            if not in_slurm_job():  # it would start that run again from step 0, over its checkpoints
                raise FileExistsError(f"the run directory {run} already holds a run ({existing.relative_to(run)}); "
                                      "continue it with ckpt_path=last, or start from the converted weights in "
                                      "another directory (leave out hydra.run.dir)")
            ckpt_path, checkpoint = existing, read_checkpoint(existing)  # a requeued fine-tune continues itself
        converted = "converted_from" in checkpoint  # released weights (convert.py): a new run starts from them
        if converted:
            check_converted_backbone(cfg, checkpoint, ckpt_path)
        model.check_checkpoint(checkpoint, f"checkpoint {ckpt_path}")
        if (data_state := checkpoint.get(type(datamodule).__qualname__)) is not None:
            datamodule.load_state_dict(data_state)  # as fit will: other class names are refused here
        step = int(checkpoint["global_step"])
        if converted:  # it holds no optimiser or loop state that Lightning could resume
            initial, ckpt_path = checkpoint["state_dict"], None
        del checkpoint
    if hasattr(datamodule, "check_class_images"):  # DreamBooth: a class folder of another base is refused here,
        datamodule.check_class_images(model, check=initial is None)  # or with converted start weights in fit

    # From here on the run directory is written to.
    if trainer.is_global_zero:
        write_launch_record(run, resolved, _task_overrides(), ckpt_path, step)
    held.setTarget(_log_to_file(run / "train.log"))  # the lines so far, then every line as it comes
    held.flush()
    logging.getLogger().removeHandler(held)
    logging.getLogger().addHandler(held.target)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    if ckpt_path is not None:
        resume_at(loggers, step)  # the logs continue at the checkpoint's step
    trainer.loggers = loggers
    for logger in loggers:
        logger.log_hyperparams(resolved)
    if initial is not None:
        model.load_state_dict(initial)
        del initial
    trainer.fit(model, datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.is_global_zero:  # e.g. Textual Inversion's learned_embeds.safetensors, in the run directory
        model.adapter.write_outputs(model, run)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def check_converted_backbone(cfg: DictConfig, checkpoint: dict[str, Any], path: str | Path) -> None:
    """The backbone settings a converted checkpoint needs and its weights' shapes do not show (the
    time map, the heads) are this run's too; else fine-tuning would start from another function."""
    needed = checkpoint["converted_from"]["backbone"]
    differing = {k: v for k, v in needed.items() if cfg.backbone.get(k) != v}
    if differing:
        from diffusion.convert import override_value

        settings = " ".join(f"++backbone.{k}={override_value(v)}" for k, v in needed.items())
        raise ValueError(f"checkpoint {path} holds converted weights that need backbone settings this run lacks "
                         f"({', '.join(f'{k}: {cfg.backbone.get(k)} here, {v} there' for k, v in differing.items())}); "
                         f"add {settings}")


def _task_overrides() -> list[str]:
    """The command line's overrides of this run (empty outside Hydra)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _log_to_file(path: Path) -> logging.Handler:
    """The run's train.log, appended to (a resumed run continues it), as Hydra's job log writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    return handler


def per_device_batch_size(global_batch_size: int, world_size: int, accumulate: int = 1) -> int:
    """The batch each process loads so that one optimiser step sees ``global_batch_size`` samples."""
    shares = world_size * accumulate
    if global_batch_size % shares:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by world size {world_size} x "
            f"accumulate_grad_batches {accumulate} = {shares}; choose a multiple of {shares}"
        )
    return global_batch_size // shares


def check_data_cacheable(cfg: DictConfig) -> None:
    """Refuse cache_dir for a data module that says why it cannot train from a cache (``cache_refusal``)."""
    from hydra.utils import get_class

    target = OmegaConf.select(cfg, "data.module._target_", default=None)
    refusal = getattr(get_class(target), "cache_refusal", None) if target else None
    if refusal:
        raise ValueError(refusal)


def check_image_condition_data(model: DiffusionModule, datamodule: Any) -> None:
    """The data gives what the image condition reads (a conditioning image, a mask), checked on its
    first training item before the run starts; a cache's fields are checked by its fingerprint."""
    condition = model.image_condition
    dataset = datamodule.dataset("train") if condition is not None and hasattr(datamodule, "dataset") else None
    if dataset is None or not len(dataset):
        return
    item = dataset[0]
    missing = [key for key in condition.needs if key not in item]
    if missing and not all(name in item for name in condition.fields):
        raise ValueError(f"image_condition={condition.name} reads {list(condition.needs)} of each sample, and the data "
                         f"({type(datamodule).__name__}) gives no {missing}: {condition.hint}")


def check_adapter_cacheable(cfg: DictConfig, model: DiffusionModule) -> None:
    """Refuse ``cache_dir`` when the adapter trains what a cache would fix (Textual Inversion's token rows),
    or the image condition changes every epoch (inpainting's random masks)."""
    refusal = getattr(model.image_condition, "cache_refusal", None)
    if cfg.get("cache_dir") and refusal:
        raise ValueError(f"cache_dir={cfg.cache_dir}: {refusal}")
    if cfg.get("cache_dir") and not model.adapter.conditions_fixed:
        raise ValueError(f"cache_dir={cfg.cache_dir}: adapter={model.adapter.name} trains the text encoder's new "
                         "token embeddings, so the text embeddings of a caption change every step and cannot be read "
                         "from a cache; leave cache_dir out (the captions are then encoded each step)")


def cache_fingerprint(cfg: DictConfig, model: DiffusionModule) -> dict[str, Any]:
    """What a cache of this configuration depends on: the encoders (their weights' hashes), the
    data and its transforms, and the dtype it is stored in; not the batch size or the loader's workers."""
    dtype = cfg.get("cache_dtype", "float32")
    check_cache_dtype(dtype)
    data = OmegaConf.to_container(cfg.data.module, resolve=True)
    for key in ("batch_size", "num_workers"):
        data.pop(key, None)
    if data.get("annotator"):  # an annotator with weights (depth): their hashes, not only the model's name
        from diffusion.data.annotators import annotator_identity

        if (identity := annotator_identity(data["annotator"], data.get("annotator_options"))) is not None:
            data["annotator_weights"] = identity
    autoencoder = model.autoencoder.fingerprint() if model.autoencoder is not None else {"class": "none"}
    image_condition = model.image_condition.fingerprint() if model.image_condition is not None else None
    return {"autoencoder": autoencoder, "conditioner": model.conditioner.fingerprint(), "data": data,
            "image_shape": list(model.image_shape), "dtype": dtype,
            **({"image_condition": image_condition} if image_condition is not None else {})}


CACHE_KEYS = {"train": -2, "val": -3}  # key the cache's posterior draws apart from training's


def cache(cfg: DictConfig) -> Path:
    """Encode the configured data once (latents and conditions) into ``cfg.cache_dir/{train,val}``, on
    ``cache_device`` (auto: the GPU when there is one), in batches of data.module.batch_size."""
    from tqdm import tqdm

    from diffusion.precision import resolve_device

    if not cfg.get("cache_dir"):
        raise ValueError("pass cache_dir=PATH: where the cache is written (and later read by train.py cache_dir=PATH)")
    check_data_cacheable(cfg)
    device = resolve_device(cfg.get("cache_device", "auto"), key="cache_device")
    model = build_module(cfg).eval().to(device)
    check_adapter_cacheable(cfg, model)
    datamodule = instantiate(cfg.data.module)
    fingerprint = cache_fingerprint(cfg, model)

    for split in ("train", "val"):
        dataset = datamodule.dataset(split)
        if dataset is None or not len(dataset):
            continue
        with tqdm(total=len(dataset), desc=f"cache {split}", unit="img", dynamic_ncols=True) as bar:
            def encode(batch: dict[str, Any]) -> dict[str, Tensor]:
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                # A posterior draw is keyed to the sample's index: a cache resumed after a kill holds the
                # latents an uninterrupted pass would have written.
                index = batch["index"].tolist() if "index" in batch else None
                key = (cfg.seed, CACHE_KEYS[split]) if index is not None else None
                latent = model.latents(batch, key, positions=index)
                images = model.image_condition.cache(batch, model.encode_condition) if model.image_condition else {}
                encoded = {"latent": latent, **model.conditioner.cache(batch), **images,
                           **{k: batch[k] for k in MICRO_KEYS if k in batch}}  # SDXL's image sizes
                bar.update(len(encoded["latent"]))
                return {k: v.cpu() for k, v in encoded.items()}

            write_cache(dataset, Path(cfg.cache_dir) / split, encode, fingerprint,
                        shard_size=cfg.get("cache_shard_size", 1024), batch_size=cfg.data.module.batch_size,
                        dtype=fingerprint["dtype"])
    if (class_names := getattr(datamodule, "class_names", None)) is not None:  # a run from the cache keeps them
        write_class_names(cfg.cache_dir, class_names)
    return Path(cfg.cache_dir)


def load_module(path: str | Path) -> DiffusionModule:
    """Rebuild the module a checkpoint was trained with (from the config it carries) and load
    its weights; a checkpoint of another model, or of other frozen encoders, is refused."""
    checkpoint = read_checkpoint(path)
    config = checkpoint["run_config"]
    if "vlb_weight" not in config.get("model", {}):  # written before the hybrid loss existed: trained without it
        config = {**config, "model": {**config["model"], "vlb_weight": 0.0}}
    model = build_module(OmegaConf.create(config))
    model.run_config = config
    model.check_checkpoint(checkpoint, f"checkpoint {path}")
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def sample(cfg: DictConfig, *, out_key: str = "out", num_in_name: bool = False) -> Path:
    """A sampling job (diffusion.sampling_job): ``num`` images into the directory ``cfg[out_key]``, on this
    process's device, split over the processes of torchrun or srun; returns the samples.npz written.

    The default directory is ``<run dir>/samples/<sampler>_<steps>_cfg<w>_seed<s>`` (``_num<N>`` appended
    with ``num_in_name``: evaluate.py's, so that evaluations of different sizes do not share one)."""
    from diffusion import sampling_job as job
    from diffusion import sampling_options as opts
    from diffusion.files import file_sha256
    from diffusion.precision import process_env, resolve_device, resolve_precision
    from diffusion.samplers import PerSampleNoise, get_sampler
    from diffusion.sampling_inputs import load_inputs

    for key, what in (("num", "the number of images to sample"), ("batch_size", "the images of a batch")):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"{key}={cfg.get(key)}: {what} must be an integer >= 1")
    rank, world_size, local_rank = process_env()
    device = resolve_device(cfg.get("device", "auto"), local_rank)
    precision = resolve_precision(cfg.get("precision", "auto"), device)
    path = checkpoint_to_load(cfg.ckpt)
    model = load_module(path).to(device)
    args = opts.resolve(cfg, model, path, device, precision)
    inputs = load_inputs(cfg, model)  # control=, image= and mask=, ip_image=
    if inputs is not None:
        args.manifest["inputs"] = inputs.manifest
    if cfg.get("ip_scale") is not None:  # the image prompt's attention weight (1 as trained)
        from diffusion.ip_adapter import set_ip_scale

        for backbone in (model.backbone, model.ema.module):
            set_ip_scale(backbone, cfg.ip_scale)
        args.manifest["ip_scale"] = float(cfg.ip_scale)
    if cfg.get("control_scale") is not None:  # the ControlNets' residual scale(s), the run's without it
        from diffusion.controlnet import set_control_scale

        scale = OmegaConf.to_object(cfg.control_scale) if OmegaConf.is_config(cfg.control_scale) else cfg.control_scale
        set_control_scale(model, scale)
        args.manifest["control_scale"] = scale
    name = f"{args.sampler}_{args.steps}_cfg{args.cfg_scale:g}_seed{cfg.seed}" + (f"_num{cfg.num}" if num_in_name else "")
    out = Path(cfg[out_key]) if cfg.get(out_key) else run_of(path) / "samples" / name
    job.check_manifest(out, args.manifest, out_key=out_key)

    calls: list[int] = []  # backbone calls of each batch: the model evaluations of an image
    sampler = get_sampler(args.sampler, **args.options) if args.options else args.sampler  # with its options bound

    def draw(indices: range) -> Tensor:
        noise = PerSampleNoise([opts.noise_seed(cfg.seed, i) for i in indices])
        condition = None if args.conditions is None else args.conditions[indices.start:indices.stop]
        count = len(calls)
        calls.append(0)
        hook = model.ema.module.register_forward_pre_hook(lambda *_: calls.__setitem__(count, calls[count] + 1))
        try:
            return model.sample(len(indices), condition, sampler=sampler, steps=args.steps,
                                cfg_scale=args.cfg_scale, generator=noise, grid=args.grid, eta=args.eta,
                                precision=precision, progress=False,
                                inputs=inputs.batch(indices) if inputs is not None else None)
        finally:
            hook.remove()

    job.run_shard(out, cfg.num, rank, world_size, cfg.batch_size, draw, png=cfg.png, progress=cfg.progress)
    if rank != 0:
        return out / "samples.npz"  # process 0 gathers
    if not calls:  # every batch was sampled before a resume: count on one image
        draw(range(1))
    record = {**args.manifest, "ckpt_sha256": file_sha256(path), "labels_mode": args.mode,
              "model_evaluations": calls[0],  # backbone calls per image (a guided call computes both branches)
              "grid_times": args.times.tolist(), "world_size": world_size, "batch_size": int(cfg.batch_size),
              "code_version": job.code_version(), "uint8": "ADM: ((x + 1) * 127.5).clamp(0, 255) cast to uint8 "
              "(truncates)", "image_shape": list(model.image_shape), "num_classes": model.num_classes}
    stored = None if args.conditions is None else ("prompts" if args.mode == "prompts" else "labels", args.conditions)
    npz = job.write_outputs(out, job.gather(out, cfg.num), stored, record)
    print(f"wrote {npz}, {out / 'grid.png'} and {out / 'samples.json'} ({cfg.num} images, sampler {args.sampler}, "
          f"{args.steps} steps, cfg_scale {args.cfg_scale:g}, {precision} on {device})")
    return npz


#: The files export.py writes a diffusers UNet's LoRA as (lora_format=).
LORA_FORMATS = ("diffusers", "kohya")


def export(cfg: DictConfig) -> Path:
    """The EMA weights of a checkpoint as ``ema.safetensors``, beside the resolved ``config.yaml``
    that rebuilds the backbone (``build_module(OmegaConf.load(config.yaml)).backbone``).

    A LoRA is merged into its base weights there (and config.yaml says adapter=full). A wrapped
    diffusers model (SD's UNet, SD3's or FLUX's transformer) is also written as diffusers saves it,
    ``unet/`` or ``transformer/`` (``from_pretrained`` reads it; the LoRA merged), and its LoRA as
    diffusers' ``pytorch_lora_weights.safetensors`` (the pipeline's ``load_lora_weights`` reads it), or
    with ``lora_format=kohya`` a UNet's LoRA in kohya's layout, ``lora_kohya.safetensors`` (ComfyUI's).
    An adapter's own files are written beside them (Textual Inversion: ``learned_embeds.safetensors``)."""
    from safetensors.torch import save_file

    from diffusion._checks import check_choice
    from diffusion.adapters import LoRA, diffusers_model, merged, save_diffusers_lora, save_kohya_lora

    lora_format = cfg.get("lora_format", "diffusers")
    check_choice("lora_format", lora_format, LORA_FORMATS)
    path = checkpoint_to_load(cfg.ckpt)
    model = load_module(path)
    if isinstance(model.adapter, LoRA) and model.adapter.base_dtype != "float32":
        # Merge into the base as built (float32, the weights the sha256 names), not into its bf16 copy.
        config = {**model.run_config, "adapter": {**model.run_config["adapter"], "base_dtype": "float32"}}
        rebuilt = build_module(OmegaConf.create(config))
        rebuilt.run_config = model.run_config
        if rebuilt.base_weights_sha256 != model.base_weights_sha256:
            raise ValueError(f"checkpoint {path}: its float32 base rebuilt from the run's config has another sha256")
        rebuilt.load_state_dict(read_checkpoint(path)["state_dict"])
        model = rebuilt.eval()
    backbone, config, written = model.ema.module, dict(model.run_config), ["ema.safetensors", "config.yaml"]
    unet_lora = isinstance(model.adapter, LoRA) and type(backbone).__name__ == "DiffusersUNet"
    if lora_format == "kohya" and not unet_lora:  # asked for by name: say why no such file comes
        raise ValueError(f"lora_format=kohya: checkpoint {path} holds adapter={model.adapter.name} on "
                         f"{type(backbone).__name__}; the kohya file is written for adapter=lora on a diffusers "
                         "UNet (backbone=sd15_unet, sd21_unet, sdxl_unet); leave lora_format out")
    out = Path(cfg.out) if cfg.out else run_of(path) / "export"
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model.adapter, LoRA):
        if unet_lora and lora_format == "kohya":
            written.append(save_kohya_lora(backbone, model.adapter, out / "lora_kohya.safetensors").name)
        elif diffusers_model(backbone) is not None:
            written.append(save_diffusers_lora(backbone, model.adapter, out).name)
        backbone, config["adapter"] = merged(backbone), {"_target_": "diffusion.adapters.Full"}
    written += [p.name for p in model.adapter.write_outputs(model, out)]
    weights = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    save_file(weights, out / "ema.safetensors", metadata={"source": str(path)})
    if (wrapped := diffusers_model(backbone)) is not None:
        name, diffusers_module = wrapped
        if type(model.adapter).__name__ == "IPAdapter":  # unet/ is the base; the adapter is ip_adapter.safetensors
            from diffusion.ip_adapter import without_ip_adapter

            name, diffusers_module = diffusers_model(without_ip_adapter(backbone))
        diffusers_module.save_pretrained(out / name, safe_serialization=True)
        written.append(f"{name}/")
    OmegaConf.save(OmegaConf.create(config), out / "config.yaml")
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    return out
