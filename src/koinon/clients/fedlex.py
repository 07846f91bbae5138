"""FedLEx: federated loss exploration builds a global guidance matrix that scales later steps.

"Federated Loss Exploration for Improved Convergence on Non-IID Data" (FedLEx). The abstract
says: clients contribute to a global guidance matrix by calculating gradient deviations for
the model parameters during a short exploration, and the matrix then guides the clients'
gradient updates in the following rounds. It leaves open which deviation, how the matrix is
formed and how it guides. Our reading, chosen to be simple and checkable:

- exploration: during the first `explore_rounds` rounds clients train as FedAvg and upload,
  per parameter, the standard deviation of their minibatch gradients over their local steps,
  sqrt(mean_t g_t^2 - (mean_t g_t)^2) (the abstract's "gradient deviations"; the spread of the
  gradient along the local trajectory is the loss-surface information a client sees). The
  server averages the uploads of each exploration round and, after the last one, averages the
  rounds into the matrix D;
- guidance: G = clip(D / mean(D), min_weight, max_weight) over the trainable coordinates (mean
  weight about 1, so the learning rate keeps its meaning; clipping so that a coordinate that
  never moved is not frozen and a noisy one does not explode). G is server state sent to every
  sampled client;
- guided training: afterwards each client multiplies each gradient coordinate by its weight,
  g <- G * g, before the optimizer step (coordinates whose gradients deviate more across the
  clients' loss landscapes take larger steps).

A client knows the phase from what it receives: G is all zeros until exploration ends.
Bytes: the guidance matrix is one model-sized download every round (zeros during exploration);
the deviation upload is a fixed stream of the wire, so after exploration clients send zeros
there (one model-sized tensor through the uplink codec; a sparse codec makes it small).
"""

from __future__ import annotations

import torch

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.params import Layout


def guidance_weights(deviation: torch.Tensor, min_weight: float, max_weight: float) -> torch.Tensor:
    """G = clip(D / mean(D), min_weight, max_weight); all ones where D carries no signal."""
    mean = deviation.mean()
    if not bool(mean > 0):
        return torch.ones_like(deviation)
    return (deviation / mean).clamp(min_weight, max_weight)


@CLIENT_ALGORITHMS.register("fedlex")
class FedLEx(LocalSGD):
    """Loss exploration (gradient deviations) for `explore_rounds` rounds, then guided steps."""

    name = "fedlex"
    uploads: tuple[str, ...] = ("deviation",)
    downloads: tuple[str, ...] = ("guidance",)

    def __init__(self, explore_rounds: int = 2, min_weight: float = 0.1, max_weight: float = 10.0,
                 layout: Layout | None = None) -> None:
        if explore_rounds < 1:
            raise ValueError(f"client.explore_rounds must be >= 1, got {explore_rounds}")
        if not 0.0 < min_weight <= 1.0 <= max_weight:
            raise ValueError(f"client.min_weight and client.max_weight must satisfy 0 < min_weight <= 1 <= "
                             f"max_weight, got {min_weight} and {max_weight}")
        self.explore_rounds = explore_rounds
        self.min_weight, self.max_weight = min_weight, max_weight
        self.trainable = None if layout is None else layout.num_trainable  # None: every coordinate

    def init_server_state(self, numel: int) -> State:
        return {"guidance": torch.zeros(numel), "explored": torch.zeros(numel), "rounds": torch.zeros(1)}

    def begin(self, global_params: torch.Tensor, server_state: State, client_states: list[State]) -> State:
        guidance = server_state.get("guidance")
        k, numel = len(client_states), global_params.shape[-1]
        if guidance is not None and bool(guidance.any()):
            return {"guidance": guidance}
        return {"sum": torch.zeros(k, numel), "sum_sq": torch.zeros(k, numel)}

    def correct(self, theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor, ctx: State) -> None:
        if "guidance" in ctx:
            grad.mul_(ctx["guidance"][: grad.shape[1]])
            return
        p = grad.shape[1]
        ctx["sum"][:, :p].add_(grad)  # rows of finished clients are outside the stack: untouched
        ctx["sum_sq"][:, :p].addcmul_(grad, grad)

    def end(
        self, theta0: torch.Tensor, theta: torch.Tensor, num_steps: torch.Tensor, lr: float, ctx: State
    ) -> tuple[dict[str, torch.Tensor], list[State]]:
        k = theta.shape[0]
        if "guidance" in ctx:
            return {"deviation": torch.zeros_like(theta)}, [{} for _ in range(k)]
        n = num_steps.clamp_min(1).to(theta.dtype).unsqueeze(1)
        mean = ctx["sum"] / n
        deviation = (ctx["sum_sq"] / n - mean * mean).clamp_min(0.0).sqrt()
        if self.trainable is not None:
            deviation[:, self.trainable:] = 0.0
        return {"deviation": deviation}, [{} for _ in range(k)]

    def server_update(
        self, server_state: State, uploads: dict[str, torch.Tensor], cohort_fraction: float
    ) -> State:
        rounds = int(server_state["rounds"].item())
        if rounds >= self.explore_rounds:
            return server_state
        explored = server_state["explored"] + uploads["deviation"]
        rounds += 1
        guidance = server_state["guidance"]
        if rounds == self.explore_rounds:
            p = self.trainable if self.trainable is not None else explored.shape[0]
            guidance = torch.ones_like(explored)  # buffers: never scaled (the trainer does not step them)
            guidance[:p] = guidance_weights(explored[:p] / rounds, self.min_weight, self.max_weight)
        return {"guidance": guidance, "explored": explored, "rounds": torch.tensor([float(rounds)])}
