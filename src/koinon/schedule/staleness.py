"""Staleness functions: how much an update computed on a model `tau` versions old still counts.

From FedAsync (Xie et al. 2019, arXiv:1903.03934, section 5.2), with a, b >= 0:

- constant:   s(tau) = 1
- polynomial: s(tau) = (1 + tau) ** -a            (FedBuff's default is a = 0.5)
- hinge:      s(tau) = 1 if tau <= b else 1 / (a * (tau - b) + 1)
"""

from __future__ import annotations

from collections.abc import Callable

from koinon.errors import ConfigError

__all__ = ["STALENESS", "staleness_fn"]

STALENESS = ("constant", "polynomial", "hinge")


def staleness_fn(name: str, a: float = 0.5, b: float = 4.0) -> Callable[[int], float]:
    """The staleness function `name` with parameters a and b."""
    if a < 0 or b < 0:
        raise ConfigError(f"staleness parameters must be >= 0, got a = {a}, b = {b}")
    if name == "constant":
        return lambda tau: 1.0
    if name == "polynomial":
        return lambda tau: float((1.0 + tau) ** -a)
    if name == "hinge":
        return lambda tau: 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ConfigError(f"schedule.staleness = {name!r}: allowed: {', '.join(STALENESS)}")
