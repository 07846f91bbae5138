"""Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", arXiv:2003.00295).

Each treats the aggregated client delta `Delta` (mean of local minus global models) as a negative
pseudo-gradient and steps the flat global parameters. State is a dict of tensors, saved in
checkpoints. No `torch.optim` object: a few in-place ops on one flat tensor are faster, and a
`torch.optim` import costs about two seconds of start-up.
"""

from __future__ import annotations

from typing import Protocol

import torch

from koinon.registry import Registry

State = dict[str, torch.Tensor]


class ServerOptimizer(Protocol):
    name: str
    lr: float

    def init(self, params: torch.Tensor) -> State: ...

    def step(self, params: torch.Tensor, delta: torch.Tensor, state: State) -> torch.Tensor:
        """New global parameters; updates `state` in place."""
        ...


SERVER_OPTIMIZERS: Registry[ServerOptimizer] = Registry("server optimizer")
"""Factories are called with the `[server]` keys they declare (lr, momentum, beta1, beta2, tau)."""


def _check_lr(lr: float) -> None:
    if lr <= 0:
        raise ValueError(f"server.lr must be > 0, got {lr}")


@SERVER_OPTIMIZERS.register("fedavg")
class FedAvg:
    """x <- x + lr * Delta (lr = 1 is McMahan et al.'s FedAvg)."""

    name = "fedavg"

    def __init__(self, lr: float = 1.0) -> None:
        _check_lr(lr)
        self.lr = lr

    def init(self, params: torch.Tensor) -> State:
        return {}

    def step(self, params: torch.Tensor, delta: torch.Tensor, state: State) -> torch.Tensor:
        return params + self.lr * delta


@SERVER_OPTIMIZERS.register("fedavgm")
class FedAvgM:
    """Server momentum (Hsu et al. 2019): v <- momentum * v + Delta; x <- x + lr * v.

    `nesterov`: x <- x + lr * (Delta + momentum * v), which is `torch.optim.SGD(nesterov=True)`
    on the pseudo-gradient -Delta (v is minus torch's momentum buffer)."""

    name = "fedavgm"

    def __init__(self, lr: float = 1.0, momentum: float = 0.9, nesterov: bool = False) -> None:
        _check_lr(lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"server.momentum must be in [0, 1), got {momentum}")
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.name = "nesterov" if nesterov else "fedavgm"

    def init(self, params: torch.Tensor) -> State:
        return {"velocity": torch.zeros_like(params)}

    def step(self, params: torch.Tensor, delta: torch.Tensor, state: State) -> torch.Tensor:
        v = state["velocity"]
        v.mul_(self.momentum).add_(delta)
        if self.nesterov:
            # One fused multiply-add, as torch.optim.SGD's `param.add_(step, alpha=-lr)`.
            return params.add(delta + self.momentum * v, alpha=self.lr)
        return params + self.lr * v


@SERVER_OPTIMIZERS.register("nesterov")
def nesterov(lr: float = 1.0, momentum: float = 0.9) -> FedAvgM:
    """Nesterov momentum on the pseudo-gradient: DiLoCo's outer optimizer (Douillard et al.
    2023, arXiv:2311.08105, uses lr 0.7, momentum 0.9)."""
    return FedAvgM(lr, momentum, nesterov=True)


class _Adaptive:
    """Shared part of FedAdagrad / FedAdam / FedYogi: m <- b1 m + (1 - b1) Delta; x <- x + lr m / (sqrt(v) + tau)."""

    name = "adaptive"

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        _check_lr(lr)
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"server.beta1 must be in [0, 1), got {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"server.beta2 must be in [0, 1), got {beta2}")
        if tau <= 0:
            raise ValueError(f"server.tau must be > 0, got {tau}")
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau

    def init(self, params: torch.Tensor) -> State:
        # The paper initializes v_0 = tau^2 (Algorithm 2).
        return {"m": torch.zeros_like(params), "v": torch.full_like(params, self.tau**2)}

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, params: torch.Tensor, delta: torch.Tensor, state: State) -> torch.Tensor:
        m, v = state["m"], state["v"]
        m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        self._second_moment(v, delta * delta)
        return params + self.lr * m / (v.sqrt() + self.tau)


@SERVER_OPTIMIZERS.register("fedadagrad")
class FedAdagrad(_Adaptive):
    """FedAdagrad: v <- v + Delta^2."""

    name = "fedadagrad"

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.add_(d2)


@SERVER_OPTIMIZERS.register("fedadam")
class FedAdam(_Adaptive):
    """FedAdam: v <- b2 v + (1 - b2) Delta^2."""

    name = "fedadam"

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(d2, alpha=1.0 - self.beta2)


@SERVER_OPTIMIZERS.register("fedyogi")
class FedYogi(_Adaptive):
    """FedYogi: v <- v - (1 - b2) Delta^2 sign(v - Delta^2)."""

    name = "fedyogi"

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.sub_((1.0 - self.beta2) * d2 * torch.sign(v - d2))
