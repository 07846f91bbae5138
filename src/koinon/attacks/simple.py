"""Baseline attacks: label flipping (data) and sign flipping (model)."""

from __future__ import annotations

import dataclasses

import torch

from koinon.attacks.base import ATTACKS, AttackContext, DataAttack, ModelAttack, honest_rows
from koinon.data.datasets import Dataset


@ATTACKS.register("label_flip")
class LabelFlip(DataAttack):
    """Byzantine clients train on flipped labels y -> C - 1 - y (Tolpegin et al. 2020)."""

    name = "label_flip"

    def poison_data(self, dataset: Dataset, indices: torch.Tensor, generator: torch.Generator) -> Dataset:
        y = dataset.y_train.clone()
        y[indices] = dataset.num_classes - 1 - y[indices]
        return dataclasses.replace(dataset, y_train=y)


@ATTACKS.register("sign_flip")
class SignFlip(ModelAttack):
    """Byzantine clients send -scale times an honest update.

    `of = "own"` (the default) flips each Byzantine client's own update, the "bit flipping" of
    Allen-Zhu et al. 2020 (https://arxiv.org/abs/2012.14368) and Karimireddy et al. 2021
    (https://arxiv.org/abs/2012.10333). Under label skew that update comes from the attacker's
    own few classes. `of = "honest_mean"` sends minus the mean of the round's honest updates,
    identical in every Byzantine row: ByzFL's `SignFlipping` (omniscient).
    """

    name = "sign_flip"

    def __init__(self, scale: float = 1.0, of: str = "own") -> None:
        if scale <= 0:
            raise ValueError(f"attack.scale must be > 0, got {scale}")
        if of not in ("own", "honest_mean"):
            raise ValueError(f"attack.of must be 'own' or 'honest_mean', got {of!r}")
        self.scale = scale
        self.of = of

    def forge(self, updates: torch.Tensor, byzantine: torch.Tensor, context: AttackContext) -> torch.Tensor:
        out = updates.clone()
        if self.of == "own":
            out[byzantine] = -self.scale * updates[byzantine]
        else:
            out[byzantine] = -self.scale * honest_rows(updates, byzantine).mean(dim=0)
        return out


@ATTACKS.register("none")
class NoAttack(ModelAttack, DataAttack):
    """No attack: every client is honest (the default)."""

    name = "none"
