"""The `Aggregator` interface: a stack of updates `[n, P]` plus weights `[n]` -> one update `[P]`.

Aggregators are (nearly) pure functions of the stacked tensor, which keeps robust rules a few
vectorized kernels. A rule that tolerates only a bounded number of Byzantine inputs receives
`num_byzantine` (f) when it is built and refuses a cohort that breaks its assumption.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from koinon.registry import Registry


@runtime_checkable
class Aggregator(Protocol):
    name: str

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Combine `updates` (`[n, P]`) with non-negative `weights` (`[n]`) into `[P]`."""
        ...


AGGREGATORS: Registry[Aggregator] = Registry("aggregator")
"""Factories are called as `factory(num_byzantine=..., **options)` (context args optional)."""


def check_stack(updates: torch.Tensor, weights: torch.Tensor) -> None:
    if updates.dim() != 2:
        raise ValueError(f"updates must be a [n, P] stack, got shape {tuple(updates.shape)}")
    if weights.shape != (updates.shape[0],):
        raise ValueError(f"weights must have shape [{updates.shape[0]}], got {tuple(weights.shape)}")
    if updates.shape[0] == 0:
        raise ValueError("cannot aggregate an empty cohort")
