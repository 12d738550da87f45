"""The released DiT (Peebles & Xie 2023) and SiT (Ma et al. 2024) weights as checkpoints of this
project: ``python convert.py src=DiT-XL-2-256x256.pt out=dit_xl_2.ckpt``.

Both repositories save one layout (their models.py share it): a plain state dict, or train.py's
``{"model", "ema", "opt", "args"}`` (the EMA weights are taken). Its names are our DiT's but for
the label table, and its sizes are read off its shapes. What differs is the theory around it:

- DiT embeds the integer DDPM step ``i``; our DDPM puts step ``i`` at ``t = (i + 1) / N``, so the
  converted backbone embeds ``N t - 1`` (``time_scale=N, time_shift=-1``) and predicts eps as it did;
- SiT's time is 1 at the data and 0 at the noise, ours the reverse: it embeds ``1 - t``
  (``time_scale=-1, time_shift=1``); its velocity ``data - noise`` is minus ours
  (diffusion.schedules.FlowMatching: ``xT - x0``), so the final linear's prediction rows are negated.

Both have 2C output channels (``learn_sigma``): DiT's variance, and SiT's, which its forward drops.
They are kept, and our DiT returns the C prediction channels; DiT's variance is read by
sampler=ddpm_learned (diffusion.variance) and trained on by the hybrid loss, SiT's is left
untrained (model.vlb_weight=0) as SiT leaves it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from diffusion._checks import check_choice
from diffusion.backbones.dit import DiT
from diffusion.backbones.layers import sincos_pos_embed_2d
from diffusion.backbones.registry import DIT_CONFIGS
from diffusion.files import file_sha256, write_atomic

log = logging.getLogger(__name__)

FORMATS = ("dit", "sit")
EXPERIMENTS = {"dit": "imagenet256_dit_xl_2", "sit": "imagenet256_sit_xl_2"}  # the theories they were trained with
# Heads by hidden size: the paper's sizes of the registry (Peebles & Xie 2023, Table 1; SiT uses the same).
HEADS_BY_HIDDEN = {c["hidden_size"]: c["num_heads"] for name, c in DIT_CONFIGS.items() if name.startswith("DiT-")}
# The keys every file of the layout has, whatever its size; the others follow from these.
ANCHORS = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
           "blocks.0.attn.qkv.weight", "final_layer.linear.weight")
RENAMES = {"y_embedder.embedding_table.weight": "y_embedder.table.weight"}  # theirs -> ours; the rest are equal
CONF = str(Path(__file__).resolve().parents[1] / "conf")


@dataclass(frozen=True)
class Sizes:
    """The DiT constructor arguments a file's shapes give, and the side of its position grid."""

    in_channels: int
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float
    num_classes: int
    learn_sigma: bool
    frequency_dim: int
    grid: int | None  # patches per side of the training resolution (from pos_embed), if stored


