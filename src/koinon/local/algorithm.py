"""The client-algorithm interface and the hyperparameters of local training.

Local training itself (batches, the optimizer step, losses) lives in `koinon.local.trainer` and
runs a *stack* of K clients at once (`theta` is `[K, P]`). An algorithm only says how it
corrects the gradient (FedProx adds a proximal term, SCAFFOLD control variates), what it keeps
per client, and what it uploads besides the model delta. Because the hooks work on stacks, the
sequential runtime (K = 1) and the vectorized runtime (K = cohort) run the same algorithm code.

What the interface carries beyond FedAvg (all optional, each shown by a test in
`tests/local/test_algorithm_interface.py`):
- per-client persistent state: `end` returns each client's new state (SCAFFOLD's control
  variate, worker momentum, a personal model); the driver keeps it and hands it back to `begin`;
- a shared subset: `shared_mask(layout) -> [P] bool` names the coordinates that cross the wire
  (FedRep and FedPer keep the head, FedBN the normalization layers); the trainer starts the
  others from the client's own `private` state, uploads zero there and keeps what it trained;
- several global models: `downloads` names server tensors every sampled client receives
  (cluster models, SCAFFOLD's control), and `start(trainer, client_ids, global_params,
  server_state, client_states) -> [K, P]` picks where each client starts;
- its own local objective or step: `train_cohort(trainer, client_ids, global_params,
  server_state, client_states, idx, steps, seed, round_index)` replaces the trainer's gradient
  loop (SPSA's zeroth-order steps) and may call `trainer.run_steps(..., algorithm=...)` for
  each part of its objective (Ditto's global and personal models);
- a perturbed gradient: `perturb(theta, grad, ctx) -> [K, P_trainable]` gives an offset, and the
  trainer replaces the step's gradient by the gradient on the same batch at `theta + offset`
  (sharpness-aware minimization: FedSAM, FedSpeed); `correct` then sees that gradient;
- adversarial inputs: `perturb_inputs(loss_of, x) -> x_adv` replaces each batch's inputs
  (`[K, B, ...]`); `loss_of(x)` gives the per-sample losses `[K, B]` under the current models
  (federated adversarial training: PGD inside local updates);
- an extra loss term: `extra_loss(trainer, params, x, stacked, ctx) -> [K, B]` is added to each
  sample's loss in the gradient (MOON's model-contrastive term); `params` are the layer views
  the forward pass uses (stacked `[K, ...]` when `stacked`, else one client's), `x` is `[K, B, ...]`;
- a server correction: `server_delta(server_state, delta, cohort_fraction) -> (delta, state)`
  changes the aggregated update before the server optimizer steps (FedDyn);
- a server check: `check_update(received, update) -> str` refuses one client's update with that
  reason before aggregation ('' accepts it; FRL: the update must be a ranking);
- a server check of the extra streams: `check_uploads(rows) -> str` refuses one client's decoded
  rows (stream name -> row) with that reason when they arrive, before they are kept ('' accepts;
  FedoSSL, reconnaissance, FedKA: the packed table must fit the server's model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from koinon.local.optim import SGD, AdamW, LocalOptimizer

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LocalTraining:
    """Hyperparameters of local training, shared by all client algorithms."""

    epochs: int = 1
    steps: int = 0  # if > 0, exactly this many local steps (reshuffling each pass) instead of epochs
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    optimizer: str = "sgd"  # "sgd" or "adamw"
    beta1: float = 0.9  # adamw
    beta2: float = 0.999  # adamw
    eps: float = 1e-8  # adamw
    # Local learning-rate schedule over a round's local steps: "constant", "cosine" or "linear"
    # decay to zero over `steps` (so those need client.steps > 0: every client then follows the
    # same schedule), after `lr_warmup` steps of linear warm-up; or a callable step -> factor.
    lr_schedule: str | Callable[[int], float] = "constant"
    lr_warmup: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 and self.steps < 1:
            raise ValueError(f"client.epochs must be >= 1 (or client.steps >= 1), got {self.epochs}")
        if self.steps < 0:
            raise ValueError(f"client.steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"client.batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"client.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"client.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"client.weight_decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"client.optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        self.build_optimizer()  # checks the optimizer's own options
        if isinstance(self.lr_schedule, str):
            if self.lr_schedule not in ("constant", "cosine", "linear"):
                raise ValueError(f"client.lr_schedule must be 'constant', 'cosine' or 'linear' (or a callable "
                                 f"step -> factor), got {self.lr_schedule!r}")
            if self.lr_schedule != "constant" and self.steps < 1:
                raise ValueError(f"client.lr_schedule = {self.lr_schedule!r} decays over client.steps; set "
                                 "client.steps > 0 (with epochs, clients of different sizes would decay differently)")
        elif not callable(self.lr_schedule):
            raise ValueError(f"client.lr_schedule must be a name or a callable, got {self.lr_schedule!r}")
        if self.lr_warmup < 0 or (self.steps and self.lr_warmup >= self.steps):
            raise ValueError(f"client.lr_warmup must be in [0, client.steps), got {self.lr_warmup}")

    def lr_at(self, step: int) -> float:
        """The learning rate of local step `step` (from 0) under the schedule."""
        if self.lr_schedule == "constant" and not self.lr_warmup:
            return self.lr
        if step < self.lr_warmup:
            return self.lr * (step + 1) / self.lr_warmup
        if callable(self.lr_schedule):
            return self.lr * float(self.lr_schedule(step))
        if self.lr_schedule == "constant":
            return self.lr
        progress = (step - self.lr_warmup) / (self.steps - self.lr_warmup)
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (1.0 - progress)

    def num_steps(self, num_samples: int) -> int:
        """Local steps of a client that holds `num_samples` samples (as the trainer schedules them)."""
        if num_samples <= 0:
            return 0
        return self.steps if self.steps > 0 else self.epochs * -(-num_samples // self.batch_size)

    def build_optimizer(self) -> LocalOptimizer:
        if self.optimizer == "adamw":
            return AdamW(self.beta1, self.beta2, self.eps, self.weight_decay)
        return SGD(self.momentum, self.nesterov, self.weight_decay)


class ClientAlgorithm(Protocol):
    """Hooks of one client algorithm, each acting on a stack of K clients."""

    name: str
    uploads: tuple[str, ...]  # tensors sent to the server besides the model delta
    downloads: tuple[str, ...]  # server tensors every sampled client receives

    def init_server_state(self, numel: int) -> State: ...

    def begin(self, global_params: torch.Tensor, server_state: State, client_states: list[State]) -> State:
        """Stacked per-cohort context (e.g. `[K, P]` control variates) for `correct` and `end`."""
        ...

    def correct(self, theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor, ctx: State) -> None:
        """Modify `grad` (`[K, P]`) in place before the optimizer step."""
        ...

    def end(
        self, theta0: torch.Tensor, theta: torch.Tensor, num_steps: torch.Tensor, lr: float, ctx: State
    ) -> tuple[dict[str, torch.Tensor], list[State]]:
        """Extra uploads (`name -> [K, P]`) and each client's new persistent state."""
        ...

    def server_update(
        self, server_state: State, uploads: dict[str, torch.Tensor], cohort_fraction: float
    ) -> State:
        """New server state from the cohort means of the extra uploads (|S|/N = cohort_fraction)."""
        ...
