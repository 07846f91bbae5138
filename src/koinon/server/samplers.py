"""Client samplers: which clients train in a round (seeded by run seed and round).

A sampler may also learn: one with an `observe(feedback: Feedback)` method is told, after every
server step, which clients' updates were taken, their training losses and their durations
(`koinon.server.feedback` holds the samplers that use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from koinon.registry import Registry


class Sampler(Protocol):
    name: str

    def sample(
        self, available: np.ndarray, sizes: np.ndarray, k: int, rng: np.random.Generator
    ) -> list[int]:
        """`k` distinct client ids out of `available` (sizes are their sample counts)."""
        ...


SAMPLERS: Registry[Sampler] = Registry("sampler")


def _check(available: np.ndarray, k: int) -> None:
    if k < 1 or k > len(available):
        raise ValueError(f"cannot sample {k} clients out of {len(available)} available")


@SAMPLERS.register("uniform")
class Uniform:
    """Uniformly at random without replacement."""

    name = "uniform"

    def sample(self, available: np.ndarray, sizes: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
        _check(available, k)
        return sorted(int(c) for c in rng.choice(available, size=k, replace=False))


@SAMPLERS.register("proportional")
class Proportional:
    """Without replacement, with probability proportional to each client's number of samples."""

    name = "proportional"

    def sample(self, available: np.ndarray, sizes: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
        _check(available, k)
        w = sizes.astype(np.float64)
        if (w > 0).sum() < k:
            raise ValueError(f"only {(w > 0).sum()} available clients hold data, cannot sample {k}")
        return sorted(int(c) for c in rng.choice(available, size=k, replace=False, p=w / w.sum()))


@SAMPLERS.register("poisson")
class Poisson:
    """Every available client independently with probability `rate` (0: k / available clients),
    so the cohort's size is binomial around k and may even be 0. This is the sampling that
    differential privacy's accountants amplify (Poisson subsampling); central DP uses it."""

    name = "poisson"

    def __init__(self, rate: float = 0.0) -> None:
        if not 0 <= rate <= 1:
            raise ValueError(f"server.sampler_options.rate = {rate}: must be in [0, 1] (0 = k / available clients)")
        self.rate = rate

    def sample(self, available: np.ndarray, sizes: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
        rate = self.rate or min(1.0, k / max(len(available), 1))
        return sorted(int(c) for c in np.asarray(available)[rng.random(len(available)) < rate])


@dataclass
class Feedback:
    """What the server tells a sampler after a server step (a round, or an asynchronous
    buffer): the clients whose updates it took, their mean training losses, and the seconds
    each one took (None where no clock measured it). Rows follow `client_ids`."""

    round_index: int
    client_ids: list[int]
    losses: list[float]
    durations: list[float | None]
