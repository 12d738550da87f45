"""Features of an image source through one or more extractors, split over the processes and
resumable, as the sampling job is (diffusion.sampling_job):

    out/features.json                  what decides the features (the source, the extractors' fingerprints)
    out/features/{start}-{end}.npz     the features of images start..end-1, one array per "<extractor>/<key>"

Process r extracts its contiguous shard of the indices, skipping the ranges already in ``features/``;
then each process adds its shard's features to float64 streaming statistics, which are summed over
the processes (EDM2's calculate_metrics.py), and process 0 reads the full feature arrays that the
metrics needing every sample (KID, precision/recall, CLIP score, CMMD) ask for. Parts are keyed by
index ranges, so an evaluation resumes with another batch size or number of processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from diffusion.evaluation.metrics import FeatureStats
from diffusion.evaluation.sources import ImageSource
from diffusion.files import save_npz
from diffusion.sampling_job import StoppedForTest, check_manifest, done_ranges, pending_batches, shard

#: Stops an extraction after this many batches of a process (tests use it to stand for a killed job).
STOP_AFTER_ENV = "DIFFUSION_EVAL_STOP_AFTER_BATCHES"

#: An extractor: uint8 images (B, 3, H, W) on its device -> {feature key: (B, D) float}.
Extractor = Callable[[Tensor], Mapping[str, Tensor]]


@dataclass
class Features:
    """What the metrics read: float64 statistics per feature (every process holds the summed ones)
    and, on process 0, the full arrays of the features asked for in ``full``."""

    stats: dict[str, FeatureStats]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return next(iter(self.stats.values())).count


def feature_name(extractor: str, key: str) -> str:
    return f"{extractor}/{key}"


def _run_extractors(extractors: Mapping[str, Extractor], images: np.ndarray, device: torch.device) -> dict[str, np.ndarray]:
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).to(device)  # a copy: read-only views of a file
    out: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for name, extractor in extractors.items():
            for key, value in extractor(x).items():
                out[feature_name(name, key)] = value.float().cpu().numpy()
    return out


def _read_range(parts: Path, lo: int, hi: int, names: Iterable[str]) -> Iterable[tuple[int, dict[str, np.ndarray]]]:
    """The features of images lo..hi-1 from ``parts``, part by part, in index order: (start, arrays)."""
    for r in done_ranges(parts):
        a, b = max(r.start, lo), min(r.stop, hi)
        if a >= b:
            continue
        with np.load(parts / f"{r.start:06d}-{r.stop:06d}.npz") as part:
            yield a, {n: part[n][a - r.start:b - r.start] for n in names}


def extract(source: ImageSource, extractors: Mapping[str, Extractor], fingerprints: Mapping[str, dict],
            out: Path | None, *, full: Iterable[str] = (), batch_size: int = 64, device: torch.device | None = None,
            progress: bool = True, desc: str = "features", local: bool = False) -> Features:
    """Features of every image of ``source`` (see the module docstring). ``out=None`` keeps them in
    memory; ``local=True`` (with ``out=None``): ``source`` holds this process's share of the images
    already (the training callback's samples). ``full``: the "<extractor>/<key>" arrays that process 0
    returns whole."""
    device = device or torch.device("cpu")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if local and out is not None:
        raise ValueError("local=True extracts this process's images in memory: pass out=None")
    mine = range(len(source)) if local else shard(len(source), rank, world)
    full = set(full)
    in_memory: list[dict[str, np.ndarray]] = []
    if out is not None:
        manifest = json.loads(json.dumps({"source": source.describe(), "extractors": dict(fingerprints)}))
        check_manifest(out, manifest, name="features.json", what="features of other images or extractors")
        (out / "features").mkdir(parents=True, exist_ok=True)
        todo = pending_batches(mine, done_ranges(out / "features"), batch_size)
    else:
        todo = [range(s, min(s + batch_size, mine.stop)) for s in range(mine.start, mine.stop, batch_size)]
    bar = tqdm(total=sum(map(len, todo)), disable=not progress or rank != 0, desc=desc, unit="img", dynamic_ncols=True)
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0"))
    for k, indices in enumerate(todo):
        if stop_after and k == stop_after:
            raise StoppedForTest(f"stopped after {k} batches ({STOP_AFTER_ENV}, used by the tests)")
        arrays = _run_extractors(extractors, source.batch(indices.start, indices.stop), device)
        if out is None:
            in_memory.append(arrays)
        else:
            save_npz(out / "features" / f"{indices.start:06d}-{indices.stop:06d}.npz", arrays)
        bar.update(len(indices))
    bar.close()
    if dist.is_initialized():
        dist.barrier()  # every part is written before any process reads another's

    if out is None:
        if not in_memory:
            raise ValueError("a process got no images to evaluate: use fewer processes than images")
        dims = {n: int(v.shape[1]) for n, v in in_memory[0].items()}
        batches: Iterable[dict[str, np.ndarray]] = in_memory
    else:
        dims = _part_dims(out)
        batches = (a for _, a in _read_range(out / "features", mine.start, mine.stop, dims))
    stats = {n: FeatureStats(dims[n]) for n in sorted(dims)}  # also for a process with an empty shard
    for arrays in batches:
        for name, value in arrays.items():
            stats[name].update(value)
    for name in stats:  # the same order on every process
        stats[name].all_reduce()

    arrays: dict[str, np.ndarray] = {}
    if full and rank == 0:
        if out is None:
            if world > 1:
                raise ValueError(f"{sorted(full)} need every sample's features on one process: pass an out= directory")
            arrays = {n: np.concatenate([a[n] for a in in_memory]) for n in full}
        else:
            chunks: dict[str, list[np.ndarray]] = {n: [] for n in full}
            for _, part in _read_range(out / "features", 0, len(source), full):
                for n in full:
                    chunks[n].append(part[n])
            arrays = {n: np.concatenate(c) for n, c in chunks.items()}
    return Features(stats, arrays)


def _part_dims(out: Path) -> dict[str, int]:
    """{"<extractor>/<key>": feature dimension} of the parts in ``out/features`` (read off the first)."""
    ranges = done_ranges(out / "features")
    if not ranges:
        return {}
    with np.load(out / "features" / f"{ranges[0].start:06d}-{ranges[0].stop:06d}.npz") as part:
        return {n: int(part[n].shape[1]) for n in part.files}


def describe_extractors(extractors: Mapping[str, Any]) -> dict[str, dict]:
    """Each extractor's fingerprint (name, weight hash, preprocessing), as results record it."""
    return {name: dict(extractor.fingerprint()) for name, extractor in extractors.items()}
