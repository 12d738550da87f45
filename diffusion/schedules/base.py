"""A diffusion theory is two linear definitions over the clean sample ``x0`` and the noise
``xT ~ N(0, I)`` at a continuous time ``t in [0, 1]`` (t = 0 is data, t = 1 is noise):

    data definition   x_t    = alpha(t) * x0 + sigma(t) * xT
    model definition  target = c(t)     * x0 + d(t)     * xT

A subclass of :class:`Schedule` defines only those four coefficient functions. Everything
else -- noising, the training target, recovering ``(x0_hat, xT_hat)`` from a model output,
SNR, log-SNR and the deterministic step -- is derived here, once, from the 2x2 matrix
``[[alpha, sigma], [c, d]]`` (see :class:`Coefficients`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, Callable, Union

import torch
from torch import Tensor

from diffusion._checks import check_choice, check_on_device

Scalar = Union[Tensor, float]

#: Standard model definitions, each a pair (c, d) given the path. ``velocity`` is the time
#: derivative of the path, d x_t / dt, and needs the path's ``alpha_dot`` and ``sigma_dot``.
PREDICTIONS = ("eps", "x0", "v", "velocity")


def _right_pad(value: Scalar, ndim: int) -> Scalar:
    """Reshape a per-sample coefficient of shape (B,) to (B, 1, ..., 1) so it broadcasts
    against a tensor of ``ndim`` dimensions; leave 0-d tensors and Python floats alone."""
    if isinstance(value, Tensor) and value.ndim > 0:
        return value.reshape(value.shape + (1,) * (ndim - value.ndim))
    return value


def _lincomb(a: Scalar, x: Tensor, b: Scalar, y: Tensor) -> Tensor:
    """``a * x + b * y`` in as few passes over the data as the coefficients allow: samplers call
    this with Python floats on every step, training with per-sample tensors."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if b == 0:
            return x * a
        if a == 0:
            return y * b
        return torch.add(x * a, y, alpha=b)
    return torch.addcmul(a * x, torch.as_tensor(b), y)


