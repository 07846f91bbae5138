"""Baseline attacks: label flipping (data) and sign flipping (model)."""

from __future__ import annotations

import dataclasses

import torch

from koinon.attacks.base import ATTACKS, AttackContext, DataAttack, ModelAttack
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
    """Byzantine clients send -scale times their honest update (Allen-Zhu et al. 2020)."""

    name = "sign_flip"

    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError(f"attack.scale must be > 0, got {scale}")
        self.scale = scale

    def forge(self, updates: torch.Tensor, byzantine: torch.Tensor, context: AttackContext) -> torch.Tensor:
        out = updates.clone()
        out[byzantine] = -self.scale * updates[byzantine]
        return out


@ATTACKS.register("none")
class NoAttack(ModelAttack, DataAttack):
    """No attack: every client is honest (the default)."""

    name = "none"
