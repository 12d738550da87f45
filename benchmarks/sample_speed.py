"""Sampling speed on the CPU: images per second of DiT forwards in fp32, bf16 autocast and bf16
weights, and the model FLOP utilisation (MFU) against this CPU's own matmul peak.

Models: DiT-S/2 and DiT-B/2 as the paper has them for ImageNet 256 (32x32x4 SD-VAE latents, 1000
classes, learned sigma), class-conditional, forward only under `torch.inference_mode` (a sampler's
model call, without guidance), batch 64. Precisions:
  fp32           the model as built;
  bf16_autocast  DiT(bf16_autocast=True): matmuls and convolutions in bf16, weights, norms and the
                 residual stream in fp32 (what sample.py's precision=bf16 does);
  bf16_weights   model.to(torch.bfloat16), bf16 input: everything in bf16.

Time: the three precisions of a model live in one process and run in turn (the order reversed
every repeat) after a warm-up forward each (on 2 images), so drifting load on shared cores hits them alike;
the median of the repeats is reported, and the speed ratio bf16 / fp32 (> 1: bf16 faster).
Target: bf16 >= 2x fp32 for DiT-S/2 (what AMX tiles give), marked PASS / FAIL per bf16 mode.

FLOPs are counted analytically from the sizes (a multiply-add is 2 FLOPs): per token and block
2 * 12 D^2 for qkv, proj and the 4x MLP, per block 4 N^2 D for attention's two matmuls, plus the
patch embedding, final linear and the per-image adaLN / embedder MLPs. DiT-S/2: 12.1 GFLOP (the paper's
Table 4: 6.06 "Gflops", counting multiply-adds). Checked against torch.utils.flop_counter.
FlopCounterMode on one image (printed; equal), counted with SDPA's math backend, whose matmuls it
sees (it has no formula for the fused CPU attention kernel).
The peak is measured in the same run: the best of a few 2048x2048 matmuls in each dtype (in
nn.Linear's layout; the fp32 one again before each model, the best kept). MFU is achieved FLOP/s
over the peak of the dtype the matmuls run in.

CPUs without native bf16 (no AVX512-BF16 or AMX: e.g. AVX2-only ones) run bf16 matmuls in
PyTorch's portable fallback kernels, about 6x slower than fp32 (the peak line shows it). There a
bf16 forward at batch 64 takes many minutes, so the bf16 modes are timed at --emulated-bf16-batch
(default 4, said in the output): the work per image is the same large GEMMs.

Run:  python benchmarks/sample_speed.py          (both models: about 50 min on 2 shared cores)
      python benchmarks/sample_speed.py --models dit_s_2   (7 min on 2 cores)
      python benchmarks/sample_speed.py --models dit_s_2 --batch 16 --repeats 5 --threads 2
      python benchmarks/sample_speed.py --models dit_s_2 --profile   (top ops of each precision)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.backbones.registry import build_dit, dit_forward_flops
from diffusion.conditioning.types import Conditioning

CHANNELS, SIZE, CLASSES = 4, 32, 1000
PRECISIONS = ("fp32", "bf16_autocast", "bf16_weights")
TARGET = 2.0  # bf16 / fp32 speed on DiT-S/2


def build(name: str, precision: str) -> nn.Module:
    """The paper's configuration of a named DiT, in eval mode, in the given precision (seeded)."""
    torch.manual_seed(0)
    model = build_dit(name, in_channels=CHANNELS, num_classes=CLASSES, learn_sigma=True,
                      bf16_autocast=precision == "bf16_autocast").eval()
    return model.to(torch.bfloat16) if precision == "bf16_weights" else model


def inputs(batch: int, precision: str) -> tuple[Tensor, Tensor, Conditioning]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, CHANNELS, SIZE, SIZE, generator=g)
    t = torch.rand(batch, generator=g)
    labels = torch.randint(0, CLASSES, (batch,), generator=g)
    return x.to(torch.bfloat16) if precision == "bf16_weights" else x, t, Conditioning(labels=labels)


def forward_fn(model: nn.Module, batch: int, precision: str) -> Callable[[], Tensor]:
    x, t, cond = inputs(batch, precision)
    return lambda: model(x, t, cond)


def analytic_flops(name: str, size: int = SIZE, attention: bool = True) -> float:
    """Forward FLOPs of one image (2 per multiply-add), from the sizes alone; ``attention=False``
    leaves out attention's two N x N matmuls."""
    return dit_forward_flops(name, size, CHANNELS, attention=attention)


def counted_flops(name: str) -> float:
    """Forward FLOPs of one image as torch's FlopCounterMode counts them (fp32), with attention on
    SDPA's math backend: its matmuls are counted there, the fused CPU kernel has no formula."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    forward = forward_fn(build(name, "fp32"), 1, "fp32")
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        forward()
    return float(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, size: int, repeats: int, budget_s: float = 60.0) -> float:
    """Best FLOP/s of a size x size matmul in dtype over up to ``repeats`` timed calls (fewer once
    ``budget_s`` is spent: on CPUs without native bf16 one call takes seconds). In nn.Linear's layout,
    x @ w.T: PyTorch's portable bf16 fallback runs a plain a @ b 20x slower than that (measured here:
    0.1 against 2.4 GFLOP/s), which would be no peak of what the model runs."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(dtype) for _ in range(2))
    F.linear(torch.randn(256, 256).to(dtype), torch.randn(256, 256).to(dtype))  # warm-up: library, threads
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        F.linear(a, b)
        seconds = time.perf_counter() - start
        best, spent = min(best, seconds), spent + seconds
        if spent > budget_s:
            break
    return 2 * size**3 / best


