"""Reference statistics: what samples are compared with.

- From a data config: the real images of a split through the same extractors, computed once (over
  the processes, resumably) and cached with a fingerprint, as the latent cache is: the data config,
  the split, the images taken, the extractors' fingerprints (weights hash, preprocessing) and the
  resolution. A cache made otherwise is refused, listing what differs.
- OpenAI's ADM reference batches (``VIRTUAL_imagenet256_labeled.npz``: ``mu``, ``sigma`` of the
  pool features, ``mu_s``, ``sigma_s`` of the spatial ones, and ``arr_0``, 10,000 real images for
  precision, recall and KID), so that ImageNet figures follow the paper protocol.
- A ``reference.npz`` this module wrote, with its fingerprint inside.

Real images are converted to uint8 by rounding, ``round((x + 1) * 127.5)``: they were uint8 files, and
rounding gives those bytes back exactly (truncation, as for samples, would lose one level to float error).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from diffusion.evaluation.features import Extractor, extract, feature_name
from diffusion.evaluation.sources import ImageSource, NpzImages
from diffusion.files import file_sha256, save_npz

INCEPTION = "inception"
ADM_KEYS = {feature_name(INCEPTION, "pool"): ("mu", "sigma"), feature_name(INCEPTION, "spatial"): ("mu_s", "sigma_s")}


@dataclass
class Reference:
    """Per feature ``"<extractor>/<key>"``: its (mean, covariance) and, where kept, the full arrays."""

    stats: dict[str, tuple[np.ndarray, np.ndarray]]
    count: int
    resolution: tuple[int, int]  # (0, 0) when unknown
    fingerprint: dict[str, Any]  # how it was made; compared with the samples' extractors
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    images: ImageSource | None = None  # ADM's arr_0: its features are extracted when a metric needs them

    def describe(self) -> dict[str, Any]:
        return {**self.fingerprint, "num": self.count, "resolution": list(self.resolution)}


def real_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Real images (B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8 by rounding (see the module docstring)."""
    if not torch.isfinite(x).all():
        raise ValueError("a real image holds NaN or infinite values")
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).numpy()


class DatasetImages(ImageSource):
    """A dataset's images ({"image": (C, H, W) in [-1, 1]}) as uint8 RGB, rounded (see the module docstring);
    ``indices`` picks the images taken."""

    def __init__(self, dataset: Any, indices: np.ndarray, name: str):
        self.dataset, self.indices, self.name = dataset, indices, name
        first = real_to_uint8(self.dataset[int(indices[0])]["image"][None])
        self.shape = tuple(first.shape[1:3])

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, start: int, stop: int) -> np.ndarray:
        return np.concatenate([real_to_uint8(self.dataset[int(i)]["image"][None]) for i in self.indices[start:stop]])


