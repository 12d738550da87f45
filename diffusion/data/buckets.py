"""Aspect-ratio buckets (SDXL, kohya-ss): train at several resolutions of about the same area
instead of cropping every image square. Each image goes to the bucket of closest aspect ratio;
each batch holds one bucket, so the images of a batch share ``(H, W)`` while the run mixes them.
Buckets are ``(height, width)``; image sizes are PIL's ``(width, height)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffusion._checks import check_positive


@dataclass(frozen=True)
class BucketConfig:
    """Sides are multiples of ``multiple``; aspect ratios lie in [1/max_ratio, max_ratio]."""

    multiple: int = 64
    max_ratio: float = 2.0

    @classmethod
    def coerce(cls, value: bool | BucketConfig | Mapping[str, Any]) -> BucketConfig | None:
        """``buckets=`` as configs give it: false -> None, true -> defaults, a mapping -> its fields."""
        if isinstance(value, BucketConfig) or value is None:
            return value
        if isinstance(value, bool):
            return cls() if value else None
        if isinstance(value, Mapping):
            return cls(**dict(value))
        raise TypeError(f"buckets must be a bool, a BucketConfig or a mapping of its fields, got {value!r}")


def make_buckets(resolution: int, multiple: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """``(height, width)`` buckets, sorted from tallest to widest: for each short side (a multiple
    of ``multiple``, up to ``resolution``) the largest long side keeping the area at most
    ``resolution**2``, and its transpose. ``make_buckets(1024)`` gives SDXL's resolutions up to
    2:1 (1024x1024, 1152x896, 1216x832, 1344x768 and transposes) and 1088x960."""
    check_positive("resolution", resolution)
    check_positive("buckets.multiple", multiple)
    if max_ratio < 1:
        raise ValueError(f"buckets.max_ratio must be >= 1, got {max_ratio}")
    area = resolution * resolution
    long_of_short: dict[int, int] = {}
    for short in range(multiple, resolution + 1, multiple):
        long = area // short // multiple * multiple
        if long >= short and long / short <= max_ratio:
            long_of_short[short] = long
    # Two short sides can round to the same long side; keep the one with the larger area.
    best: dict[int, int] = {}
    for short, long in long_of_short.items():
        best[long] = max(best.get(long, 0), short)
    shapes = {(long, short) for long, short in best.items()} | {(short, long) for long, short in best.items()}
    if not shapes:
        raise ValueError(
            f"no aspect-ratio buckets for resolution={resolution}, multiple={multiple}, max_ratio={max_ratio}; "
            "lower buckets.multiple (it must be at most the resolution) or raise buckets.max_ratio"
        )
    return sorted(shapes, key=lambda hw: hw[1] / hw[0])


def assign_buckets(sizes: Sequence[tuple[int, int]], buckets: Sequence[tuple[int, int]]) -> list[int]:
    """For each ``(width, height)`` the index of the bucket of closest aspect ratio, measured as
    ``|log(w/h) - log(bw/bh)|`` so that 2:1 and 1:2 are equally far from square."""
    if not sizes:
        return []
    image_log_ratio = np.log([w / h for w, h in sizes])[:, None]
    bucket_log_ratio = np.log([w / h for h, w in buckets])[None, :]
    return np.abs(image_log_ratio - bucket_log_ratio).argmin(axis=1).tolist()  # ties: the first bucket
