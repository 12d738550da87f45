"""Speed of FID's feature extractor on this CPU: images per second of InceptionFeatures (TF1 resize to
299, TF Inception-v3 to the pool and spatial features) in fp32 and under bf16 autocast.

Both precisions share one extractor (its `precision` switched) in one process and see the same uint8
images; each is warmed up on one batch, then the precisions are timed in turn (the order reversed every
repeat, so drifting load on shared cores hits both alike) and the median repeat is reported, with the
ratio bf16 / fp32 (> 1: bf16 faster). Forward only, under torch.inference_mode.

Run:  python benchmarks/feature_speed.py                       (64 images 256x256, batch 32)
      python benchmarks/feature_speed.py --num 128 --batch-size 64 --size 512 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffusion.evaluation.inception import InceptionFeatures


def images_per_second(extractor: InceptionFeatures, images: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        extractor.features(images[i:i + batch_size])
    return len(images) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=64, help="images timed per precision and repeat")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=256, help="side of the square uint8 input images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    for name in ("num", "batch_size", "size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.num, 3, args.size, args.size), generator=g, dtype=torch.uint8)
    extractor = InceptionFeatures()
    order = ["32", "bf16"]
    for precision in order:  # warm-up: one batch each
        extractor.precision = precision
        extractor.features(images[: args.batch_size])
    speeds: dict[str, list[float]] = {p: [] for p in order}
    for _ in range(args.repeats):
        for precision in order:
            extractor.precision = precision
            speeds[precision].append(images_per_second(extractor, images, args.batch_size))
        order.reverse()
    result = {p: statistics.median(v) for p, v in speeds.items()}
    print(f"InceptionFeatures on {torch.get_num_threads()} CPU threads: {args.num} images {args.size}x{args.size} "
          f"uint8, batch {args.batch_size}, median of {args.repeats} repeats")
    for p in ("32", "bf16"):
        print(f"  precision={p:<5} {result[p]:7.2f} images/s   (repeats: {', '.join(f'{s:.2f}' for s in speeds[p])})")
    print(f"  bf16 / fp32 = {result['bf16'] / result['32']:.2f}x")
    return result


if __name__ == "__main__":
    main()
