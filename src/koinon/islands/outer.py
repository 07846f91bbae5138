"""Outer optimizers: what the averaged pseudo-gradient does to the shared parameters.

All of them work in float32 on the decoded average, never on quantized values, as Streaming
DiLoCo prescribes (outer gradients may travel in 4 bits; accumulation stays in FP32).
"""

from __future__ import annotations

import torch


def outer_sgd(
    theta: torch.Tensor, momentum: torch.Tensor, grad: torch.Tensor, lr: float, mu: float,
    nesterov: bool,
) -> None:
    """SGD with (Nesterov) momentum on views of the shared state, in place.

    Same update as `torch.optim.SGD(momentum=mu, nesterov=...)`: buf <- mu*buf + g;
    step = g + mu*buf (Nesterov) or buf; theta <- theta - lr*step. DiLoCo's outer optimizer is
    Nesterov with lr 0.7, mu 0.9; lr 1 and mu 0 makes theta the plain average of the workers.
    """
    momentum.mul_(mu).add_(grad)
    step = grad + mu * momentum if nesterov else momentum
    theta.sub_(step, alpha=lr)


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
