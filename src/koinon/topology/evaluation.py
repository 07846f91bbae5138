"""Federated evaluation: the global model on each client's own held-out data, and a server hook.

`Evaluation(holdout=0.2)` sets a seeded share of every client's samples aside before training
(they never train); on each evaluated round the global model is scored on the held-out split of
every client (`clients=0`) or of a seeded sample of them, and the per-client accuracies and
losses are aggregated into the round's metrics (`RoundResult.extra`, so `metrics.jsonl`):

- `client_accuracy_mean` / `client_loss_mean`: the unweighted mean over clients,
- `client_accuracy_weighted` / `client_loss_weighted`: weighted by held-out samples (pooled),
- `client_accuracy_p10`: the 10th percentile over clients (how the worse-off tenth does),
- `client_accuracy_worst` / `client_loss_worst`: the worst client,
- `client_eval_clients`: how many clients were evaluated.

`evaluate_fn(model, round_index) -> dict[str, float]` is the server-side hook (Flower's
`evaluate_fn`): it receives the user's module holding the current global weights, and what it
returns joins the same metrics. Both run only on evaluated rounds and only when asked for, so a
federation without them pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from koinon.data.federated import FederatedData
from koinon.params import Layout

EvaluateFn = Callable[[nn.Module, int], dict[str, float]]


@dataclass(frozen=True)
class Evaluation:
    """What a federation evaluates besides the server's test split (see the module docstring)."""

    holdout: float = 0.0  # share of each client's samples held out for client-side evaluation
    clients: int = 0  # clients evaluated a round (a seeded sample); 0 = every client
    evaluate_fn: EvaluateFn | None = None  # server-side hook: (model, round) -> metrics
    new_clients: float = 0.0  # clients kept out of training (count >= 1 or share < 1), see koinon.personal

    def __post_init__(self) -> None:
        if self.new_clients < 0 or (self.new_clients and not self.holdout):
            raise ValueError(f"evaluation new_clients = {self.new_clients}: must be >= 0, and > 0 needs "
                             "holdout > 0 (each client's held-out share)")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"evaluation holdout must be in [0, 1), got {self.holdout}")
        if self.clients < 0:
            raise ValueError(f"evaluation clients must be >= 0 (0 = all), got {self.clients}")
        if self.clients and not self.holdout:
            raise ValueError("evaluation clients > 0 needs holdout > 0 (the clients' held-out share)")
        if self.evaluate_fn is not None and not callable(self.evaluate_fn):
            raise ValueError(f"evaluate_fn must be callable (model, round) -> dict, got {self.evaluate_fn!r}")


def split_holdout(data: FederatedData, holdout: float, seed: int) -> tuple[FederatedData, list[torch.Tensor]]:
    """Each client's samples split into training and held-out (seeded); a client keeps at least
    one training sample, and one with a single sample holds nothing out."""
    rng = np.random.default_rng([seed, 0xE7A1])
    train, held = [], []
    for ix in data.client_indices:
        n = len(ix)
        k = min(max(int(round(holdout * n)), 1), n - 1) if n >= 2 else 0
        order = torch.from_numpy(rng.permutation(n))
        held.append(ix[order[:k]].sort().values)
        train.append(ix[order[k:]].sort().values)
    return FederatedData(data.dataset, train), held


@torch.no_grad()
def evaluate_clients(module: nn.Module, layout: Layout, params: torch.Tensor, data: FederatedData,
                     held: list[torch.Tensor], clients: list[int], loss_fn,
                     batch_size: int = 4096) -> dict[str, float]:
    """The global model on `clients`' held-out samples, aggregated over clients."""
    clients = [c for c in clients if len(held[c])]
    if not clients:
        return {}
    index = torch.cat([held[c] for c in clients])
    owner = torch.repeat_interleave(torch.arange(len(clients)), torch.tensor([len(held[c]) for c in clients]))
    x, y = data.dataset.x_train, data.dataset.y_train
    views = layout.views(params)
    module.eval()
    correct, losses = [], []
    for start in range(0, len(index), batch_size):
        ix = index[start : start + batch_size]
        out = functional_call(module, views, (x[ix],))
        losses.append(loss_fn(out, y[ix]).reshape(len(ix), -1).mean(dim=1))
        correct.append((out.argmax(dim=-1) == y[ix]).reshape(len(ix), -1).float().mean(dim=1))  # sequences: per position
    module.train()
    count = torch.zeros(len(clients)).index_add_(0, owner, torch.ones(len(index)))
    acc = torch.zeros(len(clients)).index_add_(0, owner, torch.cat(correct)) / count
    loss = torch.zeros(len(clients)).index_add_(0, owner, torch.cat(losses)) / count
    weights = count / count.sum()
    return {
        "client_accuracy_mean": float(acc.mean()),
        "client_accuracy_weighted": float((acc * weights).sum()),
        "client_accuracy_p10": float(np.percentile(acc.numpy(), 10)),
        "client_accuracy_worst": float(acc.min()),
        "client_loss_mean": float(loss.mean()),
        "client_loss_weighted": float((loss * weights).sum()),
        "client_loss_worst": float(loss.max()),
        "client_eval_clients": float(len(clients)),
    }
