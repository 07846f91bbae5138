"""Geometric median by smoothed Weiszfeld iterations (RFA), run on the Gram matrix.

Every Weiszfeld iterate is a convex combination `beta @ updates`, and the distances it needs,
`|x_i - beta @ x|^2 = G_ii - 2 (G beta)_i + beta^T G beta`, only involve the `n x n` Gram
matrix. So all iterations cost O(n^2) after one pass over the data, and the output is one
matmul; iterating to convergence is then free, where ByzFL stops after 3 full passes.
"""

from __future__ import annotations

import torch

from koinon.aggregate import kernels
from koinon.aggregate.base import (
    AGGREGATORS,
    check_num_byzantine,
    honest_majority,
)


def weiszfeld_coefficients(
    g: torch.Tensor, max_iter: int, smoothing: float, tolerance: float
) -> torch.Tensor:
    """Convex coefficients of the smoothed geometric median, from the Gram matrix `g`."""
    n = g.shape[0]
    beta = torch.full((n,), 1.0 / n, dtype=torch.float64)
    diag = g.diagonal()
    for _ in range(max_iter):
        gb = g @ beta
        dist = (diag - 2 * gb + beta @ gb).clamp_min(0).sqrt()
        w = 1.0 / dist.clamp_min(smoothing)
        new = w / w.sum()
        change = (new - beta).abs().sum()
        beta = new
        if change <= tolerance:
            break
    return beta


@AGGREGATORS.register("geometric_median")
class GeometricMedian:
    """Geometric median (smoothed Weiszfeld, RFA); breakdown point 1/2, needs n > 2f.

    Pillutla, Kakade and Harchaoui, Robust Aggregation for Federated Learning (IEEE TSP 2022),
    https://arxiv.org/abs/1912.13445. Starts at the mean; distances below `smoothing` are
    raised to it (the nu of RFA); stops when the coefficients move less than `tolerance` in
    L1 or after `max_iter` iterations.
    """

    name = "geometric_median"

    def __init__(
        self,
        num_byzantine: int = 0,
        max_iter: int = 100,
        smoothing: float = 1e-6,
        tolerance: float = 1e-10,
    ) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)
        if max_iter < 1 or smoothing <= 0 or tolerance < 0:
            raise ValueError(
                "geometric_median needs max_iter >= 1, smoothing > 0 and tolerance >= 0, got "
                f"{max_iter}, {smoothing}, {tolerance}"
            )
        self.max_iter = max_iter
        self.smoothing = float(smoothing)
        self.tolerance = float(tolerance)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, f = honest_majority(self.name, updates, weights, self.num_byzantine)
        beta = weiszfeld_coefficients(
            kernels.gram(updates), self.max_iter, self.smoothing, self.tolerance
        )
        return kernels.combine(beta, updates)
