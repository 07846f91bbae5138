"""`FederatedData`: one copy of the data plus each client's index tensor into it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from koinon.data.checks import check_dataset
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
    """Split `dataset`'s training set with a registered partitioner (seeded). `options` are the
    partitioner's own (e.g. `{"alpha": 0.5}` for dirichlet); any other key is refused."""
    factory = PARTITIONERS.get(partition, key="data.partition")
    accepted = [k for k in PARTITIONERS.options(partition) if k not in ("labels", "num_clients", "rng", "groups")]
    kwargs = dict(options or {})
    for key in kwargs:
        if key not in accepted:
            raise ValueError(f"{key!r} is not an option of partition {partition!r}; "
                             f"allowed: {', '.join(accepted) or '(none)'}")
    check_dataset(dataset)
    rng = np.random.default_rng([seed, 0xDA7A])
    parts = factory(
        labels=dataset.y_train.numpy(), num_clients=num_clients, rng=rng,
        groups=dataset.groups, **kwargs,
    )
    return FederatedData(dataset, [torch.from_numpy(np.asarray(p, dtype=np.int64)) for p in parts])


def partition_options(partition: str, values: dict) -> dict:
    """The entries of `values` that `partition` takes: a config's flat data keys (`alpha`,
    `classes_per_client`, `power`) always have values, but each partitioner reads its own."""
    accepted = PARTITIONERS.options(partition)
    return {k: v for k, v in values.items() if k in accepted}
