"""A sampling job: ``num`` images split over any number of processes, written in batches that a
rerun skips, and gathered into the layout evaluators read.

    out/job.json                  the arguments that decide the images; a rerun must match them
    out/parts/{start}-{end}.npz   images start..end-1 (uint8), one file per finished batch
    out/samples.npz               arr_0 (N, H, W, 3) uint8 as OpenAI's ADM evaluator reads it, and
                                  labels (or prompts) of every image
    out/images/000000.png ...     with png=true
    out/grid.png                  the first images
    out/samples.json              everything that made them

Image i depends on (seed, i) alone (diffusion.sampling_options), so the processes need not talk:
process r takes the r-th contiguous shard of the indices, skips the ranges already in parts/ and
writes its batches; process 0 then waits for every index to be in parts/ and gathers. Parts are
keyed by index ranges, so a job may be resumed with another batch_size or number of processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from diffusion.files import save_npz, write_atomic
from diffusion.images import save_grid

#: Stops a job after this many batches of a process (tests use it to stand for a killed job).
STOP_AFTER_ENV = "DIFFUSION_SAMPLE_STOP_AFTER_BATCHES"
GRID_IMAGES = 64
_PART = re.compile(r"^(\d+)-(\d+)\.npz$")


class StoppedForTest(RuntimeError):
    """Raised after ``DIFFUSION_SAMPLE_STOP_AFTER_BATCHES`` batches: a job stopped midway."""


def to_uint8(images: Tensor, what: str = "samples") -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8 with ADM's conversion, ``((x + 1) * 127.5).clamp(0, 255)``
    then a cast, which truncates (guided-diffusion's image_sample.py), so that statistics compare with
    those of ADM's samples; one channel is repeated to three, as the evaluators need RGB.

    NaN or infinite values are refused (``what`` names the images in the message): the conversion would
    turn them silently into black or white pixels, and the metrics of such images would look plausible."""
    x = images.detach().float().cpu()
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} of {len(x)} images hold NaN or infinite values (the first: "
                         f"number {int(bad.nonzero()[0])} of them, from 0); the model diverged (check its training loss), or the backbone "
                         "overflowed in bf16 (try precision=32)")
    x = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"samples.npz holds RGB images; these have {x.shape[1]} channels")
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def shard(num: int, rank: int, world_size: int) -> range:
    """Process ``rank``'s contiguous share of the indices 0..num-1 (sizes differ by at most one)."""
    return range(rank * num // world_size, (rank + 1) * num // world_size)


def done_ranges(parts: Path) -> list[range]:
    """The index ranges of the finished batches in ``parts`` (temporary files of a killed write are not)."""
    if not parts.is_dir():
        return []
    found = [_PART.match(name) for name in os.listdir(parts)]
    return sorted((range(int(m[1]), int(m[2])) for m in found if m), key=lambda r: r.start)


def pending_batches(indices: range, done: Sequence[range], batch_size: int) -> list[range]:
    """The indices of ``indices`` not in ``done``, as consecutive runs cut into batches of at most ``batch_size``."""
    covered = np.zeros(len(indices), dtype=bool)
    for r in done:
        lo, hi = max(r.start, indices.start), min(r.stop, indices.stop)
        if lo < hi:
            covered[lo - indices.start:hi - indices.start] = True
    batches, i = [], 0
    while i < len(indices):
        if covered[i]:
            i += 1
            continue
        j = i
        while j < len(indices) and not covered[j] and j - i < batch_size:
            j += 1
        batches.append(range(indices.start + i, indices.start + j))
        i = j
    return batches


def count_done(done: Sequence[range], num: int) -> int:
    covered = np.zeros(num, dtype=bool)
    for r in done:
        covered[r.start:min(r.stop, num)] = True
    return int(covered.sum())


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def check_manifest(out: Path, manifest: dict[str, Any], name: str = "job.json", what: str = "a sampling job",
                   out_key: str = "out") -> None:
    """Write ``out/<name>``, or refuse to continue a job there that was started with other arguments
    (``out_key``: the config key that chose ``out``, named in the refusal)."""
    path = out / name
    if path.exists():
        before = json.loads(path.read_text())
        diff = [f"{k}: {before.get(k)!r} there, {manifest.get(k)!r} now" for k in sorted(set(before) | set(manifest))
                if before.get(k) != manifest.get(k)]
        if diff:
            raise ValueError(f"{out} holds {what} made with other arguments:\n  " + "\n  ".join(diff)
                             + f"\nrerun with its arguments to resume it, pass another {out_key}=DIR, or delete the directory")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, manifest)  # every process writes the same content; the rename makes it whole


