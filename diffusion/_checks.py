"""Small argument checks shared by the package: they fail early with a message that names
the parameter, what was received and what is allowed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


def check_choice(parameter: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``; otherwise raise a ValueError naming both."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(
            f"{parameter}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}"
        )
    return value


def check_positive(parameter: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{parameter} must be > 0, got {value!r}")
    return value


def check_on_device(ok: Tensor, message: str, full_message: Callable[[], str], *, read: bool = False) -> None:
    """Raise ``RuntimeError`` unless ``ok``, a boolean scalar tensor, is True, without the host
    waiting for the device (reading a device tensor waits for all the work queued before it).

    The check is ``torch._assert_async(ok, message)``: queued on an accelerator, which stops the run
    at its next sync with a device-side assert (CUDA does not print ``message``; run with
    ``CUDA_LAUNCH_BLOCKING=1`` to be pointed at the check); on a CPU it raises at once, with
    ``full_message()``, which may read the offending values since the host holds them then.
    ``read=True`` reads ``ok`` on the host instead (one wait), for a check's first use, where a clear
    message on every device is worth it."""
    if ok.shape != () or ok.dtype != torch.bool:
        raise TypeError(f"check_on_device needs a boolean scalar tensor, got {ok.dtype} of shape {tuple(ok.shape)}")
    if read:
        if not bool(ok):
            raise RuntimeError(full_message())
        return
    try:
        torch._assert_async(ok, message)
    except RuntimeError:  # raised here only where the check runs at once (a CPU)
        raise RuntimeError(full_message()) from None
