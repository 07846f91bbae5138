"""`FederatedData`: one copy of the data plus each client's index tensor into it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from koinon.data.datasets import Dataset
from koinon.data.partition import PARTITIONERS


@dataclass
class FederatedData:
    dataset: Dataset
    client_indices: list[torch.Tensor]

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    @property
    def sizes(self) -> torch.Tensor:
        return torch.tensor([len(ix) for ix in self.client_indices], dtype=torch.long)


def partition_dataset(
    dataset: Dataset,
    partition: str,
    num_clients: int,
    seed: int,
    options: dict | None = None,
) -> FederatedData:
    """Split `dataset`'s training set with a registered partitioner (seeded)."""
    factory = PARTITIONERS.get(partition, key="data.partition")
    accepted = PARTITIONERS.options(partition)
    kwargs = {k: v for k, v in (options or {}).items() if k in accepted}
    rng = np.random.default_rng([seed, 0xDA7A])
    parts = factory(
        labels=dataset.y_train.numpy(), num_clients=num_clients, rng=rng,
        groups=dataset.groups, **kwargs,
    )
    return FederatedData(dataset, [torch.from_numpy(np.asarray(p, dtype=np.int64)) for p in parts])
