"""Shapley-value estimators over a cooperative game: exact, leave-one-out, TMC and GTG.

A game is n players and a utility `v(S)` over coalitions, asked for in batches of boolean masks
(`Game.values(masks [m, n]) -> [m]`): a federated round evaluates a batch of coalition models in
one stacked forward pass. `CachedGame` counts each distinct coalition once, so "evaluations" is
the number of distinct models evaluated, the unit of a budget.

- `exact_shapley`: the definition, sum over all 2^(n-1) coalitions without i; the reference for
  small n.
- `leave_one_out`: v(N) - v(N \\ i) (n + 1 evaluations).
- `permutation_shapley`: Monte-Carlo over permutations with truncation within a permutation once
  the prefix's value is within `tolerance` of v(N) (the remaining marginals count as zero).
  TMC-Shapley (Ghorbani & Zou, Data Shapley, ICML 2019, https://arxiv.org/abs/1904.02868) draws
  uniform permutations. GTG-Shapley (Liu et al., GTG-Shapley: Efficient and Accurate Participant
  Contribution Evaluation in Federated Learning, ACM TIST 2022, https://arxiv.org/abs/2109.02053)
  adds guided sampling (permutation k puts player (k + a random offset) mod n first, so every
  player's marginal to
  the empty coalition, the largest in a round, is sampled equally often), between-round
  truncation (a round whose v(N) - v(empty) is below `round_tolerance` scores zero) and a
  convergence stop.

Every estimate carries the standard error of the mean marginal per player (zero for exact
methods), the evaluations and permutations used and the seconds spent. A run that stopped on a
time budget is replayed exactly by passing the logged permutation count as `max_permutations`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Game(Protocol):
    """n players and the utility of coalitions given as boolean masks `[m, n]`."""

    num_players: int

    def values(self, masks: np.ndarray) -> np.ndarray: ...


class CachedGame:
    """A game whose distinct coalitions are evaluated once each (counted in `evaluations`)."""

    def __init__(self, game: Game) -> None:
        self.game = game
        self.num_players = game.num_players
        self.cache: dict[bytes, float] = {}
        self.evaluations = 0

    def values(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.num_players)
        keys = [np.packbits(m).tobytes() for m in masks]
        todo = {k: i for i, k in enumerate(keys) if k not in self.cache}
        if todo:
            fresh = self.game.values(masks[list(todo.values())])
            self.evaluations += len(todo)
            self.cache.update(zip(todo, (float(v) for v in fresh)))
        return np.array([self.cache[k] for k in keys], dtype=np.float64)


@dataclass
class Budget:
    """When a sampling estimator stops: whichever limit is reached first (0 = no limit)."""

    seconds: float = 0.0
    evaluations: int = 0
    max_permutations: int = 0

    def spent(self, start: float, evaluations: int, permutations: int) -> bool:
        return bool((self.seconds and time.perf_counter() - start >= self.seconds)
                    or (self.evaluations and evaluations >= self.evaluations)
                    or (self.max_permutations and permutations >= self.max_permutations))


@dataclass
class Estimate:
    """Scores of one game, with their standard errors and what they cost."""

    values: np.ndarray
    stderr: np.ndarray
    evaluations: int = 0
    permutations: int = 0
    seconds: float = 0.0
    skipped: bool = False  # between-round truncation: the round was not worth scoring
    details: dict[str, float] = field(default_factory=dict)


def exact_shapley(game: Game) -> Estimate:
    """Shapley values by their definition (2^n coalitions; n up to about 15)."""
    start = time.perf_counter()
    cached = CachedGame(game)
    n = game.num_players
    if n > 20:
        raise ValueError(f"exact Shapley needs 2^n coalition values; n = {n} is too many (at most 20)")
    grid = ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1).astype(bool)
    v = cached.values(grid)
    sizes = grid.sum(axis=1)
    phi = np.zeros(n)
    for i in range(n):
        without = ~grid[:, i]
        s = sizes[without]
        weight = np.array([math.factorial(k) * math.factorial(n - k - 1) for k in s], dtype=np.float64)
        phi[i] = float((weight * (v[np.flatnonzero(without) | (1 << i)] - v[without])).sum()) / math.factorial(n)
    return Estimate(phi, np.zeros(n), cached.evaluations, 0, time.perf_counter() - start)


def leave_one_out(game: Game) -> Estimate:
    """v(N) - v(N \\ i) for every player (n + 1 coalitions)."""
    start = time.perf_counter()
    cached = CachedGame(game)
    n = game.num_players
    masks = np.ones((n + 1, n), dtype=bool)
    masks[np.arange(n), np.arange(n)] = False
    v = cached.values(masks)
    return Estimate(v[n] - v[:n], np.zeros(n), cached.evaluations, 0, time.perf_counter() - start)


def permutation_shapley(
    game: Game,
    rng: np.random.Generator,
    *,
    guided: bool,
    tolerance: float = 0.0,
    round_tolerance: float = 0.0,
    convergence: float = 0.0,
    budget: Budget | None = None,
    chunk: int = 8,
) -> Estimate:
    """Monte-Carlo Shapley over permutations (TMC with `guided=False`, GTG with `guided=True`).

    `tolerance`: truncate a permutation once |v(N) - v(prefix)| < tolerance * |v(N) - v(empty)|.
    `round_tolerance`: return zeros (skipped) when |v(N) - v(empty)| <= round_tolerance.
    `convergence`: after the first cycle of n permutations, every min(n, 10) permutations, stop
    when the mean absolute change of the estimates since the previous check is at most
    `convergence` times their mean absolute value. Prefixes are evaluated `chunk` at a time, so truncation also
    saves evaluations when the game evaluates batches."""
    start = time.perf_counter()
    budget = budget or Budget(max_permutations=200)
    if not (budget.seconds or budget.evaluations or budget.max_permutations or convergence):
        raise ValueError("a sampling estimator needs a budget (seconds, evaluations, permutations) or convergence")
    cached = CachedGame(game)
    n = game.num_players
    ends = cached.values(np.array([np.zeros(n, bool), np.ones(n, bool)]))
    v_empty, v_full = float(ends[0]), float(ends[1])
    span = abs(v_full - v_empty)
    if span <= round_tolerance:
        return Estimate(np.zeros(n), np.zeros(n), cached.evaluations, 0, time.perf_counter() - start,
                        skipped=True)
    total = np.zeros(n)
    total_sq = np.zeros(n)
    count = 0
    previous: np.ndarray | None = None
    offset = int(rng.integers(n))  # which player leads first: a short run is not biased to player 0
    while True:
        order = rng.permutation(n)
        if guided:
            first = (offset + count) % n
            order = np.concatenate(([first], order[order != first]))
        marginals = np.zeros(n)
        before = v_empty
        mask = np.zeros(n, dtype=bool)
        position = 0
        while position < n:
            if abs(v_full - before) < tolerance * span:
                break  # truncated: the rest of this permutation adds (about) nothing
            step = order[position:position + chunk]
            prefixes = np.repeat(mask[None], len(step), axis=0)
            for j, player in enumerate(step):
                prefixes[j:, player] = True
            values = cached.values(prefixes)
            stop = len(step)
            for j, player in enumerate(step):
                marginals[player] = values[j] - before
                before = values[j]
                if abs(v_full - before) < tolerance * span:
                    stop = j + 1
                    break
            mask = prefixes[stop - 1]
            position += stop
        total += marginals
        total_sq += marginals**2
        count += 1
        if budget.spent(start, cached.evaluations, count):
            break
        if convergence and count >= n and (count - n) % min(n, 10) == 0:
            current = total / count
            if previous is not None:
                change = np.abs(current - previous).mean()
                if change <= convergence * max(np.abs(current).mean(), 1e-12):
                    break
            previous = current
    mean = total / count
    var = (total_sq - count * mean**2) / max(count - 1, 1)
    stderr = np.sqrt(np.clip(var, 0, None) / count)
    return Estimate(mean, stderr, cached.evaluations, count, time.perf_counter() - start)
