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
        """E[x0 | x_t] for x_t of shape (B, D) and alpha, sigma scalars or of shape (B,)."""
        x_t = x_t.to(torch.float64)
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        eye = torch.eye(self.dim, dtype=torch.float64)
        marg_cov = a**2 * self.covs + s**2 * eye  # (B, K, D, D): covariance of x_t given component k
        resid = x_t[:, None, :] - a[..., 0] * self.means  # (B, K, D)
        chol = torch.linalg.cholesky(marg_cov)
        solved = torch.cholesky_solve(resid.unsqueeze(-1), chol).squeeze(-1)  # marg_cov^-1 resid
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_resp = self.weights_log - 0.5 * ((resid * solved).sum(-1) + log_det)
        resp = torch.softmax(log_resp, dim=-1)  # (B, K)
        cond_means = self.means + a[..., 0] * torch.einsum("bkij,bkj->bki", self.covs.expand_as(marg_cov), solved)
        return torch.einsum("bk,bkd->bd", resp, cond_means)

    def denoiser(self, schedule: Schedule):
        """The exact model of ``schedule``: ``model(x_t, t) = c x0_hat + d xT_hat`` with
        ``x0_hat = E[x0 | x_t]`` and ``xT_hat = (x_t - alpha x0_hat) / sigma``."""

        def model(x_t: Tensor, t: Tensor) -> Tensor:
            k = schedule.at(t.to(torch.float64))
            x0 = self.posterior_mean(x_t, k.alpha, k.sigma)
            kx = k.like(x0)
            xT = (x_t - kx.alpha * x0) / kx.sigma
            return kx.target(x0, xT).to(x_t.dtype)

        return model
