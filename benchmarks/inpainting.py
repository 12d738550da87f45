"""Inpainting on the digits (issue 15): train ``experiment=digits_inpaint``, then fill a fixed mask
in each held-out digit and judge both regions:

- kept: the mean absolute error of the unmasked pixels against the real digit (0..16 pixel units),
  which the model keeps by itself (no pasting back); target <= 1 (1/16 of the range);
- filled: a classifier trained on the real training digits reads the inpainted digits; its accuracy
  is set against the same digits with the hole left at the masked value (what the model was given)
  and against the real digits (its ceiling), and the filled pixels' error against the error of
  filling them with the mean training digit. Targets: accuracy above the holed digits', filled
  error below the mean digit's (a ratio < 1).

The masks cover the middle rows (rows 2..5 of 8, the centre of every digit), so each class needs
its context to be restored. Sampling uses the digits' own labels, with label dropout's guidance 1.

    python benchmarks/inpainting.py [--ckpt PATH] [--num 360] [-- train.py overrides ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.svm import SVC

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_quality import ROOT, to_pixels, train_run  # noqa: E402

from diffusion.cli import load_module  # noqa: E402
from diffusion.data import load_digits_split  # noqa: E402


def middle_mask(num: int, size: int = 8) -> torch.Tensor:
    """(num, 1, size, size): 1 on the middle half of the rows."""
    mask = torch.zeros(num, 1, size, size)
    mask[:, :, size // 4: 3 * size // 4] = 1.0
    return mask


def judge(ckpt: Path, num: int, steps: int | None = None) -> dict[str, float]:
    split = load_digits_split()
    classifier = SVC(gamma=0.001, C=10.0).fit(to_pixels(split["train"][0]), split["train"][1].numpy())
    images, labels = split["val"][0][:num], split["val"][1][:num]
    mask = middle_mask(len(images), images.shape[-1])
    model = load_module(ckpt)
    filled = model.sample(len(images), labels, steps=steps, generator=torch.Generator().manual_seed(0),
                          inputs={"image": images, "mask": mask}).clamp(-1, 1)
    holed = images * (mask < 0.5)  # what the model was given
    mean_digit = split["train"][0].mean(0, keepdim=True)
    pixels = lambda x: (x + 1) * 8  # [-1, 1] -> 0..16  # noqa: E731
    hole, kept = mask.bool(), ~mask.bool()
    error = (pixels(filled) - pixels(images)).abs()
    mean_error = (pixels(mean_digit.expand_as(images)) - pixels(images)).abs()
    accuracy = lambda x: float((classifier.predict(to_pixels(x)) == labels.numpy()).mean())  # noqa: E731
    return {"kept_mae": float(error[kept].mean()), "filled_mae": float(error[hole].mean()),
            "mean_digit_mae": float(mean_error[hole].mean()), "accuracy_filled": accuracy(filled),
            "accuracy_holed": accuracy(holed), "accuracy_real": accuracy(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, help="judge this checkpoint instead of training a new run")
    parser.add_argument("--num", type=int, default=360, help="held-out digits to inpaint (of 360)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("overrides", nargs="*", help="train.py overrides")
    args = parser.parse_args()
    seconds, ckpt = None, args.ckpt
    if ckpt is None:
        run_dir = ROOT / "outputs" / "benchmark" / ("inpaint_" + time.strftime("%Y-%m-%d_%H-%M-%S"))
        seconds = train_run(["experiment=digits_inpaint", *args.overrides], run_dir)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
    r = judge(ckpt, args.num, args.steps)
    print(f"checkpoint: {ckpt}" + (f" (trained in {seconds / 60:.1f} min)" if seconds else ""))
    print(f"kept region: mean abs error {r['kept_mae']:.3f} (0..16 pixels; target <= 1)")
    print(f"filled region: mean abs error {r['filled_mae']:.3f}; the mean training digit's {r['mean_digit_mae']:.3f}: "
          f"ratio {r['filled_mae'] / r['mean_digit_mae']:.2f} (target < 1)")
    print(f"classifier accuracy: inpainted {100 * r['accuracy_filled']:.1f} %, holed {100 * r['accuracy_holed']:.1f} %, "
          f"real {100 * r['accuracy_real']:.1f} % (target: inpainted above holed)")
    ok = r["kept_mae"] <= 1 and r["filled_mae"] < r["mean_digit_mae"] and r["accuracy_filled"] > r["accuracy_holed"]
    print("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
