"""Model-poisoning attacks: the Byzantine rows of the cohort's update stack are forged.

All of them are omniscient, as in the literature: they read the honest rows of the round (the
simulation hands them the stack; honest clients never see the attacker). Every Byzantine row of
a round receives the same forged vector, which is what the papers do and what hurts
distance-based rules most. When the cohort holds no honest row, `honest_rows` falls back to the
whole stack, so every attack still returns a finite stack of the same shape. Randomness comes
only from `context.generator`, so a round is reproducible from the seed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from statistics import NormalDist

import torch

from koinon.attacks.base import ATTACKS, AttackContext, ModelAttack, honest_rows

_PERTURBATIONS = ("unit_vec", "std", "sign")


def _std(rows: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise sample standard deviation (ddof = 1, as ByzFL); zero for one row."""
    if len(rows) < 2:
        return torch.zeros_like(rows[0])
    return rows.std(dim=0, correction=1)


def _replace(updates: torch.Tensor, byzantine: torch.Tensor, forged: torch.Tensor) -> torch.Tensor:
    out = updates.clone()
    out[byzantine] = forged.to(updates.dtype)
    return out


@ATTACKS.register("gaussian")
class GaussianNoise(ModelAttack):
    """Byzantine clients send Gaussian noise N(mean, std^2) per coordinate (Blanchard et al. 2017).

    The baseline "Gaussian attack" of Krum's paper, https://arxiv.org/abs/1703.02757 (each
    Byzantine row draws its own noise).
    """

    name = "gaussian"

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if not std >= 0 or not math.isfinite(std) or not math.isfinite(mean):
            raise ValueError(f"attack.std must be finite and >= 0 and mean finite, got {std}, {mean}")
        self.mean = float(mean)
        self.std = float(std)

    def forge(self, updates: torch.Tensor, byzantine: torch.Tensor, context: AttackContext) -> torch.Tensor:
        shape = (int(byzantine.sum()), updates.shape[1])
        noise = torch.randn(shape, generator=context.generator, dtype=torch.float32)
        return _replace(updates, byzantine, self.mean + self.std * noise)


def alie_z(num_clients: int, num_byzantine: int) -> float:
    """Baruch et al.'s z_max: s = floor(n/2 + 1) - f supporters needed, z = Phi^-1((n - s) / n).

    With a Byzantine majority (s <= 0) the formula leaves its domain; we take s = 1, the largest
    z that still keeps one honest supporter.
    """
    n, f = num_clients, num_byzantine
    s = max(math.floor(n / 2 + 1) - f, 1)
    return NormalDist().inv_cdf((n - s) / n) if n > s else 0.0


@ATTACKS.register("alie")
class ALittleIsEnough(ModelAttack):
    """ALIE (Baruch et al. 2019): send mean - z * std of the honest updates, coordinate-wise.

    "A Little Is Enough: Circumventing Defenses For Distributed Learning" (NeurIPS 2019),
    https://arxiv.org/abs/1902.06156. z = 0 (the default) means the paper's z_max for the
    cohort's n and f (see `alie_z`); any other value is used as is.
    """

    name = "alie"

    def __init__(self, z: float = 0.0) -> None:
        if not math.isfinite(z) or z < 0:
            raise ValueError(f"attack.z must be finite and >= 0 (0 = the paper's formula), got {z}")
        self.z = float(z)

    def forge(self, updates: torch.Tensor, byzantine: torch.Tensor, context: AttackContext) -> torch.Tensor:
        honest = honest_rows(updates, byzantine)
        z = self.z or alie_z(len(updates), int(byzantine.sum()))
        return _replace(updates, byzantine, honest.mean(dim=0) - z * _std(honest))


@ATTACKS.register("ipm")
class InnerProductManipulation(ModelAttack):
    """IPM (Xie et al. 2020): send -epsilon times the mean of the honest updates.

    "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product Manipulation" (UAI
    2020), https://arxiv.org/abs/1903.03936. The default epsilon = 0.1 is the paper's choice
    against median and Krum (a small epsilon hides among the honest inputs).
    """

    name = "ipm"

    def __init__(self, epsilon: float = 0.1) -> None:
        if not math.isfinite(epsilon) or epsilon <= 0:
            raise ValueError(f"attack.epsilon must be finite and > 0, got {epsilon}")
        self.epsilon = float(epsilon)

    def forge(self, updates: torch.Tensor, byzantine: torch.Tensor, context: AttackContext) -> torch.Tensor:
        honest = honest_rows(updates, byzantine)
        return _replace(updates, byzantine, -self.epsilon * honest.mean(dim=0))


