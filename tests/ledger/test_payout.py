"""Payouts: exact sums, the rounding rule by hand, thresholds and penalties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koinon.ledger.payout import largest_remainder, split_budget


def test_largest_remainder_by_hand():
    # 100 cents over 1:1:1 -> 33.33 each; one cent left goes to the lowest id on a tie.
    assert largest_remainder(100, {5: 1, 2: 1, 9: 1}) == {5: 33, 2: 34, 9: 33}
    # 10 cents over 7:2:1 -> 7, 2, 1 exactly; 11 over 7:2:1 -> 7.7, 2.2, 1.1 -> +1 to the first.
    assert largest_remainder(10, {0: 7, 1: 2, 2: 1}) == {0: 7, 1: 2, 2: 1}
    assert largest_remainder(11, {0: 7, 1: 2, 2: 1}) == {0: 8, 1: 2, 2: 1}


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**9), st.dictionaries(st.integers(0, 60), st.integers(-10**6, 10**12), min_size=1),
       st.sets(st.integers(0, 60)), st.sampled_from(["0", "0.1", "0.5", "1"]))
def test_payouts_sum_exactly_to_the_budget(budget, totals, flagged, quality):
    p = split_budget(budget, totals, {c: "rejected" for c in flagged}, quality)
    assert sum(p.paid.values()) + p.refund == budget
    assert all(v >= 0 for v in p.paid.values())
    for c in totals:
        if c in flagged or totals[c] <= 0:
            assert p.paid[c] == 0
    # More score never means fewer cents (monotone in the score, up to the one rounding cent).
    paid = sorted((totals[c], p.paid[c]) for c in totals if c not in p.reasons)
    assert all(b[1] >= a[1] - 1 for a, b in zip(paid, paid[1:]))


def test_thresholds_and_attackers():
    totals = {0: 1000, 1: 900, 2: 50, 3: -20, 4: 0, 5: 2000}
    p = split_budget(10_000, totals, {5: "dropped by multi_krum in 3 of 3 rounds"}, "0.1")
    assert p.paid[5] == 0 and "attacker" in p.reasons[5]
    assert p.paid[3] == p.paid[4] == 0
    assert p.paid[2] == 0 and "minimum quality" in p.reasons[2]  # 50 < 0.1 * mean(1000, 900, 50)
    assert p.paid[0] + p.paid[1] == 10_000 and p.paid[0] == 5263
    nobody = split_budget(500, {0: -1, 1: 0}, {})
    assert nobody.refund == 500 and not any(nobody.paid.values())


def test_refuses_non_positive_shares():
    with pytest.raises(ValueError):
        largest_remainder(10, {0: 0})
