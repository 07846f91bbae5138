"""The Flag Aggregator: an IRLS subspace fit to the input directions, on the Gram matrix.

Almasi, Mishra, Vamanan and Ravi, Flag Aggregator: Scalable Distributed Training under Failures
and Augmented Losses using Convex Optimization (2023), following the authors' code,
https://github.com/hamidralmasi/FlagAggregator (`aggregators/flag_median.py`, and `irls_flag` in
`aggregators/center_algorithms_torch.py`).

Every subspace the algorithm builds is spanned by the unit inputs v_i, so we work in their span:
with the Gram matrix K = V^T V = Q diag(l) Q^T, an orthonormal basis of the span is
V Q diag(l)^-1/2, and the top singular subspace of any weighted matrix V C is V B with
B = Q diag(l)^-1/2 E, E the top eigenvectors of the `s x s` matrix
diag(l)^1/2 Q^T C C^T Q diag(l)^1/2. One pass builds K, the iterations cost O(n^3), and one
`coefficients @ updates` pass gives the output.
"""

from __future__ import annotations

import torch

from koinon.aggregate import kernels
from koinon.aggregate.base import (
    AGGREGATORS,
    check_num_byzantine,
    honest_majority,
    require,
)

_EPS = 1e-7  # the authors' perturbation of the IRLS weights
_STOP = 1e-10  # the authors' tolerance on the objective and on its decrease


def _irls_weights(sq_sines: torch.Tensor) -> torch.Tensor:
    """Column weights (|sin^2| + eps)^-1/4; squared in C C^T they give the sine-median IRLS."""
    return (sq_sines.abs() + _EPS) ** -0.25


def flag_subspace(k: torch.Tensor, rank: int, lam: float, iterations: int) -> torch.Tensor | None:
    """Coefficients B (`[n, r]`) of the subspace Y = V B from the unit-input Gram matrix `k`.

    `None` stands for the start, a subspace orthogonal to every input (what the authors'
    random start is in high dimension), and is returned only if no step improved on it.
    """
    n = k.shape[0]
    values, vectors = torch.linalg.eigh(k)
    keep = values > n * torch.finfo(torch.float32).eps * values[-1].clamp_min(1e-300)
    if not bool(keep.any()):
        return None  # every input is zero
    root = values[keep].sqrt()
    basis = vectors[:, keep]  # span coordinates: V basis diag(root)^-1 is orthonormal
    r = min(rank, int(keep.sum()))
    pairs = lam > 0 and n > 1
    in_sines = torch.ones(n, dtype=k.dtype)  # at the start: sin^2 = 1 for every input
    pair_sines = torch.ones(n, n, dtype=k.dtype)
    best: torch.Tensor | None = None
    previous: torch.Tensor | None = None
    objective = float(n)  # sum of sines at the start
    decrease = 1.0
    for _ in range(iterations):
        if decrease <= _STOP or objective <= _STOP:
            break
        # C C^T for the columns a_i v_i and w_ij (v_i - v_j), i != j (both orders, as theirs).
        weighted = torch.diag(_irls_weights(in_sines) ** 2)
        if pairs:
            w2 = (_irls_weights(pair_sines) * lam / (n * (n - 1))) ** 2
            w2.fill_diagonal_(0)
            weighted += 2 * (torch.diag(w2.sum(1)) - w2)
        small = root[:, None] * (basis.T @ weighted @ basis) * root[None, :]
        top = torch.linalg.eigh(small).eigenvectors[:, -r:]
        coefficients = basis @ (top / root[:, None])
        z = coefficients.T @ k  # column i: Y^T v_i
        inner = z.T @ z
        proj = inner.diagonal()
        new_objective = float((1 - proj).clamp_min(0).sqrt().sum())
        decrease = objective - new_objective
        previous, best, objective = best, coefficients, new_objective
        in_sines = 1 - proj
        if pairs:
            pair_sines = 1 - (proj[:, None] + proj[None, :] - 2 * inner)
    # The authors return the previous iterate when the last step did not lower the objective.
    return best if decrease > 0 else previous


