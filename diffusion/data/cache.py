"""Pre-computed latents and condition embeddings: the frozen encoders of latent diffusion do not
depend on t, so a dataset is encoded once and training reads the shards.

Layout of a cache directory (one per split):
    fingerprint.json   what produced it (encoders and their weight hashes, dtype, data, transforms)
    shard_00000.bin    samples [0, S): a header, then one contiguous record of bytes per sample
    ...
    index.json         written last: the cache is complete only once it exists

A shard starts with ``MAGIC``, the header's length (8 bytes, little-endian) and the header, JSON:
each field's dtype, its distinct shapes and each sample's index into them (aspect-ratio buckets
put latents of several shapes in one shard), and each record's byte offset. A record holds the
sample's fields in the header's order, each padded to ``ALIGN`` bytes. So reading sample i is one
read of its own bytes, whatever the size of its shard, and a shuffled epoch costs what it reads.

A shard is written to a temporary name and renamed, so a kill never leaves a half-written shard
that looks whole; a rerun skips the shards that exist and writes the rest, byte for byte the same.
Floating-point fields are stored in the cache's dtype (``CACHE_DTYPES``) and read back as float32;
integer and bool fields keep their dtype.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from diffusion.data.batching import batch_sampler
from diffusion.data.classes import ClassNamesRecord, read_class_names

log = logging.getLogger(__name__)

Encode = Callable[[dict[str, Any]], dict[str, Tensor]]  # a collated batch -> per-batch tensors to store

FORMAT = 2  # of index.json and the shards; 1 was a torch.save'd list of dicts per shard (shard_*.pt)
MAGIC = b"DIFFCACHE2\n"
ALIGN = 8  # every field starts at a multiple of 8 bytes, so it is an aligned view of its record

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a shard may hold: the cache dtypes (floating-point fields) and the integer and bool fields.
_STORED_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.bfloat16, torch.float16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


def check_cache_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``cache_dtype`` name; an unknown name is refused."""
    if name not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype={name!r} is not one of {', '.join(CACHE_DTYPES)}: the dtype the cache stores "
                         "latents and embeddings in (bfloat16 and float16 take half the disk and reads)")
    return CACHE_DTYPES[name]


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


def _refuse_old_format(directory: Path) -> None:
    if next(directory.glob("shard_*.pt"), None) is not None:
        raise ValueError(f"{directory} holds a cache in the old format (shard_*.pt), which this version does not "
                         "read; re-encode it (python cache.py ... cache_dir=NEW_DIR) or delete it")


# --- writing ------------------------------------------------------------------------------

def write_cache(
    dataset: Dataset,
    out_dir: str | Path,
    encode: Encode,
    fingerprint: dict[str, Any],
    *,
    shard_size: int = 1024,
    batch_size: int = 32,
    dtype: str = "float32",
) -> Path:
    """Encode ``dataset`` into shards under ``out_dir``; resumable, and refuses a directory that
    holds a cache of other settings. ``encode`` maps a collated batch to a dict of batched tensors;
    their floating-point ones are stored in ``dtype`` (one of ``CACHE_DTYPES``)."""
    store_dtype = check_cache_dtype(dtype)
    if fingerprint.get("dtype", dtype) != dtype:
        raise ValueError(f"the fingerprint says dtype {fingerprint['dtype']!r} but the cache is written in {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _refuse_old_format(out)
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
        path = _shard_path(out, k)
        if path.exists():
            continue
        indices = range(k * shard_size, min(n, (k + 1) * shard_size))
        loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                            collate_fn=list)
        samples: list[dict[str, Tensor]] = []
        with torch.no_grad():
            for items in loader:
                samples += _encode_by_shape(items, encode, store_dtype)
        _write_atomic(path, lambda p: _write_shard(p, samples))
        log.info("cache %s: shard %d/%d written", out, k + 1, num_shards)
    index = {"format": FORMAT, "num_samples": n, "shard_size": shard_size, "num_shards": num_shards}
    _write_json(out / "index.json", {**index, **_latent_shapes(out, num_shards)})
    return out


def _shard_path(directory: Path, k: int) -> Path:
    return directory / f"shard_{k:05d}.bin"


def _encode_by_shape(items: list[dict[str, Any]], encode: Encode, store_dtype: torch.dtype) -> list[dict[str, Tensor]]:
    """Encode a list of samples in batches of equal tensor shapes (aspect-ratio buckets mix
    sizes within a shard), returning one dict per sample in the original order, its floating-point
    tensors in ``store_dtype``."""
    groups: dict[tuple, list[int]] = {}
    for j, item in enumerate(items):
        key = tuple((name, tuple(v.shape)) for name, v in item.items() if isinstance(v, Tensor))
        groups.setdefault(key, []).append(j)
    out: list[dict[str, Tensor] | None] = [None] * len(items)
    for members in groups.values():
        encoded = {name: _to_store_dtype(name, torch.as_tensor(value).cpu(), store_dtype)
                   for name, value in encode(default_collate([items[j] for j in members])).items()}
        for pos, j in enumerate(members):
            out[j] = {name: value[pos] for name, value in encoded.items()}
    return out  # type: ignore[return-value]


