"""Federated adversarial training: PGD examples inside every local step, and robust accuracy.

Li et al. 2021, "Federated Adversarial Learning: A Framework with Convergence Analysis",
https://arxiv.org/abs/2201.02775 (the min-max formulation), with the inner maximization of
Madry et al. 2018 (https://arxiv.org/abs/1706.06083): each local step first moves the batch's
inputs `pgd_steps` times by `pgd_step * sign(grad_x loss)`, projected back into the
L-infinity ball of radius `pgd_eps` around the clean inputs (and, with `clip`, into the data's range), and
then trains on those inputs; `mix` of the batch stays clean (0: all adversarial). PGD starts at
the clean inputs (no random start), so the method stays deterministic on every runtime. The
server is FedAvg. `robust_accuracy` measures the global model under the same attack.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD
from koinon.params import Layout


def pgd(loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float, step_size: float,
        steps: int, clip: tuple[float, float] | None = None) -> torch.Tensor:
    """L-infinity PGD from `x`: `steps` signed-gradient ascent steps on `loss_of(x).sum()`."""
    if not torch.is_floating_point(x):
        raise ValueError("adversarial inputs need float features; this data has integer codes")
    adv = x.detach().clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(adv).sum(), adv)
        with torch.no_grad():
            adv = torch.minimum(torch.maximum(adv + step_size * g.sign(), x - eps), x + eps)
            if clip is not None:
                adv = adv.clamp(*clip)
    return adv.detach()


@CLIENT_ALGORITHMS.register("adversarial")
class AdversarialTraining(LocalSGD):
    """Local training on PGD adversarial examples (federated adversarial learning, Li et al. 2021)."""

    name = "adversarial"

    def __init__(self, pgd_eps: float = 0.1, pgd_step: float = 0.025, pgd_steps: int = 5, mix: float = 0.0,
                 clip: list = []) -> None:  # noqa: B006
        # Named pgd_* because client.eps (AdamW) and client.steps (local steps) are taken.
        if pgd_eps <= 0 or pgd_step <= 0:
            raise ValueError(f"client.pgd_eps and client.pgd_step must be > 0, got {pgd_eps} and {pgd_step}")
        if pgd_steps < 1:
            raise ValueError(f"client.pgd_steps must be >= 1, got {pgd_steps}")
        if not 0.0 <= mix < 1.0:
            raise ValueError(f"client.mix must be in [0, 1), got {mix}")
        if clip and (len(clip) != 2 or clip[0] >= clip[1]):
            raise ValueError(f"client.clip must be [low, high] with low < high, got {clip}")
        self.eps, self.step_size, self.steps, self.mix = pgd_eps, pgd_step, pgd_steps, mix
        self.clip = (float(clip[0]), float(clip[1])) if clip else None

    def perturb_inputs(self, loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        adv = pgd(loss_of, x, self.eps, self.step_size, self.steps, self.clip)
        keep = int(round(self.mix * x.shape[1]))
        if keep:  # the first `keep` samples of each batch stay clean (the batch order is random)
            adv[:, :keep] = x[:, :keep]
        return adv


@torch.no_grad()
def robust_accuracy(module: nn.Module, layout: Layout, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    eps: float, step_size: float, steps: int, clip: tuple[float, float] | None = None,
                    batch_size: int = 1024) -> float:
    """Accuracy of the flat `params` on PGD adversarial versions of `(x, y)` (classification)."""
    module.eval()
    views = layout.views(params)
    correct = 0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]

        def loss_of(inputs: torch.Tensor, yb: torch.Tensor = yb) -> torch.Tensor:
            return nn.functional.cross_entropy(functional_call(module, views, (inputs,)), yb, reduction="none")

        with torch.enable_grad():
            adv = pgd(loss_of, xb, eps, step_size, steps, clip)
        correct += int((functional_call(module, views, (adv,)).argmax(dim=1) == yb).sum())
    module.train()
    return correct / max(len(y), 1)
