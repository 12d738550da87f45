"""Training-time distributions: how the time t in [0, 1] of each training sample is drawn.

The resolution-dependent shift of SD3 / FLUX moves mass towards noise for larger images,
whose pixels are more redundant and so keep their signal longer at a given t.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, Union

import torch
from torch import Tensor

from diffusion._checks import check_positive

if TYPE_CHECKING:
    from diffusion.schedules import Schedule


def time_shift(t: Tensor, shift: float) -> Tensor:
    """``shift * t / (1 + (shift - 1) * t)`` (Esser et al. 2024, eq. 23). FLUX's
    ``exp(mu) / (exp(mu) + 1 / t - 1)`` is the same map with ``shift = exp(mu)``."""
    return shift * t / (1 + (shift - 1) * t)


class SD3Shift:
    """SD3 (Esser et al. 2024): ``shift = sqrt(m / n)`` for an image of m pixels trained from a
    base of n pixels. Given here per latent (or pixel) grid: ``reference_size`` is the side of the
    base grid (32 latents = 256 px through an 8x VAE)."""

    def __init__(self, reference_size: int = 32):
        self.reference_size = check_positive("reference_size", reference_size)

    def __call__(self, height: int, width: int) -> float:
        return math.sqrt(height * width) / self.reference_size


class FluxShift:
    """FLUX: ``mu`` linear in the token count, from ``base_shift`` at ``base_tokens`` to
    ``max_shift`` at ``max_tokens``; ``shift = exp(mu)``. Tokens are ``(h / patch) * (w / patch)``
    (FLUX packs 2x2 latent patches)."""

    def __init__(
        self,
        patch_size: int = 2,
        base_tokens: int = 256,
        max_tokens: int = 4096,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
    ):
        if max_tokens <= base_tokens:
            raise ValueError(f"max_tokens ({max_tokens}) must exceed base_tokens ({base_tokens})")
        self.patch_size, self.base_tokens, self.max_tokens = patch_size, base_tokens, max_tokens
        self.base_shift, self.max_shift = base_shift, max_shift

    def mu(self, num_tokens: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_tokens - self.base_tokens)
        return self.base_shift + slope * (num_tokens - self.base_tokens)

    def __call__(self, height: int, width: int) -> float:
        return math.exp(self.mu((height // self.patch_size) * (width // self.patch_size)))


Shift = Union[float, Callable[[int, int], float]]


class TimeDistribution(ABC):
    """Draws training times. ``shift`` is a number, or a rule (like :class:`SD3Shift`) that
    gives one from the batch's spatial size; 1 means no shift."""

    def __init__(self, shift: Shift = 1.0):
        if not callable(shift):
            check_positive("shift", shift)
        self.shift = shift
        self._schedule: Schedule | None = None

    def bind(self, schedule: Schedule) -> None:
        """Give the distribution its theory, which the objective does when it is built: the shift
        acts on the log-SNR (:meth:`Schedule.shift_times`), and a distribution of noise levels
        (:class:`LogNormalNoise`) maps them to the theory's times."""
        self._schedule = schedule

    def _theory(self) -> Schedule:
        if self._schedule is None:
            raise ValueError(f"{type(self).__name__} draws noise levels, which need the theory's times: "
                             "call bind(schedule) first (DiffusionObjective does)")
        return self._schedule

    @abstractmethod
    def _draw(self, n: int, generator: torch.Generator | None, device: torch.device | None) -> Tensor:
        """n float32 values: times in [0, 1] before any shift, unless :meth:`_to_times` maps them."""

    def sample(
        self,
        n: int,
        *,
        size: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``n`` times in [0, 1] (float32, shape (n,)); ``size`` = (height, width) of the batch
        feeds a resolution-dependent shift."""
        return self.finish(self.draw(n, generator=generator, device=device), size=size)

    def draw(self, n: int, *, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> Tensor:
        """The random part of :meth:`sample`: ``n`` values that :meth:`finish` maps to times.
        Training draws them one sample at a time (each from its own seed) and finishes the batch
        at once, so a map that costs many operations (a bisection) runs once per batch."""
        return self._draw(n, generator, device)

    def finish(self, drawn: Tensor, *, size: tuple[int, int] | None = None) -> Tensor:
        """Draws of :meth:`draw` -> times: the distribution's own map, then the shift."""
        t = self._to_times(drawn)
        shift = self.shift
        if callable(shift):
            if size is None:
                raise ValueError(f"{type(self).__name__} has a resolution-dependent shift; pass size=(height, width)")
            shift = shift(*size)
        if shift == 1:
            return t
        # Unbound (no theory given), the shift is the flow-matching map it was defined as.
        return time_shift(t, shift) if self._schedule is None else self._schedule.shift_times(t, shift)

    def _to_times(self, drawn: Tensor) -> Tensor:
        return drawn

    def __repr__(self) -> str:
        args = (f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({', '.join(args)})"


class Uniform(TimeDistribution):
    """t ~ U[t_min, t_max]."""

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0, shift: Shift = 1.0):
        super().__init__(shift)
        if not 0 <= t_min < t_max <= 1:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = t_min, t_max

    def _draw(self, n, generator, device):
        u = torch.rand(n, generator=generator, device=device)
        return self.t_min + (self.t_max - self.t_min) * u


class DiscreteUniform(TimeDistribution):
    """Uniform over the N training steps of a discrete schedule: t = (i + 1) / N, i in 0..N-1
    (the times at which :class:`~diffusion.schedules.DDPM` places its steps)."""

    def __init__(self, num_steps: int = 1000, shift: Shift = 1.0):
        super().__init__(shift)
        self.num_steps = int(check_positive("num_steps", num_steps))

    def _draw(self, n, generator, device):
        i = torch.randint(0, self.num_steps, (n,), generator=generator, device=device)
        return (i + 1).float() / self.num_steps


class LogitNormal(TimeDistribution):
    """t = sigmoid(mean + std * z), z ~ N(0, 1): more weight on the middle times
    (Esser et al. 2024, whose best setting is mean 0, std 1)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, shift: Shift = 1.0):
        super().__init__(shift)
        self.mean, self.std = mean, check_positive("std", std)

    def _draw(self, n, generator, device):
        z = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(self.mean + self.std * z)


class _NoiseLevels(TimeDistribution):
    """Draws noise levels ``sigma / alpha`` (Karras' sigma, ``exp(-log_snr / 2)``) and returns the
    times of the bound theory at which they occur, so it trains any theory, not only EDM. A level
    beyond the theory's range is clamped to its end (t = 0 or 1)."""

    # _draw gives n values of log(sigma / alpha), which _to_times maps to the theory's times.
    def _to_times(self, log_level: Tensor) -> Tensor:
        return self._theory().t_at_log_snr(-2 * log_level.double()).clamp(0, 1).float()


class LogNormalNoise(_NoiseLevels):
    """EDM's training distribution (Karras et al. 2022, Table 1): ``log sigma ~ N(mean, std^2)``,
    with the paper's ``P_mean = -1.2``, ``P_std = 1.2``."""

    def __init__(self, mean: float = -1.2, std: float = 1.2, shift: Shift = 1.0):
        super().__init__(shift)
        self.mean, self.std = float(mean), check_positive("std", std)

    def _draw(self, n, generator, device):
        return self.mean + self.std * torch.randn(n, generator=generator, device=device)


class LogUniformNoise(_NoiseLevels):
    """``log sigma ~ U(log sigma_min, log sigma_max)``: the VE SDE's training distribution (Song et
    al. 2021; EDM Table 1, "VE")."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, shift: Shift = 1.0):
        super().__init__(shift)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def _draw(self, n, generator, device):
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)
