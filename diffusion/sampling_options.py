"""What sample.py's arguments mean, checked before anything is sampled: every image's condition
(labels or prompts), the time grid by name, and ``eta``. Each image's random draws are keyed to
``(seed, its index)``, so none of them depends on the batch or the process it is drawn in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf
from torch import Tensor

from diffusion._checks import check_choice
from diffusion.samplers import get_sampler, grids
from diffusion.schedules import Schedule
from diffusion.training.randomness import sample_seed

@dataclass
class SamplingArgs:
    """sample.py's arguments, resolved against the checkpoint's run and checked."""

    sampler: str
    options: dict[str, Any]  # the sampler group's own options (e.g. sde's diffusion_form), checked
    steps: int
    cfg_scale: float
    grid: Callable[[int], Tensor] | None  # None: the run's own
    times: Tensor  # the grid at ``steps``
    eta: float | None
    mode: str  # of the conditions: cycle | uniform | list | prompts | none
    conditions: list | None  # every image's label or prompt
    manifest: dict[str, Any]  # what decides the images: a resumed job must match it


def resolve(cfg: Any, model: Any, ckpt: Path, device: Any, precision: str) -> SamplingArgs:
    """The job's arguments from sample.py's config ``cfg`` and the loaded ``model``; ValueError names a bad one."""
    chosen = cfg.get("sampler") or {}  # the sampler group, if one was picked on the command line
    sampler = chosen.get("name") or model.sampling.sampler
    steps = int(cfg.steps or chosen.get("steps") or model.sampling.steps)
    cfg_scale = float(cfg.cfg_scale if cfg.cfg_scale is not None else model.sampling.cfg_scale)  # the run's guidance
    grid = named_grid(cfg.get("grid"), model.schedule, cfg.get("grid_shift"))
    eta = check_eta(cfg.get("eta"), sampler)
    options = sampler_group_options(chosen, sampler)
    mode, values = conditions(model.conditioner.takes, model.num_classes, cfg.num, cfg.seed, cfg.labels,
                              cfg.get("prompts"), source=str(ckpt))
    times = (grid or model.sampling.grid)(steps)  # a grid that cannot be made (e.g. too many steps): refused here
    stat = ckpt.stat()
    manifest = {"ckpt": str(ckpt.resolve()), "ckpt_size": stat.st_size, "ckpt_mtime_ns": stat.st_mtime_ns,
                "sampler": sampler, "steps": steps, "grid": cfg.get("grid") or "run", "eta": eta,
                "cfg_scale": cfg_scale, "seed": int(cfg.seed), "precision": precision, "device": device.type,
                "num": int(cfg.num), "labels": as_list("labels", cfg.labels) if mode == "list" else mode,
                "prompts": None if cfg.get("prompts") is None else as_list("prompts", cfg.prompts),
                "png": bool(cfg.get("png", False))}
    if cfg.get("grid") == "shifted":
        manifest["grid_shift"] = float(cfg.grid_shift)
    if options:  # only then, so that the jobs of the samplers without options resume as they were
        manifest["sampler_options"] = options
    return SamplingArgs(sampler, options, steps, cfg_scale, grid, times, eta, mode, values, manifest)


def sampler_group_options(chosen: Any, sampler: str) -> dict[str, Any]:
    """The options the sampler group sets besides its name and steps (conf/sampler/sde.yaml's
    diffusion_form, ...), as plain values; ValueError if ``sampler`` takes no such option."""
    options = {key: value for key, value in dict(chosen).items() if key not in ("name", "steps")}
    options = OmegaConf.to_container(OmegaConf.create(options)) if options else {}
    get_sampler(sampler, **options)  # refuses an option the sampler does not take
    return options


LABEL_KEY = 0x1ABE1  # keys the label draws apart from the noise of the same image
LABEL_MODES = ("uniform",)  # besides null (cycle the classes) and an explicit list
GRIDS = ("uniform", "shifted", "karras", "trailing", "linspace", "leading")
TAKE_ETA = ("ddim", "euler_ancestral", "dpmpp_2m_sde")  # ancestral is ddim with eta = 1; sde has its own
# diffusion_form; the others are deterministic


def noise_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s initial noise and of every noise the sampler adds to it."""
    return sample_seed(seed, index)


