"""DiT-XL/2 on one GPU: sampling and training images per second in bf16, eager and torch.compile'd.

The paper's ImageNet 256 model (Peebles & Xie 2023): DiT-XL/2 on 32x32x4 SD-VAE latents, 1000
classes, learned sigma. Three figures, each after warm-up (and compilation), timed between
CUDA synchronisations, median of --repeats timings of --steps calls:
  sample eager     forward only (inference_mode), bf16 autocast, batch --sample-batch: the model
                   call of a sampler (a guided step is one call on twice the batch);
  sample compiled  the same model under torch.compile;
  train compiled   forward + backward + AdamW step (DiT's lr 1e-4, no weight decay, fused), bf16
                   autocast, compiled; the cached latents are random tensors, so data loading and
                   the VAE are left out; batch --train-batch per GPU (DiT's global batch is 256:
                   e.g. 2 GPUs x 128 or 4 x 64).
Target: training >= 420 img/s on an H100-class card (PASS / FAIL). MFU is printed against a
bf16 matmul peak measured in the same run (an 8192^3 matmul, best of 5).

Runs in under 5 minutes on an H100 (compilation included). `--tiny` runs the same code on the
CPU with a tiny DiT, small batches and torch.compile's "eager" backend (Dynamo's graph capture
without code generation) in seconds, so the script is known to work before a GPU is at hand;
it gives no verdict.

    python benchmarks/gpu_dit_xl.py                        # on a GPU
    python benchmarks/gpu_dit_xl.py --train-batch 64 --sample-batch 128 --steps 20
    python benchmarks/gpu_dit_xl.py --tiny                 # on the CPU, seconds
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

from diffusion.backbones.registry import build_dit, dit_forward_flops
from diffusion.conditioning.types import Conditioning

CHANNELS, SIZE, CLASSES = 4, 32, 1000
TARGET_TRAIN = 420.0  # img/s, H100-class


def forward_flops(name: str, size: int) -> float:
    """Forward FLOPs of one image (2 per multiply-add), as benchmarks/sample_speed.py counts them."""
    return dit_forward_flops(name, size, CHANNELS)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, steps: int, repeats: int) -> float:
    """Median seconds of one call of ``fn`` over ``repeats`` timings of ``steps`` calls each."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def matmul_peak(device: torch.device, size: int) -> float:
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * size**3 / timed(lambda: a @ b, device, warmup=2, steps=1, repeats=5)


def batch(n: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(n, CHANNELS, size, size, generator=g, device=device)
    t = torch.rand(n, generator=g, device=device)
    labels = torch.randint(0, CLASSES, (n,), generator=g, device=device)
    return x, t, Conditioning(labels=labels)


def build(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_dit(name, in_channels=CHANNELS, num_classes=CLASSES, learn_sigma=True, bf16_autocast=True).to(device)


def sampling_step(model: nn.Module, n: int, size: int, device: torch.device) -> Callable[[], torch.Tensor]:
    x, t, cond = batch(n, size, device)

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return model(x, t, cond)

    return step


def training_step(model: nn.Module, n: int, size: int, device: torch.device) -> Callable[[], None]:
    """One optimiser step of the DiT objective's shape: regress the first C output channels
    (the learned-sigma half is left out here) on a target, MSE, backward, AdamW."""
    x, t, cond = batch(n, size, device, seed=1)
    target = torch.randn_like(x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = (model(x, t, cond)[:, :CHANNELS].float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dit_xl_2")
    parser.add_argument("--sample-batch", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=128, help="per GPU; DiT's global batch is 256")
    parser.add_argument("--steps", type=int, default=10, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="calls before timing (the first compiles)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --tiny: eager)")
    parser.add_argument("--tiny", action="store_true", help="tiny DiT on the CPU in seconds: checks the script runs")
    args = parser.parse_args(argv)
    size = SIZE
    if args.tiny:  # 16x16 latents, batch 2: the CPU's bf16 matmuls are slow where it has no bf16 units
        args.model, args.sample_batch, args.train_batch, size = "dit_tiny", 2, 2, 16
        args.steps, args.repeats, args.warmup = 1, 1, 1
        device = torch.device("cpu")
        backend = args.compile_backend or "eager"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_dit_xl.py needs a CUDA GPU; run it with --tiny to check it on the CPU")
        device = torch.device("cuda")
        backend = args.compile_backend or "inductor"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the few fp32 matmuls
    began = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = matmul_peak(device, 256 if args.tiny else 8192)
    flops = forward_flops(args.model, size)
    print(f"torch {torch.__version__}, {name}; {args.model} on {size}x{size}x{CHANNELS} latents, {flops / 1e9:.2f} GFLOP "
          f"per image forward; "
          f"bf16 matmul peak {peak / 1e12:.3g} TFLOP/s; compile backend {backend}")

    results: dict[str, float] = {}
    model = build(args.model, device).eval()
    eager = timed(sampling_step(model, args.sample_batch, size, device), device, args.warmup, args.steps, args.repeats)
    compiled_model = torch.compile(model, backend=backend)
    compiled = timed(sampling_step(compiled_model, args.sample_batch, size, device), device, args.warmup, args.steps, args.repeats)
    for label, seconds in (("sample eager", eager), ("sample compiled", compiled)):
        results[label] = rate = args.sample_batch / seconds
        print(f"  {label:<16} batch {args.sample_batch:>4}: {rate:9.1f} img/s  MFU {flops * rate / peak:6.1%}  "
              f"(a 250-step guided sampler: {rate / 500:.2f} img/s)")
    print(f"  compile speed-up for sampling: {eager / compiled:.2f}x")
    del model, compiled_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    model = build(args.model, device).train()
    model.compile(backend=backend)  # in place, as the training module does
    seconds = timed(training_step(model, args.train_batch, size, device), device, args.warmup, args.steps, args.repeats)
    results["train compiled"] = rate = args.train_batch / seconds
    memory = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"  {'train compiled':<16} batch {args.train_batch:>4}: {rate:9.1f} img/s  MFU {3 * flops * rate / peak:6.1%} "
          f"(forward + backward = 3x forward FLOPs){memory}")
    verdict = "no verdict (--tiny)" if args.tiny else ("PASS" if rate >= TARGET_TRAIN else "FAIL")
    print(f"target training >= {TARGET_TRAIN:.0f} img/s on an H100-class card: {rate:.1f} img/s {verdict}")
    print(f"total {time.perf_counter() - began:.0f} s")
    return results


if __name__ == "__main__":
    main()
