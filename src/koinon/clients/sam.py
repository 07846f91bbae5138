"""Sharpness-aware local training: FedSAM and FedSpeed.

Both take each local step's gradient at a perturbed point, found by one gradient-ascent step of
radius rho on the same minibatch: e = rho g / ||g|| (per client), gradient at theta + e. The
trainer computes that second gradient (the `perturb` hook of `ClientAlgorithm`), so both run
on every local runtime with the trainer's own batches and optimizer.

- FedSAM (Qu et al. 2022, "Generalized Federated Learning via Sharpness Aware Minimization",
  https://arxiv.org/abs/2206.02618): local SAM, server FedAvg.
- FedSpeed (Sun et al. 2023, https://arxiv.org/abs/2302.10429): the local gradient merges the
  plain and the perturbed one, (1 - alpha) g + alpha g(theta + e); a proximal term
  (theta - x) / lam keeps clients near the global model x, and a prox-correction ghat_i, kept
  by each client across rounds, removes the bias that term adds:
      step:   theta <- theta - lr * (gtilde - ghat_i + (theta - x) / lam)
      after:  ghat_i <- ghat_i - (theta_K - x) / lam;  the client sends theta_K - lam * ghat_i
  (the server averages what it receives, as FedAvg does).
"""

from __future__ import annotations

import torch

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.params import Layout


def ascent_offset(grad: torch.Tensor, rho: float) -> torch.Tensor:
    """rho g / ||g|| per row (zero where a client's gradient is zero)."""
    norm = grad.norm(dim=1, keepdim=True)
    return grad * (rho / norm.clamp_min(1e-12))


@CLIENT_ALGORITHMS.register("fedsam")
class FedSAM(LocalSGD):
    """Local sharpness-aware minimization (Qu et al. 2022): the gradient at theta + rho g/||g||."""

    name = "fedsam"

    def __init__(self, rho: float = 0.05) -> None:
        if rho <= 0:
            raise ValueError(f"client.rho must be > 0, got {rho}")
        self.rho = rho

    def perturb(self, theta: torch.Tensor, grad: torch.Tensor, ctx: State) -> torch.Tensor:
        return ascent_offset(grad, self.rho)


@CLIENT_ALGORITHMS.register("fedspeed")
class FedSpeed(LocalSGD):
    """Prox-correction plus merged perturbed gradients (Sun et al. 2023)."""

    name = "fedspeed"

    def __init__(self, rho: float = 0.05, alpha: float = 0.5, lam: float = 10.0, layout: Layout | None = None) -> None:
        if rho <= 0:
            raise ValueError(f"client.rho must be > 0, got {rho}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"client.alpha must be in [0, 1], got {alpha}")
        if lam <= 0:
            raise ValueError(f"client.lam must be > 0, got {lam}")
        self.rho, self.alpha, self.lam = rho, alpha, lam
        self.trainable = None if layout is None else layout.num_trainable  # buffers are not corrected

    def begin(self, global_params: torch.Tensor, server_state: State, client_states: list[State]) -> State:
        numel = global_params.shape[-1]
        ghat = torch.stack([s.get("correction", torch.zeros(numel)) for s in client_states])
        return {"ghat": ghat, "plain": torch.zeros_like(ghat)}

    def perturb(self, theta: torch.Tensor, grad: torch.Tensor, ctx: State) -> torch.Tensor:
        ctx["plain"][:, : grad.shape[1]].copy_(grad)  # the plain gradient, merged in `correct`
        return ascent_offset(grad, self.rho)

    def correct(self, theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor, ctx: State) -> None:
        pt = grad.shape[1]
        grad.mul_(self.alpha).add_(ctx["plain"][:, :pt], alpha=1.0 - self.alpha)
        grad.sub_(ctx["ghat"][:, :pt]).add_(theta - theta0, alpha=1.0 / self.lam)

    def end(
        self, theta0: torch.Tensor, theta: torch.Tensor, num_steps: torch.Tensor, lr: float, ctx: State
    ) -> tuple[dict[str, torch.Tensor], list[State]]:
        moved = theta - theta0
        if self.trainable is not None and self.trainable < moved.shape[1]:
            moved[:, self.trainable:] = 0.0  # buffers (running statistics) are not corrected
        ghat = ctx["ghat"] - moved / self.lam
        theta.sub_(ghat * self.lam)  # the upload is theta_K - lam * ghat_i
        return {}, [{"correction": row.clone()} for row in ghat]
