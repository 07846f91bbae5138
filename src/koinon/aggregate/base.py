"""The `Aggregator` interface: a stack of updates `[n, P]` plus weights `[n]` -> one update `[P]`.

Aggregators are (nearly) pure functions of the stacked tensor, which keeps robust rules a few
vectorized kernels. A rule that tolerates only a bounded number of Byzantine inputs receives
`num_byzantine` (f) when it is built and refuses a cohort that breaks its assumption.
Rules that pick or weight whole inputs (Krum, Multi-Krum, FLTrust) also leave `coefficients`
(`[n]`, the weight each input got in the last `aggregate`; 0 = dropped): the contribution ledger
reads it to leave out what the rule itself discarded.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from koinon.errors import ConfigError
from koinon.registry import Registry


@runtime_checkable
class Aggregator(Protocol):
    name: str

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Combine `updates` (`[n, P]`) with non-negative `weights` (`[n]`) into `[P]`."""
        ...


@runtime_checkable
class PreAggregator(Protocol):
    """A step before the final rule (NNM, bucketing, clipping): a stack in, a stack out."""

    name: str

    def transform(
        self, updates: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map `updates` `[n, P]` and `weights` `[n]` to a new stack `[m, P]` and weights `[m]`."""
        ...


AGGREGATORS: Registry[Aggregator] = Registry("aggregator")
"""Factories are called as `factory(num_byzantine=..., **options)` (context args optional)."""

PRE_AGGREGATORS: Registry[PreAggregator] = Registry("pre-aggregator")
"""Pre-aggregation steps live in their own registry: they are not aggregators (they return a
stack), so `koinon list` shows them apart and a config cannot use one as the final rule."""


def check_num_byzantine(num_byzantine: int) -> int:
    """Build-time check of f; the n-dependent assumption is checked when n is known."""
    if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 0:
        raise ConfigError(f"num_byzantine must be an integer >= 0, got {num_byzantine!r}")
    return num_byzantine


def require(ok: bool, rule: str, n: int, f: int, requirement: str) -> None:
    """Refuse a cohort that breaks a rule's assumption, naming n, f and the requirement."""
    if not ok:
        raise ValueError(f"{rule} needs {requirement}, got n = {n} inputs and f = {f} Byzantine")


def honest_majority(rule: str, updates: torch.Tensor, weights: torch.Tensor, f: int) -> tuple[int, int]:
    """Check the stack and refuse a cohort without n > 2f; returns (n, f)."""
    check_stack(updates, weights)
    n = updates.shape[0]
    require(n > 2 * f, rule, n, f, "n > 2f")
    return n, f


def check_stack(updates: torch.Tensor, weights: torch.Tensor) -> None:
    if updates.dim() != 2:
        raise ValueError(f"updates must be a [n, P] stack, got shape {tuple(updates.shape)}")
    if weights.shape != (updates.shape[0],):
        raise ValueError(
            f"weights must have shape [{updates.shape[0]}], got {tuple(weights.shape)}"
        )
    if updates.shape[0] == 0:
        raise ValueError("cannot aggregate an empty cohort")
