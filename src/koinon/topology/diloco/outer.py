"""Outer optimizers: what the averaged pseudo-gradient does to the shared parameters.

All of them work in float32 on the decoded average, never on quantized values, as Streaming
DiLoCo prescribes (outer gradients may travel in 4 bits; accumulation stays in FP32).

DiLoCo's outer step is a server optimizer (`koinon.server.optimizers`: Nesterov, or plain
momentum SGD), stepped with Delta = -average pseudo-gradient like a federated server's.

CO2's step stays here: its penalty lambda compares the average applied now with the one applied
the round before, which only means something for CO2's one-round-stale application, and it
clips the momentum *between* the momentum update and the parameter step, which the
`init`/`step` protocol has no place for. Offered as a server optimizer, it would be a federated
option that silently means nothing.
"""

from __future__ import annotations

import torch

from koinon.server.optimizers import SERVER_OPTIMIZERS, ServerOptimizer
from koinon.topology.diloco.spec import IslandsSpec

_SERVER_NAMES = {"nesterov": "nesterov", "sgd": "fedavgm"}


def outer_optimizer(spec: IslandsSpec) -> ServerOptimizer:
    """DiLoCo's outer optimizer: `nesterov` or `sgd` (momentum SGD; lr 1 and momentum 0 makes
    theta the plain average of the workers)."""
    return SERVER_OPTIMIZERS.build(
        _SERVER_NAMES[spec.outer_optimizer], {}, "diloco.outer_optimizer",
        lr=spec.outer_lr, momentum=spec.outer_momentum,
    )


def co2_penalty(avg: torch.Tensor, previous: torch.Tensor | None, gamma: float) -> float:
    """CO2's staleness-gap penalty lambda >= 1.

    The paper's exact formula is not public in a form we could check, so this is our reading of
    it: the update applied now was computed one round ago; the more the averaged pseudo-gradient
    moved between the last two rounds (relative gap), the less we trust the stale one, so
    lambda = 1 + gamma * ||avg - previous|| / ||previous||. gamma = 0 gives lambda = 1.
    """
    if gamma <= 0 or previous is None:
        return 1.0
    gap = (avg - previous).norm() / previous.norm().clamp_min(1e-12)
    return 1.0 + gamma * float(gap)


def co2_step(
    theta: torch.Tensor, momentum: torch.Tensor, stale_avg: torch.Tensor, penalty: float,
    lr: float, beta: float, clip: float,
) -> None:
    """CO2 outer step, in place: m <- beta*m + avg/lambda; clip ||m|| <= clip; theta -= lr*m.

    The clip *is* applied (the reference code computes a clamp and drops its result).
    """
    momentum.mul_(beta).add_(stale_avg, alpha=1.0 / penalty)
    if clip > 0:
        norm = float(momentum.norm())
        if norm > clip:
            momentum.mul_(clip / norm)
    theta.sub_(momentum, alpha=lr)
