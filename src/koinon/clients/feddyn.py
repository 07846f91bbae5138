"""FedDyn: dynamic regularization, so that local optima agree with the global one.

Acar et al. 2021, "Federated Learning Based on Dynamic Regularization",
https://arxiv.org/abs/2111.04263. Client i minimizes
    L_i(theta) - <h_i, theta> + alpha/2 ||theta - x||^2,
so its local step adds -h_i + alpha (theta - x) to the gradient, and afterwards keeps
h_i <- h_i - alpha (theta_K - x) (persistent client state, in checkpoints). The server keeps
h <- h - alpha |S|/N mean_i(theta_i - x) and moves the model to mean_i(theta_i) - h / alpha:
the `server_delta` hook turns the cohort's mean update d into d - h_new / alpha before the
server optimizer (FedAvg with lr 1 gives the paper's step). koinon's mean is weighted by
sample counts, the paper's is uniform; with equal clients they agree. Nothing beyond the model
crosses the wire. Only trainable coordinates carry h: a model's buffers (BatchNorm's running
statistics) are averaged as FedAvg averages them, never corrected.
"""

from __future__ import annotations

import torch

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.params import Layout


@CLIENT_ALGORITHMS.register("feddyn")
class FedDyn(LocalSGD):
    """Dynamic regularization with per-client linear terms and a server correction (Acar et al. 2021)."""

    name = "feddyn"

    def __init__(self, alpha: float = 0.01, layout: Layout | None = None) -> None:
        if alpha <= 0:
            raise ValueError(f"client.alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.trainable = None if layout is None else layout.num_trainable  # None: every coordinate

    def init_server_state(self, numel: int) -> State:
        return {"h": torch.zeros(numel)}

    def begin(self, global_params: torch.Tensor, server_state: State, client_states: list[State]) -> State:
        numel = global_params.shape[-1]
        return {"h": torch.stack([s.get("h", torch.zeros(numel)) for s in client_states])}

    def correct(self, theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor, ctx: State) -> None:
        grad.sub_(ctx["h"][:, : grad.shape[1]]).add_(theta - theta0, alpha=self.alpha)

    def end(
        self, theta0: torch.Tensor, theta: torch.Tensor, num_steps: torch.Tensor, lr: float, ctx: State
    ) -> tuple[dict[str, torch.Tensor], list[State]]:
        h = ctx["h"] - self.alpha * _trainable(theta - theta0, self.trainable)
        return {}, [{"h": row.clone()} for row in h]

    def server_delta(self, server_state: State, delta: torch.Tensor, cohort_fraction: float) -> tuple[torch.Tensor, State]:
        """The cohort's mean update corrected by the server's h (and the new h)."""
        h = server_state["h"] - self.alpha * cohort_fraction * _trainable(delta, self.trainable)
        return delta - h / self.alpha, {"h": h}


def _trainable(x: torch.Tensor, trainable: int | None) -> torch.Tensor:
    """`x` with its buffer coordinates (past the first `trainable`) zeroed."""
    if trainable is None or trainable >= x.shape[-1]:
        return x
    out = x.clone()
    out[..., trainable:] = 0.0
    return out
