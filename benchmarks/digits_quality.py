"""Quality of the default run: train with `python train.py`, then judge its class-conditional
samples two ways:

- FID and KID (TF Inception-v3, as papers compute them) against the held-out real digits, next to
  the same figures of as many real training digits against them: the floor a perfect model reaches
  at this n (FID from n samples is biased upwards, so it is named fid@<n>);
- a classifier trained on the real training digits: its accuracy on the held-out real digits (its
  own ceiling) and the share of samples classified as the digit they were asked for.

Targets (issue 4): the default run in at most 10 minutes on 2 CPU cores, and >= 95 % of samples
classified as asked.

    python benchmarks/digits_quality.py [--per-class 100] [--ckpt PATH] [-- train.py overrides ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.svm import SVC

from diffusion.cli import load_module
from diffusion.data import load_digits_split
from diffusion.evaluation import metrics
from diffusion.evaluation.inception import InceptionFeatures
from diffusion.evaluation.reference import real_to_uint8
from diffusion.evaluation.suite import reported_name
from diffusion.images import save_grid
from diffusion.sampling_job import to_uint8

ROOT = Path(__file__).resolve().parents[1]


def train_run(overrides: list[str], run_dir: Path) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images -> the 0..16 flattened pixels scikit-learn's digits use."""
    return ((images.clamp(-1, 1) + 1) * 8).flatten(1).numpy()


def inception_pool(extractor: InceptionFeatures, images: np.ndarray, batch_size: int = 50) -> tuple[np.ndarray, float]:
    """Pool features of uint8 (N, H, W, 3) images, and the images per second it took."""
    start, out = time.perf_counter(), []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out.append(extractor(torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2))["pool"].double().numpy())
    return np.concatenate(out), len(images) / (time.perf_counter() - start)


def fid_kid(fake: np.ndarray, real: np.ndarray) -> tuple[float, float, float]:
    fid = metrics.frechet_distance(fake.mean(0), np.cov(fake, rowvar=False), real.mean(0), np.cov(real, rowvar=False))
    kid, kid_std = metrics.kid(real, fake, num_subsets=100, subset_size=min(len(real), len(fake), 1000), seed=0)
    return fid, kid, kid_std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--ckpt", type=Path, help="judge this checkpoint instead of training a new run")
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("overrides", nargs="*", help="train.py overrides")
    args = parser.parse_args()

    seconds = None
    ckpt = args.ckpt
    if ckpt is None:
        run_dir = ROOT / "outputs" / "benchmark" / time.strftime("%Y-%m-%d_%H-%M-%S")
        seconds = train_run(args.overrides, run_dir)
        ckpt = run_dir / "checkpoints" / "last.ckpt"

    split = load_digits_split()
    classifier = SVC(gamma=0.001, C=10.0).fit(to_pixels(split["train"][0]), split["train"][1].numpy())
    real_accuracy = (classifier.predict(to_pixels(split["val"][0])) == split["val"][1].numpy()).mean()

    model = load_module(ckpt)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    images = model.sample(len(labels), labels, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                          generator=torch.Generator().manual_seed(0))
    sample_accuracy = (classifier.predict(to_pixels(images)) == labels.numpy()).mean()
    grid = save_grid(images.view(10, args.per_class, *images.shape[1:])[:, :10].transpose(0, 1).reshape(-1, *images.shape[1:]),
                     Path(ckpt).parent.parent / "samples" / "benchmark_grid.png", nrow=10)

    # FID / KID against the held-out real digits; the floor: as many real training digits against them.
    extractor = InceptionFeatures().eval()
    val, _ = inception_pool(extractor, real_to_uint8(split["val"][0]))
    fake, speed = inception_pool(extractor, to_uint8(images, "the run's samples"))
    train_images = split["train"][0][torch.randperm(len(split["train"][0]), generator=torch.Generator().manual_seed(0))]
    floor, _ = inception_pool(extractor, real_to_uint8(train_images[:len(images)]))
    name = reported_name("fid", len(images), fake.shape[1])
    fid, kid, kid_std = fid_kid(fake, val)
    floor_fid, floor_kid, floor_kid_std = fid_kid(floor, val)

    s = model.sampling
    print(f"checkpoint: {ckpt}")
    print(f"sampler: {args.sampler or s.sampler}, steps: {args.steps or s.steps}, cfg_scale: {args.cfg_scale if args.cfg_scale is not None else s.cfg_scale}")
    if seconds is not None:
        print(f"train time: {seconds / 60:.1f} min (target <= 10 min)")
    print(f"classifier accuracy on held-out real digits: {100 * real_accuracy:.1f} %")
    print(f"samples classified as the digit asked for: {100 * sample_accuracy:.1f} % (target >= 95 %)")
    print(f"{name} (TF Inception-v3, against the {len(val)} held-out real digits): {fid:.2f}; "
          f"{len(floor)} real training digits: {floor_fid:.2f} (the floor at this n)")
    print(f"KID x 1000: {1000 * kid:.2f} +- {1000 * kid_std:.2f}; real training digits: "
          f"{1000 * floor_kid:.2f} +- {1000 * floor_kid_std:.2f}")
    print(f"feature extraction: {speed:.1f} img/s on this machine (fp32, 8x8 digits resized to 299x299)")
    print(f"grid (a row per sample index, a column per digit): {grid}")


if __name__ == "__main__":
    main()
