"""Worker momentum: each client uploads a running average of its own updates across rounds.

Karimireddy, He & Jaggi, "Learning from History for Byzantine Robust Optimization" (ICML 2021),
https://arxiv.org/abs/2012.10333, and Allouah et al., "Fixing by Mixing" (AISTATS 2023),
https://arxiv.org/abs/2302.01772. Honest updates differ from each other by their sampling noise
plus their data heterogeneity; robust rules cannot tell an attacker from a noisy honest client
when that spread is large. Averaging a client's updates over rounds,

    m_i <- beta * m_i + (1 - beta) * delta_i,

shrinks the noise part by about sqrt((1 - beta) / (1 + beta)) while keeping the mean, so the
honest uploads cluster and a distance- or rank-based rule (NNM, trimmed mean, centered clipping)
removes what lies outside. This is the "momentum at the worker" of both papers; a momentum
applied by the server after aggregation does not have that effect.

`m_i` is persistent client state (saved in checkpoints, like SCAFFOLD's control variate). A
client that skipped rounds resumes from its last `m_i`; with full participation (ByzFL's
protocol) every client refreshes it each round. The first round starts from `m_i = delta_i`
(no zero bias). Byzantine clients run it too, and the attack then forges their uploads from
what honest clients send, as the omniscient threat model assumes.
"""

from __future__ import annotations

import torch

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State


@CLIENT_ALGORITHMS.register("worker_momentum")
class WorkerMomentum(LocalSGD):
    """Local SGD whose upload is the client's momentum over rounds (Karimireddy et al. 2021)."""

    name = "worker_momentum"

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"client.beta must be in [0, 1), got {beta}")
        self.beta = float(beta)

    def begin(self, global_params: torch.Tensor, server_state: State, client_states: list[State]) -> State:
        # A row of NaN marks a client with no momentum yet (its first round).
        numel = global_params.shape[-1]
        rows = [s.get("momentum", torch.full((numel,), float("nan"))) for s in client_states]
        return {"momentum": torch.stack(rows) if rows else torch.empty(0, numel)}

    def end(
        self, theta0: torch.Tensor, theta: torch.Tensor, num_steps: torch.Tensor, lr: float, ctx: State
    ) -> tuple[dict[str, torch.Tensor], list[State]]:
        """Rewrite `theta` in place to `theta0 + m_i`, so the uploaded delta is the momentum."""
        delta = theta - theta0
        previous = ctx["momentum"]
        fresh = torch.isnan(previous[:, :1])
        momentum = torch.where(fresh, delta, self.beta * previous + (1.0 - self.beta) * delta)
        theta.copy_(theta0 + momentum)
        return {}, [{"momentum": row.clone()} for row in momentum]
