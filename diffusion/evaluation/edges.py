"""Control fidelity of an edge-conditioned model (a Canny ControlNet): the F1 score between the
Canny edges of each sample and the edges of its condition, averaged over images.

Samples are uint8 RGB ``(N, H, W, 3)``, as evaluation reads them (samples.npz's ``arr_0``).
Conditions are of the samples' size, ``(N, H, W, 3)`` or ``(N, H, W)`` uint8, or ``(N, H, W)`` bool
edge maps. What a condition's edges are is said, never guessed (a white shape on black is as
binary as an edge map), by ``condition=``:

- ``"edges"`` (default): the condition is an edge map already (a Canny ControlNet's condition, white
  edges on black, as ``annotate(image, "canny")`` and ``cv2.Canny`` write it; a JPEG of one too):
  its pixels above 127 in any channel. Canny of an edge map would find the two sides of each line.
- ``"image"``: the condition is an image (the photograph the edges were taken from); its edges are
  Canny's, with the samples' thresholds.

Per image, with ``S`` the sample's edge pixels and ``C`` the condition's: precision is the fraction
of ``S`` within ``tolerance`` pixels (Chebyshev distance: a square of side ``2 tolerance + 1``) of
``C``, recall the fraction of ``C`` within ``tolerance`` of ``S``, F1 their harmonic mean. With
``tolerance=0`` that is scikit-learn's ``f1_score`` of the flattened maps. An empty ``S`` has
precision 1 and an empty ``C`` recall 1 (scikit-learn's ``zero_division=1``): both empty score 1,
one empty 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from diffusion._checks import check_choice
from diffusion.data.annotators import canny_edges

CONDITION_KINDS = ("edges", "image")


def _as_tensor(name: str, x: Any) -> Tensor:
    t = x.detach().cpu() if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype not in (torch.uint8, torch.bool):
        raise ValueError(f"{name} must be uint8 images 0..255 (or bool edge maps), got dtype {t.dtype}; "
                         "float images in [-1, 1] become uint8 by ((x + 1) * 127.5).round().clamp(0, 255)")
    return t


def condition_edges(condition: Tensor, low: float, high: float, kind: str = "edges") -> Tensor:
    """(H, W) bool edges of one condition, ``(H, W)`` or ``(H, W, C)``; see the module's docstring."""
    check_choice("condition", kind, CONDITION_KINDS)
    if kind == "image":
        if condition.dtype == torch.bool:
            raise ValueError("condition='image' takes uint8 images; a bool condition is an edge map (condition='edges')")
        return canny_edges(condition, low, high)
    edges = condition if condition.dtype == torch.bool else condition > 127
    return edges if edges.ndim == 2 else edges.any(-1)


def _near(edges: Tensor, tolerance: int) -> Tensor:
    """The pixels within ``tolerance`` (Chebyshev) of an edge pixel: a square dilation."""
    if tolerance == 0:
        return edges
    size = 2 * tolerance + 1
    return F.max_pool2d(edges[None, None].float(), size, stride=1, padding=tolerance)[0, 0] > 0


def edge_scores(samples: Any, conditions: Any, low: float = 100, high: float = 200, tolerance: int = 0,
                condition: str = "edges") -> dict[str, Tensor]:
    """Per image ``precision``, ``recall`` and ``f1`` (float64 tensors of length N) of the samples'
    Canny edges (thresholds ``low``, ``high``, as cv2.Canny) against their conditions' edges."""
    samples, conditions = _as_tensor("samples", samples), _as_tensor("conditions", conditions)
    if samples.dtype != torch.uint8 or samples.ndim != 4 or samples.shape[-1] != 3:
        raise ValueError(f"samples must be (N, H, W, 3) uint8 RGB images, got {samples.dtype} {tuple(samples.shape)}")
    if len(samples) == 0:
        raise ValueError("edge_scores needs at least one sample")
    if conditions.ndim not in (3, 4) or conditions.shape[:3] != samples.shape[:3]:
        raise ValueError(f"conditions must be (N, H, W) or (N, H, W, C) of the samples' N, H, W {tuple(samples.shape[:3])}, "
                         f"got {tuple(conditions.shape)}; resize the conditions to the samples' size")
    if not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance is a whole number of pixels >= 0, got {tolerance!r}")
    check_choice("condition", condition, CONDITION_KINDS)
    scores = torch.empty(3, len(samples), dtype=torch.float64)
    for n, (sample, cond) in enumerate(zip(samples, conditions)):
        found, wanted = canny_edges(sample, low, high), condition_edges(cond, low, high, condition)
        n_found, n_wanted = int(found.sum()), int(wanted.sum())
        precision = (found & _near(wanted, tolerance)).sum().item() / n_found if n_found else 1.0
        recall = (wanted & _near(found, tolerance)).sum().item() / n_wanted if n_wanted else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[:, n] = torch.tensor([precision, recall, f1], dtype=torch.float64)
    return dict(zip(("precision", "recall", "f1"), scores))


def edge_f1(samples: Any, conditions: Any, low: float = 100, high: float = 200, tolerance: int = 0,
            condition: str = "edges") -> float:
    """The mean over images of the edge F1 of :func:`edge_scores`: 1 when every sample's edges are
    its condition's (within ``tolerance`` pixels)."""
    return float(edge_scores(samples, conditions, low, high, tolerance, condition)["f1"].mean())
