"""Model heterogeneity: clients with different compute budgets, and what their methods share.

A client's *budget* is the share of the full model it can afford to run and train. Methods for
heterogeneous clients (`pfedgate`, `fedconv`) take `budgets`, a list cycled over the client ids
(client c has budget `budgets[c % len(budgets)]`; the default `[1.0]` makes every client able to
run the full model), so `client.budgets = [1.0, 0.5, 0.25]` gives a third of the clients each.
Methods that do not know budgets train one model that every client can run: in the benchmark's
`hetero` setting they get the narrowest width (`benchmarks/personalization.py`).

Also here: the own training loop of methods that train more than the model's flat vector (a
gating layer, a differently shaped sub-model), and `predictor_accuracy`, which scores per-client
prediction functions (a personalized model that is not one `[P]` vector of the global layout).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from koinon.local.algorithm import LocalTraining
from koinon.local.losses import cross_entropy

Predictor = Callable[[torch.Tensor], torch.Tensor]


def check_budgets(budgets: Sequence[float], name: str) -> list[float]:
    """The budgets as floats, each in (0, 1]; a clear error otherwise."""
    if isinstance(budgets, (int, float)):
        budgets = [budgets]
    out = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < float(b) <= 1.0:
            raise ValueError(f"client.budgets of {name!r} must be a list of shares in (0, 1], got {list(budgets)!r}")
        out.append(float(b))
    if not out:
        raise ValueError(f"client.budgets of {name!r} must name at least one budget")
    return out


def budget_of(budgets: list[float], client: int) -> float:
    """Client `client`'s budget: `budgets` cycled over the client ids."""
    return budgets[client % len(budgets)]


def check_plain_sgd(local: LocalTraining, name: str) -> None:
    """The own loop below is plain SGD; refuse what it would silently ignore."""
    if local.optimizer != "sgd" or local.momentum or local.weight_decay:
        raise ValueError(f"client.algorithm = {name!r} trains with plain SGD (its own loop over a gating layer or "
                         f"a sub-model): set client.optimizer = 'sgd', momentum = 0, weight_decay = 0")


def sgd_loop(local: LocalTraining, x_all: torch.Tensor, y_all: torch.Tensor, batches: torch.Tensor, num_steps: int,
             tensors: list[torch.Tensor], loss_of: Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor],
             lr_scale: Sequence[float] | None = None) -> tuple[list[torch.Tensor], float]:
    """One client's local steps of plain SGD on the mean loss `loss_of(tensors, x, y)` over the
    batches `batches` (`[S, B]` sample indices, -1 padded), the trainer's learning rate schedule
    scaled per tensor by `lr_scale` (0 freezes a tensor). Returns the trained tensors and the mean
    per-sample training loss. Used where the trainer's loop cannot train what the method trains;
    a client's arithmetic is the same whichever runtime calls it (one client at a time)."""
    scale = list(lr_scale) if lr_scale is not None else [1.0] * len(tensors)
    ts = [t.detach().clone() for t in tensors]
    loss_sum, seen = 0.0, 0
    for s in range(min(num_steps, len(batches))):  # a client without samples (no labels) has no batches
        ix = batches[s]
        ix = ix[ix >= 0]
        if len(ix) == 0:
            continue
        leaves = [t.requires_grad_(True) for t in ts]
        loss = loss_of(leaves, x_all[ix], y_all[ix])
        grads = torch.autograd.grad(loss, [t for t, c in zip(leaves, scale) if c], allow_unused=True)
        lr = local.lr_at(s)
        with torch.no_grad():
            it = iter(grads)
            new = []
            for t, c in zip(leaves, scale):
                t = t.detach()
                if c:
                    g = next(it)
                    if g is not None:
                        t = t - (lr * c) * g
                new.append(t)
            ts = new
        loss_sum += float(loss.detach()) * len(ix)
        seen += len(ix)
    return [t.detach() for t in ts], loss_sum / max(seen, 1)


def mean_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return cross_entropy(logits, y).mean()


@torch.no_grad()
def predictor_accuracy(predictors: list[Predictor], x: torch.Tensor, y: torch.Tensor,
                       held: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy of `predictors[k]` (inputs -> logits) on the samples `held[k]`, and their counts."""
    acc = torch.zeros(len(held))
    counts = torch.tensor([len(ix) for ix in held], dtype=torch.float32)
    for k, ix in enumerate(held):
        if len(ix):
            acc[k] = (predictors[k](x[ix]).argmax(dim=1) == y[ix]).float().mean()
    return acc, counts


__all__ = ["Predictor", "budget_of", "check_budgets", "check_plain_sgd", "mean_ce", "predictor_accuracy", "sgd_loop"]
