"""Quality of the default run: train with `python train.py`, then judge its class-conditional
samples with a classifier trained on the real training digits.

Reports the run's wall time, the classifier's accuracy on the held-out real digits (its own
ceiling) and the share of generated samples classified as the digit they were asked for.
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
from diffusion.images import save_grid

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

    s = model.sampling
    print(f"checkpoint: {ckpt}")
    print(f"sampler: {args.sampler or s.sampler}, steps: {args.steps or s.steps}, cfg_scale: {args.cfg_scale if args.cfg_scale is not None else s.cfg_scale}")
    if seconds is not None:
        print(f"train time: {seconds / 60:.1f} min (target <= 10 min)")
    print(f"classifier accuracy on held-out real digits: {100 * real_accuracy:.1f} %")
    print(f"samples classified as the digit asked for: {100 * sample_accuracy:.1f} % (target >= 95 %)")
    print(f"grid (a row per sample index, a column per digit): {grid}")


if __name__ == "__main__":
    main()
