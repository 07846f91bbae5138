"""Data-poisoning attacks beyond label flipping: a targeted backdoor.

The Byzantine clients train honestly on poisoned samples, so their updates look like any other
client's; the damage is measured on triggered test inputs, not on clean accuracy.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from koinon.attacks.base import ATTACKS, DataAttack
from koinon.data.datasets import Dataset
from koinon.local.losses import evaluate
from koinon.params import Layout


def stamp(x: torch.Tensor, patch_size: int, value: float) -> torch.Tensor:
    """A copy of the batch `x` `[N, ...]` with the trigger: the bottom-right `patch_size` square
    of the last two axes (an image's corner) set to `value`; for flat `[N, D]` inputs, the last
    `patch_size` features."""
    out = x.clone()
    if out.dim() >= 3:
        out[..., -patch_size:, -patch_size:] = value
    else:
        out[:, -patch_size:] = value
    return out


@ATTACKS.register("backdoor")
class Backdoor(DataAttack):
    """Backdoor: a corner trigger stamped on Byzantine samples, relabelled `target` (Gu et al. 2017).

    BadNets, https://arxiv.org/abs/1708.06733, in the federated setting of Bagdasaryan et al.
    (AISTATS 2020, https://arxiv.org/abs/1807.00459) without model replacement. A fraction
    `poison_fraction` of each Byzantine client's samples, drawn by seed, gets the trigger (the
    corner patch set to the training inputs' maximum, so it stays in the data's range) and the
    label `target`. `metrics` reports `backdoor_success`: the fraction of triggered test samples
    whose true class is not `target` that the model classifies as `target`.
    """

    name = "backdoor"

    def __init__(self, target: int = 0, poison_fraction: float = 0.5, patch_size: int = 2) -> None:
        if target < 0 or not 0 < poison_fraction <= 1 or patch_size < 1:
            raise ValueError(
                "attack needs target >= 0, 0 < poison_fraction <= 1 and patch_size >= 1, "
                f"got {target}, {poison_fraction}, {patch_size}"
            )
        self.target = target
        self.poison_fraction = float(poison_fraction)
        self.patch_size = patch_size

    def _check(self, dataset: Dataset) -> None:
        if self.target >= dataset.num_classes:
            raise ValueError(f"attack.target = {self.target}: the dataset has {dataset.num_classes} classes")

    def poison_data(self, dataset: Dataset, indices: torch.Tensor, generator: torch.Generator) -> Dataset:
        self._check(dataset)
        count = round(self.poison_fraction * len(indices))
        chosen = indices[torch.randperm(len(indices), generator=generator)[:count]]
        # The maximum of the clean data; stamping it does not change it, so `metrics` recomputes
        # the same value from the poisoned dataset.
        value = float(dataset.x_train.max())
        x = dataset.x_train.clone()
        x[chosen] = stamp(x[chosen], self.patch_size, value)
        y = dataset.y_train.clone()
        y[chosen] = self.target
        return dataclasses.replace(dataset, x_train=x, y_train=y)

    def metrics(self, module: nn.Module, layout: Layout, params: torch.Tensor, dataset: Dataset) -> dict[str, float]:
        self._check(dataset)
        keep = dataset.y_test != self.target
        x = stamp(dataset.x_test[keep], self.patch_size, float(dataset.x_train.max()))
        target = torch.full((len(x),), self.target, dtype=torch.long)
        success, _ = evaluate(module, layout, params, x, target)
        return {"backdoor_success": success}