def _perturbation(honest: torch.Tensor, kind: str) -> torch.Tensor:
    mean = honest.mean(dim=0)
    if kind == "unit_vec":
        norm = mean.norm()
        return -mean / norm if norm > 0 else torch.zeros_like(mean)
    if kind == "std":
        return -_std(honest)
    return -mean.sign()


def _check_perturbation(perturbation: str) -> str:
    if perturbation not in _PERTURBATIONS:
        raise ValueError(f"attack.perturbation must be one of {', '.join(_PERTURBATIONS)}, got {perturbation!r}")
    return perturbation


def max_gamma(honest: torch.Tensor, direction: torch.Tensor, objective: str) -> float:
    """The largest gamma >= 0 with m = mean + gamma * direction inside Shejwalkar's constraint.

    min-max: max_i ||m - x_i||^2 <= max_{i,j} ||x_i - x_j||^2.
    min-sum: sum_i ||m - x_i||^2 <= max_i sum_j ||x_i - x_j||^2.
    The paper finds gamma by binary search; both constraints are quadratics in gamma
    (||m - x_i||^2 = a_i + 2 gamma b_i + gamma^2 c) satisfied at gamma = 0 (the mean lies in
    the hull, and minimizes the sum), so the feasible set is an interval [0, gamma*] and we
    take its end in closed form: the exact limit of that search, in one pass.
    """
    x = honest.double()
    p = direction.double()
    c = float(p @ p)
    if len(x) < 2 or c == 0.0:
        return 0.0  # no spread to hide in, or no direction to move along
    d = x.mean(dim=0) - x  # [H, P]
    a = (d * d).sum(dim=1)
    b = d @ p
    pair = torch.cdist(x, x).square()
    if objective == "max":
        bound = float(pair.max())
        roots = (-b + (b * b + c * (bound - a)).clamp_min(0).sqrt()) / c
        return max(float(roots.min()), 0.0)
    bound = float(pair.sum(dim=1).max())
    h = len(x)
    bs, excess = float(b.sum()), bound - float(a.sum())  # bs is 0 up to rounding
    return max((-bs + math.sqrt(max(bs * bs + h * c * excess, 0.0))) / (h * c), 0.0)


class _MinDistance(ModelAttack):
    objective = "max"

    def __init__(self, perturbation: str = "unit_vec") -> None:
        self.perturbation = _check_perturbation(perturbation)

    def forge(self, updates: torch.Tensor, byzantine: torch.Tensor, context: AttackContext) -> torch.Tensor:
        honest = honest_rows(updates, byzantine)
        direction = _perturbation(honest, self.perturbation)
        gamma = max_gamma(honest, direction, self.objective)
        return _replace(updates, byzantine, honest.mean(dim=0) + gamma * direction)


@ATTACKS.register("min_max")
class MinMax(_MinDistance):
    """Min-max (Shejwalkar & Houmansadr 2021): mean + gamma * p, as far as the honest max distance allows.

    "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses for Federated
    Learning" (NDSS 2021), https://www.ndss-symposium.org/ndss-paper/manipulating-the-byzantine-
    optimizing-model-poisoning-attacks-and-defenses-for-federated-learning/. The perturbation p
    is the unit vector of -mean (`unit_vec`), -std or -sign(mean); gamma is the largest value
    whose maximum distance to an honest update stays within the largest honest pairwise distance
    (see `max_gamma`).
    """

    name = "min_max"
    objective = "max"


@ATTACKS.register("min_sum")
class MinSum(_MinDistance):
    """Min-sum (Shejwalkar & Houmansadr 2021): mean + gamma * p within the honest sum of squared distances.

    Same paper and perturbations as `min_max`; gamma is the largest value whose sum of squared
    distances to the honest updates stays within the largest such sum of an honest update.
    """

    name = "min_sum"
    objective = "sum"


