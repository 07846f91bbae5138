"""Domains: one per data owner, for tasks split by domain and for per-domain metrics.

A domain-split task gives each owner data from its own distribution. Two sources:

* a natural grouping the dataset carries (Shakespeare: each owner's plays), whose held-out test
  windows per group are `Dataset.test_groups`;
* a per-owner feature shift (`shift_domains`): owner i's training samples pass through transform
  i (rotation, mirror, inverted contrast, a fixed pixel permutation, blur, noise, ...), and the
  test set is dealt to the owners (seeded) and shifted the same way, so each owner's domain has
  its own test split and the whole test set mixes every domain.

Either way `test_groups[i]` indexes owner i's domain in the test set, which is what the
per-domain accuracy (and what opting an owner out costs) is measured on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from koinon.data.datasets import Dataset
from koinon.data.federated import FederatedData
from koinon.seeding import mix_seed

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _images(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"this shift needs image inputs [N, C, H, W], got shape {list(x.shape)}")
    return x


def _permute(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flat = x.reshape(len(x), -1)
    return flat[:, torch.randperm(flat.shape[1], generator=gen)].reshape(x.shape)


def _blur(x: torch.Tensor, _gen: torch.Generator) -> torch.Tensor:
    c = _images(x).shape[1]
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
    return F.conv2d(x, kernel.expand(c, 1, 3, 3), padding=1, groups=c)


def _noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x + 0.3 * x.abs().max() * torch.randn(x.shape, generator=gen)


SHIFTS: dict[str, Transform] = {
    "none": lambda x, _g: x,
    "rot90": lambda x, _g: torch.rot90(_images(x), 1, dims=(2, 3)),
    "rot180": lambda x, _g: torch.rot90(_images(x), 2, dims=(2, 3)),
    "rot270": lambda x, _g: torch.rot90(_images(x), 3, dims=(2, 3)),
    "mirror": lambda x, _g: torch.flip(_images(x), dims=(3,)),
    "invert": lambda x, _g: x.max() - x,
    "contrast": lambda x, _g: 0.5 * x + 0.25 * x.max(),
    "permute": _permute,  # one fixed (seeded) permutation of the features for the whole domain
    "blur": _blur,
    "noise": _noise,
}
"""Per-owner feature shifts by name (`topology.domains`)."""


def check_shifts(names: list[str], num_owners: int) -> None:
    if len(names) != num_owners:
        raise ValueError(f"{len(names)} domains for {num_owners} owners (data.num_clients); give one per owner")
    unknown = [n for n in names if n not in SHIFTS]
    if unknown:
        raise ValueError(f"unknown domain shift {unknown[0]!r}; allowed: {', '.join(SHIFTS)}")


def shift_domains(data: FederatedData, names: list[str], seed: int) -> FederatedData:
    """`data` with owner i's training samples shifted by `names[i]` and the test set dealt to the
    owners (seeded, near-equal parts) and shifted likewise; sets `test_groups`."""
    check_shifts(names, data.num_clients)
    ds = data.dataset
    x_train = ds.x_train.clone()
    x_test = ds.x_test.clone()
    order = np.random.default_rng([seed, 0xD0A1]).permutation(len(ds.y_test))
    test_groups = [np.sort(part).astype(np.int64) for part in np.array_split(order, len(names))]
    for owner, (name, idx) in enumerate(zip(names, data.client_indices, strict=True)):
        shift = SHIFTS[name]
        # The same generator for an owner's train and test samples: one permutation per domain.
        seed_owner = mix_seed(seed, 0xD0A2, owner)
        if len(idx):
            x_train[idx] = shift(ds.x_train[idx], torch.Generator().manual_seed(seed_owner))
        te = torch.from_numpy(test_groups[owner])
        if len(te):
            x_test[te] = shift(ds.x_test[te], torch.Generator().manual_seed(seed_owner))
    shifted = dataclasses.replace(ds, name=f"{ds.name}+domains", x_train=x_train, x_test=x_test,
                                  test_groups=test_groups)
    return FederatedData(shifted, data.client_indices)


def domain_test_sets(dataset: Dataset) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each domain's `(x, y)` test split, or None when the dataset has no per-group test split."""
    if dataset.test_groups is None:
        return None
    return [(dataset.x_test[torch.from_numpy(g)], dataset.y_test[torch.from_numpy(g)])
            for g in dataset.test_groups]