def _to_store_dtype(name: str, value: Tensor, store_dtype: torch.dtype) -> Tensor:
    if not value.is_floating_point() or value.dtype == store_dtype:
        return value
    stored = value.to(store_dtype)
    if not torch.isfinite(stored).all() and torch.isfinite(value).all():
        big = value.abs().max().item()
        raise ValueError(f"cache field {name!r} has values up to {big:.4g}, beyond the range of {store_dtype} "
                         "(65504 for float16): use cache_dtype=bfloat16 or float32")
    return stored


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _write_shard(path: Path, samples: list[dict[str, Tensor]]) -> None:
    """One shard file: MAGIC, the header's length, the header (JSON), the records."""
    names = list(samples[0])
    header: dict[str, Any] = {"fields": {}, "offsets": [0]}
    for name in names:
        shapes: list[list[int]] = []
        shape_of_sample: list[int] = []
        for j, sample in enumerate(samples):
            if list(sample) != names or sample[name].dtype != samples[0][name].dtype:
                raise ValueError(f"sample {j} of a shard has the fields {_fields(sample)}, the first one "
                                 f"{_fields(samples[0])}: encode must return the same fields and dtypes for every sample")
            shape = list(sample[name].shape)
            if shape not in shapes:
                shapes.append(shape)
            shape_of_sample.append(shapes.index(shape))
        header["fields"][name] = {"dtype": str(samples[0][name].dtype).removeprefix("torch."),
                                  "shapes": shapes, "shape_of_sample": shape_of_sample}
    for sample in samples:
        header["offsets"].append(header["offsets"][-1] + sum(_padded(sample[n].nbytes) for n in names))
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(len(MAGIC) + 8 + len(encoded)) % ALIGN)  # records start aligned
    with open(path, "wb") as f:
        f.write(MAGIC + len(encoded).to_bytes(8, "little") + encoded)
        for sample in samples:
            for name in names:
                raw = sample[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                f.write(raw + b"\0" * (_padded(len(raw)) - len(raw)))


def _fields(sample: dict[str, Tensor]) -> dict[str, str]:
    return {name: str(value.dtype).removeprefix("torch.") for name, value in sample.items()}


def _latent_shapes(out: Path, num_shards: int) -> dict[str, Any]:
    """Each sample's latent shape (its bucket), recorded once here so that training need not
    read every shard to batch by shape: the distinct shapes and each sample's index into them.
    Read from the shards' headers only."""
    shapes: list[list[int]] = []
    shape_of_sample: list[int] = []
    for k in range(num_shards):
        with open(_shard_path(out, k), "rb") as f:
            layout = _ShardLayout.read(f, _shard_path(out, k))
        if "latent" not in layout.fields:
            return {}
        field = layout.fields["latent"]
        for j in field.shape_of_sample:
            shape = list(field.shapes[j])
            if shape not in shapes:
                shapes.append(shape)
            shape_of_sample.append(shapes.index(shape))
    return {"shapes": shapes, "shape_of_sample": shape_of_sample}


# --- reading ------------------------------------------------------------------------------

@dataclass
class _Field:
    dtype: torch.dtype
    shapes: list[tuple[int, ...]]
    shape_of_sample: np.ndarray  # (samples of the shard,) index into shapes


@dataclass
class _ShardLayout:
    """Where each sample's fields lie in a shard: parsed once from its header."""

    fields: dict[str, _Field]
    offsets: np.ndarray  # (samples + 1,) byte offsets of the records, from the file's start

    @classmethod
    def read(cls, f: BinaryIO, path: Path) -> _ShardLayout:
        start = f.read(len(MAGIC) + 8)
        if start[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{path} is not a shard of this cache format; re-encode the cache (python cache.py ...)")
        length = int.from_bytes(start[len(MAGIC):], "little")
        header = json.loads(f.read(length))
        fields = {name: _Field(_STORED_DTYPES[v["dtype"]], [tuple(s) for s in v["shapes"]],
                               np.asarray(v["shape_of_sample"], dtype=np.int64))
                  for name, v in header["fields"].items()}
        return cls(fields, np.asarray(header["offsets"], dtype=np.int64) + len(start) + length)

    def unpack(self, j: int, record: Tensor) -> dict[str, Tensor]:
        """Sample j's fields from its record (uint8); floating-point ones as float32 copies."""
        sample, offset = {}, 0
        for name, field in self.fields.items():
            shape = field.shapes[field.shape_of_sample[j]]
            nbytes = math.prod(shape) * field.dtype.itemsize
            value = record[offset:offset + nbytes].view(field.dtype).reshape(shape)
            sample[name] = value.float() if value.is_floating_point() else value
            offset += _padded(nbytes)
        return sample


class CachedDataset(Dataset):
    """Samples of a complete cache, checked against the fingerprint of the configuration.

    Sample i costs one read of its record. Shard files are opened lazily in the process that reads
    them (a DataLoader worker opens its own; a pickled dataset carries no open file), at most
    ``open_files`` at a time; their layouts are kept (a few bytes a sample). Floating-point fields
    come back as float32, whatever the cache's dtype; every tensor owns its memory.
    """

    def __init__(self, cache_dir: str | Path, fingerprint: dict[str, Any] | None = None, open_files: int = 64):
        self.dir = Path(cache_dir)
        index = self.dir / "index.json"
        if not index.exists():
            raise FileNotFoundError(f"{self.dir} is not a complete cache (no index.json): run the cache command "
                                    "(python cache.py ...) to write or finish it")
        _refuse_old_format(self.dir)
        meta = json.loads(index.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.dir} holds a cache of format {meta.get('format', 1)}, this version reads format "
                             f"{FORMAT}; re-encode it (python cache.py ... cache_dir=NEW_DIR)")
        self.num_samples, self.shard_size = meta["num_samples"], meta["shard_size"]
        self._shapes, self._shape_of_sample = meta.get("shapes"), meta.get("shape_of_sample")
        found = json.loads((self.dir / "fingerprint.json").read_text())
        if fingerprint is not None:
            diff = fingerprint_difference(fingerprint, found)
            if diff:
                raise ValueError(f"the cache in {self.dir} was made with other settings than this run's; re-encode "
                                 "it (python cache.py ...) or train without cache_dir:\n  " + "\n  ".join(diff))
        self.fingerprint = found
        self.open_files = open_files
        self._layouts: dict[int, _ShardLayout] = {}
        self._files: OrderedDict[int, BinaryIO] = OrderedDict()  # least recently read first
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": OrderedDict()}  # open files do not travel to another process

    def _file(self, k: int) -> BinaryIO:
        if self._pid != os.getpid():  # a forked worker: the parent's files share its read positions
            self._files, self._pid = OrderedDict(), os.getpid()
        f = self._files.get(k)
        if f is None:
            if len(self._files) >= self.open_files:
                self._files.popitem(last=False)[1].close()
            path = _shard_path(self.dir, k)
            f = self._files[k] = open(path, "rb", buffering=0)
            if k not in self._layouts:
                self._layouts[k] = _ShardLayout.read(f, path)
        self._files.move_to_end(k)
        return f

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        k, j = divmod(i, self.shard_size)
        f = self._file(k)
        layout = self._layouts[k]
        start, end = int(layout.offsets[j]), int(layout.offsets[j + 1])
        record = torch.empty(end - start, dtype=torch.uint8)
        f.seek(start)
        if f.readinto(record.numpy()) != end - start:
            raise OSError(f"{_shard_path(self.dir, k)} is truncated (sample {i}); re-encode the cache (python cache.py ...)")
        return layout.unpack(j, record)

    def shapes(self) -> list[tuple[int, ...]]:
        """The latent shape of every sample (the bucket of aspect-ratio batching), from the index."""
        if self._shapes is None:
            raise ValueError(f"the cache in {self.dir} records no latent shapes; re-encode it (python cache.py ...)")
        return [tuple(self._shapes[j]) for j in self._shape_of_sample]


class CachedDataModule(ClassNamesRecord, L.LightningDataModule):
    """Training batches from ``cache_dir/train`` (and ``cache_dir/val`` when present): dicts of
    ``latent`` and the cached condition (``label`` or ``tokens``/``mask``/``pooled``). The caches
    are opened, and checked against ``fingerprint``, when the module is made: a missing cache or one
    of other settings is refused before training starts. A cache of a class folder carries its
    class names (``classes.json``), which the run keeps as the folder's module would."""

    def __init__(self, cache_dir: str | Path, batch_size: int = 32, fingerprint: dict[str, Any] | None = None,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.cache_dir, self.batch_size, self.fingerprint = Path(cache_dir), batch_size, fingerprint
        self.num_workers, self.seed = num_workers, seed
        self.splits = {"train": CachedDataset(self.cache_dir / "train", fingerprint)}
        if (self.cache_dir / "val" / "index.json").exists():
            self.splits["val"] = CachedDataset(self.cache_dir / "val", fingerprint)
        self.class_names = read_class_names(self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":
            self.record_class_names()

    def _loader(self, split: str, train: bool) -> DataLoader:
        data = self.splits[split]
        sampler = batch_sampler(self.trainer, data.shapes(), self.batch_size, train=train, seed=self.seed)
        return DataLoader(data, batch_sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", train=False) if "val" in self.splits else []
