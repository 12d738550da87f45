"""Sampler overhead: the time a sampler spends outside the model, as a share of the model time.

A tiny convolutional denoiser runs at batch 64 on 3x32x32 images for 50 steps on the CPU. The
model is wrapped in a timer, so each run measures both figures in the same process and the same
moments; the ratio holds on a shared, noisy machine. Runs of the samplers alternate, and the
median of the repeats is reported. Target: overhead below 5 % for every sampler.

It runs with one intra-op thread unless told otherwise: on a shared 2-core machine a second
thread makes every small tensor op wait for a descheduled peer (measured here: 0.9 ms per step's
ops with 1 thread, 84 ms with 2 while another process held both cores), which times the
neighbours, not the sampler.

    python benchmarks/sampler_overhead.py [--repeats 5] [--steps 50] [--batch 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch
from torch import nn

from diffusion.samplers import SAMPLERS, grids
from diffusion.schedules import DDPM, FlowMatching


class TinyDenoiser(nn.Module):
    """Three 3x3 convolutions with the time added as a learned bias: tiny, but image-shaped."""

    def __init__(self, channels: int = 3, width: int = 64):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        self.time = nn.Linear(1, width)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.inp(x) + self.time(t[:, None])[:, :, None, None])
        return self.out(torch.nn.functional.silu(self.mid(h)))


class TimedModel:
    def __init__(self, model: nn.Module):
        self.model, self.seconds, self.calls = model, 0.0, 0

    def __call__(self, x, t):
        start = time.perf_counter()
        out = self.model(x, t)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def measure(sampler, schedule, grid, model, x) -> tuple[float, float, int]:
    timed = TimedModel(model)
    stochastic = sampler is SAMPLERS["ancestral"] or "generator" in inspect.signature(sampler).parameters
    kwargs = {"generator": torch.Generator().manual_seed(0)} if stochastic else {}
    if sampler is SAMPLERS["ddim"]:
        kwargs["eta"] = 0.5
    start = time.perf_counter()
    sampler(timed, schedule, x, grid, **kwargs)
    total = time.perf_counter() - start
    return total, timed.seconds, timed.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = TinyDenoiser().eval()
    x = torch.randn(args.batch, 3, 32, 32)
    theories = {"flow matching": (FlowMatching(), grids.uniform(args.steps)),
                "ddpm eps": (DDPM(prediction="eps"), grids.ddpm(args.steps, "trailing"))}
    print(f"batch {args.batch}, {args.steps} steps, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'theory':<14} {'sampler':<15} {'calls':>5} {'total s':>8} {'model s':>8} {'overhead':>9}")
    worst = 0.0
    with torch.inference_mode():
        for theory, (schedule, grid) in theories.items():
            measure(SAMPLERS["euler"], schedule, grids.uniform(2), model, x)  # warm-up
            runs = {name: [] for name in SAMPLERS}
            for _ in range(args.repeats):  # alternate the samplers within each repeat
                for name, sampler in SAMPLERS.items():
                    runs[name].append(measure(sampler, schedule, grid, model, x))
            for name, results in runs.items():
                overhead = statistics.median((total - inside) / inside for total, inside, _ in results)
                total = statistics.median(r[0] for r in results)
                inside = statistics.median(r[1] for r in results)
                worst = max(worst, overhead)
                print(f"{theory:<14} {name:<15} {results[0][2]:>5} {total:>8.3f} {inside:>8.3f} {100 * overhead:>8.2f}%")
    print(f"worst overhead: {100 * worst:.2f}% of model time (target < 5%): {'PASS' if worst < 0.05 else 'FAIL'}")


if __name__ == "__main__":
    main()
