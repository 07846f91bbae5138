"""Mime-lite: local steps that follow the server's momentum, kept fixed during the round.

Karimireddy et al. 2020, "Mime: Mimicking Centralized Stochastic Algorithms in Federated
Learning", https://arxiv.org/abs/2008.03606. The server keeps a momentum m of full-batch client
gradients and sends it with the model. A client first computes its full-batch gradient at the
received model, c_i = grad f_i(x), and uploads it; its local steps use
    theta <- theta - lr * ((1 - beta) g + beta m)
with m fixed, so every client mimics one centralized momentum-SGD run instead of drifting with
momentum of its own. The server averages the models (FedAvg) and updates
m <- (1 - beta) mean_i(c_i) + beta m. Both m and c_i cross the wire, so their bytes count (one
extra model-sized tensor each way, as in the paper). Local momentum should be 0 (client.momentum).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.local.trainer import start_stack
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer

_CHUNK = 512


def full_gradient(trainer: CohortTrainer, client_ids: list[int], params: torch.Tensor) -> torch.Tensor:
    """`[K, P]` gradients of each client's mean loss over all its training samples at `params`
    (zero on the buffer coordinates), in chunks of samples."""
    k, pt = len(client_ids), trainer.num_trainable
    theta, bufs = start_stack(params, k, pt)
    lists = [trainer.data.client_indices[c].to(torch.long) for c in client_ids]
    sizes = torch.tensor([len(ix) for ix in lists], dtype=torch.float32)
    n_max = int(sizes.max()) if k else 0
    padded = torch.zeros(k, max(n_max, 1), dtype=torch.long)
    for i, ix in enumerate(lists):
        padded[i, : len(ix)] = ix
    valid = torch.arange(max(n_max, 1)).view(1, -1) < sizes.view(k, 1)
    grad = torch.zeros(k, params.shape[-1])
    for start in range(0, n_max, _CHUNK):
        ix, w = padded[:, start : start + _CHUNK], valid[:, start : start + _CHUNK].to(torch.float32)
        leaf = theta.detach().requires_grad_(True)
        out = trainer.forward_stack(leaf, bufs, trainer.x_train[ix])
        per = trainer.loss_fn(out.flatten(0, 1), trainer.y_train[ix].flatten()).view(k, -1)
        loss = ((per * w).sum(dim=1) / sizes.clamp_min(1.0)).sum()
        grad[:, :pt] += torch.autograd.grad(loss, leaf)[0]
    return grad


@CLIENT_ALGORITHMS.register("mime_lite")
class MimeLite(LocalSGD):
    """Local steps with the server's fixed momentum; clients upload full-batch gradients (Karimireddy et al. 2020)."""

    name = "mime_lite"
    uploads: tuple[str, ...] = ("grad",)
    downloads: tuple[str, ...] = ("momentum",)
    plain_sgd = True  # its momentum is the server's: a local momentum or AdamW would apply a second one

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"client.beta must be in [0, 1), got {beta}")
        self.beta = beta

    def init_server_state(self, numel: int) -> State:
        return {"momentum": torch.zeros(numel)}

    def begin(self, global_params: torch.Tensor, server_state: State, client_states: list[State]) -> State:
        return {"momentum": server_state["momentum"]}

    def correct(self, theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor, ctx: State) -> None:
        grad.mul_(1.0 - self.beta).add_(ctx["momentum"][: grad.shape[1]], alpha=self.beta)

    def train_cohort(
        self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
        server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
        seed: int, round_index: int,
    ) -> CohortResult:
        full = full_gradient(trainer, client_ids, global_params)
        result = trainer.run_steps(client_ids, global_params, server_state, client_states, idx, steps)
        result.uploads = {**result.uploads, "grad": full}
        return result

    def server_update(
        self, server_state: State, uploads: dict[str, torch.Tensor], cohort_fraction: float
    ) -> State:
        return {"momentum": (1.0 - self.beta) * uploads["grad"] + self.beta * server_state["momentum"]}
