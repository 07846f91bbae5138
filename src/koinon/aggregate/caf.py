"""CAF, the covariance-bound agnostic filter, computed exactly on the Gram matrix.

The weighted covariance of the inputs has rank < n, and its top eigenpair follows from an
`n x n` eigenproblem: with centred rows D and weights C, the nonzero spectrum of `D^T C D / s`
is that of `C^1/2 D D^T C^1/2 / s`, and `D D^T` is the centred Gram matrix. ByzFL estimates the
eigenvector with one power iteration from a random start; here it is exact and deterministic.
"""

from __future__ import annotations

import torch

from koinon.aggregate import kernels
from koinon.aggregate.base import (
    AGGREGATORS,
    check_num_byzantine,
    honest_majority,
)


def caf_coefficients(g: torch.Tensor, f: int) -> torch.Tensor:
    """Convex coefficients of CAF's output, from the Gram matrix `g` of the inputs."""
    n = g.shape[0]
    c = torch.ones(n, dtype=torch.float64)
    best_value = float("inf")
    best = c / n
    eye = torch.eye(n, dtype=torch.float64)
    while float(c.sum()) > n - 2 * f:
        s = c.sum()
        mean_coeffs = c / s
        centring = eye - mean_coeffs[None, :]  # row i: e_i - mean
        dd = centring @ g @ centring.T
        root = c.sqrt()
        values, vectors = torch.linalg.eigh(root[:, None] * dd * root[None, :] / s)
        value, u = float(values[-1]), vectors[:, -1]
        if value < best_value:
            best_value, best = value, mean_coeffs
        if value <= 1e-12 * float(dd.diagonal().abs().max().clamp_min(1e-300)):
            break  # no spread left along any direction: the mean is final
        tau = (dd @ (root * u)) ** 2 / (value * s)
        # The maximum is over inputs still in play: a removed outlier keeps a huge tau, and
        # dividing by it would barely move the others (ByzFL then loops almost forever).
        c = (c * (1 - tau / tau[c > 0].max())).clamp_min(0)
    return best


@AGGREGATORS.register("caf")
class CAF:
    """CAF: downweight inputs along the top covariance direction until n - 2f weight is left.

    Needs n > 2f. Returns the weighted mean with the smallest top eigenvalue seen. Allouah,
    Guerraoui and Stephan, Towards Trustworthy Federated Learning with Untrusted Participants
    (ICML 2025), https://arxiv.org/abs/2505.01874.
    """

    name = "caf"

    def __init__(self, num_byzantine: int = 0) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, f = honest_majority(self.name, updates, weights, self.num_byzantine)
        return kernels.combine(caf_coefficients(kernels.gram(updates), f), updates)
