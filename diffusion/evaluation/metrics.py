"""Sample-quality metrics as pure functions of feature arrays: FID (with streaming feature
statistics), KID, precision/recall, CLIP score and CMMD.

Every function accepts torch Tensors or numpy arrays (any float dtype) and computes in float64.
The pairwise metrics (KID, precision/recall, CMMD, CLIP score) run in torch on the device of a
Tensor input (the CPU for numpy input), so 50,000 features on a GPU take seconds; the Fréchet
distance works on d x d matrices and runs in numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FeatureStats",
    "clip_score",
    "cmmd",
    "frechet_distance",
    "kid",
    "precision_recall",
    "trace_sqrt_product",
]


# ---------------------------------------------------------------------------------------------
# Input checks


def _features(name: str, x: Any, device: torch.device | None = None) -> Tensor:
    """``x`` as a float64 (N, D) tensor with N >= 1, on ``device`` (default: x's own, or the CPU);
    non-finite rows are refused with their count."""
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be a (N, D) array of floats, got {type(x).__name__}: {error}") from None
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    t = t.to(device=device if device is not None else t.device, dtype=torch.float64)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, D) with N, D >= 1 (one feature vector a row), got {tuple(t.shape)}")
    bad = int((~torch.isfinite(t)).any(dim=1).sum())
    if bad:
        raise ValueError(f"{name} has {bad} of {t.shape[0]} rows with non-finite values (NaN or inf); "
                         "drop or fix those samples before computing metrics")
    return t


def _same_width(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same feature dimension, "
                         f"got {a.shape[1]} and {b.shape[1]}")


def _array(name: str, x: Any, ndim: int) -> np.ndarray:
    """``x`` as a finite float64 numpy array of ``ndim`` dimensions (1: a mean, 2: a square covariance)."""
    a = x.detach().cpu().to(torch.float64).numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != ndim or (ndim == 2 and a.shape[0] != a.shape[1]):
        wanted = "(d,)" if ndim == 1 else "(d, d)"
        raise ValueError(f"{name} must have shape {wanted}, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite entries (NaN or inf); "
                         "its features or statistics must be finite")
    return a


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _squared_distances(a: Tensor, b: Tensor, a_sq: Tensor, b_sq: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances (len(a), len(b)) as ||a||^2 + ||b||^2 - 2 a.b, one
    matrix product instead of an (N, M, D) difference; rounding can make it slightly negative
    where points (nearly) coincide, so it is clipped at 0. In float64 the error is ~1e-16 of the
    squared norms, far below the gaps these metrics compare."""
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


# ---------------------------------------------------------------------------------------------
# Fréchet distance (FID) and its streaming statistics


class FeatureStats:
    """Streaming mean/covariance of features in float64 (sum, sum of outer products, count), as
    EDM2's calculate_metrics.py accumulates: batches add, processes sum (``all_reduce``), so the
    result does not depend on batch size or number of processes.

    The sums stay on the device of the features (a GPU's matrix product is where the d x d outer
    products are cheap); ``mean``, ``cov`` and ``state_dict`` return numpy arrays."""

    def __init__(self, dim: int) -> None:
        self.dim = _positive_int("dim", dim)
        self.count = 0
        self._sum = torch.zeros(self.dim, dtype=torch.float64)
        self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, features: Any) -> None:
        """Add a (B, dim) batch of features (any float dtype)."""
        x = _features("features", features)
        if x.shape[1] != self.dim:
            raise ValueError(f"features must have shape (B, {self.dim}) for FeatureStats(dim={self.dim}), "
                             f"got {tuple(x.shape)}")
        if self._sum.device != x.device:  # follow the features: accumulate where they are
            self._sum, self._outer = self._sum.to(x.device), self._outer.to(x.device)
        self._sum += x.sum(dim=0)
        self._outer += x.T @ x
        self.count += x.shape[0]

    def all_reduce(self) -> None:
        """Sum count, sum and outer products over the processes of ``torch.distributed`` when it is
        initialised (gloo or nccl; nccl reduces CUDA tensors only, so they go to this process's GPU);
        a no-op otherwise. Every process must call it, and each then holds the totals."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        # One message: [count, sum, outer]; float64 counts are exact up to 2^53 samples.
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self._sum.device)
        flat = torch.cat([count, self._sum, self._outer.reshape(-1)]).to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.to(self._sum.device)
        self.count = int(round(float(flat[0])))
        self._sum = flat[1 : 1 + self.dim].clone()
        self._outer = flat[1 + self.dim :].reshape(self.dim, self.dim).clone()

    def merge(self, other: FeatureStats) -> None:
        """Add ``other``'s samples to these statistics."""
        if not isinstance(other, FeatureStats):
            raise ValueError(f"merge needs a FeatureStats, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"cannot merge FeatureStats of dim {other.dim} into one of dim {self.dim}")
        self._sum += other._sum.to(self._sum.device)
        self._outer += other._outer.to(self._outer.device)
        self.count += other.count

    def mean(self) -> np.ndarray:
        """The (dim,) float64 mean of the features seen."""
        if self.count < 1:
            raise ValueError("FeatureStats.mean needs at least 1 sample, got 0; call update(features) first")
        return (self._sum / self.count).cpu().numpy()

    def cov(self) -> np.ndarray:
        """The (dim, dim) float64 unbiased covariance (divided by n - 1), as ``np.cov(features, rowvar=False)``."""
        if self.count < 2:
            raise ValueError(f"FeatureStats.cov got fewer than 2 samples ({self.count}); an unbiased covariance "
                             "divides by n - 1, so update it with at least 2 feature rows first")
        mu = self._sum / self.count
        cov = (self._outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return ((cov + cov.T) / 2).cpu().numpy()  # exactly symmetric, whatever the product's rounding

    def state_dict(self) -> dict:
        """Everything needed to resume: ``{"dim", "count", "sum", "outer"}`` with numpy float64 arrays."""
        return {"dim": self.dim, "count": self.count, "sum": self._sum.cpu().numpy().copy(),
                "outer": self._outer.cpu().numpy().copy()}

    @classmethod
    def from_state_dict(cls, d: dict) -> FeatureStats:
        """Statistics as saved by ``state_dict`` (on the CPU; they follow the next update's device)."""
        missing = {"dim", "count", "sum", "outer"} - set(d)
        if missing:
            raise ValueError(f"FeatureStats state dict lacks {sorted(missing)}; it must come from FeatureStats.state_dict()")
        stats = cls(int(d["dim"]))
        s, outer = np.asarray(d["sum"], dtype=np.float64), np.asarray(d["outer"], dtype=np.float64)
        if s.shape != (stats.dim,) or outer.shape != (stats.dim, stats.dim):
            raise ValueError(f"FeatureStats state dict of dim {stats.dim} has sum of shape {s.shape} and outer of "
                             f"shape {outer.shape}; expected ({stats.dim},) and ({stats.dim}, {stats.dim})")
        stats.count = _positive_int("count", d["count"], minimum=0)
        stats._sum, stats._outer = torch.from_numpy(s.copy()), torch.from_numpy(outer.copy())
        return stats


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric matrix, negative eigenvalues (rounding of a
    PSD matrix) clipped to 0."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_covariances(sigma1: Any, sigma2: Any) -> tuple[np.ndarray, np.ndarray]:
    s1, s2 = _array("sigma1", sigma1, 2), _array("sigma2", sigma2, 2)
    if s1.shape != s2.shape:
        raise ValueError(f"sigma1 and sigma2 must have the same shape, got {s1.shape} and {s2.shape}")
    # eigh reads one triangle only; averaging with the transpose makes it read both.
    return (s1 + s1.T) / 2, (s2 + s2.T) / 2


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    # s1 s2 = A (A s2 A) A^{-1} with A = s1^{1/2}: the same eigenvalues as the symmetric PSD
    # A s2 A (for singular A too: AB and BA share their nonzero eigenvalues), so eigvalsh gives
    # real ones and their square roots need no complex arithmetic.
    a = _sqrt_psd(s1)
    m = a @ s2 @ a
    eigenvalues = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def trace_sqrt_product(sigma1: Any, sigma2: Any) -> float:
    """tr((sigma1 sigma2)^{1/2}) for two symmetric PSD (d, d) matrices: the sum of the square roots
    of the eigenvalues of sigma1^{1/2} sigma2 sigma1^{1/2}, each square root from ``eigh`` with
    negative (rounding) eigenvalues clipped to 0. Real and finite for rank-deficient covariances,
    where scipy's ``sqrtm`` of the product warns and returns complex parts."""
    return _trace_sqrt_product(*_check_covariances(sigma1, sigma2))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), the FID of Heusel et al. 2017
    on Inception features:  ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}),
    the last term from ``trace_sqrt_product``."""
    m1, m2 = _array("mu1", mu1, 1), _array("mu2", mu2, 1)
    s1, s2 = _check_covariances(sigma1, sigma2)
    if m1.shape != m2.shape or m1.shape[0] != s1.shape[0]:
        raise ValueError(f"mu1 {m1.shape}, mu2 {m2.shape}, sigma1 and sigma2 {s1.shape} must share one dimension d: "
                         "means of shape (d,), covariances (d, d)")
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product(s1, s2))


# ---------------------------------------------------------------------------------------------
# Kernel Inception Distance


def _unbiased_poly_mmd2(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 of two equal-size sets with k(a, b) = (a.b / d + 1)^3: within-set means
    leave out the diagonal (m (m - 1) pairs), the cross mean takes all m^2 pairs."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(real: Any, fake: Any, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 between real and fake
    features with the polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over ``num_subsets``
    subsets of m = min(subset_size, len(real), len(fake)) rows of each set. Each subset draws real
    rows and then fake rows, each without replacement, from ``numpy.random.default_rng(seed)``.

    Returns (mean, std) over subsets, the std with ddof=0 as torchmetrics' KernelInceptionDistance
    (0 for one subset). Needs at least 2 samples in each set (the unbiased within-set mean)."""
    num_subsets = _positive_int("num_subsets", num_subsets)
    subset_size = _positive_int("subset_size", subset_size, minimum=2)
    x = _features("real", real)
    y = _features("fake", fake, device=x.device)
    _same_width("real", x, "fake", y)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"kid needs at least 2 samples in each set, got {len(x)} real and {len(y)} fake")
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(num_subsets):
        rows_x = torch.from_numpy(rng.choice(len(x), size=m, replace=False)).to(x.device)
        rows_y = torch.from_numpy(rng.choice(len(y), size=m, replace=False)).to(x.device)
        scores.append(_unbiased_poly_mmd2(x[rows_x], y[rows_y]))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------
