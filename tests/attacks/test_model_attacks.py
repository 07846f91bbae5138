"""Model-poisoning attacks against hand-checked cases and their papers' definitions."""

import math

import pytest
import torch

from koinon.aggregate import AGGREGATORS
from koinon.attacks import ATTACKS, AttackContext
from koinon.attacks.model import Optimal, alie_z, max_gamma

# Three honest 2-D rows: mean [3, 1]; sample std (ddof 1): column 0 is 1, 3, 5 -> 2,
# column 1 is 0, 0, 3 -> deviations -1, -1, 2 -> sqrt(6 / 2) = sqrt(3).
HONEST = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 3.0]])
MEAN = torch.tensor([3.0, 1.0])
STD = torch.tensor([2.0, math.sqrt(3.0)])


def stack_with_byzantine(honest: torch.Tensor, num_byzantine: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byzantine rows first, filled with junk the attack must overwrite."""
    junk = torch.full((num_byzantine, honest.shape[1]), 1e3)
    mask = torch.tensor([True] * num_byzantine + [False] * len(honest))
    return torch.cat([junk, honest]), mask


def context(n: int, seed: int = 0, aggregator=None) -> AttackContext:
    return AttackContext(
        round_index=0, global_params=torch.zeros(1), weights=torch.ones(n),
        aggregator=aggregator or AGGREGATORS.build("mean", {}, "aggregator"),
        generator=torch.Generator().manual_seed(seed),
    )


def forge(name: str, honest: torch.Tensor, num_byzantine: int, seed: int = 0, aggregator=None, **options):
    updates, mask = stack_with_byzantine(honest, num_byzantine)
    out = ATTACKS.build(name, options, "attack").forge(updates, mask, context(len(updates), seed, aggregator))
    assert torch.equal(out[~mask], honest), "an attack must never touch honest rows"
    return out[mask]


MODEL_ATTACKS = ["alie", "gaussian", "ipm", "mimic", "min_max", "min_sum", "optimal", "sign_flip"]


def test_alie_with_given_z_is_mean_minus_z_std():
    rows = forge("alie", HONEST, 2, z=1.5)
    assert torch.allclose(rows, (MEAN - 1.5 * STD).expand(2, 2))


def test_alie_default_z_follows_the_paper():
    # n = 5, f = 2: s = floor(5/2 + 1) - 2 = 1, z = Phi^-1((5 - 1) / 5) = Phi^-1(0.8) = 0.841621.
    assert alie_z(5, 2) == pytest.approx(0.8416212, abs=1e-6)
    # n = 50, f = 12: s = 26 - 12 = 14, z = Phi^-1(36 / 50) = Phi^-1(0.72) = 0.582842.
    assert alie_z(50, 12) == pytest.approx(0.5828415, abs=1e-6)
    rows = forge("alie", HONEST, 2)
    assert torch.allclose(rows, (MEAN - 0.8416212 * STD).expand(2, 2), atol=1e-5)


def test_ipm_is_minus_epsilon_mean():
    rows = forge("ipm", HONEST, 3, epsilon=0.5)
    assert torch.allclose(rows, torch.tensor([-1.5, -0.5]).expand(3, 2))


def test_gaussian_has_the_requested_moments_and_is_seeded():
    honest = torch.zeros(4, 20_000)
    rows = forge("gaussian", honest, 2, seed=1, mean=0.5, std=2.0)
    assert rows.mean().item() == pytest.approx(0.5, abs=0.03)  # std error 2 / sqrt(40k) = 0.01
    assert rows.std().item() == pytest.approx(2.0, abs=0.03)
    assert not torch.equal(rows[0], rows[1])  # each Byzantine row draws its own noise
    assert torch.equal(rows, forge("gaussian", honest, 2, seed=1, mean=0.5, std=2.0))


def test_min_max_and_min_sum_on_a_hand_case():
    # Honest [0, 0] and [2, 0]: mean [1, 0], p = -mean / |mean| = [-1, 0], m = [1 - g, 0].
    # min-max: |m - [2, 0]| = 1 + g <= max pairwise distance 2 -> g = 1.
    # min-sum: (1 - g)^2 + (1 + g)^2 = 2 + 2 g^2 <= max_i sum_j d_ij^2 = 4 -> g = 1.
    honest = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    for name in ("min_max", "min_sum"):
        assert torch.allclose(forge(name, honest, 1), torch.zeros(1, 2), atol=1e-6)


def bisection_gamma(honest: torch.Tensor, direction: torch.Tensor, objective: str) -> float:
    """The paper's search (Shejwalkar & Houmansadr, Algorithm 1), as a plain bisection."""
    x, p = honest.double(), direction.double()
    mean = x.mean(dim=0)
    pair = torch.cdist(x, x)

    def ok(g: float) -> bool:
        d = torch.cdist((mean + g * p)[None], x)[0]
        if objective == "max":
            return bool(d.max() <= pair.max())
        return bool(d.square().sum() <= pair.square().sum(dim=1).max())

    lo, hi = 0.0, 1.0
    while ok(hi):
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


@pytest.mark.parametrize("perturbation", ["unit_vec", "std", "sign"])
@pytest.mark.parametrize("name", ["min_max", "min_sum"])
def test_min_max_min_sum_sit_on_the_constraint_boundary(name, perturbation):
    honest = torch.randn(7, 50, generator=torch.Generator().manual_seed(3)) + 0.3
    forged = forge(name, honest, 3, perturbation=perturbation)
    assert torch.equal(forged[0], forged[1]) and torch.equal(forged[0], forged[2])
    x, m = honest.double(), forged[0].double()
    distances = torch.cdist(m[None], x)[0]
    pair = torch.cdist(x, x)
    if name == "min_max":
        used, bound = distances.max(), pair.max()
    else:
        used, bound = distances.square().sum(), pair.square().sum(dim=1).max()
    assert used <= bound * (1 + 1e-5)  # inside the constraint ...
    assert used >= bound * (1 - 1e-4)  # ... and at its boundary: gamma is as large as allowed
    # The closed form agrees with the paper's binary search.
    from koinon.attacks.model import _perturbation

    direction = _perturbation(honest, perturbation)
    objective = "max" if name == "min_max" else "sum"
    assert max_gamma(honest, direction, objective) == pytest.approx(
        bisection_gamma(honest, direction, objective), rel=1e-6
    )


def test_mimic_copies_one_honest_row_chosen_by_seed():
    honest = torch.arange(12.0).reshape(4, 3)
    picked = set()
    for seed in range(20):
        rows = forge("mimic", honest, 2, seed=seed)
        assert torch.equal(rows[0], rows[1])
        (match,) = [i for i in range(4) if torch.equal(rows[0], honest[i])]
        picked.add(match)
        assert torch.equal(rows, forge("mimic", honest, 2, seed=seed))
    assert picked == {0, 1, 2, 3}  # the seed, not a fixed index, chooses the victim


class DropFar:
    """A toy rule: average the rows of norm <= 5 (all rows if none), so the attacker's best
    IPM factor is exactly 5: larger factors are dropped, smaller ones do less harm."""

    name = "drop_far"

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        keep = updates.norm(dim=1) <= 5
        return updates[keep].mean(dim=0) if keep.any() else updates.mean(dim=0)


def test_optimal_searches_the_factor_against_the_aggregator():
    honest = torch.tensor([[1.0, 0.0]] * 4)
    attack = ATTACKS.build("optimal", {"direction": "ipm", "evaluations": 30}, "attack")
    updates, mask = stack_with_byzantine(honest, 2)
    out = attack.forge(updates, mask, context(6, aggregator=DropFar()))
    # Damage (2 (1 + t) / 6 for t <= 5) grows up to t = 5 and drops to 0 beyond it.
    assert 4.5 <= attack.last_factor <= 5.0
    assert torch.allclose(out[mask], torch.tensor([-attack.last_factor, 0.0]).expand(2, 2))
    # Against the plain mean the damage grows without bound: the expansion keeps doubling.
    attack.forge(updates, mask, context(6))
    assert attack.last_factor > 1000


def test_line_maximize_finds_a_smooth_maximum():
    attack = Optimal(evaluations=40)
    assert attack.line_maximize(lambda t: -((t - 4.2) ** 2)) == pytest.approx(4.2, abs=0.05)


def test_optimal_leaves_a_stateful_aggregator_untouched():
    rule = AGGREGATORS.build("centered_clipping", {"radius": 1.0}, "aggregator", num_byzantine=1)
    honest = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    updates, mask = stack_with_byzantine(honest, 1)
    ATTACKS.build("optimal", {}, "attack").forge(updates, mask, context(6, aggregator=rule))
    assert rule.center is None  # trial aggregations ran on copies


@pytest.mark.parametrize("name", MODEL_ATTACKS)
def test_deterministic_and_total_without_honest_rows(name):
    honest = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(forge(name, honest, 3, seed=7), forge(name, honest, 3, seed=7))
    for stack in (honest, honest[:1]):  # every row Byzantine; a single row
        mask = torch.ones(len(stack), dtype=torch.bool)
        out = ATTACKS.build(name, {}, "attack").forge(stack, mask, context(len(stack)))
        assert out.shape == stack.shape and torch.isfinite(out).all()


def test_sign_flip_flips_each_attackers_own_update_or_the_honest_mean():
    updates = torch.tensor([[1.0, -2.0], [4.0, 0.0], *HONEST.tolist()])
    mask = torch.tensor([True, True, False, False, False])
    own = ATTACKS.build("sign_flip", {"scale": 2.0}, "attack").forge(updates, mask, context(5))
    assert torch.equal(own[:2], torch.tensor([[-2.0, 4.0], [-8.0, 0.0]]))
    byzfl = ATTACKS.build("sign_flip", {"of": "honest_mean"}, "attack").forge(updates, mask, context(5))
    assert torch.equal(byzfl[:2], (-MEAN).expand(2, 2))
    assert torch.equal(byzfl[2:], HONEST)
    with pytest.raises(ValueError, match="attack.of"):
        ATTACKS.get("sign_flip")(of="mean")
