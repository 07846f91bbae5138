"""The `Attack` interface: Byzantine behaviour used to evaluate robustness.

A fixed fraction of the population, chosen by seed, is Byzantine. An attack can act at two
points of a round, both called by the topology:

* `poison_data(dataset, indices, generator)`: before training starts, rewrite the training
  samples that belong to Byzantine clients (label flipping, backdoor triggers). Honest clients'
  samples are never touched.
* `forge(updates, byzantine, context)`: after local training, replace the Byzantine rows of the
  cohort's update stack `[K, P]`. Omniscient attacks (ALIE, IPM, min-max, ...) may read the
  honest rows, as the literature assumes; the simulation hands them the stack, and honest
  clients never see anything of the attacker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from koinon.aggregate.base import Aggregator
from koinon.data.datasets import Dataset
from koinon.registry import Registry


@dataclass
class AttackContext:
    """What an attacker may know in a round (the omniscient threat model)."""

    round_index: int
    global_params: torch.Tensor  # [P] the model the cohort received
    weights: torch.Tensor  # [K] aggregation weights of the cohort
    aggregator: Aggregator  # the rule in use, for adaptive attacks
    generator: torch.Generator


class Attack(Protocol):
    name: str

    def poison_data(self, dataset: Dataset, indices: torch.Tensor, generator: torch.Generator) -> Dataset:
        """A dataset whose training samples at `indices` (the Byzantine clients') are poisoned."""
        ...

    def forge(self, updates: torch.Tensor, byzantine: torch.Tensor, context: AttackContext) -> torch.Tensor:
        """The update stack with Byzantine rows (`byzantine` is a `[K]` bool mask) replaced."""
        ...


ATTACKS: Registry[Attack] = Registry("attack")
"""Factories are called with the `[attack]` options they declare."""


class DataAttack:
    """Base for attacks that only poison data: updates are sent as trained."""

    name = "data"

    def forge(self, updates: torch.Tensor, byzantine: torch.Tensor, context: AttackContext) -> torch.Tensor:
        return updates


class ModelAttack:
    """Base for attacks that only forge updates: the data stays clean."""

    name = "model"

    def poison_data(self, dataset: Dataset, indices: torch.Tensor, generator: torch.Generator) -> Dataset:
        return dataset


def honest_rows(updates: torch.Tensor, byzantine: torch.Tensor) -> torch.Tensor:
    """The honest part of the stack; an attack with no honest rows to read falls back to all rows."""
    honest = updates[~byzantine]
    return honest if len(honest) else updates