@dataclass(frozen=True)
class Coefficients:
    """The 2x2 matrix ``[[alpha, sigma], [c, d]]`` at one time, or at a batch of times.

    Fields are Python floats (what samplers precompute once per grid point) or tensors of the
    shape of ``t`` (what training uses, one time per sample); :meth:`like` makes them broadcast
    against a sample tensor.
    """

    alpha: Scalar
    sigma: Scalar
    c: Scalar
    d: Scalar

    def like(self, x: Tensor) -> "Coefficients":
        """Per-sample coefficients shaped (B, 1, ..., 1) with the dtype and device of ``x``."""

        def adapt(v: Scalar) -> Scalar:
            if isinstance(v, Tensor):
                v = v.to(device=x.device, dtype=x.dtype)
            return _right_pad(v, x.ndim)

        return Coefficients(*(adapt(getattr(self, f.name)) for f in fields(self)))

    def unbind(self) -> list["Coefficients"]:
        """One :class:`Coefficients` of Python floats per time of a 1-D batch."""
        columns = (torch.as_tensor(getattr(self, f.name)).reshape(-1).tolist() for f in fields(self))
        return [Coefficients(*values) for values in zip(*columns)]

    # --- derived once -------------------------------------------------------------------
    @property
    def det(self) -> Scalar:
        """Determinant of the 2x2 matrix; the theory is usable where it is non-zero."""
        return self.alpha * self.d - self.sigma * self.c

    def add_noise(self, x0: Tensor, xT: Tensor) -> Tensor:
        """The data definition: ``x_t = alpha x0 + sigma xT``."""
        return _lincomb(self.alpha, x0, self.sigma, xT)

    def target(self, x0: Tensor, xT: Tensor) -> Tensor:
        """The model definition: ``target = c x0 + d xT``."""
        return _lincomb(self.c, x0, self.d, xT)

    def split(self, x_t: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the matrix: from ``(x_t, model output)`` to the estimates ``(x0_hat, xT_hat)``."""
        det = self.det
        x0 = _lincomb(self.d / det, x_t, -self.sigma / det, output)
        xT = _lincomb(-self.c / det, x_t, self.alpha / det, output)
        return x0, xT

    @property
    def snr(self) -> Scalar:
        """Signal-to-noise ratio ``alpha^2 / sigma^2`` (inf at t = 0, 0 where alpha = 0)."""
        return self.alpha**2 / self.sigma**2

    @property
    def x0_error_scale(self) -> Scalar:
        """The factor turning an error in the model output into an error in ``x0_hat``:
        ``x0_hat - x0 = -(sigma / det) * (output - target)``. Loss weightings defined on the
        x0 error convert to the model's own target through its square. Where d = 0 (x0-type
        predictions) it is -1 / c exactly, which also holds at t = 0, where sigma / det is 0 / 0."""
        if isinstance(self.d, Tensor):
            return torch.where(self.d == 0, -1 / self.c, self.sigma / self.det)
        return -1 / self.c if self.d == 0 else self.sigma / self.det


class Schedule(ABC):
    """A diffusion theory: ``alpha, sigma`` (the data definition) and ``c, d`` (the model
    definition), each a function of a tensor ``t`` in [0, 1] returning a tensor of its shape.

    ``c`` and ``d`` follow from ``prediction`` (one of :data:`PREDICTIONS`) unless a subclass
    overrides them. A new theory is a subclass with a few lines::

        class TrigFlow(Schedule):
            def alpha(self, t): return torch.cos(torch.pi * t / 2)
            def sigma(self, t): return torch.sin(torch.pi * t / 2)
            def c(self, t): return -self.sigma(t)   # v = alpha xT - sigma x0
            def d(self, t): return self.alpha(t)

    On first use the theory is checked once (t = 0 is data, the SNR falls, the matrix is
    invertible on (0, 1]); every time argument is checked to lie in [0, 1], on its device (the host
    does not wait for the verdict), unless ``validate_args`` is set to False.
    """

    validate_args: bool = True
    prediction: str | None = None

    def __init__(self, prediction: str | None = None):
        if prediction is not None:
            self.prediction = check_choice("prediction", prediction, PREDICTIONS)

    # --- the two definitions ------------------------------------------------------------
    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor: ...

    def c(self, t: Tensor) -> Tensor:
        return self._prediction_coefficients(t)[0]

    def d(self, t: Tensor) -> Tensor:
        return self._prediction_coefficients(t)[1]

    def alpha_dot(self, t: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no alpha_dot; prediction='velocity' needs it")

    def sigma_dot(self, t: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no sigma_dot; prediction='velocity' needs it")

    def _prediction_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        name = self.prediction
        if name is None:
            raise NotImplementedError(
                f"{type(self).__name__} must either set prediction (one of {PREDICTIONS}) or define c(t) and d(t)"
            )
        zeros, ones = torch.zeros_like(t), torch.ones_like(t)
        if name == "eps":
            return zeros, ones
        if name == "x0":
            return ones, zeros
        if name == "v":  # Salimans & Ho 2022: v = alpha xT - sigma x0
            return -self.sigma(t), self.alpha(t)
        return self.alpha_dot(t), self.sigma_dot(t)  # velocity: d x_t / dt

    # --- how the backbone sees x_t and t ------------------------------------------------
    def model_input(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """What the backbone receives for ``(x_t, t)``: ``(c_in x_t, c_noise(t))`` in EDM's terms
        (Karras et al. 2022, Table 1). The identity unless a theory says otherwise: DDPM and flow
        matching feed ``x_t`` and ``t`` themselves, and the backbone scales ``t`` by its
        ``time_scale``. The output side needs nothing here: it is the model definition ``(c, d)``."""
        return x_t, t

    def prior_std(self, t: float = 1.0) -> float:
        """The standard deviation of the noise a sampler starts from at time ``t``: that of
        ``x_t`` for data of unit variance, ``sqrt(alpha^2 + sigma^2)``. It is 1 on variance-
        preserving and flow paths (N(0, I), as DDPM and diffusers start) and ``sqrt(1 + sigma^2)``
        on a variance-exploding one (diffusers' EDM ``init_noise_sigma``)."""
        k = self.at(float(t))
        return math.sqrt(float(k.alpha) ** 2 + float(k.sigma) ** 2)

    @property
    def first_trained_time(self) -> float:
        """The smallest time the model is trained at: 0 for a continuous theory, the first
        training step for a discrete one (a Karras grid stays at or above it)."""
        return 0.0

    def shift_times(self, t: Tensor, shift: float) -> Tensor:
        """The resolution shift of SD3 / FLUX on the log-SNR: the time whose log-SNR is
        ``log_snr(t) - 2 log(shift)``, so a shift means the same for every theory (``shift > 1``
        moves towards noise). On the straight flow path it is ``shift t / (1 + (shift - 1) t)``
        (Esser et al. 2024, eq. 23), which :class:`~diffusion.schedules.FlowMatching` computes
        in closed form. ``t`` keeps its dtype; the ends 0 and 1 stay where they are."""
        if shift == 1:
            return t
        lam = self.log_snr(t.to(torch.float64)) - 2 * math.log(shift)
        shifted = self.t_at_log_snr(lam)
        shifted = torch.where(t <= 0, torch.zeros_like(shifted), torch.where(t >= 1, torch.ones_like(shifted), shifted))
        return shifted.to(t.dtype)

    # --- everything derived -------------------------------------------------------------
    def at(self, t: Scalar) -> Coefficients:
        """The matrix ``[[alpha, sigma], [c, d]]`` at ``t`` (a float or a tensor of times)."""
        if not isinstance(t, Tensor):
            t = torch.tensor(float(t), dtype=torch.float64)
        if self.validate_args:
            self._check_once()
            _check_times(t)
        return Coefficients(self.alpha(t), self.sigma(t), self.c(t), self.d(t))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Scalar) -> Tensor:
        """``x_t = alpha(t) x0 + sigma(t) noise``; ``t`` is a float or has shape (B,)."""
        return self.at(t).like(x0).add_noise(x0, noise)

    def target(self, x0: Tensor, noise: Tensor, t: Scalar) -> Tensor:
        """The training target ``c(t) x0 + d(t) noise``."""
        return self.at(t).like(x0).target(x0, noise)

    def split(self, x_t: Tensor, output: Tensor, t: Scalar) -> tuple[Tensor, Tensor]:
        """``(x0_hat, xT_hat)`` from a model output at ``(x_t, t)``."""
        return self.at(t).like(x_t).split(x_t, output)

    def step(self, x_t: Tensor, output: Tensor, t: Scalar, s: Scalar) -> Tensor:
        """The deterministic step to time ``s``: ``x_s = alpha(s) x0_hat + sigma(s) xT_hat``.
        It is flow-matching Euler for rectified flow and DDIM (eta = 0) for DDPM."""
        x0, xT = self.split(x_t, output, t)
        return self.at(s).like(x_t).add_noise(x0, xT)

    def snr(self, t: Scalar) -> Tensor:
        return self.at(t).snr

    def log_snr(self, t: Scalar) -> Tensor:
        """``log(alpha^2 / sigma^2)``; DPM-Solver's lambda is half of it."""
        k = self.at(t)
        return 2 * (torch.log(k.alpha) - torch.log(k.sigma))

    def t_at_log_snr(self, log_snr: Tensor, iterations: int = 64) -> Tensor:
        """The time at which the log-SNR takes the given values (float64): the inverse of
        :meth:`log_snr`, by bisection, which works for any theory since its SNR falls in t."""
        target = torch.as_tensor(log_snr, dtype=torch.float64)
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(iterations):
            mid = (lo + hi) / 2
            above = self.log_snr(mid) > target  # still too clean: the answer is later
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (lo + hi) / 2

    # --- checks -------------------------------------------------------------------------
    def _check_once(self) -> None:
        if self.__dict__.get("_checked"):
            return
        check_theory(self)
        self.__dict__["_checked"] = True

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and not isinstance(v, Tensor))
        return f"{type(self).__name__}({args})"


