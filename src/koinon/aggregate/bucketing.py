"""Bucketing: average random groups of inputs before the robust rule, to reduce heterogeneity.

Karimireddy, He and Jaggi, Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing
(ICLR 2022), https://arxiv.org/abs/2006.09365.
"""

from __future__ import annotations

import torch

from koinon.aggregate import kernels
from koinon.aggregate.base import PRE_AGGREGATORS, check_stack


@PRE_AGGREGATORS.register("bucketing")
class Bucketing:
    """Bucketing: shuffle, then average buckets of `bucket_size` inputs (the last may be short).

    With f Byzantine inputs at most f buckets are contaminated, so the final rule must tolerate
    f out of ceil(n / bucket_size) inputs. The shuffle is seeded by `seed` and the round count
    (state: `rounds`, saved by `state_dict`), so runs are reproducible.
    """

    name = "bucketing"

    def __init__(self, bucket_size: int = 2, seed: int = 0) -> None:
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        self.bucket_size = bucket_size
        self.seed = seed
        self.rounds = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rounds": torch.tensor(self.rounds)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rounds = int(state["rounds"])

    def transform(
        self, updates: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_stack(updates, weights)
        n = updates.shape[0]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rounds)
        self.rounds += 1
        order = torch.randperm(n, generator=generator)
        buckets = (n + self.bucket_size - 1) // self.bucket_size
        mixing = torch.zeros(buckets, n, dtype=torch.float64)
        bucket_weights = torch.zeros(buckets, dtype=weights.dtype)
        for b in range(buckets):
            members = order[b * self.bucket_size : (b + 1) * self.bucket_size]
            mixing[b, members] = 1.0 / len(members)
            bucket_weights[b] = weights[members].sum()
        return kernels.combine(mixing, updates), bucket_weights
