"""CPU forward + backward speed and peak memory: our backbones against diffusers'.

Pairs, each at matched parameter count (within 2 %, checked before timing):
  dit:  DiT-S/2 of the paper on both sides (32x32x4 latents, 1000 classes, learned sigma; hidden
        384, 12 blocks, 6 heads, patch 2): ours vs diffusers' DiTTransformer2DModel. Parameters are
        counted as distinct weights. DiT has one timestep and one label embedder; diffusers' class
        keeps a copy of both in every block, and its script that converts the DiT authors' weights
        writes the same tensors into each copy (scripts/convert_dit_to_diffusers.py). Counted once,
        diffusers' DiT-XL/2 has the paper's 675M parameters (raw: 750M); we print that check. With
        raw counts ours would have to be wider to match, doing more matrix work for the same
        architecture: that line (ours widened to diffusers' raw count) is timed alongside, for
        transparency, and is not the criterion.
  unet: our UNet vs diffusers' UNet2DModel, the same layout (channels 64/128/128, 2 residual
        blocks per level, attention at the 8x8 level and in the middle, scale-shift time
        embedding), unconditional; the parameter counts agree to a few hundred.
Input: batch 16 of 4x32x32 latents (SD-VAE latents of 256 px images), t uniform in [0, 1]
(diffusers gets t * 1000), MSE-style loss, `backward()`.

Time: the models of a pair live in one process and run in turn (ours-theirs, then
theirs-ours, ...) after one warm-up each, so drifting load from other processes on the shared
cores hits both alike; we report the median of each and the speed ratio
median(theirs) / median(ours): > 1 means ours is faster.

Peak memory: on the CPU there is no allocator high-water mark like CUDA's, so we measure the
operating system's view. Each measurement runs in a fresh subprocess that imports the same
modules, builds one model and its inputs, then (Linux) resets the process's peak resident set
size (writing 5 to /proc/self/clear_refs), runs exactly one forward + backward and reads the new
peak (VmHWM in /proc/self/status). Reported: peak minus the resident size just before the step,
i.e. the memory the step itself needed (activations, gradients, temporaries). One step per fresh
process, because a second step would reuse pages the allocator kept and under-report. The memory
ratio is ours / theirs: <= 1 means ours needs no more.

Run:  python benchmarks/backbone_speed.py            (default, about 4 minutes on 2 idle cores)
      python benchmarks/backbone_speed.py --pairs unet --rounds 9 --threads 1
On a machine shared with other jobs, OpenMP threads fighting for cores can slow single steps
many-fold; the alternation keeps the ratios meaningful, and --threads 1 makes them steadier.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from torch import nn

BATCH, CHANNELS, SIZE, DIT_CLASSES = 16, 4, 32, 1000
# diffusers' per-block copies of DiT's one timestep / label embedder (all but block 0's)
EMBEDDER_COPY = re.compile(r"transformer_blocks\.([1-9]\d*)\.norm1\.emb\.")


def build(model: str) -> nn.Module:
    """A benchmark model by name (see MODELS), seeded."""
    torch.manual_seed(0)
    if model in ("dit_ours", "dit_ours_raw_count"):  # DiT-S/2; or widened to diffusers' raw count
        from diffusion.backbones import DiT

        hidden = 384 if model == "dit_ours" else 420  # 420: within 2 % of the raw count
        return DiT(CHANNELS, patch_size=2, hidden_size=hidden, depth=12, num_heads=6, num_classes=DIT_CLASSES,
                   learn_sigma=True)
    if model == "dit_diffusers":
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel(
            num_attention_heads=6, attention_head_dim=64, in_channels=CHANNELS, out_channels=2 * CHANNELS,
            num_layers=12, sample_size=SIZE, patch_size=2, num_embeds_ada_norm=DIT_CLASSES,
        )  # fmt: skip
    if model == "unet_ours":
        from diffusion.backbones import UNet

        return UNet(CHANNELS, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(2,), head_dim=64)
    if model == "unet_diffusers":
        from diffusers import UNet2DModel

        return UNet2DModel(
            sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=(64, 128, 128),
            layers_per_block=2, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=64,
            resnet_time_scale_shift="scale_shift", norm_num_groups=32,
        )  # fmt: skip
    raise ValueError(f"Unknown benchmark model '{model}'.")


# pair -> (ours at matched parameter count, diffusers, extra models timed alongside)
PAIRS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dit": ("dit_ours", "dit_diffusers", ("dit_ours_raw_count",)),
    "unet": ("unet_ours", "unet_diffusers", ()),
}


def step_fn(model_name: str, model: nn.Module) -> Callable[[], None]:
    """One forward + backward on a fixed batch, with gradients freed before each step."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=g)
    t = torch.rand(BATCH, generator=g)
    labels = torch.randint(0, DIT_CLASSES, (BATCH,), generator=g)
    target = torch.randn(BATCH, 2 * CHANNELS if model_name.startswith("dit") else CHANNELS, SIZE, SIZE, generator=g)
    if "ours" in model_name:
        from diffusion.conditioning import Conditioning

        cond = Conditioning(labels=labels) if model_name.startswith("dit") else None
        forward = lambda: model(x, t, cond)  # noqa: E731
    elif model_name.startswith("dit"):
        forward = lambda: model(x, timestep=t * 1000, class_labels=labels).sample  # noqa: E731
    else:
        forward = lambda: model(x, timestep=t * 1000).sample  # noqa: E731

    def step() -> None:
        model.zero_grad(set_to_none=True)
        (forward() - target).pow(2).mean().backward()

    return step


