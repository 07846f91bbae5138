"""Client algorithms: what a client does to the gradient of local training, and what it sends back.

The interface (`ClientAlgorithm`) and local training itself live in `koinon.local`; this module
holds the registry and the classic algorithms: local SGD (FedAvg), FedProx, SCAFFOLD.
"""

from __future__ import annotations

import torch

from koinon.local.algorithm import ClientAlgorithm, LocalTraining, State
from koinon.registry import Registry

__all__ = ["CLIENT_ALGORITHMS", "ClientAlgorithm", "FedProx", "LocalSGD", "LocalTraining", "Scaffold", "State"]


CLIENT_ALGORITHMS: Registry[ClientAlgorithm] = Registry("client algorithm")
"""Factories are called as `factory(mu=...)` (only the options they declare)."""


@CLIENT_ALGORITHMS.register("fedavg")
class LocalSGD:
    """Local SGD (FedAvg's client): epochs of minibatch SGD with momentum and weight decay."""

    name = "fedavg"
    uploads: tuple[str, ...] = ()
    downloads: tuple[str, ...] = ()

    def init_server_state(self, numel: int) -> State:
        return {}

    def begin(self, global_params: torch.Tensor, server_state: State, client_states: list[State]) -> State:
        return {}

    def correct(self, theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor, ctx: State) -> None:
        return None

    def end(
        self, theta0: torch.Tensor, theta: torch.Tensor, num_steps: torch.Tensor, lr: float, ctx: State
    ) -> tuple[dict[str, torch.Tensor], list[State]]:
        return {}, [{} for _ in range(theta.shape[0])]

    def server_update(
        self, server_state: State, uploads: dict[str, torch.Tensor], cohort_fraction: float
    ) -> State:
        return server_state


@CLIENT_ALGORITHMS.register("fedprox")
class FedProx(LocalSGD):
    """FedProx (Li et al. 2020, arXiv:1812.06127): local SGD plus the proximal term mu/2 ||w - w_global||^2."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        if mu < 0:
            raise ValueError(f"client.mu must be >= 0, got {mu}")
        self.mu = mu

    def correct(self, theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor, ctx: State) -> None:
        if self.mu:
            grad.add_(theta - theta0, alpha=self.mu)


@CLIENT_ALGORITHMS.register("scaffold")
class Scaffold(LocalSGD):
    """SCAFFOLD (Karimireddy et al. 2020, arXiv:1910.06378): drift correction with control variates."""

    # Option II of the paper: c_i+ = c_i - c + (x - y_i) / (K_i * lr). The server keeps c, each
    # client its own c_i (persistent client state, saved in checkpoints); both the update of
    # c_i and c itself cross the wire, so their bytes are counted.
    name = "scaffold"
    uploads: tuple[str, ...] = ("control",)
    downloads: tuple[str, ...] = ("control",)

    def init_server_state(self, numel: int) -> State:
        return {"control": torch.zeros(numel)}

    def begin(self, global_params: torch.Tensor, server_state: State, client_states: list[State]) -> State:
        c = server_state["control"]
        ci = torch.stack([s.get("control", torch.zeros_like(c)) for s in client_states])
        return {"c": c, "ci": ci, "correction": c.unsqueeze(0) - ci}

    def correct(self, theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor, ctx: State) -> None:
        grad.add_(ctx["correction"][:, : grad.shape[1]])

    def end(
        self, theta0: torch.Tensor, theta: torch.Tensor, num_steps: torch.Tensor, lr: float, ctx: State
    ) -> tuple[dict[str, torch.Tensor], list[State]]:
        ci, c = ctx["ci"], ctx["c"]
        scale = 1.0 / (num_steps.clamp_min(1).to(theta.dtype) * lr)
        ci_new = ci - c + (theta0 - theta) * scale.unsqueeze(1)
        delta_c = ci_new - ci
        return {"control": delta_c}, [{"control": row.clone()} for row in ci_new]

    def server_update(
        self, server_state: State, uploads: dict[str, torch.Tensor], cohort_fraction: float
    ) -> State:
        # c <- c + |S|/N * mean_i(delta c_i)
        return {"control": server_state["control"] + cohort_fraction * uploads["control"]}