# Improved precision and recall


def _kth_neighbour_sq_radii(x: Tensor, x_sq: Tensor, k: int, batch_size: int) -> Tensor:
    """Squared distance of each row of x to its k-th nearest neighbour in x, itself excluded: the
    (k+1)-th smallest of its distances with its own set to exactly 0, as ADM's evaluator (one
    copy of a duplicated point still counts as a neighbour)."""
    radii = torch.empty(len(x), dtype=torch.float64, device=x.device)
    for start in range(0, len(x), batch_size):
        stop = min(start + batch_size, len(x))
        d = _squared_distances(x[start:stop], x, x_sq[start:stop], x_sq)
        rows = torch.arange(stop - start, device=x.device)
        d[rows, rows + start] = 0.0
        radii[start:stop] = d.kthvalue(k + 1, dim=1).values
    return radii


def precision_recall(real: Any, fake: Any, k: int = 3, *, batch_size: int = 2048) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's evaluator computes them
    (guided-diffusion evaluations/evaluator.py, ManifoldEstimator with nhood k=3).

    Each point's radius is the distance to its k-th nearest neighbour in its own set (itself
    excluded). Precision is the share of fake points within (<=) the radius of some real point;
    recall is the share of real points within the radius of some fake point. Distances are
    compared squared, in float64, from ||a||^2 + ||b||^2 - 2 a.b clipped at 0 (see
    ``_squared_distances``), ``batch_size`` rows at a time, so memory is O(batch_size * N) and
    the result does not depend on ``batch_size``. ADM's evaluator has the same squared distances
    and ``<=`` but in float16 (float32 where float16 overflows), so points within that rounding of
    a ball's edge can count differently there. Needs more than k points in each set."""
    k = _positive_int("k", k)
    batch_size = _positive_int("batch_size", batch_size)
    x = _features("real", real)
    y = _features("fake", fake, device=x.device)
    _same_width("real", x, "fake", y)
    if len(x) <= k or len(y) <= k:
        raise ValueError(f"precision_recall with k={k} needs more than {k} points in each set "
                         f"(a k-th neighbour besides itself), got {len(x)} real and {len(y)} fake")
    x_sq, y_sq = (x * x).sum(dim=1), (y * y).sum(dim=1)
    radii_x = _kth_neighbour_sq_radii(x, x_sq, k, batch_size)
    radii_y = _kth_neighbour_sq_radii(y, y_sq, k, batch_size)
    fake_in = torch.zeros(len(y), dtype=torch.bool, device=x.device)  # inside some real ball
    real_in = torch.zeros(len(x), dtype=torch.bool, device=x.device)  # inside some fake ball
    for start in range(0, len(y), batch_size):  # one distance block serves both directions
        stop = min(start + batch_size, len(y))
        d = _squared_distances(y[start:stop], x, y_sq[start:stop], x_sq)  # (fake rows, real)
        fake_in[start:stop] = (d <= radii_x[None, :]).any(dim=1)
        real_in |= (d <= radii_y[start:stop, None]).any(dim=0)
    return float(fake_in.double().mean()), float(real_in.double().mean())


