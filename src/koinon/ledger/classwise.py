"""ShapFed-style class-wise contribution: Shapley values of each class's output-layer update.

Tastan et al., Redefining Contributions: Shapley-Driven Federated Learning (IJCAI 2024),
https://arxiv.org/abs/2406.00569, score clients per class from the last layer, which holds one
row per class: for class c the game is v_c(S) = cos(u_S^c, u_N^c), where u_S^c is the weighted
mean over coalition S of the clients' updates to the output row of class c (weights and bias)
and u_N^c the whole round's; v_c(empty) = 0. A client's class-wise Shapley values say for which
classes its data helped (a client without class c moves that row little, or against the
others); its score is their mean over classes, which is the Shapley value of the mean game
(Shapley values are linear in the game). No model is evaluated, so it needs no validation set
and costs a few matrix products; it sees only the last layer and, like every similarity score,
rewards agreeing with the majority.

Exact for up to `max_exact` clients, else the permutation estimator with GTG's guided sampling.
"""

from __future__ import annotations

import numpy as np
import torch

from koinon.ledger.contribution import CONTRIBUTIONS, RoundUpdates, Validation
from koinon.ledger.shapley import Budget, Estimate, exact_shapley, permutation_shapley
from koinon.params import Layout


def output_rows(layout: Layout, num_classes: int) -> torch.Tensor:
    """`[C, H + 1]` flat indices of each class's output row (weights, then bias when present):
    the last 2-D trainable entry with `num_classes` rows."""
    entries = [e for e in layout.entries if e.trainable]
    for i in range(len(entries) - 1, -1, -1):
        e = entries[i]
        if len(e.shape) == 2 and e.shape[0] == num_classes:
            rows = e.offset + torch.arange(e.numel).view(e.shape)
            after = entries[i + 1] if i + 1 < len(entries) else None
            if after is not None and after.shape == (num_classes,):
                rows = torch.cat([rows, after.offset + torch.arange(num_classes).view(-1, 1)], dim=1)
            return rows
    raise ValueError(f"the model has no output layer with {num_classes} rows (a [C, H] weight) for class-wise scores")


class ClassGame:
    """v(S) = mean over classes of cos(u_S^c, u_N^c); `class_values` keeps the classes apart."""

    def __init__(self, data: RoundUpdates, rows: torch.Tensor) -> None:
        self.num_players = len(data.clients)
        self.rows = data.updates.double()[:, rows]  # [k, C, H+1]
        self.weights = data.weights.double()
        self.full = (self.weights[:, None, None] * self.rows).sum(0) / self.weights.sum()  # [C, H+1]

    def class_values(self, masks: np.ndarray) -> np.ndarray:
        m = torch.as_tensor(np.asarray(masks, dtype=bool)).double() * self.weights[None, :]
        mean = torch.einsum("mk,kch->mch", m, self.rows) / m.sum(1).clamp_min(1e-30)[:, None, None]
        cos = torch.nn.functional.cosine_similarity(mean, self.full[None].expand_as(mean), dim=2, eps=1e-30)
        cos[m.sum(1) == 0] = 0.0
        return cos.numpy()  # [m, C]

    def values(self, masks: np.ndarray) -> np.ndarray:
        return self.class_values(masks).mean(axis=1)


@CONTRIBUTIONS.register("shapfed")
class ShapFed:
    """ShapFed-style: mean over classes of Shapley values of the output rows' cosine to the round's (Tastan et al. 2024)."""

    name = "shapfed"

    def __init__(self, max_exact: int = 10, max_permutations: int = 100) -> None:
        if not 1 <= max_exact <= 16:
            raise ValueError(f"max_exact = {max_exact}: must be in [1, 16]")
        if max_permutations < 1:
            raise ValueError(f"max_permutations = {max_permutations}: must be >= 1")
        self.max_exact, self.max_permutations = max_exact, max_permutations

    def game(self, data: RoundUpdates, validation: Validation) -> ClassGame:
        num_classes = int(validation.y.max()) + 1 if validation.num_classes is None else validation.num_classes
        return ClassGame(data, output_rows(validation.layout, num_classes))

    def score(self, data: RoundUpdates, validation: Validation, seed: int, budget: Budget) -> Estimate:
        game = self.game(data, validation)
        if game.num_players <= self.max_exact:
            return exact_shapley(game)
        cap = min(m for m in (budget.max_permutations, self.max_permutations) if m)
        return permutation_shapley(game, np.random.default_rng([seed, data.round, 0x5F]), guided=True,
                                   budget=Budget(budget.seconds, budget.evaluations, cap))

    def class_scores(self, data: RoundUpdates, validation: Validation) -> np.ndarray:
        """`[k, C]` exact class-wise Shapley values (up to `max_exact` clients)."""
        game = self.game(data, validation)
        if game.num_players > self.max_exact:
            raise ValueError(f"class-wise values are exact only up to max_exact = {self.max_exact} clients")
        n = game.num_players
        grid = ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1).astype(bool)
        values = game.class_values(grid)
        return np.stack([exact_shapley(_Column(values, c, n)).values for c in range(values.shape[1])], axis=1)


class _Column:
    """One class's game, read from a table of all coalitions' class values."""

    def __init__(self, table: np.ndarray, column: int, n: int) -> None:
        self.table, self.column, self.num_players = table, column, n
        self.powers = 1 << np.arange(n)

    def values(self, masks: np.ndarray) -> np.ndarray:
        return self.table[(np.asarray(masks, dtype=bool) * self.powers).sum(axis=1), self.column]