def count(model: nn.Module, distinct: bool = True) -> int:
    """Parameters; ``distinct``: diffusers' per-block copies of DiT's embedders counted once."""
    return sum(p.numel() for n, p in model.named_parameters() if not (distinct and EMBEDDER_COPY.match(n)))


def check_distinct_count_against_the_paper() -> str:
    """diffusers' DiT-XL/2 (256 px, learned sigma), counted both ways, against the paper's 675M."""
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        xl = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                   num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    distinct, raw = count(xl), count(xl, distinct=False)
    if abs(distinct / 675e6 - 1) > 0.01:
        raise SystemExit(f"diffusers' DiT-XL/2 counts {distinct:,} distinct parameters, not the paper's 675M.")
    return f"diffusers' DiT-XL/2: {distinct / 1e6:.1f}M distinct parameters (paper: 675M), {raw / 1e6:.1f}M raw"


def time_models(names: list[str], rounds: int) -> dict[str, float]:
    """Median seconds of one step per model; models run in turn, the order reversed every round."""
    steps = {name: step_fn(name, build(name)) for name in names}
    for step in steps.values():  # warm-up: first-call allocations, lazy init
        step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status; peak memory needs Linux /proc.")


def memory_child(model_name: str) -> None:
    """Run in a fresh process: print the MiB one forward + backward needs above the resident baseline."""
    import diffusers  # noqa: F401  (same imports for both models: same baseline)

    import diffusion.backbones  # noqa: F401

    step = step_fn(model_name, build(model_name))
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    step()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - baseline) / 1024}))


def measure_memory(names: list[str], repeats: int, threads: int | None) -> dict[str, float]:
    """Median MiB one step needs per model, each measured in fresh processes, alternating."""
    peaks: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            command = [sys.executable, __file__, "--memory-child", name] + (["--threads", str(threads)] if threads else [])
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"memory measurement of {name} failed:\n{out.stderr}")
            peaks[name].append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])
    return {name: statistics.median(v) for name, v in peaks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per model (alternating)")
    parser.add_argument("--memory-repeats", type=int, default=1, help="fresh processes per model for peak memory")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--memory-child", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH} of {CHANNELS}x{SIZE}x{SIZE}, "
          f"forward + backward, medians of {args.rounds} alternating steps")  # fmt: skip
    for pair in args.pairs:
        ours, theirs, extras = PAIRS[pair]
        if pair == "dit":
            print(check_distinct_count_against_the_paper())
        n_ours, n_theirs = count(build(ours)), count(build(theirs))
        if abs(n_ours / n_theirs - 1) > 0.02:
            raise SystemExit(f"{pair}: parameter counts differ by more than 2 %: ours {n_ours:,}, diffusers {n_theirs:,}.")
        secs = time_models([ours, theirs, *extras], args.rounds)
        mem = measure_memory([ours, theirs], args.memory_repeats, args.threads)
        raw = count(build(theirs), distinct=False)
        print(f"{pair}: params ours {n_ours / 1e6:.2f}M, diffusers {n_theirs / 1e6:.2f}M ({n_ours / n_theirs - 1:+.1%})"
              + (f", {raw / 1e6:.2f}M raw" if raw != n_theirs else ""))
        print(f"  time   ours {secs[ours]:.3f}s  diffusers {secs[theirs]:.3f}s  "
              f"speed ratio (diffusers / ours, >= 1 is ours faster) {secs[theirs] / secs[ours]:.3f}")  # fmt: skip
        for extra in extras:
            print(f"  time   {extra} ({count(build(extra)) / 1e6:.2f}M) {secs[extra]:.3f}s  "
                  f"speed ratio {secs[theirs] / secs[extra]:.3f}")  # fmt: skip
        print(f"  memory ours {mem[ours]:.0f} MiB  diffusers {mem[theirs]:.0f} MiB  "
              f"memory ratio (ours / diffusers, <= 1 is ours leaner) {mem[ours] / mem[theirs]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
