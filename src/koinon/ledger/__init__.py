"""Fair rewards for the clients who bring the data: contribution scores, a verifiable round log
and payouts (`[ledger]` in a config; `koinon verify RUN`).

- `shapley`: exact, leave-one-out, TMC and GTG Shapley estimators over a game, with budgets
  and standard errors; `contribution`: the registered methods (`CONTRIBUTIONS`) and the round
  game (coalition models rebuilt from stored updates, utility on the owner's validation set);
  `classwise`: ShapFed-style class-wise scores from the output layer.
- `merkle`: the RFC 6962 tree and proofs; `roundlog`: canonical entries, Ed25519-signed heads.
- `payout`: the escrowed budget split by score (largest remainder, exact to the cent).
- `ledger`: the server's observer that ties them together; `verify`: the replay.
"""

from koinon.ledger import classwise as _classwise  # noqa: F401  (registers shapfed)
from koinon.ledger.contribution import CONTRIBUTIONS, ContributionMethod, RoundUpdates, Validation
from koinon.ledger.ledger import Ledger, LedgerSettings, attach, attach_ledger, checked_settings
from koinon.ledger.payout import Payout, split_budget
from koinon.ledger.shapley import (
    Budget,
    Estimate,
    exact_shapley,
    leave_one_out,
    permutation_shapley,
)

__all__ = [
    "CONTRIBUTIONS",
    "Budget",
    "ContributionMethod",
    "Estimate",
    "Ledger",
    "LedgerSettings",
    "Payout",
    "RoundUpdates",
    "Validation",
    "attach",
    "attach_ledger",
    "checked_settings",
    "exact_shapley",
    "leave_one_out",
    "permutation_shapley",
    "split_budget",
]
