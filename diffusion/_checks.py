"""Small argument checks shared by the package: they fail early with a message that names
the parameter, what was received and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


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
