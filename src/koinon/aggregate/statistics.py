"""Coordinate-wise robust statistics: median, trimmed mean and mean-around-median (Meamed).

Each works one coordinate at a time on order statistics, computed by the blocked SIMD sort in
`kernels`. Like every robust rule here they ignore the sample-count weights: a Byzantine client
could claim any count, so weighting by it would hand the attacker the result.
"""

from __future__ import annotations

import torch

from koinon.aggregate import kernels
from koinon.aggregate.base import (
    AGGREGATORS,
    check_num_byzantine,
    honest_majority,
)


@AGGREGATORS.register("median")
class CoordinateMedian:
    """Coordinate-wise median (average of the two middle values for even n); needs n > 2f.

    Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates
    (ICML 2018), https://arxiv.org/abs/1803.01498. Each coordinate of the output lies between
    honest values of that coordinate as long as n > 2f.
    """

    name = "median"

    def __init__(self, num_byzantine: int = 0) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, f = honest_majority(self.name, updates, weights, self.num_byzantine)
        return kernels.coordinate_median(updates)


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean:
    """Coordinate-wise trimmed mean: drop the f largest and f smallest values; needs n > 2f.

    Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates
    (ICML 2018), https://arxiv.org/abs/1803.01498.
    """

    name = "trimmed_mean"

    def __init__(self, num_byzantine: int = 0) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, f = honest_majority(self.name, updates, weights, self.num_byzantine)
        if f == 0:
            return torch.full((n,), 1.0 / n, dtype=updates.dtype) @ updates
        return kernels.sorted_rows_mean(updates, f, n - f)


@AGGREGATORS.register("meamed")
class Meamed:
    """Mean around median: per coordinate, the mean of the n - f values closest to the median.

    Needs n > 2f. Xie, Koyejo and Gupta, Generalized Byzantine-tolerant SGD (2018),
    https://arxiv.org/abs/1802.10116. Ties in distance to the median go to the lower values.
    """

    name = "meamed"

    def __init__(self, num_byzantine: int = 0) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, f = honest_majority(self.name, updates, weights, self.num_byzantine)
        return kernels.meamed_rows(updates, n - f)
