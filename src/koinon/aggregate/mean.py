"""Weighted mean: FedAvg's aggregation (weights are the clients' sample counts)."""

from __future__ import annotations

import torch

from koinon.aggregate.base import AGGREGATORS, check_stack


@AGGREGATORS.register("mean")
class Mean:
    """Weighted average of the updates (FedAvg); not robust to a single malicious input."""

    name = "mean"

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        check_stack(updates, weights)
        if not self.weighted:
            return updates.mean(dim=0)
        w = weights.to(updates.dtype)
        total = w.sum()
        if total <= 0:
            raise ValueError("aggregation weights sum to zero")
        return (w / total) @ updates