# -- reading ----------------------------------------------------------------------------------------
def read_released(path: str | os.PathLike) -> tuple[dict[str, Tensor], Any, str | None]:
    """(state dict, train.py's args or None, the entry taken or None) of a DiT / SiT file, read
    without running code (``weights_only``; train.py's args are an argparse Namespace, allowed)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"src={path} does not exist; pass the released .pt file (e.g. DiT-XL-2-256x256.pt)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:  # memory-mapped: the weights are read once, when converted
                raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # a file of torch's legacy (pre-zip) format cannot be mapped
                if "mmap" not in str(e):
                    raise
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for files that are not checkpoints
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"src={path} is not a readable torch checkpoint (torch.load: {reason})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"src={path} holds a {type(raw).__name__}, not a state dict of DiT or SiT")
    entry = "ema" if "ema" in raw else "model" if "model" in raw else None  # train.py's saves: EMA preferred
    state = raw[entry] if entry else raw
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"src={path}: {entry or 'the file'} is not a state dict of tensors")
    return dict(state), raw.get("args") if entry else None, entry


def detect_format(given: str, state: dict[str, Tensor], args: Any, path: str | os.PathLike) -> str:
    """``given`` unless "auto". Both layouts are the same, so auto reads train.py's args.model, else
    the file name (DiT-XL-2-256x256.pt, SiT-XL-2-256x256.pt), else the variance head: SiT's forward
    drops it, so it never trains and stays at its zero initialisation."""
    check_choice("format", given, ("auto", *FORMATS))
    if given != "auto":
        return given
    model = args.get("model") if isinstance(args, dict) else getattr(args, "model", None)
    if isinstance(model, str) and model[:3].lower() in FORMATS:
        return model[:3].lower()
    named = set(re.findall(r"(?<![a-z])(dit|sit)(?![a-z])", Path(path).name.lower()))
    if len(named) == 1:
        return named.pop()
    weight, embed = state.get("final_layer.linear.weight"), state.get("x_embedder.proj.weight")
    if weight is not None and embed is not None and weight.shape[0] == 2 * embed.shape[1] * embed.shape[2] ** 2:
        channels = embed.shape[1]
        rows = weight.unflatten(0, (-1, 2 * channels))[:, channels:]  # (p p, C, hidden): the variance rows
        decided = "sit" if not rows.any() else "dit"
        log.info("format=auto: %s (the variance head is %s)", decided, "all zero" if decided == "sit" else "trained")
        return decided
    raise ValueError(f"cannot tell whether {path} holds DiT or SiT weights (same layout, no args, no name): "
                     "pass format=dit or format=sit")


def infer_sizes(state: dict[str, Tensor], num_heads: int | None = None, source: str = "src") -> Sizes:
    """The sizes of a DiT / SiT state dict, and every one of its shapes checked against them."""
    missing = [k for k in ANCHORS if k not in state]
    if missing:
        raise ValueError(f"{source} is not a DiT or SiT state dict: it lacks {', '.join(missing)} (has "
                         f"{', '.join(sorted(state)[:5])}{' ...' if len(state) > 5 else ''})")
    hidden, in_channels, patch, patch_w = state["x_embedder.proj.weight"].shape
    if patch != patch_w:
        raise ValueError(f"{source}: x_embedder.proj.weight has non-square patches {patch}x{patch_w}")
    out = state["final_layer.linear.weight"].shape[0]
    if out not in (patch * patch * in_channels, 2 * patch * patch * in_channels):
        raise ValueError(f"{source}: final_layer.linear.weight has {out} rows; patch {patch} and {in_channels} "
                         f"channels give {patch * patch * in_channels}, or twice that with a variance head")
    if num_heads is None:
        if hidden not in HEADS_BY_HIDDEN:
            raise ValueError(f"{source}: hidden size {hidden} is none of DiT's "
                             f"({', '.join(map(str, sorted(HEADS_BY_HIDDEN)))}); pass num_heads=N")
        num_heads = HEADS_BY_HIDDEN[hidden]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = None
    if "pos_embed" in state:
        grid = math.isqrt(state["pos_embed"].shape[-2])
        if grid * grid != state["pos_embed"].shape[-2]:
            raise ValueError(f"{source}: pos_embed holds {state['pos_embed'].shape[-2]} positions, not a square grid")
    sizes = Sizes(in_channels=in_channels, patch_size=patch, hidden_size=hidden, depth=depth, num_heads=num_heads,
                  mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden if "blocks.0.mlp.fc1.weight" in state
                  else 4.0, num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
                  learn_sigma=out != patch * patch * in_channels,
                  frequency_dim=state["t_embedder.mlp.0.weight"].shape[1], grid=grid)
    _check_layout(state, sizes, source)
    return sizes


def _check_layout(state: dict[str, Tensor], sizes: Sizes, source: str) -> None:
    """Every key of the layout, of the shape the sizes give, and no other; pos_embed DiT's fixed sin-cos."""
    with torch.device("meta"):
        expected = {_theirs(k): v.shape for k, v in _backbone(sizes).state_dict().items()}
    if sizes.grid is not None:
        expected["pos_embed"] = torch.Size((1, sizes.grid**2, sizes.hidden_size))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(s)})" for k, s in expected.items()
             if k in state and state[k].shape != s]
    if missing or unexpected or wrong:
        show = lambda names: ", ".join(names[:6]) + (" ..." if len(names) > 6 else "") if names else "none"  # noqa: E731
        raise ValueError(f"{source} does not fit a DiT of the sizes its shapes give ({_describe(sizes)}): missing "
                         f"{show(missing)}; unexpected {show(unexpected)}; shape differs {show(wrong)}")
    if sizes.grid is not None:
        ours = sincos_pos_embed_2d(sizes.hidden_size, sizes.grid, sizes.grid)
        if not torch.allclose(state["pos_embed"][0].float(), ours, atol=1e-5):
            raise ValueError(f"{source}: pos_embed is not DiT's fixed 2-D sin-cos table (learned positions?); "
                             "our DiT computes those positions and has no other")


