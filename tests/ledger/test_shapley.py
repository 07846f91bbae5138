"""Shapley estimators on small games whose exact values are known or computable."""

from __future__ import annotations

import numpy as np
import pytest

from koinon.ledger.shapley import (
    Budget,
    CachedGame,
    exact_shapley,
    leave_one_out,
    permutation_shapley,
)


class TableGame:
    """v(S) from a function of the membership mask."""

    def __init__(self, n, fn):
        self.num_players, self.fn = n, fn

    def values(self, masks):
        return np.array([self.fn(np.asarray(m, bool)) for m in masks], dtype=np.float64)


def random_game(n, seed):
    table = np.random.default_rng(seed).normal(size=1 << n)
    table[0] = 0.0
    return TableGame(n, lambda m: table[int((m.astype(int) << np.arange(n)).sum())])


def test_glove_game_by_hand():
    # Player 0 holds a left glove, players 1 and 2 right gloves; a pair is worth 1.
    game = TableGame(3, lambda m: float(m[0] and (m[1] or m[2])))
    np.testing.assert_allclose(exact_shapley(game).values, [2 / 3, 1 / 6, 1 / 6])


def test_efficiency():
    game = random_game(5, 1)
    phi = exact_shapley(game).values
    v = game.values(np.array([np.zeros(5, bool), np.ones(5, bool)]))
    assert phi.sum() == pytest.approx(v[1] - v[0])


def test_symmetry_and_null_player():
    # Players 0 and 1 are interchangeable; player 3 changes nothing.
    game = TableGame(4, lambda m: (m[0] + m[1] + 2 * m[2]) ** 1.5)
    phi = exact_shapley(game).values
    assert phi[0] == pytest.approx(phi[1])
    assert phi[3] == 0.0
    assert phi[2] > phi[0] > 0


def test_additivity():
    g1, g2 = random_game(4, 2), random_game(4, 3)
    both = TableGame(4, lambda m: g1.values(m[None])[0] + g2.values(m[None])[0])
    np.testing.assert_allclose(exact_shapley(both).values,
                               exact_shapley(g1).values + exact_shapley(g2).values, atol=1e-12)


def test_additive_game_gives_each_its_own_value():
    a = np.array([0.5, -1.0, 2.0, 0.0, 3.0])
    game = TableGame(5, lambda m: float(a[m].sum()))
    np.testing.assert_allclose(exact_shapley(game).values, a, atol=1e-12)
    np.testing.assert_allclose(leave_one_out(game).values, a, atol=1e-12)
    est = permutation_shapley(game, np.random.default_rng(0), guided=True, budget=Budget(max_permutations=10))
    np.testing.assert_allclose(est.values, a, atol=1e-12)  # every marginal is exact
    np.testing.assert_allclose(est.stderr, 0, atol=1e-9)


def test_duplicates_have_zero_leave_one_out():
    game = TableGame(3, lambda m: float(m[0] or m[1]) + 0.5 * m[2])
    loo = leave_one_out(game).values
    assert loo[0] == loo[1] == 0.0
    assert exact_shapley(game).values[0] == pytest.approx(0.5)


@pytest.mark.parametrize("guided", [False, True])
def test_sampling_within_error_bound_of_exact_on_six_players(guided):
    weights = np.array([3.0, 1.0, 1.0, 0.0, 2.0, -1.0])
    game = TableGame(6, lambda m: np.sqrt(max(weights[m].sum(), 0.0)) + 0.3 * (m[0] and m[4]))
    exact = exact_shapley(game).values
    est = permutation_shapley(game, np.random.default_rng(5), guided=guided,
                              budget=Budget(max_permutations=600))
    assert est.permutations == 600
    assert est.stderr[3] == 0 and est.stderr[[0, 1, 2, 4, 5]].min() > 0  # player 3 is null
    assert np.all(np.abs(est.values - exact) <= 4 * est.stderr + 1e-9), (est.values, exact, est.stderr)
    assert np.abs(est.values - exact).max() < 0.05


def test_truncation_saves_evaluations_and_round_skip():
    game = TableGame(8, lambda m: min(float(m.sum()), 3.0))  # saturates after 3 players
    full = permutation_shapley(game, np.random.default_rng(0), guided=True, budget=Budget(max_permutations=40))
    cut = permutation_shapley(game, np.random.default_rng(0), guided=True, tolerance=0.01,
                              budget=Budget(max_permutations=40), chunk=1)
    assert cut.evaluations < full.evaluations
    assert cut.values.sum() == pytest.approx(3.0)  # efficiency survives truncation here
    flat = TableGame(4, lambda m: 1.0)
    skipped = permutation_shapley(flat, np.random.default_rng(0), guided=True, round_tolerance=1e-3)
    assert skipped.skipped and not skipped.values.any()


def test_budget_by_evaluations_and_convergence_stop():
    game = random_game(7, 4)
    est = permutation_shapley(game, np.random.default_rng(0), guided=False, budget=Budget(evaluations=50))
    assert 50 <= est.evaluations < 50 + 7
    a = np.arange(7.0)
    additive = TableGame(7, lambda m: float(a[m].sum()))
    conv = permutation_shapley(additive, np.random.default_rng(0), guided=True, convergence=0.01,
                               budget=Budget(max_permutations=10_000))
    assert conv.permutations == 14  # stops after the second cycle: nothing changed


def test_replay_with_logged_permutations_is_identical():
    game = random_game(6, 7)
    a = permutation_shapley(game, np.random.default_rng(3), guided=True, tolerance=0.05,
                            budget=Budget(seconds=0.05))
    b = permutation_shapley(game, np.random.default_rng(3), guided=True, tolerance=0.05,
                            budget=Budget(max_permutations=a.permutations))
    np.testing.assert_array_equal(a.values, b.values)


def test_cache_counts_distinct_coalitions():
    cached = CachedGame(random_game(3, 0))
    cached.values(np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]], bool))
    cached.values(np.array([[0, 1, 0]], bool))
    assert cached.evaluations == 2


def test_exact_refuses_huge_games():
    with pytest.raises(ValueError, match="too many"):
        exact_shapley(TableGame(25, lambda m: 0.0))