def time_precisions(name: str, batches: dict[str, int], repeats: int) -> dict[str, float]:
    """Median seconds per image for each precision; the precisions run in turn, reversed every repeat."""
    fns, warmups = {}, []
    for precision, batch in batches.items():
        model = build(name, precision)
        fns[precision] = (forward_fn(model, batch, precision), batch)
        warmups.append(forward_fn(model, min(batch, 2), precision))
    times: dict[str, list[float]] = {p: [] for p in fns}
    with torch.inference_mode():
        for warmup in warmups:  # first-call allocations, thread pools; on 2 images (a batch 64 forward takes a minute)
            warmup()
        for r in range(repeats):
            for precision in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                fn, batch = fns[precision]
                start = time.perf_counter()
                fn()
                times[precision].append((time.perf_counter() - start) / batch)
    return {p: statistics.median(v) for p, v in times.items()}


def profile(name: str, batch: int, rows: int = 12) -> None:
    """The ops that take the time in one forward of each precision, and the dtypes they ran in."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for precision in PRECISIONS:
        model = build(name, precision)
        fn = forward_fn(model, batch, precision)
        with torch.inference_mode():
            fn()
            with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                fn()
        print(f"--- {name} {precision}, batch {batch}: top ops by self CPU time")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                                 max_name_column_width=40, max_shapes_column_width=60))


def cpu_features() -> str:
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    present = [f for f in wanted if f in flags] or ["none of " + ", ".join(wanted)]
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (f"CPU capability {torch.backends.cpu.get_cpu_capability()}, flags: {' '.join(present)}; "
            f"oneDNN bf16 kernels: {'yes' if native else 'no (bf16 matmuls use the portable fallback)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["dit_s_2", "dit_b_2"], help="registry names")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model and precision")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--peak-repeats", type=int, default=3)
    parser.add_argument("--emulated-bf16-batch", type=int, default=4,
                        help="batch of the bf16 modes on a CPU without native bf16 kernels")
    parser.add_argument("--profile", action="store_true", help="print the top ops of each precision and stop")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cpu_features()}")
    if args.profile:
        profile(args.models[0], min(args.batch, 4))
        return

    peak = {"fp32": matmul_peak(torch.float32, args.peak_size, args.peak_repeats),
            "bf16": matmul_peak(torch.bfloat16, args.peak_size, args.peak_repeats)}
    print(f"matmul peak ({args.peak_size}x{args.peak_size}, best of {args.peak_repeats}): fp32 {peak['fp32'] / 1e9:.1f} "
          f"GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s (bf16 / fp32 {peak['bf16'] / peak['fp32']:.2f}x)")
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    bf16_batch = args.batch if native_bf16 else min(args.batch, args.emulated_bf16_batch)
    batches = {"fp32": args.batch, "bf16_autocast": bf16_batch, "bf16_weights": bf16_batch}
    print(f"forward only (inference_mode), 32x32x4 latents, 1000 classes, learned sigma; batch {args.batch}"
          + ("" if bf16_batch == args.batch else f" (bf16 modes: batch {bf16_batch}, no native bf16 here)")
          + f"; median of {args.repeats} alternating repeats after a warm-up")

    verdicts = []
    for name in args.models:
        # the fp32 peak again before each model, the best kept: other jobs' load on shared cores drifts
        peak["fp32"] = max(peak["fp32"], matmul_peak(torch.float32, args.peak_size, args.peak_repeats))
        flops = analytic_flops(name)
        counted = counted_flops(name)
        attention = flops - analytic_flops(name, attention=False)
        print(f"{name}: {flops / 1e9:.2f} GFLOP per image forward (analytic, {attention / 1e9:.2f} of it attention's "
              f"N x N matmuls); FlopCounterMode {counted / 1e9:.2f} ({counted / flops - 1:+.2%})")
        secs = time_precisions(name, batches, args.repeats)
        for precision in PRECISIONS:
            rate = 1 / secs[precision]
            dtype_peak = peak["fp32" if precision == "fp32" else "bf16"]
            ratio = secs["fp32"] / secs[precision]
            print(f"  {precision:<14} {rate:8.2f} img/s  {flops * rate / 1e9:7.1f} GFLOP/s  "
                  f"MFU {flops * rate / dtype_peak:6.1%} of the {'fp32' if precision == 'fp32' else 'bf16'} peak"
                  + ("" if precision == "fp32" else f"  speed / fp32 {ratio:.2f}x"))
            if name == "dit_s_2" and precision != "fp32":
                verdicts.append((precision, ratio))
        faster = min(PRECISIONS[1:], key=lambda p: secs[p])
        print(f"  faster bf16 mode here: {faster} (speed bf16_weights / bf16_autocast "
              f"{secs['bf16_autocast'] / secs['bf16_weights']:.2f}x)")
    for precision, ratio in verdicts:
        print(f"target bf16 >= {TARGET:.0f}x fp32 for DiT-S/2, {precision}: {ratio:.2f}x "
              f"{'PASS' if ratio >= TARGET else 'FAIL'}")


if __name__ == "__main__":
    main()
