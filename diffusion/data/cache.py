"""Pre-computed latents and condition embeddings: the frozen encoders of latent diffusion do not
depend on t, so a dataset is encoded once and training reads the shards.

Layout of a cache directory (one per split):
    fingerprint.json   what produced it (encoders and their weight hashes, dtype, data, transforms)
    shard_00000.pt     samples [0, S), each a dict of tensors (latent, tokens, mask, pooled, label, ...)
    ...
    index.json         written last: the cache is complete only once it exists
A shard is written to a temporary name and renamed, so a kill never leaves a half-written shard
that looks whole; a rerun skips the shards that exist and writes the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from diffusion.data.batching import batch_sampler

log = logging.getLogger(__name__)

Encode = Callable[[dict[str, Any]], dict[str, Tensor]]  # a collated batch -> per-batch tensors to store


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one


def _write_json(path: Path, value: Any) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(value, indent=2, sort_keys=True)))


def fingerprint_difference(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints, key by key."""
    keys = sorted(set(expected) | set(found))
    return [f"{k}: cache has {found.get(k)!r}, configuration has {expected.get(k)!r}"
            for k in keys if expected.get(k) != found.get(k)]


def write_cache(
    dataset: Dataset,
    out_dir: str | Path,
    encode: Encode,
    fingerprint: dict[str, Any],
    *,
    shard_size: int = 1024,
    batch_size: int = 32,
) -> Path:
    """Encode ``dataset`` into shards under ``out_dir``; resumable, and refuses a directory that
    holds a cache of other settings. ``encode`` maps a collated batch to a dict of batched tensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp_path = out / "fingerprint.json"
    if fp_path.exists():
        diff = fingerprint_difference(fingerprint, json.loads(fp_path.read_text()))
        if diff:
            raise ValueError(f"{out} holds a cache made with other settings; use another directory or delete it:\n  "
                             + "\n  ".join(diff))
    else:
        _write_json(fp_path, fingerprint)
    n = len(dataset)
    num_shards = math.ceil(n / shard_size)
    for k in range(num_shards):
        path = out / f"shard_{k:05d}.pt"
        if path.exists():
            continue
        indices = range(k * shard_size, min(n, (k + 1) * shard_size))
        loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                            collate_fn=list)
        samples: list[dict[str, Tensor]] = []
        with torch.no_grad():
            for items in loader:
                samples += _encode_by_shape(items, encode)
        _write_atomic(path, lambda p: torch.save(samples, p))
        log.info("cache %s: shard %d/%d written", out, k + 1, num_shards)
    index = {"num_samples": n, "shard_size": shard_size, "num_shards": num_shards}
    _write_json(out / "index.json", {**index, **_latent_shapes(out, num_shards)})
    return out


def _latent_shapes(out: Path, num_shards: int) -> dict[str, Any]:
    """Each sample's latent shape (its bucket), recorded once here so that training need not
    read every shard to batch by shape: the distinct shapes and each sample's index into them."""
    shapes: list[list[int]] = []
    shape_of_sample: list[int] = []
    for k in range(num_shards):
        for sample in torch.load(out / f"shard_{k:05d}.pt", weights_only=True):
            if "latent" not in sample:
                return {}
            shape = list(sample["latent"].shape)
            if shape not in shapes:
                shapes.append(shape)
            shape_of_sample.append(shapes.index(shape))
    return {"shapes": shapes, "shape_of_sample": shape_of_sample}


def _encode_by_shape(items: list[dict[str, Any]], encode: Encode) -> list[dict[str, Tensor]]:
    """Encode a list of samples in batches of equal tensor shapes (aspect-ratio buckets mix
    sizes within a shard), returning one dict per sample in the original order."""
    groups: dict[tuple, list[int]] = {}
    for j, item in enumerate(items):
        key = tuple((name, tuple(v.shape)) for name, v in item.items() if isinstance(v, Tensor))
        groups.setdefault(key, []).append(j)
    out: list[dict[str, Tensor] | None] = [None] * len(items)
    for members in groups.values():
        encoded = encode(default_collate([items[j] for j in members]))
        for pos, j in enumerate(members):
            out[j] = {name: value[pos].cpu().clone() for name, value in encoded.items()}
    return out  # type: ignore[return-value]


class CachedDataset(Dataset):
    """Samples of a complete cache, checked against the fingerprint of the configuration."""

    def __init__(self, cache_dir: str | Path, fingerprint: dict[str, Any] | None = None, shards_in_memory: int = 4):
        self.dir = Path(cache_dir)
        index = self.dir / "index.json"
        if not index.exists():
            raise FileNotFoundError(f"{self.dir} is not a complete cache (no index.json): run the cache command "
                                    "(python cache.py ...) to write or finish it")
        meta = json.loads(index.read_text())
        self.num_samples, self.shard_size = meta["num_samples"], meta["shard_size"]
        self._shapes, self._shape_of_sample = meta.get("shapes"), meta.get("shape_of_sample")
        found = json.loads((self.dir / "fingerprint.json").read_text())
        if fingerprint is not None:
            diff = fingerprint_difference(fingerprint, found)
            if diff:
                raise ValueError(f"the cache in {self.dir} was made with other settings than this run's; re-encode "
                                 "it (python cache.py ...) or train without cache_dir:\n  " + "\n  ".join(diff))
        self.fingerprint = found
        self._shard = lru_cache(maxsize=shards_in_memory)(self._load_shard)

    def _load_shard(self, k: int) -> list[dict[str, Tensor]]:
        return torch.load(self.dir / f"shard_{k:05d}.pt", weights_only=True)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        return self._shard(i // self.shard_size)[i % self.shard_size]

    def shapes(self) -> list[tuple[int, ...]]:
        """The latent shape of every sample (the bucket of aspect-ratio batching), from the index."""
        if self._shapes is None:
            raise ValueError(f"the cache in {self.dir} records no latent shapes; re-encode it (python cache.py ...)")
        return [tuple(self._shapes[j]) for j in self._shape_of_sample]


class CachedDataModule(L.LightningDataModule):
    """Training batches from ``cache_dir/train`` (and ``cache_dir/val`` when present): dicts of
    ``latent`` and the cached condition (``label`` or ``tokens``/``mask``/``pooled``)."""

    def __init__(self, cache_dir: str | Path, batch_size: int = 32, fingerprint: dict[str, Any] | None = None,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.cache_dir, self.batch_size, self.fingerprint = Path(cache_dir), batch_size, fingerprint
        self.num_workers, self.seed = num_workers, seed

    def _loader(self, split: str, train: bool) -> DataLoader:
        data = CachedDataset(self.cache_dir / split, self.fingerprint)
        sampler = batch_sampler(self.trainer, data.shapes(), self.batch_size, train=train, seed=self.seed)
        return DataLoader(data, batch_sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", train=False) if (self.cache_dir / "val" / "index.json").exists() else []