def _theirs(ours: str) -> str:
    return next((k for k, v in RENAMES.items() if v == ours), ours)


def _describe(sizes: Sizes) -> str:
    return (f"depth {sizes.depth}, hidden {sizes.hidden_size}, {sizes.num_heads} heads, patch {sizes.patch_size}, "
            f"{sizes.in_channels} channels, {sizes.num_classes} classes, learn_sigma {sizes.learn_sigma}")


def _backbone(sizes: Sizes, **kwargs: Any) -> DiT:
    args = {k: v for k, v in asdict(sizes).items() if k != "grid"}
    return DiT(**args, **kwargs)


# -- the theory around the weights ------------------------------------------------------------------
def time_map(fmt: str, num_steps: int | None) -> dict[str, float]:
    """What our t (0 data, 1 noise) must be embedded as for the released weights' time axis."""
    if fmt == "dit":  # the integer DDPM step i = N t - 1 (diffusion.schedules.DDPM: t = (i + 1) / N)
        return {"time_scale": float(num_steps), "time_shift": -1.0}
    return {"time_scale": -1.0, "time_shift": 1.0}  # SiT's t = 1 - ours, embedded without a factor


def to_ours(state: dict[str, Tensor], sizes: Sizes, fmt: str) -> dict[str, Tensor]:
    """Their state dict in our DiT's names (float32); SiT's prediction rows negated (on a copy: the
    source may be memory-mapped)."""
    ours = {RENAMES.get(k, k): v.float() for k, v in state.items() if k != "pos_embed"}
    if fmt == "sit":  # our velocity xT - x0 is minus SiT's x1 - x0 (x1 its data): negate the prediction rows
        out_channels = 2 * sizes.in_channels if sizes.learn_sigma else sizes.in_channels
        predicted = (torch.arange(ours["final_layer.linear.bias"].shape[0]) % out_channels) < sizes.in_channels
        sign = 1 - 2 * predicted.float()  # rows are (p q c), c fastest
        ours["final_layer.linear.weight"] = ours["final_layer.linear.weight"] * sign[:, None]
        ours["final_layer.linear.bias"] = ours["final_layer.linear.bias"] * sign
    return ours


def _check_theory(fmt: str, schedule: DictConfig) -> int | None:
    """The run's schedule is the one the weights were trained for; DiT's number of steps N."""
    wanted = {"dit": ("diffusion.schedules.DDPM", "eps"), "sit": ("diffusion.schedules.FlowMatching", "velocity")}[fmt]
    target = schedule.get("_target_")
    defaults = {"diffusion.schedules.DDPM": "eps", "diffusion.schedules.FlowMatching": "velocity"}  # their __init__'s
    found = (target, schedule.get("prediction", defaults.get(target)))
    if found != wanted:
        raise ValueError(f"{fmt} weights predict {wanted[1]} on {wanted[0].rsplit('.', 1)[1]}, the run's schedule is "
                         f"{found[0]} with prediction {found[1]}; leave the experiment's schedule (overrides=[...])")
    return int(schedule.num_steps) if fmt == "dit" else None


def backbone_overrides(sizes: Sizes, fmt: str, num_steps: int | None) -> dict[str, Any]:
    """The backbone config keys of the converted model: a registry size by name where one matches,
    learn_sigma and the time map; what fine-tuning must set too (diffusion.cli._train checks)."""
    shape = dict(depth=sizes.depth, hidden_size=sizes.hidden_size, num_heads=sizes.num_heads, patch_size=sizes.patch_size)
    name = next((n for n, c in DIT_CONFIGS.items() if c == shape and n.startswith("dit_")), None)
    found: dict[str, Any] = {"name": name} if name else shape  # else the experiment's name, every size set
    if sizes.mlp_ratio != 4.0:
        found["mlp_ratio"] = sizes.mlp_ratio
    if sizes.frequency_dim != 256:
        found["frequency_dim"] = sizes.frequency_dim
    return {**found, "learn_sigma": sizes.learn_sigma, **time_map(fmt, num_steps)}