@AGGREGATORS.register("flag")
class FlagAggregator:
    """Flag Aggregator: project the unit inputs on an IRLS flag-median subspace, then average.

    Needs n > 2f (so that the median norm, which sets the output's scale, is an honest one).
    Weights are ignored, as in the other robust rules: a Byzantine client could claim any
    sample count. Exactly what runs, with v_i = x_i / ||x_i|| (a zero input stays zero):

    1. Start from a subspace orthogonal to every input (the authors start from a random one,
       which in high dimension is that up to O(m / P)): every sin^2 is 1.
    2. IRLS step (`iterations` at most, default 4 as the authors' `flag_median`): weight each
       v_i by a_i = (|1 - ||Y^T v_i||^2| + 1e-7)^-1/4 and, if `lam` > 0, each difference
       v_i - v_j (i != j, both orders) by (|1 - ||Y^T (v_i - v_j)||^2| + 1e-7)^-1/4 lam /
       (n (n - 1)); Y becomes the top-m left singular subspace of the weighted columns (the
       weighted flag mean). This minimises sum_i sin(angle(v_i, Y)), the flag median, which
       is the paper's log-likelihood of reconstruction ratios, with the regularised variant
       through the pairwise terms.
    3. Stop when the sum of sines falls by <= 1e-10 or is <= 1e-10; if the last step raised
       it, keep the previous subspace (as `irls_flag`).
    4. Output med * mean_i Y Y^T v_i, med the median input norm.

    Step 4 departs from the authors' code in scale only: theirs returns sum_i Y Y^T v_i / m,
    whose norm does not depend on the inputs' norms. Rescaling by the median norm keeps the
    output on the scale of the updates (n copies of x give x) while a large-norm attacker
    still cannot inflate it (the output norm is at most med). `rank` m = 0 means ceil((n+1)/2),
    the authors' setting (m = 4 for 7 workers, 8 for 15), which is <= n - f whenever n > 2f.
    Scale-equivariant, not translation-equivariant (directions are taken from the origin).
    A subspace does not see signs: Y Y^T (-v) = -Y Y^T v, so attackers who negate honest
    updates at honest norms move the output as they move the mean; larger norms gain nothing.
    """

    name = "flag"

    def __init__(
        self, num_byzantine: int = 0, rank: int = 0, lam: float = 0.0, iterations: int = 4
    ) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)
        if rank < 0 or lam < 0 or iterations < 1:
            raise ValueError(
                f"needs rank >= 0 (0: ceil((n+1)/2)), lam >= 0, iterations >= 1; "
                f"got {rank}, {lam}, {iterations}"
            )
        self.rank = rank
        self.lam = float(lam)
        self.iterations = iterations

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, f = honest_majority(self.name, updates, weights, self.num_byzantine)
        rank = self.rank or n // 2 + 1
        require(rank <= n, self.name, n, f, f"rank = {rank} <= n")
        g = kernels.gram(updates, torch.zeros_like(updates[0])).cpu()
        norms = g.diagonal().clamp_min(0).sqrt()
        inv = 1 / norms.clamp_min(1e-12)  # as torch.nn.functional.normalize
        k = inv[:, None] * g * inv[None, :]
        k = (k + k.T) / 2  # the float32 block products need not be exactly symmetric
        basis = flag_subspace(k, rank, self.lam, self.iterations)
        if basis is None:
            return torch.zeros_like(updates[0])
        med = kernels.median_of(norms)
        # sum_i Y Y^T v_i = V B (B^T K 1); divide by n, scale by med, map v_i back to x_i.
        unit = basis @ (basis.T @ k.sum(1))
        return kernels.combine((med / n * unit * inv).to(updates.device), updates)
