"""Which bf16 is faster for sampling on this CPU: the backbone under torch.autocast(bfloat16) (float32
weights, bf16 matmuls), or bf16 weights and inputs; against float32. One DiT-S/2 forward pass on a
batch of 32x32x4 latents (ImageNet-256 in SD-VAE latents), median of a few repeats.

    python benchmarks/cpu_bf16.py [--model dit_s_2] [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from diffusion.backbones import build_dit
from diffusion.conditioning.labels import label_condition
from diffusion.precision import autocast_backbone, cpu_has_amx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="dit_s_2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_dit(args.model, in_channels=4, num_classes=1000).eval()
    with torch.no_grad():  # a trained-like model: DiT's zero-initialised output layers would output zeros
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    x, t = torch.randn(args.batch, 4, 32, 32), torch.rand(args.batch)
    cond = label_condition(torch.arange(args.batch) % 1000)
    weights_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    cpu = torch.device("cpu")
    runs = {
        "float32": lambda: model(x, t, cond),
        "bf16 autocast": lambda: autocast_backbone(model, cpu, "bf16")(x, t, cond),
        "bf16 weights": lambda: weights_bf16(x.bfloat16(), t, cond).float(),
    }
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, AMX: {cpu_has_amx()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    with torch.inference_mode():
        reference = runs["float32"]()
        for name, run in runs.items():
            run()  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = run()
                times.append(time.perf_counter() - start)
            error = (out.float() - reference).abs().max().item()
            print(f"{name:>14}: {statistics.median(times) * 1000:8.1f} ms  (max |diff| vs float32 {error:.2e})")


if __name__ == "__main__":
    main()
