"""Which metrics an evaluation computes (the ``metrics`` config group), what features each needs,
and their values with the names they are reported under.

Each option of ``conf/metrics`` is one metric: ``kind`` (the function of diffusion.evaluation.metrics),
the ``extractor`` and feature ``key`` it reads, and its parameters. A Fréchet distance from fewer
samples than the feature dimension has a singular sample covariance and a large bias that depends
on n, so its name carries n (``fid@2k``) and a warning says it compares only with itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffusion._checks import check_choice
from diffusion.evaluation import metrics as M
from diffusion.evaluation.features import Features, feature_name
from diffusion.evaluation.reference import Reference

KINDS = ("frechet", "kid", "precision_recall", "clip_score", "cmmd", "likelihood", "edge_f1")
PIXELS = ("edge_f1",)  # of the samples' pixels against their conditions (control=): no features, no reference
LIKELIHOOD = ("likelihood",)  # of real images under ckpt= (diffusion.evaluation.likelihood): no samples, no features
NEEDS_FULL = ("kid", "precision_recall", "clip_score", "cmmd")  # every sample's features, not statistics
NEEDS_REFERENCE = ("frechet", "kid", "precision_recall", "cmmd")
TEXT = ("clip_score",)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str
    extractor: str
    key: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def feature(self) -> str:
        return feature_name(self.extractor, self.key)


def parse_metrics(cfg: Mapping[str, Mapping[str, Any]]) -> list[MetricSpec]:
    """The chosen options of the ``metrics`` group, checked."""
    if not cfg:
        raise ValueError("metrics= is empty; choose some, e.g. metrics=[fid,kid] (the options of conf/metrics)")
    specs = []
    for name, option in cfg.items():
        option = dict(option)
        kind = check_choice(f"metrics.{name}.kind", option.pop("kind", None), KINDS)
        if kind in LIKELIHOOD or kind in PIXELS:
            specs.append(MetricSpec(name, kind, "", "", option))
            continue
        for key in ("extractor", "key"):
            if not option.get(key):
                raise ValueError(f"metrics.{name}.{key} is not set; every metric names the extractor and feature it reads")
        specs.append(MetricSpec(name, kind, option.pop("extractor"), option.pop("key"), option))
    return specs


def needs(specs: Sequence[MetricSpec]) -> tuple[list[str], list[str]]:
    """(every feature to extract, those needed whole)."""
    specs = [s for s in specs if s.kind not in LIKELIHOOD]
    features = sorted({s.feature for s in specs})
    full = sorted({s.feature for s in specs if s.kind in NEEDS_FULL})
    return features, full


def short_count(n: int) -> str:
    """2000 -> "2k", 50000 -> "50k", 360 -> "360"."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def reported_name(name: str, n: int, dim: int) -> str:
    return f"{name}@{short_count(n)}" if n < dim else name


def compute(specs: Sequence[MetricSpec], samples: Features, reference: Reference | None,
            text_features: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, float], list[str]]:
    """The metrics' values by their reported names, and the warnings raised about them (on process 0:
    the full arrays live there; the statistics are on every process)."""
    values: dict[str, float] = {}
    notes: list[str] = []
    for spec in specs:
        if spec.kind in NEEDS_REFERENCE and reference is None:
            raise ValueError(f"metric {spec.name} compares with real images: pass ref=data or ref=PATH.npz")
        if spec.kind == "frechet":
            stats = samples.stats[spec.feature]
            mu, sigma = reference.stats[spec.feature]
            n, dim = stats.count, stats.dim
            if n < 2:
                raise ValueError(f"{spec.name} needs at least 2 samples, got {n}")
            name = reported_name(spec.name, n, dim)
            if name != spec.name:
                notes.append(f"{name}: {n} samples, fewer than the {dim} feature dimensions: the covariance is singular "
                             f"and the value is biased upwards; compare it only with {name} of other models")
            if 0 < reference.count < dim:  # 0: not known (an ADM batch without arr_0)
                notes.append(f"{name}: the reference has {reference.count} images, fewer than the {dim} feature "
                             "dimensions; the value compares only with evaluations against the same reference")
            values[name] = M.frechet_distance(stats.mean(), stats.cov(), mu, sigma)
        elif spec.kind == "kid":
            fake, real = samples.arrays[spec.feature], reference.arrays[spec.feature]
            mean, std = M.kid(real, fake, **spec.params)
            values[spec.name], values[f"{spec.name}_std"] = mean, std
        elif spec.kind == "precision_recall":
            fake, real = samples.arrays[spec.feature], reference.arrays[spec.feature]
            values["precision"], values["recall"] = M.precision_recall(real, fake, **spec.params)
        elif spec.kind == "clip_score":
            if not text_features or spec.feature not in text_features:
                raise ValueError(f"metric {spec.name} scores images against their prompts, and these samples have "
                                 "none (a class-label or unconditional model); leave it out of metrics=")
            scores = M.clip_score(samples.arrays[spec.feature], text_features[spec.feature], **spec.params)
            values[spec.name] = float(np.asarray(scores, dtype=np.float64).mean())
        elif spec.kind == "cmmd":
            values[spec.name] = M.cmmd(reference.arrays[spec.feature], samples.arrays[spec.feature], **spec.params)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return values, notes
