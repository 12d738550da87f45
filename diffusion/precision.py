"""Where and in which precision a command runs: ``device=auto|cpu|cuda|cuda:N`` and
``precision=auto|32|bf16``, resolved once so the rest of the code receives a torch.device and a
dtype (or None: full float32)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion._checks import check_choice

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("auto", "32", "bf16")


def resolve_device(device: str | None, local_rank: int | None = None, key: str = "device") -> torch.device:
    """``auto``: the GPU when there is one (under torchrun/srun, process ``local_rank``'s GPU), else the
    CPU; ``cuda`` likewise picks the local rank's GPU; ``cuda:N`` is that GPU."""
    name = "auto" if device is None else str(device)
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"{key}={name!r} is not supported; allowed values: {', '.join(map(repr, DEVICES))}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"{key}={name!r}: CUDA is not available on this machine; pass {key}=cpu or {key}=auto")
    if name in ("auto", "cuda"):
        index = (local_rank or 0) % torch.cuda.device_count()
        return torch.device("cuda", index)
    if int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"{key}={name!r}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0.."
                         f"cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (Sapphire Rapids and later), where bf16 matmuls are fast."""
    probe = getattr(getattr(torch._C, "_cpu", None), "_is_amx_tile_supported", None)
    if probe is not None:
        with contextlib.suppress(Exception):
            return bool(probe())
    with contextlib.suppress(OSError):
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    return False


def resolve_precision(precision: str | int | None, device: torch.device) -> str:
    """``"32"`` or ``"bf16"``. ``auto``: bf16 on a GPU that supports it and on a CPU with AMX, 32 otherwise."""
    name = check_choice("precision", "auto" if precision is None else str(precision), PRECISIONS)
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "32"
    return "bf16" if device.type == "cpu" and cpu_has_amx() else "32"


def autocast_backbone(backbone: Callable[..., Tensor], device: torch.device, precision: str) -> Callable[..., Tensor]:
    """The backbone under ``torch.autocast(bfloat16)`` for bf16, its outputs back in float32 so that the
    sampler's updates (and the noise they add) stay in float32; the backbone itself for 32.
    Autocast rather than bf16 weights: the weights, normalisations and softmaxes stay float32 and only
    the matmuls and convolutions run in bf16, with a third of the error. On this project's AVX2 CPU bf16
    weights were 1.01-1.04x faster than autocast, and both ran at 0.16-0.17x float32's speed
    (benchmarks/sample_speed.py)."""
    if precision == "32":
        return backbone

    def run(*args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return backbone(*args, **kwargs).float()

    return run


def process_env(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` of this process: torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else
    srun's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, else (0, 1, 0)."""
    env = os.environ if environ is None else environ
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in env and world in env:
            values = int(env[rank]), int(env[world]), int(env.get(local, 0))
            if not 0 <= values[0] < values[1]:
                raise ValueError(f"{rank}={values[0]} is not in 0..{world}-1={values[1] - 1}")
            return values
    return 0, 1, 0