# ---------------------------------------------------------------------------------------------
# CLIP-based metrics


def clip_score(image_embeds: Any, text_embeds: Any, w: float = 100.0) -> Tensor:
    """CLIPScore (Hessel et al. 2021) of each image with its own caption: w * max(cos(image_i, text_i), 0).
    Returns the (N,) float64 per-sample scores; the usual reported number is their mean. The
    embeddings need not be normalised (cosine is scale-free), but none may be zero."""
    img = _features("image_embeds", image_embeds)
    txt = _features("text_embeds", text_embeds, device=img.device)
    if img.shape != txt.shape:
        raise ValueError(f"image_embeds and text_embeds must pair up row by row with the same shape, "
                         f"got {tuple(img.shape)} and {tuple(txt.shape)}")
    norm_img, norm_txt = img.norm(dim=1), txt.norm(dim=1)
    zero = int(((norm_img == 0) | (norm_txt == 0)).sum())
    if zero:
        raise ValueError(f"{zero} of {len(img)} image/text embedding pairs contain a zero vector; its cosine is undefined")
    cos = (img * txt).sum(dim=1) / (norm_img * norm_txt)
    return w * cos.clamp_min(0.0)


def _mean_rbf(a: Tensor, b: Tensor, gamma: float, batch_size: int = 4096) -> Tensor:
    """Mean of exp(-gamma ||a_i - b_j||^2) over all pairs (i, j), diagonal included, in row blocks."""
    a_sq, b_sq = (a * a).sum(dim=1), (b * b).sum(dim=1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, len(a), batch_size):
        stop = min(start + batch_size, len(a))
        total += torch.exp(-gamma * _squared_distances(a[start:stop], b, a_sq[start:stop], b_sq)).sum()
    return total / (len(a) * len(b))


def cmmd(x: Any, y: Any, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """CMMD (Jayasumana et al. 2024), as google-research/cmmd's ``mmd``: the MMD^2 between two sets
    of (already L2-normalised) CLIP embeddings with the Gaussian RBF kernel
    exp(-||a - b||^2 / (2 sigma^2)), times ``scale``:  scale * (mean k_xx + mean k_yy - 2 mean k_xy).
    Like the reference implementation, the means run over all pairs including the diagonal: the
    biased V-statistic, never negative and exactly 0 for x == y (the unbiased estimate, as in KID,
    is neither). Squared distances are clipped at 0 against rounding (the reference does not; it
    changes the result by ~1e-16 relative)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    a = _features("x", x)
    b = _features("y", y, device=a.device)
    _same_width("x", a, "y", b)
    gamma = 1.0 / (2.0 * sigma**2)
    return float(scale * (_mean_rbf(a, a, gamma) + _mean_rbf(b, b, gamma) - 2.0 * _mean_rbf(a, b, gamma)))
