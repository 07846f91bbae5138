"""Per-FedAvg (first-order): federated meta-learning of a model that adapts in a few steps.

Fallah, Mokhtari & Ozdaglar 2020, https://arxiv.org/abs/2002.07948. Each local step uses two
minibatches D, D' of the client: a trial step theta' = theta - alpha grad L_D(theta), then the
meta step theta <- theta - beta grad L_D'(theta') (the first-order approximation: the Hessian
term is dropped). beta is the configured local learning rate (plain SGD: no momentum or weight
decay in the meta step), alpha the `alpha` option. A client personalizes by `adapt_steps` SGD
steps of size alpha from the model it serves (the paper evaluates after one).

Our choices where the paper leaves room: D and D' are consecutive minibatches of the round's
schedule (so a meta step consumes two of them and a round makes half as many steps); with an
odd count the last batch is its own D'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.local.trainer import start_stack
from koinon.personal.base import train_part
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer


def stack_grad(trainer: CohortTrainer, theta: torch.Tensor, bufs: torch.Tensor, ix: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each client's gradient (`[K, P_trainable]`) of its mean loss on its batch `ix` (`[K, B]`
    sample indices, -1 = padding), its mean losses `[K]` and sample counts `[K]`. A client whose
    batch is all padding gets a zero gradient."""
    w = (ix >= 0).to(torch.float32)
    ixc = ix.clamp(min=0)
    x, y = trainer.x_train[ixc], trainer.y_train[ixc]
    leaf = theta.detach().requires_grad_(True)
    out = trainer.forward_stack(leaf, bufs, x)
    per = trainer.loss_fn(out.flatten(0, 1), y.flatten()).view(theta.shape[0], -1)
    n = w.sum(dim=1)
    loss = (per * w).sum(dim=1) / n.clamp_min(1.0)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return grad, loss.detach(), n


def meta_steps(trainer: CohortTrainer, starts: torch.Tensor, idx: torch.Tensor, alpha: float, beta: float,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order MAML steps of K clients from `starts` (`[P]` or `[K, P]`) over the batches
    `idx` (`[K, S, B]`): the final models `[K, P]` and each client's mean loss at its trial points."""
    pt = trainer.num_trainable
    theta, bufs = start_stack(starts, k, pt)
    loss_sum, seen = torch.zeros(k), torch.zeros(k)
    trainer.module.train()
    num = idx.shape[1]
    for s in range(0, num, 2):
        first = idx[:, s]
        second = idx[:, s + 1] if s + 1 < num else first
        # A client whose schedule ended at s + 1 uses its last batch twice, as if odd.
        second = torch.where((second >= 0).any(dim=1, keepdim=True), second, first)
        g1, loss, n = stack_grad(trainer, theta, bufs, first)
        trial = theta - alpha * g1
        g2, _, _ = stack_grad(trainer, trial, bufs, second)
        theta = theta - beta * g2
        loss_sum += loss * n
        seen += n
    return torch.cat([theta, bufs], dim=1), loss_sum / seen.clamp_min(1.0)


@CLIENT_ALGORITHMS.register("perfedavg")
class PerFedAvg(LocalSGD):
    """Per-FedAvg, first-order (Fallah et al. 2020): see the module docstring."""

    name = "perfedavg"

    def __init__(self, alpha: float = 0.01, adapt_steps: int = 1) -> None:
        if not alpha > 0:
            raise ValueError(f"client.alpha must be > 0, got {alpha}")
        if not isinstance(adapt_steps, int) or adapt_steps < 0:
            raise ValueError(f"client.adapt_steps must be an integer >= 0, got {adapt_steps!r}")
        self.alpha = float(alpha)
        self.adapt_steps = adapt_steps

    def starts(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
               server_state: State, client_states: list[State]) -> torch.Tensor:
        """Where each client's meta-training starts (the received model; clusters override)."""
        return global_params

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        k = len(client_ids)
        starts = self.starts(trainer, client_ids, global_params, server_state, client_states)
        final, loss = meta_steps(trainer, starts, idx, self.alpha, trainer.local.lr, k)
        start_rows = starts.unsqueeze(0).expand(k, -1) if starts.dim() == 1 else starts
        uploads, states = self.uploads_of(client_ids, server_state, client_states)
        return CohortResult(list(client_ids), final - start_rows, uploads, trainer.sizes(client_ids), steps,
                            loss, states)

    def uploads_of(self, client_ids: list[int], server_state: State, client_states: list[State]
                   ) -> tuple[dict[str, torch.Tensor], list[State]]:
        return {}, [{} for _ in client_ids]

    def personalize(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                    server_state: State, client_states: list[State], seed: int, round_index: int) -> torch.Tensor:
        """`adapt_steps` SGD steps of size alpha from the model the client serves."""
        starts = self.starts(trainer, client_ids, global_params, server_state, client_states)
        inner = _with_lr(trainer, self.alpha)
        return train_part(inner, client_ids, starts, self.adapt_steps, seed, round_index)


def _with_lr(trainer: CohortTrainer, lr: float) -> CohortTrainer:
    import copy
    import dataclasses

    other = copy.copy(trainer)
    other.local = dataclasses.replace(trainer.local, lr=lr)
    return other
