"""Toy data with a closed-form exact denoiser: a mixture of Gaussians in a few dimensions.

For ``x0 ~ sum_k pi_k N(m_k, S_k)`` and ``x_t = alpha x0 + sigma xT`` the posterior mean is
closed-form, so the exact model output of any theory is known. Tests use it to check that
samplers reproduce the data distribution; the theory notebook uses it for its plots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffusion.schedules import Schedule


class GaussianMixture:
    """``sum_k weights[k] * N(means[k], covs[k])`` in ``D`` dimensions, in float64."""

    def __init__(self, weights: Sequence[float], means: Sequence[Sequence[float]], covs: Sequence | Tensor):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)  # (K, D, D)
        k, dim = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, dim, dim):
            raise ValueError(f"need weights (K,), means (K, D), covs (K, D, D); got {self.weights.shape}, "
                             f"{self.means.shape}, {self.covs.shape}")
        if not torch.isclose(self.weights.sum(), torch.tensor(1.0, dtype=torch.float64)):
            raise ValueError(f"weights must sum to 1, got {self.weights.sum().item()}")
        self.weights_log = self.weights.log()

    @classmethod
    def gaussian(cls, mean: Sequence[float], cov: Sequence[Sequence[float]]) -> "GaussianMixture":
        return cls([1.0], [mean], [cov])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> Tensor:
        return self.weights @ self.means

    @property
    def cov(self) -> Tensor:
        """Law of total covariance: E[S_k] + Cov[m_k]."""
        centred = self.means - self.mean
        return torch.einsum("k,kij->ij", self.weights, self.covs) + torch.einsum("k,ki,kj->ij", self.weights, centred, centred)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[comp] + torch.einsum("nij,nj->ni", chol[comp], z)

    def sample_noisy(self, n: int, alpha: float, sigma: float, generator: torch.Generator | None = None) -> Tensor:
        """Draws from the marginal of ``x_t`` (e.g. the exact start of a sampler at t = 1)."""
        x0 = self.sample(n, generator)
        return alpha * x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float64)

    def posterior_mean(self, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """E[x0 | x_t] for x_t of shape (B, D) and alpha, sigma scalars or of shape (B,).

        Given component k, x_t ~ N(alpha m_k, C_k) with C_k = alpha^2 S_k + sigma^2 I, and
        E[x0 | x_t, k] = m_k + alpha S_k C_k^-1 (x_t - alpha m_k); the components are weighted
        by their posterior responsibilities."""
        x_t = x_t.to(torch.float64)
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1, 1)  # (P, 1, 1, 1), P = 1 or B
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        marg_cov = a**2 * self.covs + s**2 * torch.eye(self.dim, dtype=torch.float64)  # (P, K, D, D)
        precision = torch.linalg.inv(marg_cov)
        log_det = torch.logdet(marg_cov)  # (P, K)
        resid = x_t[:, None, :] - a[..., 0] * self.means  # (B, K, D)
        # One shared time (P = 1, every sampler call) applies K matrices to all samples at once.
        pattern = "kij,bkj->bki" if precision.shape[0] == 1 else "bkij,bkj->bki"
        solved = torch.einsum(pattern, precision.squeeze(0) if precision.shape[0] == 1 else precision, resid)
        log_resp = self.weights_log - 0.5 * ((resid * solved).sum(-1) + log_det)  # (B, K)
        gain = torch.einsum("kij,bkj->bki", self.covs, solved)  # S_k C_k^-1 resid
        cond_means = self.means + a[..., 0] * gain
        return torch.einsum("bk,bkd->bd", torch.softmax(log_resp, dim=-1), cond_means)

    def denoiser(self, schedule: Schedule):
        """The exact model of ``schedule``: ``model(x_t, t) = c x0_hat + d xT_hat`` with
        ``x0_hat = E[x0 | x_t]`` and ``xT_hat = (x_t - alpha x0_hat) / sigma``."""

        def model(x_t: Tensor, t: Tensor) -> Tensor:
            t = t.to(torch.float64)
            if t.numel() > 1 and bool((t == t[0]).all()):
                t = t[:1]  # a sampler's batch shares one time: one set of matrices, not B
            k = schedule.at(t)
            x0 = self.posterior_mean(x_t, k.alpha, k.sigma)
            kx = k.like(x0)
            xT = (x_t - kx.alpha * x0) / kx.sigma
            return kx.target(x0, xT).to(x_t.dtype)

        return model
