"""Contribution methods (`[ledger] contribution = ...`): each scores the clients of one round.

A round is what its aggregation saw (`RoundUpdates`: the previous global model, the accepted
update rows with their weights). Coalition-based methods play the round's game: the model of
coalition S is rebuilt without retraining as previous global + lr x the weighted mean of S's
updates, renormalized over S (GTG-Shapley's reconstruction; lr is the server optimizer's), and
its utility is a metric on the validation set the owner committed to (`Validation`). A run's
score of a client is the sum of its round scores (the round-wise Shapley of GTG-Shapley).

Registered: `exact`, `loo`, `tmc`, `gtg` (games, see `koinon.ledger.shapley`), `shapfed`
(class-wise, `koinon.ledger.classwise`), and the cheap
scores `cosine` (to the round's aggregate) and `trust` (FLTrust-style ReLU(cosine) to a
reference the server trusts: here the descent direction of the validation loss at the previous
global model, one backward pass; Cao et al., NDSS 2021, https://arxiv.org/abs/2012.13995).
The cheap scores need no coalition model but are gameable: a client that copies the aggregate's
direction scores well whatever its data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from koinon.ledger.shapley import (
    Budget,
    Estimate,
    exact_shapley,
    leave_one_out,
    permutation_shapley,
)
from koinon.local.batched import batched_forward
from koinon.local.losses import cross_entropy
from koinon.params import Layout
from koinon.registry import Registry

UTILITIES = ("loss", "accuracy")


@contextmanager
def one_thread() -> Iterator[None]:
    """Score on one thread: the scores do not depend on the thread count (with float64, not
    on the machine either, to the logged 1e-9), and small products gain nothing from more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class RoundUpdates:
    """What one round's aggregation combined (the players: the scored clients)."""

    round: int
    clients: list[int]
    previous: torch.Tensor  # [P] the global model the round started from
    updates: torch.Tensor  # [k, P] decoded model updates, in `clients` order
    weights: torch.Tensor  # [k] aggregation weights (sample counts)
    lr: float = 1.0  # the server step size on the aggregate
    optimizer: Any = None  # a server optimizer with state (`fedavgm`, `fedadam`, ...); None: x + lr x mean
    state: dict[str, torch.Tensor] | None = None  # its state before the round's step

    def coalition_params(self, masks: np.ndarray) -> torch.Tensor:
        """`[m, P]` models of the coalitions `masks` (`[m, k]`); the empty one is `previous`
        (with a stateful server optimizer: its step from `state` with a zero aggregate, e.g.
        the momentum alone). In float64, as the evaluation: the scores are replayed by `koinon
        verify`, maybe with another thread count, and float32 sums in another order differ in
        the last bits."""
        previous, updates, weights = self._double()
        m = torch.as_tensor(np.asarray(masks, dtype=bool)).double() * weights[None, :]
        norm = m.sum(dim=1, keepdim=True)
        mean = (m @ updates) / norm.clamp_min(1e-30)
        if self.optimizer is None:
            return previous[None, :] + self.lr * mean
        # The server optimizer's own step, one per coalition from a copy of the round's state
        # (its ops are elementwise, so they step the [m, P] stack at once).
        state = {k: v.double()[None, :].repeat(len(mean), 1) for k, v in (self.state or {}).items()}
        return self.optimizer.step(previous[None, :].expand_as(mean), mean, state)

    def _double(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`previous`, `updates` and `weights` in float64, converted once per round (a sampling
        method asks for coalition models thousands of times, and converting the [k, P] rows
        every time cost 40 % of a coalition evaluation on the digits MLP with 50 clients)."""
        cached = self.__dict__.get("_float64")
        if cached is None or cached[0] is not self.updates:
            cached = (self.updates, self.previous.double(), self.updates.double(), self.weights.double())
            self.__dict__["_float64"] = cached
        return cached[1], cached[2], cached[3]


class Validation:
    """The owner's validation set and the utility (accuracy, or minus the mean loss) of models
    on it, evaluated `[m, P]` at a time (one stacked forward pass where the model allows)."""

    def __init__(self, module: nn.Module, layout: Layout, x: torch.Tensor, y: torch.Tensor,
                 utility: str = "loss", loss_fn=cross_entropy, max_models: int = 64,
                 num_classes: int | None = None) -> None:
        if utility not in UTILITIES:
            raise ValueError(f"utility = {utility!r}; allowed: {', '.join(UTILITIES)}")
        self.module, self.layout, self.x, self.y = module, layout, x.double(), y
        self.utility, self.loss_fn, self.max_models = utility, loss_fn, max_models
        self.num_classes = num_classes
        self.forward = batched_forward(module)

    @torch.no_grad()
    def values(self, params: torch.Tensor) -> np.ndarray:
        out = []
        for start in range(0, params.shape[0], self.max_models):
            chunk = params[start:start + self.max_models]
            if self.forward is not None:
                logits = self.forward(self.layout.views(chunk), self.x.expand(chunk.shape[0], *self.x.shape))
            else:
                self.module.eval()  # every parameter and float buffer comes from `chunk` (float64)
                logits = torch.stack([functional_call(self.module, self.layout.views(p), (self.x,)) for p in chunk])
                self.module.train()
            out.append(self._metric(logits))
        return torch.cat(out).numpy()

    def _metric(self, logits: torch.Tensor) -> torch.Tensor:
        if self.utility == "accuracy":
            return (logits.argmax(dim=-1) == self.y).double().mean(dim=1)
        k = logits.shape[0]
        flat = logits.reshape(-1, logits.shape[-1])
        losses = self.loss_fn(flat, self.y.repeat(k)).reshape(k, -1)
        return -losses.double().mean(dim=1)

    def descent_direction(self, params: torch.Tensor) -> torch.Tensor:
        """Minus the gradient of the validation loss at `params` (the server's trusted direction)."""
        p = params.detach().double().clone().requires_grad_(True)
        logits = functional_call(self.module, self.layout.views(p), (self.x,))
        loss = self.loss_fn(logits, self.y).mean()
        (grad,) = torch.autograd.grad(loss, p)
        return -grad.detach()


class RoundGame:
    """The cooperative game of one round: coalition models rebuilt from stored updates."""

    def __init__(self, data: RoundUpdates, validation: Validation) -> None:
        self.data, self.validation = data, validation
        self.num_players = len(data.clients)

    def values(self, masks: np.ndarray) -> np.ndarray:
        return self.validation.values(self.data.coalition_params(masks))


class ContributionMethod(Protocol):
    name: str

    def score(self, data: RoundUpdates, validation: Validation, seed: int, budget: Budget) -> Estimate:
        """Scores of `data.clients` for one round (seeded; within `budget` where it samples)."""
        ...


CONTRIBUTIONS: Registry[ContributionMethod] = Registry("contribution method")
"""Factories take their options as keywords; `[ledger]` keys that are not fixed keys go there."""


@CONTRIBUTIONS.register("exact")
class ExactShapley:
    """Exact Shapley values of each round's game (2^k coalition models: cohorts up to ~14)."""

    name = "exact"

    def score(self, data: RoundUpdates, validation: Validation, seed: int, budget: Budget) -> Estimate:
        return exact_shapley(RoundGame(data, validation))


@CONTRIBUTIONS.register("loo")
class LeaveOneOut:
    """Leave-one-out: utility of the round's model minus that of the model without the client."""

    name = "loo"

    def score(self, data: RoundUpdates, validation: Validation, seed: int, budget: Budget) -> Estimate:
        return leave_one_out(RoundGame(data, validation))


@CONTRIBUTIONS.register("tmc")
class TMCShapley:
    """TMC-Shapley: uniform random permutations, truncated within a permutation (Ghorbani & Zou 2019)."""

    name = "tmc"

    def __init__(self, tolerance: float = 0.01, max_permutations: int = 100, convergence: float = 0.0) -> None:
        _check_tolerances(tolerance, 0.0, convergence, max_permutations)
        self.tolerance, self.max_permutations, self.convergence = tolerance, max_permutations, convergence

    def score(self, data: RoundUpdates, validation: Validation, seed: int, budget: Budget) -> Estimate:
        return permutation_shapley(
            RoundGame(data, validation), np.random.default_rng([seed, data.round, 0x7C]), guided=False,
            tolerance=self.tolerance, convergence=self.convergence,
            budget=_with_permutations(budget, self.max_permutations))


@CONTRIBUTIONS.register("gtg")
class GTGShapley:
    """GTG-Shapley: guided permutations, within- and between-round truncation, a convergence stop (Liu et al. 2022)."""

    name = "gtg"

    def __init__(self, tolerance: float = 0.01, round_tolerance: float = 0.001, convergence: float = 0.05,
                 max_permutations: int = 100) -> None:
        _check_tolerances(tolerance, round_tolerance, convergence, max_permutations)
        self.tolerance, self.round_tolerance = tolerance, round_tolerance
        self.convergence, self.max_permutations = convergence, max_permutations

    def score(self, data: RoundUpdates, validation: Validation, seed: int, budget: Budget) -> Estimate:
        return permutation_shapley(
            RoundGame(data, validation), np.random.default_rng([seed, data.round, 0x676]), guided=True,
            tolerance=self.tolerance, round_tolerance=self.round_tolerance, convergence=self.convergence,
            budget=_with_permutations(budget, self.max_permutations))


@CONTRIBUTIONS.register("cosine")
class CosineToAggregate:
    """Cosine similarity of each update to the round's weighted mean update (no validation set)."""

    name = "cosine"

    def score(self, data: RoundUpdates, validation: Validation, seed: int, budget: Budget) -> Estimate:
        w = data.weights.double()
        aggregate = (w[:, None] * data.updates.double()).sum(0) / w.sum().clamp_min(1e-30)
        return Estimate(_cosines(data.updates, aggregate), np.zeros(len(data.clients)))


@CONTRIBUTIONS.register("trust")
class Trust:
    """FLTrust-style trust: ReLU(cosine) of each update to the validation loss's descent direction."""

    name = "trust"

    def score(self, data: RoundUpdates, validation: Validation, seed: int, budget: Budget) -> Estimate:
        reference = validation.descent_direction(data.previous)
        return Estimate(np.clip(_cosines(data.updates, reference.double()), 0, None), np.zeros(len(data.clients)),
                        evaluations=1)


def _cosines(updates: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    u = updates.double()
    norms = torch.linalg.vector_norm(u, dim=1) * torch.linalg.vector_norm(reference)
    return ((u @ reference) / norms.clamp_min(1e-30)).numpy()


def _with_permutations(budget: Budget, max_permutations: int) -> Budget:
    """The run's budget, capped at the method's permutations (a replay passes the logged count)."""
    cap = min(m for m in (budget.max_permutations, max_permutations) if m) if (
        budget.max_permutations or max_permutations) else 0
    return Budget(budget.seconds, budget.evaluations, cap)


def _check_tolerances(tolerance: float, round_tolerance: float, convergence: float, max_permutations: int) -> None:
    for key, value in (("tolerance", tolerance), ("round_tolerance", round_tolerance), ("convergence", convergence)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{key} = {value}: must be in [0, 1)")
    if max_permutations < 1:
        raise ValueError(f"max_permutations = {max_permutations}: must be >= 1")