def uniform_labels(seed: int, indices: Sequence[int], num_classes: int) -> list[int]:
    """Uniform random classes as DiT's sample_ddp.py draws them, but each image's from its own key."""
    return [int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(
        sample_seed(seed, i, LABEL_KEY))).item()) for i in indices]


def conditions(takes: str | None, num_classes: int | None, num: int, seed: int, labels: Any = None,
               prompts: Any = None, source: str = "this checkpoint") -> tuple[str, list | None]:
    """``(mode, every image's condition)``: mode "cycle" | "uniform" | "list" for labels, "prompts" or
    "none"; the conditions are num labels (ints) or prompts (strings), None for an unconditional model."""
    if labels is not None and prompts is not None:
        raise ValueError("give labels= or prompts=, not both")
    given = "labels" if labels is not None else "prompts" if prompts is not None else None
    if given is not None and given != takes:
        what = {"labels": f"class labels 0..{(num_classes or 1) - 1}", "prompts": "text prompts"}.get(takes)
        raise ValueError(f"{source} is a model conditioned on {what or 'nothing (unconditional)'}, so {given}= does "
                         "not apply; " + (f"sample it with {takes}=[...]" if takes else f"leave {given}= out"))
    if takes is None:
        return "none", None
    if takes == "prompts":
        asked = [""] if prompts is None else as_list("prompts", prompts)
        if not all(isinstance(p, str) for p in asked):
            raise ValueError(f"prompts={asked!r}: give a list of strings, e.g. prompts='[\"a red circle\"]'")
        return "prompts", _repeat(asked, num)
    if labels is None:
        return "cycle", [i % num_classes for i in range(num)]
    if isinstance(labels, str):
        if labels not in LABEL_MODES:
            raise ValueError(f"labels={labels!r} is not supported; give a list of classes (e.g. labels=[1,2]), "
                             f"'uniform' (random classes), or leave it out (cycle 0..{num_classes - 1})")
        return labels, uniform_labels(seed, range(num), num_classes)
    asked = as_list("labels", labels)
    bad = [v for v in asked if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < num_classes]
    if bad or not asked:
        raise ValueError(f"labels={asked!r}: need class labels in 0..{num_classes - 1} ({source} has "
                         f"{num_classes} classes){'; out of range: ' + repr(bad) if bad else ''}")
    return "list", _repeat(asked, num)


def as_list(key: str, values: Any) -> list:
    if isinstance(values, (str, int)):
        values = [values]
    try:
        return list(values)
    except TypeError:
        raise ValueError(f"{key}={values!r}: give a list, e.g. {key}=[...]") from None


def _repeat(values: list, num: int) -> list:
    """``values`` repeated to ``num`` items."""
    return (values * ((num + len(values) - 1) // len(values)))[:num]


def named_grid(name: str | None, schedule: Schedule, shift: float | None = None) -> Callable[[int], Tensor] | None:
    """The sampler's time grid ``steps -> times`` called ``name`` (None: the run's own)."""
    if name is None:
        return None
    check_choice("grid", name, GRIDS)
    if name == "uniform":
        return grids.uniform
    if name == "shifted":
        if shift is None:
            raise ValueError("grid=shifted needs grid_shift= (e.g. grid_shift=3.0, SD3's value)")
        return partial(grids.shifted, shift=float(shift), schedule=schedule)
    if name == "karras":
        return partial(grids.karras, schedule=schedule)
    num_train_steps = getattr(schedule, "num_steps", None)
    if num_train_steps is None:
        raise ValueError(f"grid={name} spaces the training steps of a discrete (DDPM) schedule, and this checkpoint's "
                         f"{type(schedule).__name__} has none; use grid=uniform, shifted or karras")
    return partial(grids.ddpm, spacing=name, num_train_steps=int(num_train_steps))


def check_eta(eta: float | None, sampler: str) -> float | None:
    if eta is None:
        return None
    if sampler not in TAKE_ETA:
        raise ValueError(f"eta={eta} applies to sampler={', '.join(TAKE_ETA)} only; sampler={sampler} ignores it "
                         "(ancestral is ddim with eta=1): leave eta out, or pass sampler=ddim")
    if not 0 <= float(eta) <= 1:
        raise ValueError(f"eta={eta}: must be in [0, 1] (0: deterministic, e.g. DDIM; 1: fully stochastic, e.g. DDPM "
                         "ancestral)")
    return float(eta)
