"""Distance-based rules: Krum, Multi-Krum, Bulyan, MoNNA and the NNM pre-aggregation step.

All of them only look at pairwise distances, which come from one `n x n` Gram matrix built in
a single pass over the data (`kernels.gram`). Selection then happens on small matrices and the
output is one `coefficients @ updates` product, so the cost is two passes over the stack.
Weights are ignored (a Byzantine client could claim any sample count).
"""

from __future__ import annotations

import torch

from koinon.aggregate import kernels
from koinon.aggregate.base import (
    AGGREGATORS,
    PRE_AGGREGATORS,
    check_num_byzantine,
    check_stack,
    honest_majority,
    require,
)


def krum_scores(d2: torch.Tensor, num_neighbours: int) -> torch.Tensor:
    """Sum of squared distances from each input to its `num_neighbours` nearest other inputs."""
    # Column 0 of each sorted row is the input itself (distance 0).
    return d2.sort(dim=1).values[:, 1 : 1 + num_neighbours].sum(dim=1)


def krum_order(d2: torch.Tensor, num_neighbours: int) -> torch.Tensor:
    """Indices by increasing Krum score; exact ties go to the input closest to all others.

    With few neighbours, mutual nearest pairs tie exactly; breaking ties by the data rather
    than by row order keeps Krum and Multi-Krum permutation-invariant.
    """
    by_total = d2.sum(dim=1).argsort(stable=True)
    scores = krum_scores(d2, num_neighbours)[by_total]
    return by_total[scores.argsort(stable=True)]


def _uniform(indices: torch.Tensor, n: int) -> torch.Tensor:
    coefficients = torch.zeros(n, dtype=torch.float64)
    coefficients[indices] = 1.0 / len(indices)
    return coefficients


@AGGREGATORS.register("krum")
class Krum:
    """Krum: the input closest (sum of squared distances) to its n - f - 2 neighbours.

    Needs n > 2f + 2. Blanchard et al., Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent (NeurIPS 2017), https://arxiv.org/abs/1703.02757.
    """

    name = "krum"

    def __init__(self, num_byzantine: int = 0) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        check_stack(updates, weights)
        n, f = updates.shape[0], self.num_byzantine
        require(n > 2 * f + 2, self.name, n, f, "n > 2f + 2")
        best = krum_order(kernels.pairwise_sq_distances(updates), n - f - 2)[0]
        self.coefficients = _uniform(best.view(1), n)
        return updates[int(best)].clone()


@AGGREGATORS.register("multi_krum")
class MultiKrum:
    """Multi-Krum: mean of the m inputs with the best Krum scores (m = n - f by default).

    Needs n > 2f + 2. Blanchard et al. (NeurIPS 2017), https://arxiv.org/abs/1703.02757;
    `num_selected` = 0 means n - f, as in El Mhamdi et al. (2018).
    """

    name = "multi_krum"

    def __init__(self, num_byzantine: int = 0, num_selected: int = 0) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)
        if num_selected < 0:
            raise ValueError(f"num_selected must be >= 0 (0 means n - f), got {num_selected}")
        self.num_selected = num_selected

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        check_stack(updates, weights)
        n, f = updates.shape[0], self.num_byzantine
        require(n > 2 * f + 2, self.name, n, f, "n > 2f + 2")
        m = self.num_selected or n - f
        require(m <= n - f, self.name, n, f, f"num_selected = {m} <= n - f")
        chosen = krum_order(kernels.pairwise_sq_distances(updates), n - f - 2)[:m]
        self.coefficients = _uniform(chosen, n)
        return kernels.combine(self.coefficients, updates)


@AGGREGATORS.register("bulyan")
class Bulyan:
    """Bulyan: pick n - 2f inputs by repeated Krum, then a coordinate-wise trimmed mean of them.

    Needs n >= 4f + 3. El Mhamdi, Guerraoui and Rouault, The Hidden Vulnerability of Distributed
    Learning in Byzantium (ICML 2018), https://arxiv.org/abs/1802.07927. The second stage keeps,
    per coordinate, the n - 4f selected values closest to their median and averages them.
    """

    name = "bulyan"

    def __init__(self, num_byzantine: int = 0) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        check_stack(updates, weights)
        n, f = updates.shape[0], self.num_byzantine
        require(n >= 4 * f + 3, self.name, n, f, "n >= 4f + 3")
        d2 = kernels.pairwise_sq_distances(updates)
        remaining = list(range(n))
        selected: list[int] = []
        for _ in range(n - 2 * f):
            sub = d2[remaining][:, remaining]
            best = int(krum_order(sub, len(remaining) - f - 2)[0])
            selected.append(remaining.pop(best))
        chosen = updates[torch.tensor(sorted(selected))]
        return kernels.meamed_rows(chosen, n - 4 * f)


@AGGREGATORS.register("monna")
class MoNNA:
    """MoNNA: mean of the n - f inputs nearest to the update of a trusted (honest) pivot client.

    Needs n > 2f. Farhadkhani et al., Robust Collaborative Learning with Linear Gradient
    Overhead (ICML 2023), https://arxiv.org/abs/2209.10931. `pivot` is the row index of the
    trusted input (in decentralized learning: the node's own model).
    """

    name = "monna"

    def __init__(self, num_byzantine: int = 0, pivot: int = 0) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)
        if pivot < 0:
            raise ValueError(f"pivot must be a row index >= 0, got {pivot}")
        self.pivot = pivot

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, f = honest_majority(self.name, updates, weights, self.num_byzantine)
        if self.pivot >= n:
            raise ValueError(f"monna: pivot = {self.pivot} is not a row of {n} inputs")
        # Only the distances to the pivot are needed: one pass of row norms, no Gram matrix.
        d2 = kernels.row_sq_norms(updates, updates[self.pivot])
        d2[self.pivot] = 0.0
        chosen = d2.argsort(stable=True)[: n - f]
        return kernels.combine(_uniform(chosen, n), updates)


@PRE_AGGREGATORS.register("nnm")
class NearestNeighborMixing:
    """NNM: replace each input by the mean of its n - f nearest inputs (itself included).

    Needs n > 2f. Allouah et al., Fixing by Mixing: A Recipe for Optimal Byzantine ML under
    Heterogeneity (AISTATS 2023), https://arxiv.org/abs/2302.01772. Cost: the Gram matrix plus
    one `[n, n] @ [n, P]` product; memory: one output stack.
    """

    name = "nnm"

    def __init__(self, num_byzantine: int = 0) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    def transform(
        self, updates: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, f = honest_majority(self.name, updates, weights, self.num_byzantine)
        d2 = kernels.pairwise_sq_distances(updates)
        neighbours = d2.argsort(dim=1, stable=True)[:, : n - f]
        mixing = torch.zeros(n, n, dtype=torch.float64)
        mixing.scatter_(1, neighbours, 1.0 / (n - f))
        return kernels.combine(mixing, updates), weights
