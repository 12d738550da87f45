"""Learned reverse variances on the discrete DDPM beta table (Nichol & Dhariwal 2021, "Improved
Denoising Diffusion Probabilistic Models"), as ADM and DiT train and sample them.

The model returns, beside its prediction, C channels ``v`` in [-1, 1] (unconstrained in practice)
that interpolate the reverse variance in log space between the two natural bounds, the posterior
variance ``beta~_i`` and ``beta_i``:

    log Sigma_i = frac log beta_i + (1 - frac) log beta~_i,   frac = (v + 1) / 2

It is trained by the hybrid loss ``L_simple + lambda L_vlb`` (:class:`HybridObjective`), where the
VLB term sees the predicted mean through a stop-gradient, so that it trains the variance only, and
sampled by :func:`diffusion.samplers.learned.ddpm_learned`, ancestral DDPM with that variance on any sub-grid of the training
steps (ADM's respacing: the kept steps' betas are recomputed from their alphas_cumprod).

Steps are indexed as in diffusion.schedules.DDPM: training step ``i`` in 0..N-1 is at
``t = (i + 1) / N``, and step ``i`` goes from ``x_i`` to ``x_{i-1}`` (``x_{-1}`` the data).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffusion.objective import DiffusionObjective, Denoiser
from diffusion.schedules import DDPM, Schedule
from diffusion.timesteps import TimeDistribution
from diffusion.weighting import LossWeighting

#: The default lambda of the hybrid loss (Nichol & Dhariwal 2021, section 3.1; ADM and DiT).
VLB_WEIGHT = 0.001


# -- Gaussian pieces --------------------------------------------------------------------------------
def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) elementwise, in nats."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, bins: int = 256) -> Tensor:
    """log P(x) elementwise of data ``x`` in [-1, 1] quantised to ``bins`` levels, under
    N(mean, exp(log_scale)^2) integrated over each level's bin (the DDPM decoder, Ho et al. 2020
    eq. 13); the end bins reach to -inf and +inf. The exact normal CDF is used (ADM uses a tanh
    approximation of it), and probabilities are floored at 1e-12 as in ADM."""
    half = 1.0 / (bins - 1)  # half a bin: the levels are 2 / (bins - 1) apart
    centred = x - mean
    inv_scale = torch.exp(-log_scale)
    upper, lower = inv_scale * (centred + half), inv_scale * (centred - half)
    log_below_upper = torch.special.log_ndtr(upper)  # the lowest bin: P(X < x + half)
    log_above_lower = torch.special.log_ndtr(-lower)  # the highest bin: P(X > x - half)
    # A bin's mass Phi(hi) - Phi(lo) = Phi(hi) (1 - Phi(lo) / Phi(hi)), in logs, taken in the lower tail
    # (mirrored where x is above the mean), where neither is a number near 1.
    hi, lo = torch.where(centred > 0, -lower, upper), torch.where(centred > 0, -upper, lower)
    log_hi = torch.special.log_ndtr(hi)
    log_mass = log_hi + torch.log1p(-torch.exp(torch.special.log_ndtr(lo) - log_hi))
    edge = 1.0 - 1.0 / bins  # ADM's 0.999: inside the outermost levels (+-1), past their neighbours
    floor = math.log(1e-12)
    return torch.where(x < -edge, log_below_upper, torch.where(x > edge, log_above_lower, log_mass)).clamp_min(floor)


# -- the table of a (respaced) chain ----------------------------------------------------------------
@dataclass(frozen=True)
class PosteriorTable:
    """The per-step quantities of a DDPM chain over the kept steps (float64, one entry per step):
    ``betas`` (respaced: ``1 - abar_k / abar_{k-1}``), the posterior q(x_{k-1} | x_k, x0)'s variance
    ``beta~`` and the coefficients of its mean ``coef_x0 x0 + coef_xt x_k``, and ADM's clipped log
    variance (``log beta~`` with entry 0, where beta~ is 0, replaced by entry 1's)."""

    steps: Tensor  # the kept training steps, increasing (long)
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor  # 1 before the first kept step (the data)
    betas: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    coef_x0: Tensor
    coef_xt: Tensor
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)  # (name, device) -> the field there

    @classmethod
    def from_schedule(cls, schedule: Schedule, steps: Sequence[int] | Tensor | None = None) -> "PosteriorTable":
        """The table of ``schedule`` (a DDPM) over all its training steps, or over the increasing
        sub-grid ``steps`` of them (respaced)."""
        schedule = check_ddpm(schedule, "a learned variance")
        n = schedule.num_steps
        kept = torch.arange(n) if steps is None else torch.as_tensor(steps, dtype=torch.long)
        if kept.ndim != 1 or kept.numel() < 1 or bool((kept[1:] <= kept[:-1]).any()) or kept[0] < 0 or kept[-1] >= n:
            raise ValueError(f"steps must be increasing training steps in 0..{n - 1}, got {kept.tolist()[:8]}")
        abar = schedule.alphas_cumprod[kept]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        betas = 1 - abar / abar_prev
        variance = betas * (1 - abar_prev) / (1 - abar)
        # Entry 0's variance is 0 (the step to the data): its log is taken from entry 1, as ADM does;
        # a one-step chain keeps beta there.
        floor = variance[1] if len(variance) > 1 else betas[0]
        log_clipped = torch.log(torch.cat([floor.reshape(1), variance[1:]]))
        return cls(kept, abar, abar_prev, betas, variance, log_clipped,
                   betas * abar_prev.sqrt() / (1 - abar), (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar))

    def __len__(self) -> int:
        return len(self.steps)

    def at(self, name: str, index: Tensor, like: Tensor) -> Tensor:
        """Entry ``index`` (shape (B,)) of the field ``name``, shaped (B, 1, ..., 1) like ``like``."""
        key = (name, like.device)
        table = self._on_device.get(key)
        if table is None:  # copied to a device once, not on every training step
            table = self._on_device.setdefault(key, getattr(self, name).to(like.device))
        values = table[index.to(like.device)]
        return values.to(like.dtype).reshape(-1, *(1,) * (like.ndim - 1))

    def posterior(self, x0: Tensor, x_t: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """The mean and clipped log variance of q(x_{k-1} | x_k = x_t, x0) at entries ``index``."""
        mean = self.at("coef_x0", index, x_t) * x0 + self.at("coef_xt", index, x_t) * x_t
        return mean, self.at("posterior_log_variance_clipped", index, x_t).expand_as(x_t)

    def model_log_variance(self, v: Tensor, index: Tensor) -> Tensor:
        """``frac log beta + (1 - frac) log beta~_clipped`` with ``frac = (v + 1) / 2``."""
        frac = (v + 1) / 2
        log_beta = torch.log(self.at("betas", index, v))
        return frac * log_beta + (1 - frac) * self.at("posterior_log_variance_clipped", index, v)


def check_ddpm(schedule: Schedule, what: str) -> DDPM:
    if not isinstance(schedule, DDPM):
        raise ValueError(f"{what} is defined on the discrete beta table of a DDPM schedule, and the schedule is "
                         f"{schedule!r}; use schedule=ddpm (or another DDPM theory), or a backbone without "
                         "learned variance (backbone.learn_sigma=false)")
    return schedule


def check_learned_variance(backbone: Any, schedule: Schedule, what: str) -> None:
    """Refuse ``what`` (a sampler, say) for a backbone without variance channels or a non-DDPM schedule."""
    if not getattr(backbone, "learn_sigma", False):
        raise ValueError(f"{what} needs a model with learned variance (a backbone built with learn_sigma=True, "
                         f"trained with the hybrid loss); {type(backbone).__name__} has none. Sample it with "
                         "another sampler, e.g. sampler=ancestral")
    check_ddpm(schedule, what)


def steps_of_times(schedule: DDPM, times: Tensor) -> Tensor:
    """The training steps ``i`` at ``t = (i + 1) / N`` (float64 times), nearest, clamped to 0..N-1."""
    n = schedule.num_steps
    return (times.double() * n).round().long().sub(1).clamp(0, n - 1)


def split_variance(output: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """``(prediction, v)`` of a model output of 2C channels (prediction first, as DiT and ADM)."""
    if output.ndim < 2 or output.shape[1] != 2 * channels:
        raise ValueError(f"a model with learned variance returns 2 x {channels} channels (prediction, variance) "
                         f"with return_variance=True; got shape {tuple(output.shape)}")
    return output[:, :channels], output[:, channels:]


# -- the hybrid loss --------------------------------------------------------------------------------
@dataclass
class HybridObjective(DiffusionObjective):
    """``L_simple + vlb_weight * N * L_t`` per sample (Nichol & Dhariwal 2021, eq. 16), ``L_simple``
    the weighted MSE of :class:`DiffusionObjective` and ``L_t`` the VLB term at the sample's step in
    bits per dimension: KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i)) for i > 0, the discretised
    decoder's NLL at i = 0. The model's mean enters ``L_t`` through a stop-gradient, so ``L_t``
    trains the variance channels only. With N = 1000 and the default 0.001 this is ADM's and DiT's
    ``mse + vb``; N L_t is the whole-chain VLB's estimate, so lambda stays meaningful for any N.

    The model is called ``model(x_t, t, return_variance=True)`` and returns 2C channels. Times are
    put on the nearest training step (DiscreteUniform draws them there; validation's mid-bin
    times move to a step), since the VLB is defined at the steps only.
    """

    vlb_weight: float = VLB_WEIGHT

    def __post_init__(self) -> None:
        super().__post_init__()
        self.table = PosteriorTable.from_schedule(self.schedule)
        if not self.vlb_weight >= 0:
            raise ValueError(f"vlb_weight must be >= 0 (0.001 in Nichol & Dhariwal 2021), got {self.vlb_weight!r}")

    def per_sample_loss(self, model: Denoiser, x0: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        index = steps_of_times(self.schedule, t)
        t = ((index + 1).to(t.dtype)) / self.schedule.num_steps  # on the steps, as DiscreteUniform draws them
        k = self.schedule.at(t)
        kx = k.like(x0)
        x_t = kx.add_noise(x0, noise)
        prediction, v = split_variance(model(x_t, t, return_variance=True), x0.shape[1])
        mse = ((prediction.float() - kx.target(x0, noise).float()) ** 2).flatten(1).mean(1) * self.weighting(k).float()
        vlb = self.vlb_term(x0, x_t, prediction, v, t)
        return mse + (self.vlb_weight * self.schedule.num_steps) * vlb, t

    def vlb_term(self, x0: Tensor, x_t: Tensor, prediction: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """L_t per sample in bits per dimension (shape (B,)), the prediction detached; ``t`` on the steps."""
        index = steps_of_times(self.schedule, t)
        dtype = torch.promote_types(x0.dtype, torch.float32)
        x0, x_t, v = x0.to(dtype), x_t.to(dtype), v.to(dtype)
        x0_hat, _ = self.schedule.at(t).like(x_t).split(x_t, prediction.detach().to(dtype))
        true_mean, true_log_var = self.table.posterior(x0, x_t, index)
        model_mean, _ = self.table.posterior(x0_hat, x_t, index)
        model_log_var = self.table.model_log_variance(v, index)
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(1)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(1)
        return torch.where(index.to(kl.device) == 0, nll, kl) / math.log(2.0)


def make_objective(backbone: Any, schedule: Schedule, time_distribution: TimeDistribution, weighting: LossWeighting,
                   vlb_weight: float = VLB_WEIGHT) -> DiffusionObjective:
    """The training objective of a backbone: the hybrid loss if it learns its variance
    (``learn_sigma``) and ``vlb_weight > 0``, else the plain one. ``vlb_weight = 0`` leaves a variance
    head untrained, as SiT does with its own (and then any theory trains)."""
    if not getattr(backbone, "learn_sigma", False) or vlb_weight == 0:
        return DiffusionObjective(schedule, time_distribution, weighting)
    if not isinstance(schedule, DDPM):
        raise ValueError(f"backbone.learn_sigma=true trains a learned variance with the hybrid loss, which is defined "
                         f"on the discrete beta table of a DDPM schedule; the schedule is {schedule!r}. Use "
                         "schedule=ddpm, backbone.learn_sigma=false, or model.vlb_weight=0 to keep the variance "
                         "head untrained (as SiT does)")
    return HybridObjective(schedule, time_distribution, weighting, vlb_weight=vlb_weight)
