"""FedNova: normalized averaging of local updates that took different numbers of steps.

Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", https://arxiv.org/abs/2007.07481. With epochs of local SGD, a client with more
data takes more steps and FedAvg drifts towards its objective. FedNova divides each update by
the client's step count ||a_i||_1 (for SGD with momentum rho: (tau - rho (1 - rho^tau) /
(1 - rho)) / (1 - rho)) and rescales the weighted mean by tau_eff = sum_i p_i ||a_i||_1, so the
server step is x - tau_eff sum_i p_i d_i. Here each client sends delta_i * tau_eff / ||a_i||_1
and koinon's sample-weighted mean (p_i = n_i / n) does the rest.

`tau_eff`: set it (deployment, where a client does not know the others' sizes), or leave 0 for
the population's sample-weighted mean step count, which the simulation knows (the expectation
of the paper's cohort sum under uniform sampling; the same on every runtime).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer


def step_norm(steps: torch.Tensor, momentum: float) -> torch.Tensor:
    """||a_i||_1 of `steps` local SGD steps with heavy-ball momentum `momentum`."""
    tau = steps.to(torch.float64)
    if momentum == 0.0:
        return tau
    rho = momentum
    return (tau - rho * (1.0 - rho**tau) / (1.0 - rho)) / (1.0 - rho)


@CLIENT_ALGORITHMS.register("fednova")
class FedNova(LocalSGD):
    """Normalized averaging (Wang et al. 2020): each update scaled by tau_eff / its step count."""

    name = "fednova"

    def __init__(self, tau_eff: float = 0.0) -> None:
        if tau_eff < 0:
            raise ValueError(f"client.tau_eff must be >= 0 (0 = from the population), got {tau_eff}")
        self.tau_eff = tau_eff

    def effective_steps(self, trainer: CohortTrainer) -> float:
        if self.tau_eff:
            return self.tau_eff
        sizes = trainer.data.sizes.to(torch.float64)
        steps = torch.tensor([trainer.local.num_steps(int(n)) for n in sizes.tolist()])
        norms = step_norm(steps, trainer.local.momentum)
        return float((sizes * norms).sum() / sizes.sum().clamp_min(1.0))

    def train_cohort(
        self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
        server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
        seed: int, round_index: int,
    ) -> CohortResult:
        if trainer.local.optimizer != "sgd":
            raise ValueError("fednova normalizes SGD steps; set client.optimizer = 'sgd'")
        result = trainer.run_steps(client_ids, global_params, server_state, client_states, idx, steps)
        assert result.deltas is not None
        norms = step_norm(result.num_steps, trainer.local.momentum).clamp_min(1.0)
        scale = (self.effective_steps(trainer) / norms).to(result.deltas.dtype)
        result.deltas.mul_(scale.unsqueeze(1))
        return result
