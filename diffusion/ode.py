"""Two ODE integrators of our own for a batched state (a tuple of tensors whose first dimension is
the batch): fixed-step classical Runge-Kutta (RK4) and adaptive Dormand-Prince 5(4) (Dormand &
Prince 1980; the tableau as in Hairer, Norsett & Wanner, *Solving ODEs I*, II.5), with the
first step chosen as in Hairer et al. II.4. The likelihood of diffusion.likelihood integrates with them.

``f(t, y) -> dy/dt`` takes a Python float time and returns a tuple like ``y``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from diffusion._checks import check_choice, check_positive

State = tuple[Tensor, ...]
Field = Callable[[float, State], State]
METHODS = ("dopri5", "rk4")

# Dormand-Prince 5(4): nodes, stage weights, 5th-order weights (= the last stage row: FSAL) and the
# difference between the 5th- and the embedded 4th-order weights (the error estimate).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4))


class Solution(NamedTuple):
    y: State  # the state at t1
    nfe: int  # evaluations of f
    steps: int  # accepted steps
    rejected: int  # rejected steps (dopri5)


def _axpy(y: State, h: float, ks: list[State], weights: tuple[float, ...]) -> State:
    """``y + h * sum_j w_j k_j``, skipping zero weights."""
    out = []
    for i, yi in enumerate(y):
        acc = yi.clone()
        for w, k in zip(weights, ks):
            if w != 0:
                acc.add_(k[i], alpha=h * w)
        out.append(acc)
    return tuple(out)


def _per_sample_rms(parts: list[Tensor]) -> Tensor:
    """Root mean square over each sample's elements of every part (float64, shape (B,))."""
    squares = torch.cat([p.to(torch.float64).reshape(p.shape[0], -1) ** 2 for p in parts], dim=1)
    return squares.mean(dim=1).sqrt()


def _error_norm(error: State, y: State, y_new: State, rtol: float, atol: float) -> float:
    """The worst sample's scaled RMS error: the step is shared by the batch and must suit each sample."""
    scaled = [e / (atol + rtol * torch.maximum(a.abs(), b.abs())) for e, a, b in zip(error, y, y_new)]
    return _per_sample_rms(scaled).max().item()


def rk4(f: Field, y0: State, t0: float, t1: float, steps: int) -> Solution:
    """Classical fourth-order Runge-Kutta in ``steps`` equal steps from t0 to t1 (4 evaluations a step)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: the number of RK4 steps must be an integer >= 1")
    h = (t1 - t0) / steps
    y = y0
    for n in range(steps):
        t = t0 + n * h
        k1 = f(t, y)
        k2 = f(t + h / 2, _axpy(y, h / 2, [k1], (1.0,)))
        k3 = f(t + h / 2, _axpy(y, h / 2, [k2], (1.0,)))
        k4 = f(t + h, _axpy(y, h, [k3], (1.0,)))
        y = _axpy(y, h, [k1, k2, k3, k4], (1 / 6, 1 / 3, 1 / 3, 1 / 6))
    return Solution(y, 4 * steps, steps, 0)


def _first_step(f: Field, t0: float, y0: State, k0: State, direction: float, rtol: float, atol: float) -> float:
    """Hairer et al.'s starting step: one explicit Euler trial step (one evaluation of f)."""
    scale = [atol + rtol * y.abs() for y in y0]
    d0 = _per_sample_rms([y / s for y, s in zip(y0, scale)]).max().item()
    d1 = _per_sample_rms([k / s for k, s in zip(k0, scale)]).max().item()
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    k1 = f(t0 + direction * h0, _axpy(y0, direction * h0, [k0], (1.0,)))
    d2 = _per_sample_rms([(a - b) / s for a, b, s in zip(k1, k0, scale)]).max().item() / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1)


def dopri5(f: Field, y0: State, t0: float, t1: float, *, rtol: float = 1e-5, atol: float = 1e-5,
           max_steps: int = 100_000) -> Solution:
    """Adaptive Dormand-Prince 5(4) from t0 to t1 (either direction), local extrapolation (the 5th-order
    solution is kept), first-same-as-last (6 evaluations per step), step control
    ``h <- h * clip(0.9 err^(-1/5), 0.2, 10)`` on the worst sample's RMS error scaled by
    ``atol + rtol |y|``: all samples take the same steps, so a sample's result moves with its batch by
    about the tolerance."""
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    span = t1 - t0
    if span == 0:
        return Solution(y0, 0, 0, 0)
    direction = math.copysign(1.0, span)
    k = f(t0, y0)
    h = _first_step(f, t0, y0, k, direction, rtol, atol)
    nfe, accepted, rejected = 2, 0, 0
    t, y = t0, y0
    while direction * (t1 - t) > 0:
        if accepted + rejected >= max_steps:
            raise RuntimeError(f"dopri5 took {max_steps} steps without reaching t = {t1} (at t = {t}); the ODE is "
                               "stiff or its field not smooth there: loosen rtol/atol or use method='rk4'")
        h = min(h, abs(t1 - t))
        last = h >= abs(t1 - t)
        dt = direction * h
        ks = [k]
        for c, a in zip(_C[1:], _A[1:]):
            ks.append(f(t + c * dt, _axpy(y, dt, ks, a)))
        y_new = _axpy(y, dt, ks, _B5[:6])
        ks.append(f(t1 if last else t + dt, y_new))  # the FSAL stage: f at the new point
        nfe += 6
        err = _error_norm(_axpy(tuple(torch.zeros_like(v) for v in y), dt, ks, _E), y, y_new, rtol, atol)
        if not math.isfinite(err):
            raise FloatingPointError(f"dopri5: the field is not finite near t = {t}")
        if err <= 1.0:
            t, y, k = (t1 if last else t + dt), y_new, ks[-1]
            accepted += 1
        else:
            rejected += 1
        h *= min(10.0, max(0.2, 0.9 * err ** -0.2)) if err > 0 else 10.0
    return Solution(y, nfe, accepted, rejected)


def integrate(f: Field, y0: State, t0: float, t1: float, *, method: str = "dopri5", steps: int = 100,
              rtol: float = 1e-5, atol: float = 1e-5) -> Solution:
    """``y(t1)`` for ``dy/dt = f(t, y)``, ``y(t0) = y0``: ``method="dopri5"`` (adaptive, ``rtol``/``atol``)
    or ``"rk4"`` (``steps`` equal steps)."""
    check_choice("method", method, METHODS)
    if method == "rk4":
        return rk4(f, y0, t0, t1, steps)
    return dopri5(f, y0, t0, t1, rtol=rtol, atol=atol)
