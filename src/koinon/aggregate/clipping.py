"""Clipping: centered clipping (a stateful rule), static clipping and ARC (pre-aggregation).

All of them need only row norms (plus, for several centered-clipping iterations, the Gram
matrix of the rows around the previous centre), and then one weighted sum or one row scaling.
"""

from __future__ import annotations

import torch

from koinon.aggregate import kernels
from koinon.aggregate.base import (
    AGGREGATORS,
    PRE_AGGREGATORS,
    check_num_byzantine,
    check_stack,
    honest_majority,
    require,
)


def _scale_rows(updates: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Leave the caller's stack untouched; skip the copy when nothing is clipped.
    if bool((scale >= 1).all()):
        return updates
    factor = scale.to(updates.dtype)[:, None]
    if updates.requires_grad or updates.device.type != "cpu":
        return updates * factor
    return torch.mul(updates, factor, out=kernels.new_stack(len(updates), updates))


@AGGREGATORS.register("centered_clipping")
class CenteredClipping:
    """Centered clipping: move the previous aggregate by the mean of clipped differences.

    Needs n > 2f (the analysis assumes a small Byzantine fraction). Karimireddy, He and Jaggi,
    Learning from History for Byzantine Robust Optimization (ICML 2021),
    https://arxiv.org/abs/2012.10333. v <- v + mean_i clip(x_i - v, radius), `iterations`
    times, starting from the previous round's output (zero at first); the centre is state,
    saved by `state_dict`. Defaults follow ByzFL (radius 100, one iteration).
    """

    name = "centered_clipping"

    def __init__(self, num_byzantine: int = 0, radius: float = 100.0, iterations: int = 1) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)
        if radius <= 0 or iterations < 1:
            raise ValueError(f"needs radius > 0 and iterations >= 1, got {radius}, {iterations}")
        self.radius = float(radius)
        self.iterations = iterations
        self.center: torch.Tensor | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.center is None else {"center": self.center.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.center = state["center"].clone() if "center" in state else None

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, f = honest_majority(self.name, updates, weights, self.num_byzantine)
        center = self.center
        if center is not None and center.shape != updates.shape[1:]:
            raise ValueError(
                f"centered_clipping: saved centre has shape {tuple(center.shape)}, "
                f"updates have {tuple(updates.shape[1:])}"
            )
        # The iterate is v = center + c @ (x - center); only c (n numbers) changes per iteration.
        c = torch.zeros(n, dtype=torch.float64)
        if self.iterations == 1:
            g_diag = kernels.row_sq_norms(updates, center)
            g = None
        else:
            g = kernels.gram(
                updates, center if center is not None else torch.zeros_like(updates[0])
            )
            g_diag = g.diagonal()
        for _ in range(self.iterations):
            if g is None:
                sq = g_diag
            else:
                gc = g @ c
                sq = (g_diag - 2 * gc + c @ gc).clamp_min(0)
            norms = sq.sqrt()
            scale = torch.where(
                norms > self.radius, self.radius / norms.clamp_min(1e-300), torch.ones_like(norms)
            )
            c = c + scale / n - c * (scale.sum() / n)
        out = kernels.combine(c, updates)
        if center is not None:
            out += (1 - c.sum()).to(updates.dtype) * center
        self.center = out.detach().clone()
        return out


@PRE_AGGREGATORS.register("clipping")
class StaticClipping:
    """Static clipping: scale every input to norm at most `max_norm` (no Byzantine bound).

    A common pre-aggregation step, e.g. Allouah et al., The Vital Role of Gradient Clipping in
    Byzantine-Resilient Distributed Learning (2024), https://arxiv.org/abs/2405.14432.
    """

    name = "clipping"

    def __init__(self, max_norm: float = 2.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = float(max_norm)

    def transform(
        self, updates: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_stack(updates, weights)
        norms = kernels.row_sq_norms(updates).sqrt()
        scale = (self.max_norm / norms.clamp_min(1e-300)).clamp_max(1.0)
        return _scale_rows(updates, scale), weights


@PRE_AGGREGATORS.register("arc")
class AdaptiveRobustClipping:
    """ARC: clip the k = floor(2 (f/n) (n - f)) largest inputs to the norm of the next largest.

    Needs n > f. Allouah et al., The Vital Role of Gradient Clipping in Byzantine-Resilient
    Distributed Learning (2024), https://arxiv.org/abs/2405.14432.
    """

    name = "arc"

    def __init__(self, num_byzantine: int = 0) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    def transform(
        self, updates: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_stack(updates, weights)
        n, f = updates.shape[0], self.num_byzantine
        require(n > f, self.name, n, f, "n > f")
        k = (2 * f * (n - f)) // n
        if k == 0:
            return updates, weights
        norms = kernels.row_sq_norms(updates).sqrt()
        threshold = norms.sort(descending=True).values[k]
        scale = (threshold / norms.clamp_min(1e-300)).clamp_max(1.0)
        return _scale_rows(updates, scale), weights
