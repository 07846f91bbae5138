"""Local optimizers on a stack of K models: `[K, P]` parameters, one in-place step for all.

`torch.optim` would need one module per client and a Python loop over them; these are the same
updates written on the flat stack (checked against `torch.optim.SGD` / `torch.optim.AdamW` in
the tests). Every user of local training takes them from here: federated clients, gossip peers,
the server's own root training (FLTrust) and DiLoCo's inner steps.

A step receives `correct`, the client algorithm's gradient hook (FedProx, SCAFFOLD), and calls
it where the algorithm expects the gradient: after SGD's coupled weight decay, before AdamW's
moments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from koinon.registry import Registry

State = dict[str, torch.Tensor]
Correct = Callable[[torch.Tensor], None]


class LocalOptimizer(Protocol):
    """One optimizer step on the rows of the clients that train this step."""

    name: ClassVar[str]

    def init(self, num_rows: int, numel: int) -> State:
        """Stacked state (`[K, P]` tensors) for K clients of `numel` trainable values."""
        ...

    def step(self, theta: torch.Tensor, grad: torch.Tensor, state: State, step: int, lr: float,
             correct: Correct | None = None) -> None:
        """Update `theta` in place from `grad` (both `[m, P]`; `state` cut to the same rows).
        `step` counts from 0; `grad` may be overwritten."""
        ...


LOCAL_OPTIMIZERS: Registry[LocalOptimizer] = Registry("local optimizer")


@LOCAL_OPTIMIZERS.register("sgd")
@dataclass(frozen=True)
class SGD:
    """SGD with weight decay and (Nesterov) momentum, as `torch.optim.SGD`."""

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    name: ClassVar[str] = "sgd"

    def init(self, num_rows: int, numel: int) -> State:
        return {"momentum": torch.zeros(num_rows, numel)} if self.momentum else {}

    def step(self, theta: torch.Tensor, grad: torch.Tensor, state: State, step: int, lr: float,
             correct: Correct | None = None) -> None:
        if self.weight_decay:
            grad.add_(theta, alpha=self.weight_decay)
        if correct is not None:
            correct(grad)
        buf = state.get("momentum")
        if buf is not None:
            # A zero buffer times momentum plus g is g: torch.optim.SGD's first step exactly.
            buf.mul_(self.momentum).add_(grad)
            grad = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
        theta.sub_(grad, alpha=lr)


@LOCAL_OPTIMIZERS.register("adamw")
@dataclass(frozen=True)
class AdamW:
    """AdamW (Loshchilov and Hutter 2019, arXiv:1711.05101), as `torch.optim.AdamW`:
    decoupled weight decay, bias-corrected moments."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    name: ClassVar[str] = "adamw"

    def __post_init__(self) -> None:
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"client.{key} must be in [0, 1), got {value}")
        if self.eps <= 0:
            raise ValueError(f"client.eps must be > 0, got {self.eps}")

    def init(self, num_rows: int, numel: int) -> State:
        return {"exp_avg": torch.zeros(num_rows, numel), "exp_avg_sq": torch.zeros(num_rows, numel)}

    def step(self, theta: torch.Tensor, grad: torch.Tensor, state: State, step: int, lr: float,
             correct: Correct | None = None) -> None:
        if correct is not None:
            correct(grad)
        t = step + 1
        b1, b2 = self.beta1, self.beta2
        state["exp_avg"].lerp_(grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(self.eps)
        theta.mul_(1 - lr * self.weight_decay)
        theta.addcdiv_(state["exp_avg"] / (1 - b1**t), denom, value=-lr)


def rows(state: State, m: int) -> State:
    """The first m rows of a stacked optimizer state."""
    return {k: v[:m] for k, v in state.items()}