# -- the checkpoint ---------------------------------------------------------------------------------
def convert(cfg: DictConfig) -> Path:
    """Write ``cfg.out``: a checkpoint of this project (read by sample.py, export.py, train.py
    ckpt_path=) holding the released weights as backbone and EMA, at step 0."""
    from diffusion.cli import build_module  # the module is built as train.py builds it

    src, out = Path(cfg.src), Path(cfg.out)
    state, args, entry = read_released(src)
    sizes = infer_sizes(state, cfg.num_heads, f"src={src}")  # first: a file of another model is named as such
    fmt = detect_format(cfg.format, state, args, src)
    user = [str(o) for o in cfg.overrides]
    experiment = next((o.split("=", 1)[1] for o in user if o.startswith("experiment=")), EXPERIMENTS[fmt])
    user = [o for o in user if not o.startswith("experiment=")]
    num_steps = _check_theory(fmt, _compose([f"experiment={experiment}", *user], out).schedule.schedule)
    backbone = backbone_overrides(sizes, fmt, num_steps)
    overrides = [f"data.num_classes={sizes.num_classes}",
                 *(f"++backbone.{k}={override_value(v)}" for k, v in backbone.items()),
                 # SiT never trains its variance head; the hybrid loss of a learned variance needs DDPM
                 *(["model.vlb_weight=0"] if fmt == "sit" and sizes.learn_sigma else []), *user]
    cfg_run = _compose([f"experiment={experiment}", *overrides], out)
    model = build_module(cfg_run)
    latent = model.image_shape
    if latent[0] != sizes.in_channels:
        raise ValueError(f"src={src} takes {sizes.in_channels} latent channels, the run's vae gives {latent[0]}; "
                         """pass the autoencoder it was trained with ('overrides=["vae=..."]')""")
    given_resolution = any(o.startswith("data.module.resolution=") for o in user)
    if sizes.grid is not None and latent[1] != sizes.grid * sizes.patch_size and not given_resolution:
        # Trained at another resolution (DiT-XL-2-512x512.pt): the run's data and samples take it.
        factor = cfg_run.data.module.resolution // latent[1]
        overrides.append(f"data.module.resolution={sizes.grid * sizes.patch_size * factor}")
        cfg_run = _compose([f"experiment={experiment}", *overrides], out)
        model = build_module(cfg_run)
    weights = to_ours(state, sizes, fmt)
    del state
    model.backbone.load_state_dict(weights)
    model.ema.module.load_state_dict(weights)
    run_config = OmegaConf.to_container(cfg_run, resolve=True)
    checkpoint = {
        "state_dict": model.state_dict(),
        "run_config": run_config,
        "frozen_weights": model.frozen_weights(),
        "global_step": 0,
        "converted_from": {"path": str(src.resolve()), "sha256": file_sha256(src), "format": fmt, "entry": entry,
                           "experiment": experiment, "overrides": overrides, "backbone": backbone},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: torch.save(checkpoint, tmp))
    train = " ".join([f"experiment={experiment}", f"ckpt_path={out}", *_quoted(overrides)])
    print(f"wrote {out}: {fmt} weights ({_describe(sizes)}), the theory of experiment={experiment}\n"
          f"  sample:    python sample.py ckpt={out}\n"
          f"  fine-tune: python train.py {train} data.module.root=...")
    return out


def override_value(v: Any) -> str:
    """``v`` as a Hydra override writes it (booleans lower-case)."""
    return str(v).lower() if isinstance(v, bool) else str(v)


def _quoted(overrides: list[str]) -> list[str]:
    return [o if re.fullmatch(r"[\w.+=/:,-]+", o) else f"'{o}'" for o in overrides]


def _compose(overrides: list[str], out: Path) -> DictConfig:
    """conf/train.yaml with ``overrides``, resolvable outside a run: the run directory reads ``out``'s."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if GlobalHydra.instance().is_initialized():  # inside convert.py's @hydra.main: its search path is conf/
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    else:
        with initialize_config_dir(version_base="1.3", config_dir=CONF):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out.resolve().parent)
        cfg.hydra.job.num = 0
    hydra = HydraConfig.instance()
    previous = hydra.cfg
    hydra.set_config(cfg)  # what ${hydra:runtime.output_dir} reads (trainer, checkpoints, loggers)
    try:
        with open_dict(cfg):
            del cfg.hydra
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    finally:
        hydra.cfg = previous

