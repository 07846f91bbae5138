"""SignGuard: keep the inputs whose norm and sign statistics look like the majority's.

Xu, Huang, Song and Lan, Byzantine-robust Federated Learning through Collaborative Malicious
Gradient Filtering (ICDCS 2022), https://arxiv.org/abs/2109.05872, following the authors' code
(github.com/JianXu95/SignGuard, `signguard_multiclass`). The cost is one pass for the row norms,
sign counts on a block of coordinates and the output pass; the clustering runs on `n` points in
three dimensions.
"""

from __future__ import annotations

import torch

from koinon.aggregate import kernels
from koinon.aggregate.base import AGGREGATORS, check_num_byzantine, check_stack, require

_COUNT_CHUNK = 1 << 22


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Explicit differences, not `torch.cdist`: its matmul path leaves tiny nonzero distances
    # between equal points, and the bandwidth comparisons below must see exact zeros.
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1).sqrt()


def mean_shift_labels(
    points: torch.Tensor, quantile: float = 0.5, max_iter: int = 300
) -> torch.Tensor:
    """Flat-kernel mean shift, as scikit-learn's `MeanShift(cluster_all=False)`; -1: orphan.

    The bandwidth is `estimate_bandwidth(points, quantile)` (the mean distance to the
    `int(quantile n)`-th nearest point, self included) and every point is a seed. Exact
    duplicates among the modes keep the larger count and ties in scikit-learn's ordering go
    by the mode's coordinates, so the result depends on the set of points only, not on
    their order (scikit-learn's dict keeps the last seed's count).
    """
    n = points.shape[0]
    d = _distances(points, points)
    bandwidth = d.sort(dim=1).values[:, max(1, int(n * quantile)) - 1].mean()
    if bandwidth == 0:
        # Each point has int(quantile n) - 1 exact duplicates: with a zero-width kernel the
        # clusters are the groups of equal points, densest first, ties by value as below.
        # (scikit-learn refuses a zero bandwidth; rounding in the means would orphan all.)
        values, inverse, counts = torch.unique(
            points, dim=0, return_inverse=True, return_counts=True
        )
        order = sorted(
            range(len(values)), key=lambda i: (int(counts[i]), values[i].tolist()), reverse=True
        )
        rank = torch.empty(len(values), dtype=torch.long)
        rank[torch.tensor(order)] = torch.arange(len(values))
        return rank[inverse]
    stop = 1e-3 * bandwidth
    means = points.clone()
    counts = torch.zeros(n, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for step in range(max_iter + 1):
        within = _distances(means, points) <= bandwidth
        count = within.sum(1)
        # A masked sum keeps each row's summation order independent of its position.
        new = (within[:, :, None] * points[None]).sum(1) / count.clamp_min(1)[:, None]
        empty = count == 0
        moving = ~done & ~empty
        counts[~done] = count[~done]
        moved = (new - means).norm(dim=1)
        means[moving] = new[moving]
        done |= empty | (moved <= stop) | (step == max_iter)
        if bool(done.all()):
            break
    modes: dict[tuple[float, ...], int] = {}
    for mode, count in zip(means.tolist(), counts.tolist()):
        if count:
            key = tuple(mode)
            modes[key] = max(count, modes.get(key, 0))
    ordered = sorted(modes.items(), key=lambda item: (item[1], item[0]), reverse=True)
    centres = torch.tensor([mode for mode, _ in ordered], dtype=points.dtype)
    close = _distances(centres, centres) <= bandwidth
    unique = torch.ones(len(centres), dtype=torch.bool)
    for i in range(len(centres)):
        if unique[i]:
            unique[close[i]] = False
            unique[i] = True
    to_centres = _distances(points, centres[unique])
    nearest, labels = to_centres.min(dim=1)
    return torch.where(nearest <= bandwidth, labels, torch.full_like(labels, -1))


def sign_features(block: torch.Tensor) -> torch.Tensor:
    """Fractions of positive, zero and negative coordinates per row, each over its maximum."""
    n, width = block.shape
    balance = torch.zeros(n, dtype=torch.float64, device=block.device)  # positive - negative
    nonzero = torch.zeros(n, dtype=torch.float64, device=block.device)
    # Float sums of signs count exactly below 2**24 and run several times faster than
    # summing boolean masks; chunks keep every partial count below that, and half-precision
    # stacks are summed in float32.
    total = torch.promote_types(block.dtype, torch.float32)
    for start in range(0, width, _COUNT_CHUNK):
        signs = block[:, start : start + _COUNT_CHUNK].sign()
        balance += signs.sum(1, dtype=total).double()
        nonzero += signs.abs_().sum(1, dtype=total).double()
    counts = torch.stack([(nonzero + balance) / 2, width - nonzero, (nonzero - balance) / 2], 1)
    fractions = counts.cpu() / width
    return fractions / (fractions.max(dim=0).values + 1e-8)


@AGGREGATORS.register("signguard")
class SignGuard:
    """SignGuard: mean of the inputs that pass a norm filter and a sign-clustering filter.

    Needs n > 2f (an honest majority sets the median norm and forms the largest cluster).
    Weights are ignored, as in the other robust rules: a Byzantine client could claim any
    sample count. Per round:

    1. Norm filter: keep input i if `lower * med < ||x_i|| < upper * med`, med the median norm.
    2. Sign filter: on a random contiguous block of `coordinate_fraction * P` coordinates (at
       least one; the authors' choice, 10 %), the fractions of positive, zero and negative
       entries of each input, each divided by its maximum over inputs, are clustered by mean
       shift (bandwidth: scikit-learn's estimate at quantile 0.5, every input a seed, orphans
       in no cluster; `mean_shift_labels`); keep the largest cluster (ties: the denser mode).
    3. Output: the mean of the inputs kept by both filters, each clipped to norm med. If no
       input survives (only possible in degenerate cohorts) the output is zero: no update.

    The block is drawn from a generator seeded with `seed` that advances every round, so a run
    is reproducible. Differences from the authors' code: every input seeds mean shift (their
    `bin_seeding` depends on a grid), the bandwidth uses all inputs (theirs samples 50), and
    the clipping uses the same median as the filter (theirs takes the lower middle for even n).
    Not translation-equivariant: signs and norms are measured from the origin.
    """

    name = "signguard"

    def __init__(
        self,
        num_byzantine: int = 0,
        lower: float = 0.1,
        upper: float = 3.0,
        coordinate_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)
        if not 0 <= lower < 1 < upper:
            raise ValueError(f"needs 0 <= lower < 1 < upper, got lower={lower}, upper={upper}")
        if not 0 < coordinate_fraction <= 1:
            raise ValueError(f"coordinate_fraction must be in (0, 1], got {coordinate_fraction}")
        self.lower = float(lower)
        self.upper = float(upper)
        self.coordinate_fraction = float(coordinate_fraction)
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The block generator's state: a resumed run draws the blocks an uninterrupted one does."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        check_stack(updates, weights)
        (n, p), f = updates.shape, self.num_byzantine
        require(n > 2 * f, self.name, n, f, "n > 2f")
        norms = kernels.row_sq_norms(updates).sqrt().cpu()
        med = kernels.median_of(norms)
        by_norm = (norms > self.lower * med) & (norms < self.upper * med)

        width = max(1, int(self.coordinate_fraction * p))
        start = int(torch.randint(0, p - width + 1, (1,), generator=self.generator))
        labels = mean_shift_labels(sign_features(updates[:, start : start + width]).cpu())
        sizes = torch.bincount(labels[labels >= 0])
        # argmax takes the first of equal sizes, i.e. the densest mode; all orphans: none kept.
        by_sign = labels == int(sizes.argmax()) if len(sizes) else labels >= 0

        kept = by_norm & by_sign
        if not bool(kept.any()):
            return torch.zeros_like(updates[0])
        scale = torch.where(norms > med, med / norms.clamp_min(1e-300), torch.ones_like(norms))
        coefficients = torch.where(kept, scale, torch.zeros_like(scale)) / int(kept.sum())
        return kernels.combine(coefficients.to(updates.device), updates)