@ATTACKS.register("mimic")
class Mimic(ModelAttack):
    """Mimic (Karimireddy, He & Jaggi 2022): every Byzantine client copies one honest client's update.

    "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing" (ICLR 2022),
    https://arxiv.org/abs/2006.09365. Over-representing one honest client hurts under non-IID
    data without ever looking abnormal. The paper picks the client along the honest updates' top
    variance direction; cohorts change every round here, so the mimicked client is drawn each
    round from the honest rows with `context.generator`.
    """

    name = "mimic"

    def forge(self, updates: torch.Tensor, byzantine: torch.Tensor, context: AttackContext) -> torch.Tensor:
        honest = honest_rows(updates, byzantine)
        pick = int(torch.randint(len(honest), (1,), generator=context.generator))
        return _replace(updates, byzantine, honest[pick])


@ATTACKS.register("optimal")
class Optimal(ModelAttack):
    """Adaptive ALIE/IPM: line-search the attack factor that pushes the aggregator in use farthest.

    Allouah et al., "Fixing by Mixing" (AISTATS 2023), https://arxiv.org/abs/2302.01772, and
    ByzFL's `LineMaximize`. Each round the attack forges x(t) = mean - t * std (`direction =
    "alie"`) or x(t) = -t * mean (`"ipm"`) from the honest rows, puts x(t) in every Byzantine
    row, runs a copy of `context.aggregator` on that stack with the round's weights, and
    maximizes ||aggregate - weighted honest mean|| over t >= 0 within `evaluations`
    aggregations: from `start`, step `delta`, doubling the step while the objective improves,
    then probing around the best t with the step shrunk by `ratio` each time. The copy keeps
    a stateful rule (centered clipping) from seeing trial stacks.
    """

    name = "optimal"

    def __init__(
        self, direction: str = "alie", evaluations: int = 16, start: float = 0.0,
        delta: float = 1.0, ratio: float = 0.8,
    ) -> None:
        if direction not in ("alie", "ipm"):
            raise ValueError(f"attack.direction must be 'alie' or 'ipm', got {direction!r}")
        if evaluations < 1 or start < 0 or delta <= 0 or not 0.5 < ratio < 1:
            raise ValueError(
                "attack needs evaluations >= 1, start >= 0, delta > 0 and 0.5 < ratio < 1, "
                f"got {evaluations}, {start}, {delta}, {ratio}"
            )
        self.direction = direction
        self.evaluations = evaluations
        self.start = float(start)
        self.delta = float(delta)
        self.ratio = float(ratio)
        self.last_factor = self.start  # the factor chosen in the latest round, for inspection

    def candidate(self, honest: torch.Tensor, factor: float) -> torch.Tensor:
        mean = honest.mean(dim=0)
        return mean - factor * _std(honest) if self.direction == "alie" else -factor * mean

    def forge(self, updates: torch.Tensor, byzantine: torch.Tensor, context: AttackContext) -> torch.Tensor:
        honest_mask = ~byzantine if bool((~byzantine).any()) else torch.ones_like(byzantine)
        honest = updates[honest_mask]
        w = context.weights[honest_mask].double()
        target = (w @ honest.double()) / w.sum() if w.sum() > 0 else honest.double().mean(dim=0)

        def damage(factor: float) -> float:
            stack = _replace(updates, byzantine, self.candidate(honest, factor))
            out = copy.deepcopy(context.aggregator).aggregate(stack, context.weights)
            return float((out.double() - target).norm())

        factor = self.line_maximize(damage)
        self.last_factor = factor
        return _replace(updates, byzantine, self.candidate(honest, factor))

    def line_maximize(self, objective: Callable[[float], float]) -> float:
        """ByzFL's LineMaximize: best-effort argmax over t >= 0 with `evaluations` calls."""
        left = self.evaluations
        delta = self.delta
        best_x, best_y = self.start, objective(self.start)
        left -= 1
        probe = best_x
        while left > 0:  # expansion: double the step while it helps
            probe = best_x + delta
            y = objective(probe)
            left -= 1
            if y > best_y:
                best_x, best_y = probe, y
                delta *= 2
            else:
                delta *= self.ratio
                break
        while left > 0:  # contraction: probe on the other side of the best, shrinking the step
            if probe < best_x:
                probe += delta
            else:
                probe = probe - delta if probe >= delta else probe / 2  # stay in t >= 0
            y = objective(probe)
            left -= 1
            if y > best_y:
                best_x, best_y = probe, y
            delta *= self.ratio
        return best_x