def run_shard(out: Path, num: int, rank: int, world_size: int, batch_size: int,
              sample: Callable[[range], Tensor], *, png: bool = False, progress: bool = True) -> None:
    """Sample this process's missing batches (``sample(indices) -> images in [-1, 1]``) into ``out/parts``;
    process 0 shows one bar over the whole job (images done / num) and waits for the others' parts."""
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    if png:
        (out / "images").mkdir(exist_ok=True)
    batches = pending_batches(shard(num, rank, world_size), done_ranges(parts), batch_size)
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0"))
    bar = tqdm(total=num, initial=count_done(done_ranges(parts), num), disable=not progress or rank != 0,
               desc="sampling", unit="img", dynamic_ncols=True)
    for k, indices in enumerate(batches):
        if stop_after and k == stop_after:
            raise StoppedForTest(f"stopped after {k} batches ({STOP_AFTER_ENV}, used by the tests)")
        images = to_uint8(sample(indices), f"the batch of images {indices.start}..{indices.stop - 1}")
        if png:  # before the part: a batch whose part exists has its PNGs
            for i, image in zip(indices, images):
                write_atomic(out / "images" / f"{i:06d}.png",
                              lambda tmp, im=image: Image.fromarray(im).save(tmp, "PNG"))
        save_npz(parts / f"{indices.start:06d}-{indices.stop:06d}.npz", {"images": images})
        bar.n = count_done(done_ranges(parts), num)
        bar.refresh()
    if rank == 0:
        while (done := count_done(done_ranges(parts), num)) < num:  # the other processes' shards
            bar.n = done
            bar.refresh()
            time.sleep(1.0)
        bar.n = num
        bar.refresh()
    bar.close()


def gather(out: Path, num: int) -> np.ndarray:
    """All images 0..num-1 from ``out/parts``, each exactly once."""
    ranges = done_ranges(out / "parts")
    seen = np.zeros(num, dtype=np.int64)
    images: np.ndarray | None = None
    for r in ranges:
        if r.stop > num:
            raise ValueError(f"{out / 'parts'} holds images {r.start}..{r.stop - 1}, past num={num}")
        seen[r.start:r.stop] += 1
        with np.load(out / "parts" / f"{r.start:06d}-{r.stop:06d}.npz") as part:
            batch = part["images"]
        if images is None:
            images = np.empty((num, *batch.shape[1:]), dtype=np.uint8)
        images[r.start:r.stop] = batch
    if images is None or (seen != 1).any():
        missing, twice = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
        raise RuntimeError(f"{out / 'parts'}: images missing {missing[:10].tolist()}, written twice "
                           f"{twice[:10].tolist()}; rerun the same command to finish the job")
    return images


def write_outputs(out: Path, images: np.ndarray, conditions: tuple[str, list] | None, record: dict[str, Any]) -> Path:
    """samples.npz (arr_0 and labels or prompts), grid.png and samples.json."""
    arrays: dict[str, np.ndarray] = {"arr_0": images}
    if conditions is not None:
        name, values = conditions
        arrays[name] = np.asarray(values, dtype=np.int64 if name == "labels" else np.str_)
    save_npz(out / "samples.npz", arrays)
    first = torch.from_numpy(images[:GRID_IMAGES]).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_grid(first, out / "grid.png")
    write_json(out / "samples.json", record)
    return out / "samples.npz"


def code_version() -> str | None:
    """The git commit of this code ("+dirty" with uncommitted changes), None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")
