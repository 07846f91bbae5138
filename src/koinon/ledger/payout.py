"""Payouts: the owner's escrowed budget split by contribution, a deterministic function of the log.

Rules, in order (all integer arithmetic, so anyone recomputes the same cents from the log):

1. A detected attacker is paid nothing: a client that the server rejected, or the robust rule
   dropped, in at least `detect_fraction` of the rounds it was sampled in (the log's
   `aggregate` entries say who and why).
2. A client whose total score is not positive is paid nothing.
3. Minimum quality: a client whose total is below `min_quality` times the mean of the positive
   totals (of clients not excluded by 1) is paid nothing.
4. The budget (integer cents) is split in proportion to the remaining totals by the largest
   remainder method (Hamilton): each gets floor(budget x score / sum), then the cents left go one
   each to the largest remainders, ties to the lower client id. The payouts sum exactly to the
   budget; when nobody qualifies the whole budget goes back to the owner (`refund`).

Fractions given as strings (`"0.1"`) are read exactly (`fractions.Fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction


@dataclass
class Payout:
    paid: dict[int, int]  # client -> cents
    reasons: dict[int, str] = field(default_factory=dict)  # client paid nothing -> why
    refund: int = 0  # cents back to the owner (nobody qualified)


def largest_remainder(budget: int, shares: dict[int, int]) -> dict[int, int]:
    """`budget` integer units split in proportion to positive integer `shares`, summing exactly."""
    total = sum(shares.values())
    if budget < 0 or total <= 0 or any(s <= 0 for s in shares.values()):
        raise ValueError("largest_remainder needs budget >= 0 and positive shares")
    base = {c: budget * s // total for c, s in shares.items()}
    left = budget - sum(base.values())
    by_remainder = sorted(shares, key=lambda c: (-(budget * shares[c] % total), c))
    for c in by_remainder[:left]:
        base[c] += 1
    return base


def split_budget(budget: int, totals: dict[int, int], flagged: dict[int, str],
                 min_quality: str = "0.1") -> Payout:
    """The payout of `budget` cents over clients with fixed-point `totals` (see module doc)."""
    quality = Fraction(min_quality)
    reasons = {c: f"detected attacker ({why})" for c, why in flagged.items() if c in totals}
    for c, s in totals.items():
        if c not in reasons and s <= 0:
            reasons[c] = "no positive contribution"
    positive = [s for c, s in totals.items() if c not in reasons]
    if positive:
        floor = quality * Fraction(sum(positive), len(positive))
        for c, s in totals.items():
            if c not in reasons and s < floor:
                reasons[c] = f"below the minimum quality ({min_quality} x the mean positive score)"
    eligible = {c: s for c, s in totals.items() if c not in reasons}
    paid = dict.fromkeys(totals, 0)
    if not eligible:
        return Payout(paid, reasons, refund=budget)
    paid.update(largest_remainder(budget, eligible))
    return Payout(paid, reasons)