class _ModelInput:
    """``backbone`` called on the theory's input map of ``(x_t, t)``; what else it takes passes through."""

    def __init__(self, backbone: Callable[..., Tensor], schedule: "Schedule"):
        self.backbone, self.schedule = backbone, schedule

    def __call__(self, x_t: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.backbone(*self.schedule.model_input(x_t, t), *args, **kwargs)


def with_model_input(backbone: Callable[..., Tensor], schedule: "Schedule") -> Callable[..., Tensor]:
    """The model of the theory: ``backbone`` seeing ``schedule.model_input(x_t, t)``. A theory that
    keeps the identity gets the backbone itself back, so today's theories run exactly as before."""
    if type(schedule).model_input is Schedule.model_input:
        return backbone
    return _ModelInput(backbone, schedule)


def _check_times(t: Tensor) -> None:
    # Checked on t's device on every call, so the host never waits for it: training draws t on the
    # device each step, and a new time distribution or theory may break it at any step. A NaN fails too.
    inside = (t >= 0) & (t <= 1)
    message = "t must lie in [0, 1] (t = 0 is data, t = 1 is noise)"
    check_on_device(inside.all(), message, lambda: f"{message}; got {t[~inside].flatten()[:4].tolist()}")


def check_theory(schedule: Schedule, num: int = 1001) -> None:
    """Check that a schedule is a usable theory, on a grid of ``num`` times (float64):
    t = 0 is clean data, the SNR falls strictly with t, and the 2x2 matrix is invertible on
    (0, 1] (samplers evaluate the model there). Raises ValueError naming what fails."""
    name = type(schedule).__name__
    t = torch.linspace(0, 1, num, dtype=torch.float64)
    alpha, sigma, c, d = (torch.as_tensor(f(t)) for f in (schedule.alpha, schedule.sigma, schedule.c, schedule.d))
    for label, v in (("alpha", alpha), ("sigma", sigma), ("c", c), ("d", d)):
        if v.shape != t.shape or not bool(torch.isfinite(v).all()):
            raise ValueError(
                f"{name}.{label}(t) must return finite values in a tensor of the shape of t on [0, 1] "
                "(for a constant, return torch.full_like(t, value))"
            )
    if not (math.isclose(alpha[0].item(), 1.0, abs_tol=1e-9) and abs(sigma[0].item()) < 1e-9):
        raise ValueError(
            f"{name}: t = 0 must be clean data, alpha(0) = 1 and sigma(0) = 0; "
            f"got alpha(0) = {alpha[0].item()}, sigma(0) = {sigma[0].item()}"
        )
    if bool((sigma[1:] <= 0).any()) or bool((alpha < 0).any()):
        raise ValueError(f"{name}: need sigma(t) > 0 on (0, 1] and alpha(t) >= 0 on [0, 1]")
    snr = alpha[1:] ** 2 / sigma[1:] ** 2
    if not bool((snr[1:] < snr[:-1]).all()):
        raise ValueError(f"{name}: the signal-to-noise ratio alpha^2 / sigma^2 must fall strictly with t")
    det = (alpha * d - sigma * c)[1:]
    scale = alpha[1:].abs() + sigma[1:].abs()
    singular = det.abs() <= 1e-12 * scale * (c[1:].abs() + d[1:].abs())
    if bool(singular.any()):
        where = t[1:][singular][0].item()
        raise ValueError(
            f"{name}: the matrix [[alpha, sigma], [c, d]] is singular at t = {where:g}, so the model output "
            f"cannot be turned back into (x0, xT) there (prediction={schedule.prediction!r}). "
            "Choose a model definition with alpha * d - sigma * c != 0 on (0, 1]."
        )
