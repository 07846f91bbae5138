"""A population of clients of known quality, to check that contribution scores rank them right.

Roles (one per client): `clean`; `noisy:R` (a seeded share R of its labels replaced by other
labels); `duplicate:J` (the same samples as client J); `free_rider` (sends no change: the global
model back); `label_flip` (trains on labels y -> C - 1 - y); `sign_flip` (sends minus its
honest update). Free riders and sign flippers act at the server as a simulated model attack,
so every cohort must hold every client (full participation).

`true_quality` orders them: clean and duplicates 1, noisy 1 - R, free riders 0, label and sign
flippers -1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from koinon.attacks.base import AttackContext, ModelAttack
from koinon.clients import LocalTraining
from koinon.data import Dataset, FederatedData, partition_dataset
from koinon.ledger.shapley import Budget
from koinon.topology.federated import Federation
from koinon.topology.server import Adversary

FORGED = ("free_rider", "sign_flip")


def true_quality(role: str) -> float:
    kind, _, arg = role.partition(":")
    return {"clean": 1.0, "duplicate": 1.0, "free_rider": 0.0, "label_flip": -1.0,
            "sign_flip": -1.0}.get(kind, 1.0 - float(arg or 0))


def check_roles(roles: list[str]) -> None:
    for i, role in enumerate(roles):
        kind, _, arg = role.partition(":")
        if kind == "noisy" and not 0.0 <= float(arg) <= 1.0:
            raise ValueError(f"client {i}: {role!r}: the noise rate must be in [0, 1]")
        if kind == "duplicate" and not (arg.isdigit() and int(arg) < len(roles) and
                                        roles[int(arg)].partition(":")[0] != "duplicate"):
            raise ValueError(f"client {i}: {role!r}: must name a client that is not a duplicate")
        if kind not in ("clean", "noisy", "duplicate", "free_rider", "label_flip", "sign_flip"):
            raise ValueError(f"client {i}: unknown role {role!r}")


def population_data(dataset: Dataset, roles: list[str], seed: int) -> FederatedData:
    """An IID split over the clients that own data, with each role's labels applied."""
    check_roles(roles)
    owners = [i for i, r in enumerate(roles) if not r.startswith("duplicate")]
    parts = partition_dataset(dataset, "iid", len(owners), seed).client_indices
    indices: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(roles)
    for i, part in zip(owners, parts):
        indices[i] = part
    y = dataset.y_train.clone()
    c = dataset.num_classes
    rng = np.random.default_rng([seed, 0x9015E])
    for i, role in enumerate(roles):
        kind, _, arg = role.partition(":")
        if kind == "duplicate":
            indices[i] = indices[int(arg)]
        elif kind == "label_flip":
            y[indices[i]] = c - 1 - y[indices[i]]
        elif kind == "noisy":
            own = indices[i].numpy()
            noisy = own[rng.random(len(own)) < float(arg)]
            shift = torch.as_tensor(rng.integers(1, c, len(noisy)))
            y[noisy] = (y[noisy] + shift) % c  # always a wrong label
    poisoned = Dataset(dataset.name, dataset.x_train, y, dataset.x_test, dataset.y_test, c)
    return FederatedData(poisoned, indices)


class RoleAttack(ModelAttack):
    """The forged roles: free riders send zeros, sign flippers minus their update."""

    name = "roles"

    def __init__(self, roles: list[str]) -> None:
        self.forgers = [(i, r) for i, r in enumerate(roles) if r in FORGED]

    def forge(self, updates: torch.Tensor, byzantine: torch.Tensor, context: AttackContext) -> torch.Tensor:
        rows = byzantine.nonzero().flatten().tolist()
        if len(rows) != len(self.forgers):
            raise ValueError("a population of known quality needs every client in every cohort")
        out = updates.clone()
        for row, (_, role) in zip(rows, self.forgers):
            out[row] = 0.0 if role == "free_rider" else -updates[row]
        return out


def population_federation(model: nn.Module, dataset: Dataset, roles: list[str], seed: int,
                          **federation: Any) -> Federation:
    """A `Federation` of `roles` with every client in every round (`federation`: its other
    arguments, e.g. `local`, `aggregator`, `runtime`)."""
    data = population_data(dataset, roles, seed)
    fed = Federation(model, data, clients_per_round=len(roles), seed=seed, **federation)
    attack = RoleAttack(roles)
    if attack.forgers:
        # The forging clients are these roles, not a seeded draw: the adversary is set as the
        # server would be built with it (its cohorts are everyone, so the quota is all of them).
        chosen = {i for i, _ in attack.forgers}
        fed.byzantine = chosen
        fed.attack = attack
        fed.server.adversary = Adversary(attack, chosen, len(chosen) / len(roles))
    return fed


@dataclass
class PopulationResult:
    """How one contribution method ranked a population of known quality."""

    method: str
    spearman: float  # rank correlation of the total scores with `true_quality`
    wall_s: float  # the whole run, ledger included
    ledger_s: float  # of which the ledger: scoring, storing and logging
    scoring_s: float  # of which the contribution method
    evaluations: int  # coalition models evaluated
    accuracy: float
    bad_paid: int  # cents paid to free riders, label flippers and sign flippers
    totals: dict[int, float]


def score_population(roles: list[str], contribution: str | None, *, rounds: int, seed: int, out: Path,
                     model: str = "mlp", model_options: dict[str, Any] | None = None, dataset: str = "digits",
                     local: LocalTraining | None = None, options: dict[str, Any] | None = None,
                     budget: Budget | None = None, payout_cents: int = 100_000,
                     utility: str = "loss", validation_fraction: float = 0.5,
                     dataset_options: dict[str, Any] | None = None) -> PopulationResult:
    """Train `roles` for `rounds` rounds with the ledger `contribution` (None: no ledger, the
    baseline) writing into `out`, and compare its scores with the roles' true quality."""
    from scipy.stats import spearmanr

    from koinon.data import DATASETS
    from koinon.ledger.ledger import SCALE, LedgerSettings, attach
    from koinon.models import build_model

    ds = DATASETS.build(dataset, dataset_options or {}, "data", seed=seed, test_fraction=0.2, num_clients=len(roles))
    module = build_model(model, model_options or {"hidden": [64]}, ds.input_shape, ds.num_classes, seed)
    fed = population_federation(module, ds, roles, seed, local=local or LocalTraining(), runtime="vectorized")
    ledger = None
    if contribution is not None:
        settings = LedgerSettings(contribution, options or {}, utility, validation_fraction,
                                  budget=budget or Budget(), payout_cents=payout_cents)
        ledger = attach(fed, out, settings)
    start = time.perf_counter()
    for r in range(rounds):
        result = fed.run_round(evaluate=r == rounds - 1)
    wall = time.perf_counter() - start
    accuracy = float(result.test_accuracy or 0.0)
    if ledger is None:
        return PopulationResult("none", float("nan"), wall, 0.0, 0.0, 0, accuracy, 0, {})
    payout = ledger.finish(out)
    totals = {c: ledger.totals.get(c, 0) / SCALE for c in range(len(roles))}
    quality = [true_quality(r) for r in roles]
    rho = float(spearmanr([totals[c] for c in range(len(roles))], quality).statistic)
    bad = sum(payout.paid.get(c, 0) for c, r in enumerate(roles)
              if r in ("free_rider", "label_flip", "sign_flip"))
    return PopulationResult(str(contribution), rho, wall, ledger.seconds, ledger.scoring_s, ledger.evaluations, accuracy,
                            bad, totals)