def differences(expected: Mapping[str, Any], found: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The keys where two nested fingerprints differ, as ``key: found vs expected`` lines."""
    lines = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            lines += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {b!r} in the reference, {a!r} now")
    return lines


def check_compatible(reference: Reference, fingerprints: Mapping[str, dict], resolution: tuple[int, int],
                     needed: list[str], where: str, full: list[str] = ()) -> None:
    """Refuse a reference made by other extractors, at another resolution, or without a needed feature
    (``full``: those whose every real feature vector is needed, not just their statistics)."""
    problems = []
    for name in sorted({n.split("/")[0] for n in needed}):
        made = reference.fingerprint.get("extractors", {}).get(name)
        if made is None:
            problems.append(f"it has no features of extractor {name!r} (it has {sorted(reference.fingerprint.get('extractors', {}))})")
        elif name in fingerprints:
            now = {k: fingerprints[name].get(k) for k in made if k != "precision"}  # what the reference records
            problems += differences(now, {k: v for k, v in made.items() if k != "precision"}, f"extractors.{name}.")
    # (0, 0): unknown, an ADM batch without arr_0 (its mu/sigma alone do not say what size they were made at).
    if tuple(reference.resolution) not in ((0, 0), tuple(resolution)):
        problems.append(f"resolution: {tuple(reference.resolution)} in the reference, {tuple(resolution)} for the samples")
    missing = [n for n in needed if n not in reference.stats and n not in reference.arrays and reference.images is None]
    if missing:
        problems.append(f"it lacks the features {missing}")
    whole = [n for n in full if n in needed and n not in missing and n not in reference.arrays and reference.images is None]
    if whole:  # e.g. an ADM batch without arr_0: mu/sigma serve FID, not KID or precision/recall
        problems.append(f"it holds only the statistics of {whole}, and a chosen metric needs every real feature vector")
    if problems:
        raise ValueError(f"reference {where} does not match this evaluation:\n  " + "\n  ".join(problems)
                         + "\nrecompute it (ref=data with the same extractors) or pass a reference made for these samples")


# --- ADM's reference batches -----------------------------------------------------------------

#: How ADM's evaluator made its reference batches: the same TF graph, fed uint8 images and resized inside
#: it by TF1's bilinear resize. Compared with the inception extractor of an evaluation.
ADM_INCEPTION = {"extractor": "inception_v3_tf_2015_12_05", "resize": "tf1_bilinear_299_align_corners_false"}


def read_adm_reference(path: str | Path) -> Reference:
    """OpenAI's reference batch: its mu/sigma (pool) and mu_s/sigma_s (spatial), computed by ADM's
    evaluator with the same TF Inception graph and resize, and arr_0 for the metrics that need every
    real feature."""
    path = Path(path)
    with np.load(path) as f:
        keys = set(f.files)
        absent = [k for k in ("mu", "sigma") if k not in keys]
        if absent:
            raise ValueError(f"ref={path} is neither an ADM reference batch (mu, sigma, mu_s, sigma_s, arr_0) nor a "
                             f"reference.npz of evaluate.py: it holds {sorted(keys)}")
        stats = {name: (f[m].astype(np.float64), f[s].astype(np.float64))
                 for name, (m, s) in ADM_KEYS.items() if m in keys and s in keys}
    for name, (mu, sigma) in stats.items():
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ValueError(f"ref={path}: {name} has mean {mu.shape} and covariance {sigma.shape}; not a reference batch")
    images = NpzImages(path) if "arr_0" in keys else None
    resolution = images.shape if images is not None else (0, 0)
    fingerprint = {"kind": "adm_reference_batch", "path": str(path), "sha256": file_sha256(path),
                   "extractors": {INCEPTION: dict(ADM_INCEPTION)}}
    count = len(images) if images is not None else 0  # 0: unknown
    return Reference(stats, count, resolution, fingerprint, images=images)


# --- our reference.npz -----------------------------------------------------------------------

def save_reference(path: Path, reference: Reference) -> None:
    arrays: dict[str, np.ndarray] = {}
    for name, (mu, sigma) in reference.stats.items():
        arrays[f"mu/{name}"], arrays[f"sigma/{name}"] = mu, sigma
    for name, value in reference.arrays.items():
        arrays[f"features/{name}"] = value
    meta = {"fingerprint": reference.fingerprint, "count": reference.count, "resolution": list(reference.resolution)}
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))

    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(path, arrays)


def load_reference(path: str | Path) -> Reference:
    path = Path(path)
    with np.load(path) as f:
        if "meta" not in f.files:
            raise ValueError(f"{path} is not a reference.npz of evaluate.py (no meta)")
        meta = json.loads(str(f["meta"]))
        stats = {k[3:]: (f[k], f["sigma/" + k[3:]]) for k in f.files if k.startswith("mu/")}
        arrays = {k[9:]: f[k] for k in f.files if k.startswith("features/")}
    return Reference(stats, meta["count"], tuple(meta["resolution"]), meta["fingerprint"], arrays)


def open_reference(path: str | Path) -> Reference:
    """A reference ``.npz``: ours (with its fingerprint) or one of ADM's reference batches."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ref={path} does not exist; pass ref=data (the data config's real images) or an .npz")
    with np.load(path) as f:
        ours = "meta" in f.files
    return load_reference(path) if ours else read_adm_reference(path)


# --- from a data config ----------------------------------------------------------------------

def data_fingerprint(data_cfg: Mapping[str, Any], split: str, num: int | None, seed: int) -> dict[str, Any]:
    data = {k: v for k, v in data_cfg.items() if k not in ("batch_size", "num_workers")}
    return {"kind": "data", "data": data, "split": split, "num": num, "subset_seed": seed,
            "uint8": "round((x + 1) * 127.5)"}


def reference_from_data(dataset: Any, data_fp: dict[str, Any], extractors: Mapping[str, Extractor],
                        fingerprints: Mapping[str, dict], cache: Path, *, full: list[str], batch_size: int,
                        device: torch.device, progress: bool = True) -> Reference:
    """The reference of a data split, read from ``cache/reference.npz`` when it was made the same way,
    otherwise computed (resumably, in ``cache``) and written there. A cache made another way is refused."""
    fingerprint = json.loads(json.dumps({**data_fp, "extractors": dict(fingerprints)}))
    path = cache / "reference.npz"
    if path.is_file():
        reference = load_reference(path)
        diff = differences(fingerprint, reference.fingerprint)
        if diff:
            raise ValueError(f"{path} holds reference statistics made otherwise:\n  " + "\n  ".join(diff)
                             + f"\ndelete {cache}, or pass another ref_cache=DIR")
        if all(n in reference.arrays for n in full):
            return reference
    size = len(dataset)
    num = data_fp.get("num")
    if num is not None and num > size:
        raise ValueError(f"ref_num={num}: the {data_fp['split']} split has only {size} images")
    indices = np.arange(size) if num is None or num == size else \
        np.sort(np.random.default_rng(data_fp["subset_seed"]).choice(size, num, replace=False))
    source = DatasetImages(dataset, indices, f"{data_fp['split']} split")
    features = extract(source, extractors, fingerprints, cache / "extraction", full=full, batch_size=batch_size,
                       device=device, progress=progress, desc="reference features")
    stats = {n: (s.mean(), s.cov()) for n, s in features.stats.items()}
    reference = Reference(stats, features.count, source.shape, fingerprint, features.arrays)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_reference(path, reference)
    if dist.is_initialized():
        dist.barrier()
    return reference
